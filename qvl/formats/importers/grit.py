"""``grit``: GRIT-20M's parquet shards (``caption``, ``url``, ``width``, ``height``, ``noun_chunks``,
``ref_exps``; each chunk/expression ``[start, end, x1, y1, x2, y2, confidence]`` with the box
normalised to 0-1: ``norm``).

``grounding``: the caption with its noun chunks as region spans (chunks on one span share it,
their boxes listed; of chunks that overlap, the more confident is kept and the other dropped —
a span can take one ``<ref>``). ``ref_grounding``: each referring expression (``caption[start:end]``)
with its box. Images are URLs, found in a `qvl curate download` folder through ``--downloads``;
the parquet is read in batches, memory flat.
"""

from __future__ import annotations

from pathlib import Path

from qvl.formats.boxes import AnnotationError
from qvl.formats.importers import Importer, LayoutFileError, Options, Yield

BATCH = 4096


def _entries(value, what: str) -> list:
    if value is None:
        return []
    entries = []
    for item in value:
        item = list(item) if item is not None else None
        if not item or len(item) < 6:
            raise AnnotationError(f"{what}: an entry is not [start, end, x1, y1, x2, y2, confidence]")
        entries.append(item)
    return entries


def regions(caption: str, chunks: list) -> list[dict]:
    """Non-overlapping spans, the more confident chunk winning an overlap; boxes of one span together."""
    by_span: dict[tuple[int, int], list] = {}
    confidence: dict[tuple[int, int], float] = {}
    for start, end, *box in chunks:
        span = (int(start), int(end))
        by_span.setdefault(span, []).append([float(v) for v in box[:4]])
        confidence[span] = max(confidence.get(span, 0.0), float(box[4]) if len(box) > 4 else 0.0)
    kept: list[tuple[int, int]] = []
    for span in sorted(by_span, key=lambda s: (-confidence[s], s)):
        if all(span[1] <= k[0] or span[0] >= k[1] for k in kept):
            kept.append(span)
    return [{"span": list(span), "boxes": by_span[span]} for span in sorted(kept)]


def read(files: list[Path], opts: Options) -> Yield:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in files:
        try:
            reader = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise LayoutFileError(f"{path}: not a readable parquet file ({e})") from None
        missing = {"caption", "url", "width", "height"} - set(reader.schema_arrow.names)
        if missing:
            raise LayoutFileError(f"{path}: not a GRIT shard (no {', '.join(sorted(missing))})")
        columns = [c for c in ("key", "url", "caption", "width", "height", "noun_chunks", "ref_exps")
                   if c in reader.schema_arrow.names]
        row = 0
        for batch in reader.iter_batches(batch_size=BATCH, columns=columns):
            for record in batch.to_pylist():
                here, row = row, row + 1
                key = record.get("key") or here
                try:
                    caption = record.get("caption")
                    if not isinstance(caption, str) or not isinstance(record.get("url"), str):
                        raise AnnotationError(f"row {here}: no caption or url")
                    common = {"image": record["url"], "width": record.get("width"), "height": record.get("height"),
                              "box_format": "norm", "source": "grit"}
                    if "grounding" in opts.tasks:
                        found = regions(caption, _entries(record.get("noun_chunks"), f"row {here} noun_chunks"))
                        if found:
                            yield str(path), here, {"task": "grounding", "id": f"grit:{key}", "caption": caption,
                                                    "regions": found, **common}
                    if "ref_grounding" in opts.tasks:
                        for k, (start, end, *box) in enumerate(_entries(record.get("ref_exps"), f"row {here} ref_exps")):
                            yield str(path), here, {"task": "ref_grounding", "id": f"grit:{key}:ref{k}",
                                                    "ref": caption[int(start):int(end)], "box": box[:4], **common}
                except (AnnotationError, TypeError, ValueError) as e:
                    yield str(path), here, e if isinstance(e, AnnotationError) else AnnotationError(str(e))


IMPORTER = Importer("grit", ("grounding", "ref_grounding"), read, "GRIT-20M parquet shards")
