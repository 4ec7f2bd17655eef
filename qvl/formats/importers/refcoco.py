"""``refcoco``: RefCOCO / RefCOCO+ / RefCOCOg as published — ``refs(unc).p``, ``refs(umd).p`` or
``refs(google).p`` (a pickle) beside the dataset's ``instances.json``.

Each sentence of each ref of the chosen split (``--split``, default ``train``) gives a
``ref_grounding`` sample (the sentence -> the box) and a ``grounded_caption`` sample (the
box -> the sentence); several sentences of one ref are several samples. The box is the ref's
annotation's COCO ``bbox``: ``xywh`` pixels, checked against the image's width and height from
``instances.json``. A ref's ``file_name`` carries an annotation suffix
(``COCO_train2014_000000581857_16.jpg`` is image 581857): the image is ``instances.json``'s own
``file_name`` for the ref's ``image_id`` under ``--images``.

The pickle is read by a restricted unpickler that admits only plain containers, strings and
numbers: a pickle that asks for any class or function is an error naming the file — a
downloaded pickle is never ``pickle.load``-ed.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

from qvl.formats.boxes import AnnotationError
from qvl.formats.importers import Importer, LayoutFileError, Options, Yield, load_json

class PlainUnpickler(pickle.Unpickler):
    """Containers, strings and numbers only; anything that names a global is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refuses {module}.{name}: only plain containers, strings and numbers")


def load_refs(path: Path) -> list:
    try:
        data = PlainUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        raise LayoutFileError(f"{path}: not a plain refs pickle ({e})") from None
    if not isinstance(data, list):
        raise LayoutFileError(f"{path}: a refs file holds a list of refs")
    return data


def read(files: list[Path], opts: Options) -> Yield:
    pickles = [p for p in files if p.suffix == ".p"]
    instances = [p for p in files if p.suffix == ".json"]
    if len(pickles) != 1 or len(instances) != 1:
        raise LayoutFileError("--from refcoco takes one refs(*).p and one instances.json")
    refs = load_refs(pickles[0])
    coco = load_json(instances[0])
    try:
        images = {img["id"]: img for img in coco["images"]}
        boxes = {ann["id"]: ann["bbox"] for ann in coco["annotations"]}
    except (KeyError, TypeError) as e:
        raise LayoutFileError(f"{instances[0]}: not a COCO instances file ({e})") from None
    split = opts.split or "train"
    where = str(pickles[0])
    for i, ref in enumerate(refs):
        if not isinstance(ref, dict) or ref.get("split") != split:
            continue
        try:
            image = images.get(ref.get("image_id"))
            box = boxes.get(ref.get("ann_id"))
            if image is None or box is None:
                raise AnnotationError(f"ref {ref.get('ref_id')}: image {ref.get('image_id')} or annotation "
                                      f"{ref.get('ann_id')} not in {instances[0].name}", "missing_image")
            sentences = ref.get("sentences")
            if not isinstance(sentences, list) or not sentences:
                raise AnnotationError(f"ref {ref.get('ref_id')}: no sentences")
        except AnnotationError as e:
            yield where, i, e
            continue
        common = {"image": image["file_name"], "width": image["width"], "height": image["height"], "box": box,
                  "box_format": "xywh", "source": "refcoco"}
        for k, sentence in enumerate(sentences):
            text = sentence.get("sent") if isinstance(sentence, dict) else None
            if not isinstance(text, str) or not text.strip():
                yield where, i, AnnotationError(f"ref {ref.get('ref_id')} sentence {k}: no text")
                continue
            sid = sentence.get("sent_id", k)
            if "ref_grounding" in opts.tasks:
                yield where, i, {"task": "ref_grounding", "id": f"refcoco:{ref.get('ref_id')}:{sid}", "ref": text,
                                 **common}
            if "grounded_caption" in opts.tasks:
                yield where, i, {"task": "grounded_caption", "id": f"refcoco:{ref.get('ref_id')}:{sid}:caption",
                                 "caption": text, **common}


IMPORTER = Importer("refcoco", ("ref_grounding", "grounded_caption"), read, "refs(*).p + instances.json")
