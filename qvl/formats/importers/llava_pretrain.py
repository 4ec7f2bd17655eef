"""``llava-pretrain``: LLaVA's pre-training captions (``blip_laion_cc_sbu_558k.json``) and
ShareGPT4V's caption files: a JSON list of ``{id, image, conversations: [human, gpt]}``.

Each record gives a ``caption`` sample: the image's path under ``--images`` and the ``gpt``
turn's text (the human turn is only an instruction with ``<image>``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec

from qvl.boundary import MAX_ITEMS, Id
from qvl.errors import AnnotationError
from qvl.formats.importers import Importer, Options, Yield, decode, stream


class Turn(msgspec.Struct):
    from_: str = msgspec.field(name="from")
    value: str = ""


class Record(msgspec.Struct):
    image: str
    conversations: Annotated[list[Turn], msgspec.Meta(max_length=MAX_ITEMS)]
    id: str | Id | None = None


def read(files: list[Path], opts: Options) -> Yield:
    for path in files:
        for i, raw in enumerate(stream(path, "item")):
            try:
                record = decode(raw, Record, f"record {i}")
                answer = next((t.value for t in record.conversations if t.from_ in ("gpt", "assistant")), "")
                if not answer.strip():
                    raise AnnotationError(f"record {i}: needs image and a gpt turn")
            except AnnotationError as e:
                yield str(path), i, e
                continue
            yield str(path), i, {"task": "caption", "id": f"llava:{record.id if record.id is not None else i}",
                                 "image": record.image, "caption": answer.strip(), "lang": "en",
                                 "source": "llava-pretrain"}


IMPORTER = Importer("llava-pretrain", ("caption",), read, "LLaVA / ShareGPT4V caption JSON")
