"""``vqav2``: ``v2_OpenEnded_mscoco_{split}_questions.json`` + ``v2_mscoco_{split}_annotations.json``.

Give both files (in either order: the one holding ``annotations`` is the annotations). Each
question becomes a ``vqa`` sample whose answer is the annotation's ``multiple_choice_answer``
(the most common of the ten human answers, as VQAv2 publishes it). Images are COCO's:
``COCO_{data_subtype}_{image_id:012d}.jpg`` under ``--images``, ``data_subtype`` read from the
questions file (``train2014``, ``val2014``). The train annotations run to ~330 MB: both files are
streamed (ijson), and only question id -> answer is kept.
"""

from __future__ import annotations

from pathlib import Path

from qvl.formats.boxes import AnnotationError
from qvl.formats.importers import Importer, LayoutFileError, Options, Yield


def _kind(path: Path) -> str | None:
    """"questions" or "annotations": the first of those top-level keys (found before the big
    array it names, so only the head of the file is read)."""
    import ijson

    with open(path, "rb") as f:
        for prefix, event, value in ijson.parse(f):
            if prefix == "" and event == "map_key" and value in ("questions", "annotations"):
                return value
    return None


def read(files: list[Path], opts: Options) -> Yield:
    import ijson

    if len(files) != 2:
        raise LayoutFileError("--from vqav2 takes one questions file and one annotations file")
    try:
        kinds = {path: _kind(path) for path in files}
    except ijson.JSONError as e:
        raise LayoutFileError(f"--from vqav2: not JSON ({e})") from None
    answers_path = next((p for p, k in kinds.items() if k == "annotations"), None)
    questions_path = next((p for p, k in kinds.items() if k == "questions"), None)
    if answers_path is None or questions_path is None:
        raise LayoutFileError(f"--from vqav2: need a file with 'questions' and one with 'annotations' "
                              f"(got {', '.join(map(str, files))})")
    answers = {}
    with open(answers_path, "rb") as f:
        for ann in ijson.items(f, "annotations.item", use_float=True):
            if isinstance(ann, dict) and isinstance(ann.get("multiple_choice_answer"), str):
                answers[ann.get("question_id")] = ann["multiple_choice_answer"]
    with open(questions_path, "rb") as f:
        subtype = next((v for p, e, v in ijson.parse(f) if p == "data_subtype" and e == "string"), "train2014")
    with open(questions_path, "rb") as f:
        for i, q in enumerate(ijson.items(f, "questions.item", use_float=True)):
            if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not isinstance(q.get("image_id"), int):
                yield str(questions_path), i, AnnotationError(f"question {i}: needs question and image_id")
                continue
            answer = answers.get(q.get("question_id"))
            if answer is None:
                yield str(questions_path), i, AnnotationError(
                    f"question {q.get('question_id')}: no annotation with multiple_choice_answer in {answers_path}")
                continue
            yield str(questions_path), i, {"task": "vqa", "id": f"vqav2:{q['question_id']}",
                                           "image": f"COCO_{subtype}_{q['image_id']:012d}.jpg",
                                           "question": q["question"], "answer": answer, "source": "vqav2"}


IMPORTER = Importer("vqav2", ("vqa",), read, "questions JSON + annotations JSON")
