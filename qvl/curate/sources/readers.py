"""Stream raw pair shards (parquet, jsonl, csv, tsv — optionally .gz) as canonical batches.

Every row that comes out carries ``row_id`` (``<file>:<line>`` for text files, 1-based;
``<file>:<row>`` for parquet, 0-based) and ``_seq`` (a global order key). Rows that cannot
be parsed or decoded are not dropped here: they come out with ``_input_error`` set
(``malformed_row``, ``invalid_utf8``) so the pipeline sends them to the rejects.
Problems with a whole file (missing, truncated, unknown columns) raise InputError.
"""

from __future__ import annotations

import csv
import json
from typing import Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from qvl.common import remote
from qvl.curate.sources import layouts
from qvl.curate.sources.shards import (
    BOM,
    MAX_LINE_BYTES,
    SAMPLE_LINES,
    SEQ_ROW_BITS,
    InputError,
    Shard,
    json_line,
    open_text,
)

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


# sizes and scores beyond this are not measurements (and would not survive an int64 cast)
MAX_NUMBER = float(1 << 53)


def _numbers(arr: pa.Array) -> tuple[pa.Array, np.ndarray | None, np.ndarray]:
    """A size or score column as float64: (values, rows whose text is not a number, rows
    whose number is not finite or absurdly large). Those numbers become null and are counted:
    a size is then unknown, a score broken (``invalid_scores``); unparsable text rejects its row."""
    unparsable = None
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_binary(arr.type):
        text = pl.Series(_decode_utf8(arr)[0]).str.strip_chars()
        text = text.set(text == "", None)
        parsed = text.cast(pl.Float64, strict=False)
        unparsable = (text.is_not_null() & parsed.is_null()).to_numpy()
        arr = parsed.to_arrow()
    elif pa.types.is_null(arr.type) or pa.types.is_boolean(arr.type):
        return pa.nulls(len(arr), pa.float64()), None, np.zeros(len(arr), dtype=bool)
    values = pl.Series(arr.cast(pa.float64()))
    bad = values.is_not_null() & ~(values.abs() < MAX_NUMBER).fill_null(False)  # NaN compares false
    bad_np = bad.to_numpy()
    if bad_np.any():
        values = values.set(bad, None)
    return values.to_arrow(), unparsable, bad_np


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
    non_finite = np.zeros(n, dtype=bool)
    mapped = set(cols.values())
    passthrough = {c: table.column(c) for c in table.column_names if c not in mapped}
    invalid: dict[str, np.ndarray] = {}
    for name in layouts.NUMBERS:
        dtype = pa.int64() if name in ("width", "height") else pa.float64()
        if name in cols:
            raw = table.column(cols[name]).combine_chunks()
            values, unparsable, missing = _numbers(raw)
            if unparsable is not None:
                input_error[unparsable & (input_error == None)] = "malformed_row"  # noqa: E711
            non_finite |= missing
            out[name] = pa.compute.round(values).cast(dtype) if dtype == pa.int64() else values
            if name in layouts.SCORES and not pa.types.is_null(raw.type):
                invalid[name] = values.is_null().to_numpy(zero_copy_only=False)
        else:
            out[name] = pa.nulls(n, dtype)
    frame = pl.from_arrow(pa.table({**out, **passthrough}), rechunk=False)
    if not isinstance(frame, pl.DataFrame):  # pragma: no cover - from_arrow of a table
        raise TypeError("expected a DataFrame")
    if shard.source is not None or "source" not in frame.columns:
        frame = frame.with_columns(source=pl.lit(shard.source or shard.layout.name))
    else:
        frame = frame.with_columns(pl.col("source").cast(pl.String).fill_null(shard.layout.name))
    stem = shard.name or shard.path.name
    line = pl.Series("_line", lines, dtype=pl.Int64)
    read = input_error == None  # noqa: E711 - a row that could not be read has no score to judge
    return frame.with_columns(
        row_id=pl.lit(stem + ":") + line.cast(pl.String),
        _seq=(pl.lit(shard.index, pl.Int64) * (1 << SEQ_ROW_BITS)) + line,
        _input_error=pl.Series(input_error.tolist(), dtype=pl.String),
        _non_finite=pl.Series(non_finite),
        invalid_scores=_invalid_scores({k: v & read for k, v in invalid.items()}, passthrough.get(INVALID), n),
    ).rename({"text": "text_raw"})


INVALID = "invalid_scores"  # the scores a row's file has a column for, but no finite value in it


def _invalid_scores(invalid: dict[str, np.ndarray], recorded: pa.ChunkedArray | None, n: int) -> pl.Series:
    """Per row, the names of the scores whose column the file has but whose value is null, NaN,
    ±inf or absurd (rule ``invalid_score``). A file that is qvl's own output has every score
    column, null where its input had none: its own ``invalid_scores`` column says which nulls
    are broken, so filtering it again keeps an unscored row unscored. A parquet column of null
    type holds no value by declaration: read as absent."""
    if recorded is not None and (pa.types.is_list(recorded.type) or pa.types.is_large_list(recorded.type)):
        before = pl.Series(recorded.combine_chunks()).cast(pl.List(pl.String))
        invalid = {k: v & before.list.contains(k).fill_null(False).to_numpy() for k, v in invalid.items()}
    invalid = {k: v for k, v in invalid.items() if v.any()}
    if not invalid:
        return pl.Series(INVALID, [[]], dtype=pl.List(pl.String)).new_from_index(0, n)
    names = list(invalid)
    code = np.zeros(n, dtype=np.uint32)  # one bit per score; each of the 2^k lists is built once
    for i, mask in enumerate(invalid.values()):
        code |= mask.astype(np.uint32) << i
    lists = [[k for i, k in enumerate(names) if c >> i & 1] for c in range(1 << len(names))]
    return pl.Series(INVALID, lists, dtype=pl.List(pl.String)).gather(code)


def _malformed(shard: Shard, rows: list[tuple[int, str, str]]) -> pl.DataFrame:
    """Rows that could not be parsed, as canonical rows flagged with their error."""
    lines = np.array([r[0] for r in rows], dtype=np.int64)
    cols = shard.layout.columns
    raw = pa.table({
        **{column: pa.nulls(len(rows), pa.float64()) for name, column in cols.items() if name not in ("url", "text")},
        **{column: pa.nulls(len(rows), pa.string()) for column in shard.passthrough},
        cols["url"]: pa.nulls(len(rows), pa.string()),
        cols["text"]: pa.array([r[1] for r in rows], pa.string()),
    })
    return _canonical(raw, shard, lines, np.array([r[2] for r in rows], dtype=object))


# ---------------------------------------------------------------- formats


def read_batches(shard: Shard, batch_rows: int) -> Iterator[pl.DataFrame]:
    try:
        if shard.format == "parquet":
            yield from _parquet_batches(shard, batch_rows)
        elif shard.format == "jsonl":
            yield from _jsonl_batches(shard, batch_rows)
        elif shard.format == "csv":
            yield from _csv_batches(shard, batch_rows)
        else:
            yield from _tsv_batches(shard, batch_rows)
    except (OSError, EOFError, pa.ArrowException) as e:
        raise InputError(f"{shard.path}: read failed ({e})") from None


def _parquet_batches(shard: Shard, batch_rows: int) -> Iterator[pl.DataFrame]:
    f = pq.ParquetFile(remote.open_input(shard.path))
    start = 0
    for batch in f.iter_batches(batch_size=batch_rows):
        lines = np.arange(start, start + batch.num_rows, dtype=np.int64)
        start += batch.num_rows
        yield _canonical(pa.Table.from_batches([batch]), shard, lines)


def _tsv_batches(shard: Shard, batch_rows: int) -> Iterator[pl.DataFrame]:
    """TSV has no quoting: one line, one row; a line with the wrong field count is a reject."""
    invalid: list[tuple[int, str, str]] = []

    def on_invalid(row) -> str:
        invalid.append((row.number, row.text, "malformed_row"))
        return "skip"

    headerless = bool(shard.layout.headerless)
    cols = shard.layout.columns
    column_types = {cols["url"]: pa.binary(), cols["text"]: pa.binary()}
    column_types.update({cols[c]: pa.string() for c in layouts.NUMBERS if c in cols})
    column_types.update({c: pa.string() for c in shard.passthrough})
    reader = pacsv.open_csv(
        open_text(shard.path, shard.compression),
        read_options=pacsv.ReadOptions(
            column_names=list(shard.layout.headerless) if headerless else None,
            use_threads=False,
            block_size=1 << 24,
        ),
        parse_options=pacsv.ParseOptions(
            delimiter="\t",
            quote_char=False,  # web captions hold stray quotes; TSV has no quoting at all
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


class _Lines:
    """A binary file's lines as text for the csv module, remembering the last one read.
    Bytes that are not UTF-8 survive as surrogates and are flagged per row later."""

    def __init__(self, f):
        self.f, self.last, self.first = f, "", True

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self.f.readline(MAX_LINE_BYTES + 1)
        if not line:
            raise StopIteration
        if self.first:
            line, self.first = line.removeprefix(BOM), False
        self.last = line.decode("utf-8", errors="surrogateescape")
        return self.last


def _csv_batches(shard: Shard, batch_rows: int) -> Iterator[pl.DataFrame]:
    """CSV as RFC 4180 says, strictly: a quoted field may span lines (the row takes the
    number of its first line); a quote that is never closed, or closed in the middle of a
    field, would swallow the following lines into one row — that is an error naming the
    lines, never a silent merge. A line with the wrong field count is a reject."""
    with open_text(shard.path, shard.compression) as f:
        lines = _Lines(f)
        reader = csv.reader(lines, strict=True)
        header = next(reader, [])
        names = {name: i for i, name in enumerate(header)}
        cols = shard.layout.columns
        wanted = [*cols.values(), *shard.passthrough]
        finished = False
        while not finished:
            rows: list[list[str]] = []
            numbers: list[int] = []
            bad: list[tuple[int, str, str]] = []
            while len(rows) < batch_rows:
                start = reader.line_num + 1
                try:
                    record = next(reader)
                except StopIteration:
                    finished = True
                    break
                except csv.Error as e:
                    if reader.line_num > start or not lines.last.endswith("\n"):
                        raise InputError(
                            f"{shard.path}:{start}: {e}: a quoted field opened on line {start} is not closed properly "
                            f"(read on to line {reader.line_num}); fix the quoting — qvl does not merge lines") from None
                    bad.append((start, lines.last.rstrip("\r\n"), "malformed_row"))
                    continue
                if len(record) != len(header):
                    bad.append((start, lines.last.rstrip("\r\n") if reader.line_num == start else ",".join(record),
                                "malformed_row"))
                    continue
                rows.append(record)
                numbers.append(start)
            if rows:
                table = pa.table({name: pa.array([r[names[name]].encode("utf-8", "surrogateescape") for r in rows],
                                                 pa.binary()) for name in wanted})
                for name in shard.passthrough:  # carried as text: bytes that are not UTF-8 shown replaced
                    table = table.set_column(table.schema.get_field_index(name), name,
                                             _decode_utf8(table.column(name).combine_chunks())[0])
                yield _canonical(table, shard, np.array(numbers, dtype=np.int64))
            if bad:
                yield _malformed(shard, [(n, t.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), r)
                                         for n, t, r in bad])


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
    with open_text(shard.path, shard.compression) as f:
        line_no = 0
        while True:
            records: list[dict] = []
            lines: list[int] = []
            bad: list[tuple[int, str, str]] = []
            for raw in f:
                line_no += 1
                if line_no == 1:
                    raw = raw.removeprefix(BOM)
                obj, reason = json_line(raw)
                if reason is not None or not isinstance(obj, dict):
                    bad.append((line_no, raw.decode("utf-8", errors="replace").rstrip("\n"), reason or "malformed_row"))
                    continue
                if shard.unread and (late := [k for k in shard.unread if k in obj]):
                    raise InputError(f"{shard.path}:{line_no}: key {late[0]!r} first appears here, after the "
                                     f"{SAMPLE_LINES} lines a JSONL file's columns are read from, so its values "
                                     "would be lost; give it in an early record (null where there is none)")
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
    """JSON objects -> a table of the mapped columns; url/text of the wrong type become
    null text, numbers that are not numbers reject their row, never a crash. Other fields of the first line are
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
        else:  # numbers as text, parsed with those of CSV/TSV: a string or list there is no size
            data[input_name] = pa.array(
                [None if v is None else repr(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                 else v if isinstance(v, str) else json.dumps(v) for v in values], pa.string())
    return pa.table(data)
