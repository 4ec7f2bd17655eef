"""``coco-captions``: COCO's ``captions_{train,val}{2014,2017}.json`` as published.

Reads ``images`` (id, file_name) and ``annotations`` (id, image_id, caption); gives one
``caption`` sample per caption (COCO has about five per image), the image being the file's
own ``file_name`` under ``--images`` (``COCO_train2014_%012d.jpg`` in 2014, ``%012d.jpg`` in 2017:
the file says which). The file is the split. Captions are English. An image entry without a
usable ``id`` and ``file_name`` pairs with no caption; a caption without ``image_id`` is a reject.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from qvl.boundary import Id
from qvl.errors import AnnotationError
from qvl.formats.importers import (
    Importer,
    LayoutFileError,
    Options,
    Yield,
    decode,
    keyed,
    load_json,
)


class CocoImage(msgspec.Struct):
    id: Id
    file_name: str


class CocoCaption(msgspec.Struct):
    image_id: Id
    caption: str
    id: Id | None = None


def read(files: list[Path], opts: Options) -> Yield:
    for path in files:
        data = load_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
                or not isinstance(data.get("annotations"), list):
            raise LayoutFileError(f"{path}: a COCO captions file holds 'images' and 'annotations' lists")
        images = keyed(data["images"], CocoImage, lambda img: img.id, "image")
        for i, raw in enumerate(data["annotations"]):
            try:
                ann = decode(raw, CocoCaption, f"annotation {i}")
                image = images.get(ann.image_id)
                if image is None:
                    raise AnnotationError(f"annotation {i}: image {ann.image_id} is not in 'images'", "missing_image")
                if isinstance(image, AnnotationError):
                    raise image
                yield str(path), i, {"task": "caption", "id": f"coco-caption:{ann.id if ann.id is not None else i}",
                                     "image": image.file_name, "caption": ann.caption, "lang": "en",
                                     "source": "coco-captions"}
            except AnnotationError as e:
                yield str(path), i, e


IMPORTER = Importer("coco-captions", ("caption",), read, "captions_*.json")
