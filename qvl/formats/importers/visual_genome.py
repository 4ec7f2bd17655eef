"""``visual-genome``: ``region_descriptions.json`` + ``image_data.json`` (Visual Genome 1.2).

Each region (``phrase``; ``x, y, width, height`` pixels: ``xywh``) gives a ``ref_grounding`` and a
``grounded_caption`` sample, checked against the image's width and height from
``image_data.json``. Images are where VG's ``url`` puts them: ``VG_100K/{id}.jpg`` or
``VG_100K_2/{id}.jpg`` under ``--images``. ``region_descriptions.json`` is ~700 MB: read as a
stream (ijson, one image's regions at a time), memory flat. Records are numbered by region
(from 1); an image entry whose ``regions`` cannot be read is one record, rejected. Ids are read
as the official driver (ranjaykrishna/visual_genome_python_driver, ``visual_genome/utils.py``)
reads them: an image is ``id``, else ``image_id`` (1.0 and 1.4 say ``id``, 1.2 ``image_id``); a
region ``region_id``, else ``id`` (1.0); a region belongs to its entry's image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from qvl.boundary import Coord, Id, IntSide
from qvl.errors import AnnotationError
from qvl.formats.importers import (
    Importer,
    LayoutFileError,
    Options,
    Yield,
    decode,
    keyed,
    load_json,
    stream,
)


class ImageData(msgspec.Struct):
    url: str
    width: IntSide
    height: IntSide
    id: Id | None = None  # VG 1.0 and 1.4 say id, 1.2 image_id: the driver reads id, else image_id
    image_id: Id | None = None

    def ident(self) -> int | None:
        return self.id if self.id is not None else self.image_id

    def path(self) -> str:
        """``VG_100K_2/1.jpg``: the url's last two parts."""
        parts = self.url.rstrip("/").split("/")
        if len(parts) < 2 or not all(p.strip() and p not in (".", "..") for p in parts[-2:]):
            raise AnnotationError(f"image {self.ident()}: url {self.url!r:.120} does not end in FOLDER/NAME",
                                  "bad_field")
        return "/".join(parts[-2:])


class Region(msgspec.Struct):
    phrase: str
    x: Coord
    y: Coord
    width: Coord
    height: Coord
    region_id: Id | None = None
    id: Id | None = None  # VG 1.0 says id: the driver reads region_id, else id
    image_id: Id | None = None

    def ident(self) -> int | None:
        return self.region_id if self.region_id is not None else self.id


class ImageRegions(msgspec.Struct):
    regions: list[Any]
    id: Id | None = None
    image_id: Id | None = None


def _images(path: Path) -> dict:
    entries = load_json(path)
    if not isinstance(entries, list):
        raise LayoutFileError(f"{path}: an image_data.json holds a list of images")
    found = keyed(entries, ImageData, ImageData.ident, "image", ids=("id", "image_id"))
    for key, image in list(found.items()):
        if isinstance(image, ImageData):
            try:
                found[key] = (image.path(), image.width, image.height)
            except AnnotationError as e:
                found[key] = e
    return found


def read(files: list[Path], opts: Options) -> Yield:
    regions = [p for p in files if "region" in p.name]
    meta = [p for p in files if p not in regions]
    if len(regions) != 1 or len(meta) != 1:
        raise LayoutFileError("--from visual-genome takes region_descriptions.json and image_data.json")
    images = _images(meta[0])
    where = str(regions[0])
    index = 0
    for k, raw in enumerate(stream(regions[0], "item")):
        try:
            entry = decode(raw, ImageRegions, f"image entry {k}")
        except AnnotationError as e:
            index += 1
            yield where, index, e
            continue
        image_id = entry.id if entry.id is not None else entry.image_id
        for n, raw_region in enumerate(entry.regions):
            index += 1
            try:
                region = decode(raw_region, Region, f"image entry {k} region {n}")
                found = images.get(image_id if image_id is not None else region.image_id)  # the entry's, as the driver
                if isinstance(found, AnnotationError):
                    raise AnnotationError(f"region {region.ident()}: {found}", found.reason)
                if found is None or not region.phrase.strip():
                    raise AnnotationError(f"region {region.ident()}: no phrase, or its image is not in "
                                          "image_data.json")
            except AnnotationError as e:
                yield where, index, e
                continue
            name, width, height = found
            common = {"image": name, "width": width, "height": height, "box_format": "xywh",
                      "box": [region.x, region.y, region.width, region.height], "source": "visual-genome"}
            rid = region.ident() if region.ident() is not None else index
            if "ref_grounding" in opts.tasks:
                yield where, index, {"task": "ref_grounding", "id": f"vg:{rid}", "ref": region.phrase.strip(),
                                     **common}
            if "grounded_caption" in opts.tasks:
                yield where, index, {"task": "grounded_caption", "id": f"vg:{rid}:caption",
                                     "caption": region.phrase.strip(), **common}


IMPORTER = Importer("visual-genome", ("ref_grounding", "grounded_caption"), read,
                    "region_descriptions.json + image_data.json")
