"""``textvqa``: ``TextVQA_0.5.1_{train,val}.json`` (``data``: question_id, image_id, question, answers).

Each question becomes a ``vqa`` sample whose answer is the most frequent of its ten human
answers (ties: the one given first); the image is ``{image_id}.jpg`` under ``--images``
(TextVQA's ``train_images/``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from qvl.formats.boxes import AnnotationError
from qvl.formats.importers import Importer, LayoutFileError, Options, Yield, load_json


def most_frequent(answers: list[str]) -> str:
    counts = Counter(answers)
    best = max(counts.values())
    return next(a for a in answers if counts[a] == best)


def read(files: list[Path], opts: Options) -> Yield:
    for path in files:
        data = load_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise LayoutFileError(f"{path}: a TextVQA file holds a 'data' list")
        for i, q in enumerate(data["data"]):
            answers = q.get("answers") if isinstance(q, dict) else None
            if not (isinstance(q, dict) and isinstance(q.get("question"), str) and isinstance(q.get("image_id"), str)
                    and isinstance(answers, list) and answers and all(isinstance(a, str) for a in answers)):
                yield str(path), i, AnnotationError(f"record {i}: needs question, image_id and answers")
                continue
            yield str(path), i, {"task": "vqa", "id": f"textvqa:{q.get('question_id', i)}",
                                 "image": f"{q['image_id']}.jpg", "question": q["question"],
                                 "answer": most_frequent(answers), "source": "textvqa"}


IMPORTER = Importer("textvqa", ("vqa",), read, "TextVQA_0.5.1_*.json")
