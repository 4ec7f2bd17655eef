"""``vqav2``: ``v2_OpenEnded_mscoco_{split}_questions.json`` + ``v2_mscoco_{split}_annotations.json``.

Give both files (in either order). Each question becomes a ``vqa`` sample whose answer is the
annotation's ``multiple_choice_answer`` (the most common of the ten human answers, as VQAv2
publishes it). Images are COCO's: ``COCO_{data_subtype}_{image_id:012d}.jpg`` under ``--images``,
``data_subtype`` read from the questions file (``train2014``, ``val2014``).
"""

from __future__ import annotations

from pathlib import Path

from qvl.formats.boxes import AnnotationError
from qvl.formats.importers import Importer, LayoutFileError, Options, Yield, load_json


def read(files: list[Path], opts: Options) -> Yield:
    loaded = {path: load_json(path) for path in files}
    questions = [p for p, d in loaded.items() if isinstance(d, dict) and "questions" in d]
    answers = [p for p, d in loaded.items() if isinstance(d, dict) and "annotations" in d]
    if len(questions) != 1 or len(answers) != 1:
        raise LayoutFileError("--from vqav2 takes one questions file and one annotations file "
                              f"(got {', '.join(map(str, files))})")
    q_path, a_path = questions[0], answers[0]
    by_id = {a.get("question_id"): a for a in loaded[a_path]["annotations"] if isinstance(a, dict)}
    subtype = loaded[q_path].get("data_subtype", "train2014")
    for i, q in enumerate(loaded[q_path]["questions"]):
        try:
            if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not isinstance(q.get("image_id"), int):
                raise AnnotationError(f"question {i}: needs question and image_id")
            ann = by_id.get(q.get("question_id"))
            if ann is None or not isinstance(ann.get("multiple_choice_answer"), str):
                raise AnnotationError(f"question {q.get('question_id')}: no annotation with multiple_choice_answer "
                                      f"in {a_path}")
            yield str(q_path), i, {"task": "vqa", "id": f"vqav2:{q['question_id']}",
                                   "image": f"COCO_{subtype}_{q['image_id']:012d}.jpg", "question": q["question"],
                                   "answer": ann["multiple_choice_answer"], "source": "vqav2"}
        except AnnotationError as e:
            yield str(q_path), i, e


IMPORTER = Importer("vqav2", ("vqa",), read, "questions JSON + annotations JSON")
