"""``gqa``: GQA's ``{train,val,testdev}_balanced_questions.json`` (a dict by question id).

Each question becomes a ``vqa`` sample with its short ``answer`` (not ``fullAnswer``); the
image is ``{imageId}.jpg`` under ``--images``. The files run to hundreds of MB: read as a
stream (ijson), memory flat.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from qvl.errors import AnnotationError
from qvl.formats.importers import Importer, Options, Yield, decode, stream


class Question(msgspec.Struct):
    question: str
    answer: str
    imageId: str


def read(files: list[Path], opts: Options) -> Yield:
    for path in files:
        for i, (qid, raw) in enumerate(stream(path, "", pairs=True)):
            try:
                q = decode(raw, Question, f"question {qid!r:.60}")
            except AnnotationError as e:
                yield str(path), i, e
                continue
            yield str(path), i, {"task": "vqa", "id": f"gqa:{qid}", "image": f"{q.imageId}.jpg",
                                 "question": q.question, "answer": q.answer, "source": "gqa"}


IMPORTER = Importer("gqa", ("vqa",), read, "*_balanced_questions.json")
