"""The stage-2 sources of the Qwen-VL paper, read as their publishers ship them.

One module per layout; each turns the published records into qvl annotation records (the
multitask schema of ``formats/multitask.py``) and does nothing else — the renderers, shards,
packing and rejects apply unchanged. Each module's docstring says which files, splits and
fields it reads and how its boxes are given (the source convention stays explicit: COCO,
RefCOCO and Visual Genome ``xywh`` pixels, GRIT normalised ``xyxy``, TextOCR polygons).

An importer yields ``(file, index, record)``: the place of the record in the published files
(a reject names it), and the record — or an ``AnnotationError`` for a record that cannot
become one, so that one bad record is a reject and never the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from qvl.errors import QvlError
from qvl.formats.boxes import AnnotationError

Yield = Iterator[tuple[str, int, "dict | AnnotationError"]]


class LayoutFileError(QvlError):
    """A whole published file cannot be read as its layout says; the message names it."""


@dataclass(frozen=True)
class Options:
    tasks: frozenset[str]  # the tasks to give, of those the layout can give
    split: str | None = None  # for layouts that hold several splits in one file (RefCOCO)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Importer:
    name: str
    tasks: tuple[str, ...]
    read: Callable[[list[Path], Options], Yield]
    files: str  # what to give it, for messages


def registry() -> dict[str, Importer]:
    from qvl.formats.importers import (
        coco_captions,
        gqa,
        grit,
        llava_pretrain,
        refcoco,
        textocr,
        textvqa,
        visual_genome,
        vqav2,
    )

    return {m.IMPORTER.name: m.IMPORTER for m in (coco_captions, vqav2, gqa, textvqa, refcoco, visual_genome, grit,
                                                   textocr, llava_pretrain)}


def records(layout: str, files: list[Path], tasks: list[str] | None = None, split: str | None = None,
            limit: int | None = None) -> Yield:
    """The importer's records for ``files`` (at most ``limit``), after checking what was asked."""
    known = registry()
    if layout not in known:
        raise LayoutFileError(f"--from {layout}: unknown layout; known: {', '.join(known)}")
    importer = known[layout]
    wanted = frozenset(tasks or importer.tasks)
    bad = sorted(wanted - set(importer.tasks))
    if bad:
        raise LayoutFileError(f"--from {layout} gives {', '.join(importer.tasks)}, not {', '.join(bad)}")
    for path in files:
        if not Path(path).is_file():
            raise LayoutFileError(f"{path}: no such file")
    produced = 0
    for item in importer.read([Path(p) for p in files], Options(wanted, split)):
        if limit is not None and produced >= limit:
            return
        produced += 1
        yield item


def load_json(path: Path):
    import json

    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise LayoutFileError(f"{path}: not a readable JSON file ({str(e)[:200]})") from None


def need(record, name: str, kind, what: str):
    """``record[name]`` when it is a ``kind``, else an AnnotationError saying which field."""
    value = record.get(name) if isinstance(record, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise AnnotationError(f"{what}: missing or bad {name!r} ({value!r:.80})")
    return value
