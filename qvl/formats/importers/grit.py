"""``grit``: GRIT-20M's parquet shards as on Hugging Face (``zzliang/GRIT``, ``grit-20m/coyo_*_snappy.parquet``:
``id``, ``url``, ``caption``, ``width``, ``height``, ``noun_chunks``, ``ref_exps``,
``clip_similarity_vitb32``, ``clip_similarity_vitl14``); each chunk/expression
``[start, end, x1, y1, x2, y2, confidence]`` with the box normalised to 0-1 (``norm``), as
kosmos-2's ``data/visualize_grit.py`` (microsoft/unilm) reads it. A sample's id is the row's
``key`` where a shard has one (the jsonl release's), else its COYO ``id``, else file and row. A
row that gives no sample (no chunk, no expression) is a reject.

``grounding``: the caption with its noun chunks as region spans (chunks on one span share it,
their boxes listed; of chunks that overlap, the more confident is kept and the other dropped —
a span can take one ``<ref>``). ``ref_grounding``: each referring expression (``caption[start:end]``)
with its box. Images are URLs, found in a `qvl curate download` folder through ``--downloads``;
the parquet is read in batches, memory flat. The release's own ``grit_coyo.jsonl`` (one row a line,
with ``key``: what ``visualize_grit.py`` reads) is read too, a line at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec

from qvl.boundary import Coord, Id, IntSide, decode_json
from qvl.errors import AnnotationError, RecordError
from qvl.formats.importers import Importer, LayoutFileError, Options, Yield, decode

BATCH = 4096
MAX_LINE = 1 << 20  # one jsonl row: a GRIT row is a few KB

# [start, end, x1, y1, x2, y2(, confidence)]: finite, bounded numbers (a start of inf is a reject)
Entry = Annotated[list[Coord], msgspec.Meta(min_length=6, max_length=7)]
MAX_ENTRIES = 256  # a GRIT caption has a handful; overlap resolution is quadratic in them
Entries = Annotated[list[Entry], msgspec.Meta(max_length=MAX_ENTRIES)]


class Row(msgspec.Struct):
    caption: str
    url: str
    width: IntSide | None = None
    height: IntSide | None = None
    key: str | int | None = None
    id: Id | None = None  # COYO-700M's 64-bit id: the Hugging Face shards have it, not key
    noun_chunks: Entries | None = None
    ref_exps: Entries | None = None


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
    for path in files:
        rows = _jsonl(path) if path.suffix == ".jsonl" else _parquet(path)
        for here, row in rows:
            try:
                if isinstance(row, AnnotationError):
                    raise row
                yield from _samples(str(path), here, row, opts)
            except AnnotationError as e:
                yield str(path), here, e


def _parquet(path: Path):
    """(row number, Row or its AnnotationError) of a parquet shard, read in batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise LayoutFileError(f"{path}: not a readable parquet file ({e})") from None
    missing = {"caption", "url", "width", "height"} - set(reader.schema_arrow.names)
    if missing:
        raise LayoutFileError(f"{path}: not a GRIT shard (no {', '.join(sorted(missing))})")
    columns = [c for c in ("key", "id", "url", "caption", "width", "height", "noun_chunks", "ref_exps")
               if c in reader.schema_arrow.names]
    row = 0
    try:
        for batch in reader.iter_batches(batch_size=BATCH, columns=columns):
            for record in batch.to_pylist():
                here, row = row, row + 1
                try:
                    yield here, decode(record, Row, f"row {here}")
                except AnnotationError as e:
                    yield here, e
    except (OSError, UnicodeDecodeError, pa.ArrowException) as e:
        raise LayoutFileError(f"{path}: a parquet batch after row {row} cannot be read ({str(e)[:200]})") from None


def _jsonl(path: Path):
    """(row number, Row or its AnnotationError) of the release's ``grit_coyo.jsonl``, a line at a
    time; a line longer than ``MAX_LINE`` is skipped unread (a reject)."""
    with open(path, "rb") as f:
        here = -1
        while raw := f.readline(MAX_LINE + 1):
            here += 1
            if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
                while (rest := f.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                    pass
                yield here, AnnotationError(f"row {here}: a line over {MAX_LINE:,} bytes", "line_too_long")
                continue
            try:
                yield here, decode_json(raw, Row)
            except RecordError as e:
                yield here, AnnotationError(f"row {here}: {e}", e.reason)


def _samples(path: str, here: int, row: Row, opts: Options) -> Yield:
    """The row's samples; a row that gives none (no chunk, no expression) is a reject, never a silent drop."""
    key = row.key if row.key not in (None, "") else row.id if row.id is not None else f"{Path(path).stem}:{here}"
    common = {"image": row.url, "width": row.width, "height": row.height, "box_format": "norm", "source": "grit"}
    given = 0
    if "grounding" in opts.tasks:
        found = regions(row.caption, row.noun_chunks or [])
        if found:
            given += 1
            yield path, here, {"task": "grounding", "id": f"grit:{key}", "caption": row.caption, "regions": found,
                               **common}
    if "ref_grounding" in opts.tasks:
        for k, (start, end, *box) in enumerate(row.ref_exps or []):
            given += 1
            yield path, here, {"task": "ref_grounding", "id": f"grit:{key}:ref{k}",
                               "ref": row.caption[int(start):int(end)], "box": box[:4], **common}
    if not given:
        raise AnnotationError(f"row {here}: no noun chunk or referring expression to give {', '.join(sorted(opts.tasks))}",
                              "no_regions")


IMPORTER = Importer("grit", ("grounding", "ref_grounding"), read, "GRIT-20M parquet shards or grit_coyo.jsonl")
