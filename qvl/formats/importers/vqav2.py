"""``vqav2``: ``v2_OpenEnded_mscoco_{split}_questions.json`` + ``v2_mscoco_{split}_annotations.json``.

Give both files (in either order: the one holding ``annotations`` is the annotations). Each
question becomes a ``vqa`` sample whose answer is the annotation's ``multiple_choice_answer``
(the most common of the ten human answers, as VQAv2 publishes it). Images are COCO's:
``COCO_{data_subtype}_{image_id:012d}.jpg`` under ``--images``, ``data_subtype`` read from the
questions file (``train2014``, ``val2014``). The train annotations run to ~330 MB: both files are
streamed (ijson), and only question id -> answer is kept.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from qvl.boundary import Count, Id
from qvl.errors import AnnotationError
from qvl.formats.importers import (
    Importer,
    LayoutFileError,
    Options,
    Yield,
    decode,
    events,
    stream,
)

SUBTYPE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # train2014, val2014, test-dev2015: part of every image's name


class Question(msgspec.Struct):
    question_id: Id
    image_id: Count
    question: str


class Answer(msgspec.Struct):
    question_id: Id
    multiple_choice_answer: str


EVENTS = {"start_map": "an object", "string": "a string", "number": "a number", "boolean": "true/false",
          "null": "null"}


def _kind(path: Path) -> str | None:
    """"questions" or "annotations": the first of those top-level keys (found before the big
    array it names, so only the head of the file is read). It must name a list: anything else
    would give no records, silently."""
    found = None
    for prefix, event, value in events(path):
        if found is not None:
            if event != "start_array":
                raise LayoutFileError(f"{path}: '{found}' must be a list of {found}, not {EVENTS.get(event, event)}")
            return found
        if prefix == "" and event == "map_key" and value in ("questions", "annotations"):
            found = value
    return None


def _answers(path: Path) -> dict:
    """question id -> its answer, or the AnnotationError of its annotation (its question is then
    rejected saying why)."""
    answers: dict = {}
    for i, raw in enumerate(stream(path, "annotations.item")):
        try:
            ann = decode(raw, Answer, f"annotation {i} of {path}")
        except AnnotationError as e:
            qid = raw.get("question_id") if isinstance(raw, dict) else None
            if isinstance(qid, int) and not isinstance(qid, bool):
                answers.setdefault(qid, e)
            continue
        answers[ann.question_id] = ann.multiple_choice_answer
    return answers


def read(files: list[Path], opts: Options) -> Yield:
    if len(files) != 2:
        raise LayoutFileError("--from vqav2 takes one questions file and one annotations file")
    kinds = {path: _kind(path) for path in files}
    answers_path = next((p for p, k in kinds.items() if k == "annotations"), None)
    questions_path = next((p for p, k in kinds.items() if k == "questions"), None)
    if answers_path is None or questions_path is None:
        raise LayoutFileError(f"--from vqav2: need a file with 'questions' and one with 'annotations' "
                              f"(got {', '.join(map(str, files))})")
    answers = _answers(answers_path)
    where = str(questions_path)
    subtype = next((v for p, e, v in events(questions_path) if p == "data_subtype"), "train2014")
    if not isinstance(subtype, str) or not SUBTYPE.fullmatch(subtype):
        raise LayoutFileError(f"{where}: data_subtype {subtype!r:.80} is not a split name like val2014")
    for i, raw in enumerate(stream(questions_path, "questions.item")):
        try:
            q = decode(raw, Question, f"question {i}")
            answer = answers.get(q.question_id)
            if answer is None:
                raise AnnotationError(f"question {q.question_id}: no annotation with multiple_choice_answer "
                                      f"in {answers_path}")
            if isinstance(answer, AnnotationError):
                raise AnnotationError(f"question {q.question_id}: {answer}", answer.reason)
        except AnnotationError as e:
            yield where, i, e
            continue
        yield where, i, {"task": "vqa", "id": f"vqav2:{q.question_id}",
                         "image": f"COCO_{subtype}_{q.image_id:012d}.jpg", "question": q.question,
                         "answer": answer, "source": "vqav2"}


IMPORTER = Importer("vqav2", ("vqa",), read, "questions JSON + annotations JSON")
