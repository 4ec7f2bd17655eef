"""Stream raw pair shards (parquet, jsonl, csv, tsv — optionally .gz) as canonical batches.

Every row that comes out carries ``row_id`` (``<file>:<line>`` for text files, 1-based;
``<file>:<row>`` for parquet, 0-based) and ``_seq`` (a global order key). Rows that cannot
be parsed or decoded are not dropped here: they come out with ``_input_error`` set
(``malformed_row``, ``invalid_utf8``) so the pipeline sends them to the rejects.
Problems with a whole file (missing, truncated, unknown columns) raise InputError.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from qvl.curate import layouts
from qvl.curate.layouts import Layout, LayoutError
from qvl.schemas import SchemaError, check_columns

SUFFIXES = {
    ".parquet": "parquet",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
}
SEQ_ROW_BITS = 40  # _seq = shard index << 40 | row: 1T rows per shard, 8M shards


class InputError(ValueError):
    """A whole input file cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class Shard:
    path: Path
    index: int
    format: str
    compression: str | None
    layout: Layout
    source: str | None  # fixed source name (``--source``); else a `source` column or the layout
    est_rows: int
    # text formats: the columns not mapped, read as text (types of a stream are not knowable up front)
    passthrough: tuple[str, ...] = ()
    # a previous run's output file (--from-ledger): that run's input file names, in shard order
    origin: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """A name unique within the run, safe as a file name."""
        return f"{self.index:05d}-{self.path.name.replace('.', '_')}"


def _format_of(path: Path) -> tuple[str, str | None]:
    suffixes = [s.lower() for s in path.suffixes]
    compression = None
    if suffixes and suffixes[-1] in (".gz", ".bz2"):
        compression = {".gz": "gzip", ".bz2": "bz2"}[suffixes.pop()]
    if not suffixes or suffixes[-1] not in SUFFIXES:
        raise InputError(f"{path}: unsupported file type (use {', '.join(SUFFIXES)}, optionally .gz/.bz2)")
    fmt = SUFFIXES[suffixes[-1]]
    if fmt == "parquet" and compression:
        raise InputError(f"{path}: parquet files are compressed inside; do not wrap them in {compression}")
    return fmt, compression


def discover(inputs: list[str | Path]) -> list[Path]:
    """Expand folders into their supported files; sorted so shard indices are stable."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and not f.name.startswith((".", "_"))
                and ".tmp-" not in f.name and _supported(f)
            )
            if not found:
                raise InputError(f"{p}: folder holds no parquet/jsonl/csv/tsv files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    return files


def _supported(path: Path) -> bool:
    try:
        _format_of(path)
        return True
    except InputError:
        return False


def _open_text(path: Path, compression: str | None) -> io.BufferedIOBase:
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "bz2":
        return bz2.open(path, "rb")
    return open(path, "rb")


def _first_line(path: Path, compression: str | None) -> str:
    try:
        with _open_text(path, compression) as f:
            line = f.readline(1 << 20)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    return line.decode("utf-8", errors="replace")


def open_shard(
    path: Path, index: int, mapping: dict[str, str] | None = None, source: str | None = None
) -> Shard:
    """Recognise a file's format and layout and check its columns, before any row is read."""
    fmt, compression = _format_of(path)
    where = str(path)
    if fmt == "parquet":
        try:
            meta = pq.ParquetFile(path).metadata
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{path}: not a readable parquet file ({e})") from None
        columns = meta.schema.to_arrow_schema().names
        schema = meta.schema.to_arrow_schema()
        est_rows = meta.num_rows
    else:
        size = path.stat().st_size
        first = _first_line(path, compression)
        est_rows = max(1, size // max(1, len(first.encode()))) if first else 0
        if fmt == "jsonl":
            if not first.strip():
                columns = []
            else:
                try:
                    columns = list(json.loads(first))
                except (json.JSONDecodeError, TypeError):
                    raise InputError(f"{path}:1: first line is not a JSON object") from None
        else:
            headerless = layouts.headerless_tsv(first) if fmt == "tsv" and not mapping else None
            if headerless is not None:
                layout = headerless
                return Shard(path, index, fmt, compression, layout, source, est_rows)
            columns = first.rstrip("\r\n").split("\t" if fmt == "tsv" else ",")
        schema = None
    try:
        layout = layouts.from_mapping(mapping) if mapping else layouts.detect(columns, where)
        layout = layouts.restrict(layout, columns) if mapping else layout
        missing = [c for c in layouts.REQUIRED if c not in layout.columns]
        if missing:
            raise LayoutError(f"{where}: --map names column(s) the file lacks: "
                              + ", ".join(mapping[c] for c in missing))
        if schema is not None:
            cols = layout.columns
            check_columns(
                schema,
                {cols["url"]: "string", cols["text"]: "string"},
                where,
                optional={cols[c]: "number" for c in ("width", "height", "clip_score") if c in cols},
            )
    except (LayoutError, SchemaError) as e:
        raise InputError(str(e)) from None
    mapped = set(layout.columns.values())
    passthrough = tuple(c for c in columns if c not in mapped) if schema is None else ()
    return Shard(path, index, fmt, compression, layout, source, est_rows, passthrough)


# ---------------------------------------------------------------- decoding


def _decode_utf8(arr: pa.Array) -> tuple[pa.Array, np.ndarray | None]:
    """Binary/string -> valid UTF-8 strings, and a mask of the rows that were not valid
    (decoded with U+FFFD replacements so the reject still shows what was there)."""
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), pa.string()), None
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        try:
            arr.validate(full=True)
            return arr.cast(pa.string()), None
        except pa.ArrowInvalid:
            arr = arr.view(pa.binary() if pa.types.is_string(arr.type) else pa.large_binary())
    try:
        return arr.cast(pa.string()), None
    except pa.ArrowInvalid:
        pass
    values = arr.to_pylist()  # rare path: only a batch that holds invalid bytes
    bad = np.zeros(len(values), dtype=bool)
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        try:
            out.append(v.decode("utf-8"))
        except UnicodeDecodeError:
            bad[i] = True
            out.append(v.decode("utf-8", errors="replace"))
    return pa.array(out, pa.string()), bad


def _canonical(
    table: pa.Table, shard: Shard, lines: np.ndarray, errors: np.ndarray | None = None
) -> pl.DataFrame:
    """Rename a raw batch to canonical columns, decode text, attach ids and order keys."""
    cols = shard.layout.columns
    n = table.num_rows
    input_error = np.full(n, None, dtype=object)
    if errors is not None:
        input_error[:] = errors
    out: dict[str, pa.Array] = {}
    for name in ("url", "text"):
        arr, bad = _decode_utf8(table.column(cols[name]).combine_chunks())
        out[name] = arr
        if bad is not None:
            input_error[bad & (input_error == None)] = "invalid_utf8"  # noqa: E711
    for name, dtype in (("width", pa.int64()), ("height", pa.int64()), ("clip_score", pa.float64())):
        if name in cols:
            col = table.column(cols[name])
            if pa.types.is_floating(col.type) and dtype == pa.int64():
                col = pa.compute.round(col)
            out[name] = col.cast(dtype, safe=False).combine_chunks()
        else:
            out[name] = pa.nulls(n, dtype)
    mapped = set(cols.values())
    passthrough = {c: table.column(c) for c in table.column_names if c not in mapped}
    frame = pl.from_arrow(pa.table({**out, **passthrough}), rechunk=False)
    if not isinstance(frame, pl.DataFrame):  # pragma: no cover - from_arrow of a table
        raise TypeError("expected a DataFrame")
    if shard.source is not None or "source" not in frame.columns:
        frame = frame.with_columns(source=pl.lit(shard.source or shard.layout.name))
    else:
        frame = frame.with_columns(pl.col("source").cast(pl.String).fill_null(shard.layout.name))
    stem = shard.path.name
    line = pl.Series("_line", lines, dtype=pl.Int64)
    return frame.with_columns(
        row_id=pl.lit(stem + ":") + line.cast(pl.String),
        _seq=(pl.lit(shard.index, pl.Int64) * (1 << SEQ_ROW_BITS)) + line,
        _input_error=pl.Series(input_error.tolist(), dtype=pl.String),
    ).rename({"text": "text_raw"})


def _malformed(shard: Shard, rows: list[tuple[int, str, str]]) -> pl.DataFrame:
    """Rows that could not be parsed, as canonical rows flagged with their error."""
    lines = np.array([r[0] for r in rows], dtype=np.int64)
    raw = pa.table(
        {
            shard.layout.columns["url"]: pa.nulls(len(rows), pa.string()),
            shard.layout.columns["text"]: pa.array([r[1] for r in rows], pa.string()),
        }
    )
    return _canonical(raw, shard, lines, np.array([r[2] for r in rows], dtype=object))


# ---------------------------------------------------------------- formats


def read_batches(shard: Shard, batch_rows: int) -> Iterator[pl.DataFrame]:
    try:
        if shard.format == "parquet":
            yield from _parquet_batches(shard, batch_rows)
        elif shard.format == "jsonl":
            yield from _jsonl_batches(shard, batch_rows)
        else:
            yield from _delimited_batches(shard, batch_rows)
    except (OSError, EOFError, pa.ArrowException) as e:
        raise InputError(f"{shard.path}: read failed ({e})") from None


def _parquet_batches(shard: Shard, batch_rows: int) -> Iterator[pl.DataFrame]:
    f = pq.ParquetFile(shard.path)
    start = 0
    for batch in f.iter_batches(batch_size=batch_rows):
        lines = np.arange(start, start + batch.num_rows, dtype=np.int64)
        start += batch.num_rows
        yield _canonical(pa.Table.from_batches([batch]), shard, lines)


def _delimited_batches(shard: Shard, batch_rows: int) -> Iterator[pl.DataFrame]:
    invalid: list[tuple[int, str, str]] = []

    def on_invalid(row) -> str:
        invalid.append((row.number, row.text, "malformed_row"))
        return "skip"

    headerless = bool(shard.layout.headerless)
    cols = shard.layout.columns
    column_types = {cols["url"]: pa.binary(), cols["text"]: pa.binary()}
    column_types.update({cols[c]: pa.float64() for c in ("width", "height", "clip_score") if c in cols})
    column_types.update({c: pa.string() for c in shard.passthrough})
    reader = pacsv.open_csv(
        _open_text(shard.path, shard.compression),
        read_options=pacsv.ReadOptions(
            column_names=list(shard.layout.headerless) if headerless else None,
            use_threads=False,
            block_size=1 << 24,
        ),
        parse_options=pacsv.ParseOptions(
            delimiter="\t" if shard.format == "tsv" else ",",
            # web captions hold stray quotes; TSV has no quoting at all
            quote_char=False if shard.format == "tsv" else '"',
            invalid_row_handler=on_invalid,
            ignore_empty_lines=False,
        ),
        convert_options=pacsv.ConvertOptions(column_types=column_types, strings_can_be_null=False),
    )
    next_line = 1 if headerless else 2  # 1-based line of the next data row
    pending: list[pa.RecordBatch] = []
    pending_rows = 0

    def flush() -> Iterator[pl.DataFrame]:
        nonlocal next_line, pending, pending_rows
        if pending_rows:
            table = pa.Table.from_batches(pending)
            lines, next_line = _assign_lines(next_line, table.num_rows, {r[0] for r in invalid})
            yield _canonical(table, shard, lines)
        if invalid:
            done = [r for r in invalid if r[0] < next_line]
            if done:
                yield _malformed(shard, done)
                invalid[:] = [r for r in invalid if r[0] >= next_line]
        pending, pending_rows = [], 0

    for batch in reader:
        pending.append(batch)
        pending_rows += batch.num_rows
        if pending_rows >= batch_rows:
            yield from flush()
    yield from flush()
    if invalid:  # malformed lines after the last good row
        yield _malformed(shard, invalid)


def _assign_lines(first: int, n: int, skipped: set[int]) -> tuple[np.ndarray, int]:
    """Line numbers of ``n`` parsed rows starting at ``first``, stepping over lines the
    parser rejected (those become malformed rows with their own line numbers)."""
    ahead = sum(1 for s in skipped if s >= first)
    window = np.arange(first, first + n + ahead, dtype=np.int64)
    if ahead:
        window = window[~np.isin(window, np.fromiter(skipped, dtype=np.int64))]
    lines = window[:n]
    return lines, (int(lines[-1]) + 1) if n else first


def _jsonl_batches(shard: Shard, batch_rows: int) -> Iterator[pl.DataFrame]:
    cols = shard.layout.columns
    wanted = {v: k for k, v in cols.items()}
    with _open_text(shard.path, shard.compression) as f:
        line_no = 0
        while True:
            records: list[dict] = []
            lines: list[int] = []
            bad: list[tuple[int, str, str]] = []
            for raw in f:
                line_no += 1
                try:
                    obj = json.loads(raw)
                except UnicodeDecodeError:
                    bad.append((line_no, raw.decode("utf-8", errors="replace").rstrip("\n"), "invalid_utf8"))
                    continue
                except json.JSONDecodeError:
                    bad.append((line_no, raw.decode("utf-8", errors="replace").rstrip("\n"), "malformed_row"))
                    continue
                if not isinstance(obj, dict):
                    bad.append((line_no, raw.decode("utf-8", errors="replace").rstrip("\n"), "malformed_row"))
                    continue
                records.append(obj)
                lines.append(line_no)
                if len(records) >= batch_rows:
                    break
            if records:
                table = _records_table(records, wanted, shard.passthrough)
                yield _canonical(table, shard, np.array(lines, dtype=np.int64))
            if bad:
                yield _malformed(shard, bad)
            if not records and not bad:
                return


def _records_table(records: list[dict], wanted: dict[str, str], passthrough: tuple[str, ...]) -> pa.Table:
    """JSON objects -> a table of the mapped columns; values of the wrong type become null
    text (url/text) or null numbers, never a crash. Other fields of the first line are
    carried as text (strings as they are, anything else as JSON)."""
    data: dict[str, pa.Array] = {}
    for name in passthrough:
        values = [r.get(name) for r in records]
        data[name] = pa.array(
            [v if isinstance(v, str) or v is None else json.dumps(v, ensure_ascii=False) for v in values],
            pa.string(),
        )
    for input_name, canonical in wanted.items():
        values = [r.get(input_name) for r in records]
        if canonical in ("url", "text"):
            data[input_name] = pa.array([v if isinstance(v, str) else None for v in values], pa.string())
        else:
            data[input_name] = pa.array(
                [float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None for v in values],
                pa.float64(),
            )
    return pa.table(data)
