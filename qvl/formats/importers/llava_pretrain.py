"""``llava-pretrain``: LLaVA's pre-training captions (``blip_laion_cc_sbu_558k.json``) and
ShareGPT4V's caption files: a JSON list of ``{id, image, conversations: [human, gpt]}``.

Each record gives a ``caption`` sample: the image's path under ``--images`` and the ``gpt``
turn's text (the human turn is only an instruction with ``<image>``).
"""

from __future__ import annotations

from pathlib import Path

from qvl.formats.boxes import AnnotationError
from qvl.formats.importers import Importer, LayoutFileError, Options, Yield


def read(files: list[Path], opts: Options) -> Yield:
    import ijson

    for path in files:
        try:
            with open(path, "rb") as f:
                for i, record in enumerate(ijson.items(f, "item", use_float=True)):
                    turns = record.get("conversations") if isinstance(record, dict) else None
                    answer = next((t.get("value") for t in turns or [] if isinstance(t, dict)
                                   and t.get("from") in ("gpt", "assistant")), None)
                    if not isinstance(record, dict) or not isinstance(record.get("image"), str) \
                            or not isinstance(answer, str) or not answer.strip():
                        yield str(path), i, AnnotationError(f"record {i}: needs image and a gpt turn")
                        continue
                    yield str(path), i, {"task": "caption", "id": f"llava:{record.get('id', i)}",
                                         "image": record["image"], "caption": answer.strip(), "lang": "en",
                                         "source": "llava-pretrain"}
        except ijson.JSONError as e:
            raise LayoutFileError(f"{path}: not a JSON list of LLaVA records ({e})") from None


IMPORTER = Importer("llava-pretrain", ("caption",), read, "LLaVA / ShareGPT4V caption JSON")
