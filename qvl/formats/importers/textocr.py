"""``textocr``: ``TextOCR_0.1_{train,val}.json`` as released (``info``; ``imgs``: id, file_name,
width, height, set; ``anns``: id, image_id, bbox, points, utf8_string, area; ``imgToAnns``: image
id -> its annotation ids).

One ``ocr`` sample per image of ``imgToAnns`` with its legible words in the file's order (TextOCR
marks illegible words ``.``: dropped; an image with none gives no sample). A word's ``points`` are a
polygon in pixels: four corners become the quad as they are; a longer polygon becomes the
corners of its bounding box. An image is its ``file_name``'s last part under ``--images``: the
file says ``train/{id}.jpg``, but TextVQA's ``train_val_images.zip`` (the images TextOCR
annotates) unpacks to ``train_images/{id}.jpg`` — give that folder, as mindocr's converter
(``tools/dataset_converters/textocr.py``) does. A word that cannot be read (not in
``anns``, a bad polygon) rejects its image: the image is the record.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import msgspec

from qvl.boundary import MAX_ITEMS, Coord, IntSide
from qvl.errors import AnnotationError
from qvl.formats.importers import (
    Importer,
    LayoutFileError,
    Options,
    Yield,
    decode,
    load_json,
)


class Image(msgspec.Struct):
    file_name: str
    width: IntSide | None = None
    height: IntSide | None = None

    def name(self, image_id: str) -> str:
        name = PurePosixPath(self.file_name).name
        if name in ("", ".", ".."):
            raise AnnotationError(f"image {image_id!r:.60}: file_name {self.file_name!r:.80} names no file",
                                  "bad_field")
        return name


class Word(msgspec.Struct):
    utf8_string: str
    points: Annotated[list[Coord], msgspec.Meta(max_length=2 * MAX_ITEMS)]


AnnIds = Annotated[list[str], msgspec.Meta(max_length=MAX_ITEMS)]


def quad(points: list) -> list[list[float]]:
    if not isinstance(points, list) or len(points) < 8 or len(points) % 2:
        raise AnnotationError(f"bad polygon {points!r:.80}", "bad_box")
    xs, ys = points[0::2], points[1::2]
    if len(points) == 8:
        return [[x, y] for x, y in zip(xs, ys)]
    x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    return [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]


def _lines(data: dict, image_id: str, ann_ids: Any) -> list[dict]:
    lines = []
    for ann_id in decode(ann_ids, AnnIds, f"image {image_id!r:.60}: imgToAnns"):
        if ann_id not in data["anns"]:
            raise AnnotationError(f"image {image_id!r:.60}: annotation {ann_id!r:.60} is not in 'anns'")
        word = decode(data["anns"][ann_id], Word, f"image {image_id!r:.60}: annotation {ann_id!r:.60}")
        if word.utf8_string == "." or not word.utf8_string.strip():
            continue  # illegible
        lines.append({"text": word.utf8_string, "quad": quad(word.points)})
    return lines


def read(files: list[Path], opts: Options) -> Yield:
    for path in files:
        data = load_json(path)
        if not isinstance(data, dict) or not all(isinstance(data.get(k), dict) for k in ("imgs", "anns", "imgToAnns")):
            raise LayoutFileError(f"{path}: a TextOCR file holds 'imgs', 'anns' and 'imgToAnns'")
        for i, (image_id, ann_ids) in enumerate(data["imgToAnns"].items()):
            try:
                image_id = decode(image_id, str, f"imgToAnns key {i}")  # valid text: it becomes the sample's id
                if image_id not in data["imgs"]:
                    raise AnnotationError(f"image {image_id!r:.60}: not in 'imgs'", "missing_image")
                image = decode(data["imgs"][image_id], Image, f"image {image_id!r:.60}")
                name = image.name(image_id)
                lines = _lines(data, image_id, ann_ids)
            except AnnotationError as e:
                yield str(path), i, e
                continue
            if lines:
                yield str(path), i, {"task": "ocr", "id": f"textocr:{image_id}", "image": name,
                                     "width": image.width, "height": image.height, "lines": lines,
                                     "source": "textocr"}


IMPORTER = Importer("textocr", ("ocr",), read, "TextOCR_*.json")
