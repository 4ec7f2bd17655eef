"""``textocr``: ``TextOCR_0.1_{train,val}.json`` (``imgs``: id, file_name, width, height; ``anns``:
image_id, utf8_string, points; ``img2Anns``).

One ``ocr`` sample per image with its legible words in the file's order (TextOCR marks
illegible words ``.``: dropped; an image with none gives no sample). A word's ``points`` are a
polygon in pixels: four corners become the quad as they are; a longer polygon becomes the
corners of its bounding box. Images are the file's ``file_name`` (``train/…jpg``) under ``--images``.
"""

from __future__ import annotations

from pathlib import Path

from qvl.formats.boxes import AnnotationError
from qvl.formats.importers import Importer, LayoutFileError, Options, Yield, load_json


def quad(points: list) -> list[list[float]]:
    if not isinstance(points, list) or len(points) < 8 or len(points) % 2:
        raise AnnotationError(f"bad polygon {points!r:.80}", "bad_box")
    xs, ys = points[0::2], points[1::2]
    if len(points) == 8:
        return [[x, y] for x, y in zip(xs, ys)]
    x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    return [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]


def read(files: list[Path], opts: Options) -> Yield:
    for path in files:
        data = load_json(path)
        if not isinstance(data, dict) or not all(isinstance(data.get(k), dict) for k in ("imgs", "anns", "img2Anns")):
            raise LayoutFileError(f"{path}: a TextOCR file holds 'imgs', 'anns' and 'img2Anns'")
        for i, (image_id, ann_ids) in enumerate(data["img2Anns"].items()):
            image = data["imgs"].get(image_id)
            try:
                if not isinstance(image, dict) or not isinstance(image.get("file_name"), str):
                    raise AnnotationError(f"image {image_id}: not in 'imgs'", "missing_image")
                lines = []
                for ann_id in ann_ids:
                    ann = data["anns"].get(ann_id)
                    text = ann.get("utf8_string") if isinstance(ann, dict) else None
                    if not isinstance(text, str) or text == "." or not text.strip():
                        continue  # illegible
                    lines.append({"text": text, "quad": quad(ann.get("points"))})
            except AnnotationError as e:
                yield str(path), i, e
                continue
            if lines:
                yield str(path), i, {"task": "ocr", "id": f"textocr:{image_id}", "image": image["file_name"],
                                     "width": image.get("width"), "height": image.get("height"), "lines": lines,
                                     "source": "textocr"}


IMPORTER = Importer("textocr", ("ocr",), read, "TextOCR_*.json")
