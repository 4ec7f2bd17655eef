"""``gqa``: GQA's ``{train,val,testdev}_balanced_questions.json`` (a dict by question id).

Each question becomes a ``vqa`` sample with its short ``answer`` (not ``fullAnswer``); the
image is ``{imageId}.jpg`` under ``--images``. The files run to hundreds of MB: read as a
stream (ijson), memory flat.
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
                for i, (qid, q) in enumerate(ijson.kvitems(f, "", use_float=True)):
                    if not isinstance(q, dict) or not all(isinstance(q.get(k), str) for k in
                                                          ("question", "answer", "imageId")):
                        yield str(path), i, AnnotationError(f"question {qid}: needs question, answer and imageId")
                        continue
                    yield str(path), i, {"task": "vqa", "id": f"gqa:{qid}", "image": f"{q['imageId']}.jpg",
                                         "question": q["question"], "answer": q["answer"], "source": "gqa"}
        except ijson.JSONError as e:
            raise LayoutFileError(f"{path}: not a GQA questions file (a JSON object by question id): {e}") from None


IMPORTER = Importer("gqa", ("vqa",), read, "*_balanced_questions.json")
