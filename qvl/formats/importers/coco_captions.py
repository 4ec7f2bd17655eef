"""``coco-captions``: COCO's ``captions_{train,val}{2014,2017}.json`` as published.

Reads ``images`` (id, file_name) and ``annotations`` (id, image_id, caption); gives one
``caption`` sample per caption (COCO has about five per image), the image being the file's
own ``file_name`` under ``--images`` (``COCO_train2014_%012d.jpg`` in 2014, ``%012d.jpg`` in 2017:
the file says which). The file is the split. Captions are English.
"""

from __future__ import annotations

from pathlib import Path

from qvl.formats.boxes import AnnotationError
from qvl.formats.importers import Importer, LayoutFileError, Options, Yield, load_json, need


def read(files: list[Path], opts: Options) -> Yield:
    for path in files:
        data = load_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
                or not isinstance(data.get("annotations"), list):
            raise LayoutFileError(f"{path}: a COCO captions file holds 'images' and 'annotations' lists")
        names = {img.get("id"): img.get("file_name") for img in data["images"] if isinstance(img, dict)}
        for i, ann in enumerate(data["annotations"]):
            try:
                image = names.get(ann.get("image_id")) if isinstance(ann, dict) else None
                if not isinstance(image, str):
                    raise AnnotationError(f"annotation {i}: image {ann.get('image_id') if isinstance(ann, dict) else '?'}"
                                          " is not in 'images'", "missing_image")
                yield str(path), i, {"task": "caption", "id": f"coco-caption:{ann.get('id', i)}", "image": image,
                                     "caption": need(ann, "caption", str, f"annotation {i}"), "lang": "en",
                                     "source": "coco-captions"}
            except AnnotationError as e:
                yield str(path), i, e


IMPORTER = Importer("coco-captions", ("caption",), read, "captions_*.json")
