"""What an input file is, before a row is read: its format, compression, layout and columns
(a Shard); the inputs given (files, folders, globs) found. Problems with a whole file
(missing, truncated, unknown columns) raise InputError."""

from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from qvl.common import remote
from qvl.common.remote import RemoteFile
from qvl.curate.sources import layouts
from qvl.curate.sources.layouts import Layout, LayoutError
from qvl.errors import QvlError
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


class InputError(QvlError):
    """A whole input file cannot be read; the message names the file and the problem."""


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # \ud800-\udfff: half of a pair, or alone


def json_line(raw: bytes | str) -> tuple[object, str | None]:
    """One JSONL line decoded, or the reject reason: ``invalid_utf8`` for bytes that are not
    UTF-8 and for a lone surrogate escape (``"\\ud800"``: Python's json reads it, no UTF-8
    writer can write it), ``malformed_row`` for what is not JSON or nests past the recursion
    limit (100k ``[``)."""
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    except (json.JSONDecodeError, RecursionError):
        return None, "malformed_row"
    if _SURROGATE_ESCAPE.search(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")):
        try:  # only lines with such an escape pay for the check; a proper pair is one character now
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            return None, "invalid_utf8"
        except RecursionError:
            return None, "malformed_row"
    return obj, None


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
    layout_note: str = ""  # how the layout was recognised, when it took more than a header
    unread: tuple[str, ...] = ()  # JSONL: the layout's columns the sampled lines lack (refused later)
    name: str = ""  # the file's name in row ids (qvl.common.inputs); default: its file name

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


def discover(inputs: list[str | Path]) -> list[Path | RemoteFile]:
    """Expand folders into their supported files; sorted so shard indices are stable. A URL's
    files are read where they are (``RemoteFile``), never copied here first."""
    files: list[Path | RemoteFile] = []
    for item in inputs:
        item = remote.location(item)
        if isinstance(item, str):
            found = remote.list_files(item)
            if isinstance(found, RemoteFile):
                files.append(found)
                continue
            found = [f for f in found if not f.name.startswith((".", "_")) and ".tmp-" not in f.name and _supported(f)]
            if not found:
                raise InputError(f"{item}: folder holds no parquet/jsonl/csv/tsv files")
            files.extend(found)
            continue
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


def open_text(path: Path | RemoteFile, compression: str | None) -> io.BufferedIOBase:
    raw = path.open("rb") if isinstance(path, RemoteFile) else path  # a remote stream closes when dropped
    if compression == "gzip":
        return gzip.open(raw, "rb")
    if compression == "bz2":
        return bz2.open(raw, "rb")
    return open(raw, "rb") if isinstance(raw, Path) else raw


SAMPLE_LINES = 200  # lines read to recognise a text file's layout
MAX_LINE_BYTES = 256 << 20  # one JSONL record may be large; a "line" beyond this is no record
BOM = b"\xef\xbb\xbf"


def _sample_lines(path: Path, compression: str | None) -> list[str]:
    """The first lines of a text file (the UTF-8 BOM removed), for recognising its layout."""
    lines = []
    try:
        with open_text(path, compression) as f:
            for i in range(SAMPLE_LINES):
                line = f.readline(MAX_LINE_BYTES + 1)
                if not line:
                    break
                if len(line) > MAX_LINE_BYTES:
                    raise InputError(f"{path}:{i + 1}: a line of over {MAX_LINE_BYTES >> 20} MiB (is this a text file?)")
                lines.append((line.removeprefix(BOM) if i == 0 else line).decode("utf-8", errors="replace"))
    except (OSError, EOFError, pa.ArrowException) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    return lines


def _json_columns(path: Path, lines: list[str]) -> list[str]:
    """The keys of the sampled lines that are JSON objects, in the order first seen: a key the first
    record lacks (a score only some records have) is still a column (a bad line is a reject, not
    the file's end)."""
    keys: dict[str, None] = {}
    for line in lines:
        if not line.strip():
            continue
        obj, _ = json_line(line)
        if isinstance(obj, dict):
            keys.update(dict.fromkeys(obj))
    if not keys and any(line.strip() for line in lines):
        raise InputError(f"{path}: none of the first {len(lines)} lines is a JSON object (is this JSONL?)")
    return list(keys)


def open_shard(
    path: Path, index: int, mapping: dict[str, str] | None = None, source: str | None = None, name: str = ""
) -> Shard:
    """Recognise a file's format and layout and check its columns, before any row is read."""
    return dataclasses.replace(_open_shard(path, index, mapping, source), name=name or path.name)


def _open_shard(path: Path, index: int, mapping: dict[str, str] | None, source: str | None) -> Shard:
    fmt, compression = _format_of(path)
    where = str(path)
    if fmt == "parquet":
        try:
            meta = pq.ParquetFile(remote.open_input(path)).metadata
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{path}: not a readable parquet file ({e})") from None
        columns = meta.schema.to_arrow_schema().names
        schema = meta.schema.to_arrow_schema()
        est_rows = meta.num_rows
    else:
        lines = _sample_lines(path, compression)
        size = path.stat().st_size
        sampled = sum(len(line.encode()) for line in lines)
        est_rows = max(1, size * len(lines) // max(1, sampled)) if lines else 0
        if fmt == "jsonl":
            columns = _json_columns(path, lines)
        else:
            try:
                headerless = layouts.headerless_tsv(lines, where) if fmt == "tsv" and not mapping else None
            except LayoutError as e:
                raise InputError(str(e)) from None
            if headerless is not None:
                layout, note = headerless
                return Shard(path, index, fmt, compression, layout, source, est_rows, layout_note=note)
            header = lines[0].rstrip("\r\n") if lines else ""
            columns = header.split("\t") if fmt == "tsv" else next(csv.reader([header]), [])
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
                optional={cols[c]: "number" for c in layouts.NUMBERS if c in cols},
            )
    except (LayoutError, SchemaError) as e:
        raise InputError(str(e)) from None
    mapped = set(layout.columns.values())
    passthrough = tuple(c for c in columns if c not in mapped) if schema is None else ()
    # a known column of the layout that no sampled line holds: a JSONL record naming it later
    # would otherwise lose that value unseen
    unread = tuple(c for c in layouts.full(layout).columns.values() if c not in mapped) \
        if fmt == "jsonl" and not mapping else ()
    return Shard(path, index, fmt, compression, layout, source, est_rows, passthrough, unread=unread)
