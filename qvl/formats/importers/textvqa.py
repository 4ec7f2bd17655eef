"""``textvqa``: ``TextVQA_0.5.1_{train,val}.json`` (``data``: question_id, image_id, question, answers).

Each question becomes a ``vqa`` sample whose answer is the most frequent of its ten human
answers (ties: the one given first); the image is ``{image_id}.jpg`` under ``--images``
(TextVQA's ``train_images/``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Annotated

import msgspec

from qvl.boundary import MAX_ITEMS, Id
from qvl.errors import AnnotationError
from qvl.formats.importers import (
    Importer,
    LayoutFileError,
    Options,
    Yield,
    decode,
    load_json,
)


class Question(msgspec.Struct):
    question: str
    image_id: str
    answers: Annotated[list[str], msgspec.Meta(min_length=1, max_length=MAX_ITEMS)]
    question_id: Id | None = None


def most_frequent(answers: list[str]) -> str:
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def read(files: list[Path], opts: Options) -> Yield:
    for path in files:
        data = load_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise LayoutFileError(f"{path}: a TextVQA file holds a 'data' list")
        for i, raw in enumerate(data["data"]):
            try:
                q = decode(raw, Question, f"record {i}")
            except AnnotationError as e:
                yield str(path), i, e
                continue
            yield str(path), i, {"task": "vqa", "id": f"textvqa:{q.question_id if q.question_id is not None else i}",
                                 "image": f"{q.image_id}.jpg", "question": q.question,
                                 "answer": most_frequent(q.answers), "source": "textvqa"}


IMPORTER = Importer("textvqa", ("vqa",), read, "TextVQA_0.5.1_*.json")
