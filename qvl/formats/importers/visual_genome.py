"""``visual-genome``: ``region_descriptions.json`` + ``image_data.json`` (Visual Genome 1.2).

Each region (``phrase``; ``x, y, width, height`` pixels: ``xywh``) gives a ``ref_grounding`` and a
``grounded_caption`` sample, checked against the image's width and height from
``image_data.json``. Images are where VG's ``url`` puts them: ``VG_100K/{id}.jpg`` or
``VG_100K_2/{id}.jpg`` under ``--images``. ``region_descriptions.json`` is ~700 MB: read as a
stream (ijson, one image's regions at a time), memory flat.
"""

from __future__ import annotations

from pathlib import Path

from qvl.formats.boxes import AnnotationError
from qvl.formats.importers import Importer, LayoutFileError, Options, Yield, load_json


def read(files: list[Path], opts: Options) -> Yield:
    import ijson

    regions = [p for p in files if "region" in p.name]
    meta = [p for p in files if p not in regions]
    if len(regions) != 1 or len(meta) != 1:
        raise LayoutFileError("--from visual-genome takes region_descriptions.json and image_data.json")
    images = {}
    for entry in load_json(meta[0]):
        if isinstance(entry, dict) and isinstance(entry.get("url"), str):
            folder, name = entry["url"].rstrip("/").split("/")[-2:]
            images[entry.get("image_id", entry.get("id"))] = (f"{folder}/{name}", entry.get("width"),
                                                              entry.get("height"))
    where = str(regions[0])
    index = 0
    try:
        with open(regions[0], "rb") as f:
            for image in ijson.items(f, "item", use_float=True):
                image_id = image.get("id", image.get("image_id")) if isinstance(image, dict) else None
                for region in (image.get("regions") or []) if isinstance(image, dict) else []:
                    index += 1
                    found = images.get(region.get("image_id", image_id)) if isinstance(region, dict) else None
                    phrase = region.get("phrase") if isinstance(region, dict) else None
                    if found is None or not isinstance(phrase, str) or not phrase.strip():
                        yield where, index, AnnotationError(f"region {region.get('region_id') if isinstance(region, dict) else '?'}"
                                                            ": no phrase, or its image is not in image_data.json")
                        continue
                    name, width, height = found
                    common = {"image": name, "width": width, "height": height, "box_format": "xywh",
                              "box": [region.get(k) for k in ("x", "y", "width", "height")], "source": "visual-genome"}
                    rid = region.get("region_id", index)
                    if "ref_grounding" in opts.tasks:
                        yield where, index, {"task": "ref_grounding", "id": f"vg:{rid}", "ref": phrase.strip(),
                                             **common}
                    if "grounded_caption" in opts.tasks:
                        yield where, index, {"task": "grounded_caption", "id": f"vg:{rid}:caption",
                                             "caption": phrase.strip(), **common}
    except ijson.JSONError as e:
        raise LayoutFileError(f"{where}: not a Visual Genome region_descriptions file ({e})") from None


IMPORTER = Importer("visual-genome", ("ref_grounding", "grounded_caption"), read,
                    "region_descriptions.json + image_data.json")
