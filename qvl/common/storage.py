"""Atomic writes: every file qvl produces appears whole or not at all.

A run killed mid-write leaves only ``*.tmp-*`` files behind, which the next run
overwrites; readers never see half a parquet file or half a JSON report.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from qvl.errors import QvlError


def _tmp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: str | Path) -> object:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# Columns with few distinct values, where dictionary pages pay. Everywhere else a
# dictionary is built and then abandoned (captions and URLs are nearly all distinct),
# which costs a third of the write time; min/max statistics of long text are never used.
DICTIONARY_COLUMNS = frozenset({"source", "lang", "lang_by", "drop_reason", "failed_rules", "reason", "status",
                                "clip_model"})
NO_STATISTICS = frozenset({"text", "text_raw", "url"})


def writer_options(schema: pa.Schema) -> dict:
    """pyarrow writer settings for ``schema``: dictionaries and statistics where they pay."""
    def leaf(field: pa.Field) -> str:  # a list of strings is dictionary-encoded at its element
        listed = pa.types.is_list(field.type) or pa.types.is_large_list(field.type)
        return f"{field.name}.list.element" if listed else field.name

    return {"use_dictionary": [leaf(f) for f in schema if f.name in DICTIONARY_COLUMNS] or False,
            "write_statistics": [n for n in schema.names if n not in NO_STATISTICS] or False}


def write_parquet(path: str | Path, table: pa.Table, compression: str = "zstd") -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=compression, **writer_options(table.schema))


class ParquetSink:
    """Streams tables into one parquet file, renamed into place on ``commit``.

    Writing nothing still commits a valid empty file with ``schema``.
    """

    def __init__(self, path: str | Path, schema: pa.Schema, compression: str = "zstd"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _tmp_path(self.path)
        self.schema = schema
        self._writer = pq.ParquetWriter(self.tmp, schema, compression=compression, **writer_options(schema))
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._writer.write_table(table.cast(self.schema))
            self.rows += table.num_rows

    def commit(self) -> None:
        self._writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._writer.close()
        if self.tmp.exists():
            self.tmp.unlink()


# ---------------------------------------------------------------- output folders

MARKER = ".qvl"  # written into every output folder: what qvl may later resume, replace or delete


class OutputError(QvlError):
    """An output folder that cannot be used; the message names it and says why."""


def claim(out: Path, kind: str, legacy: tuple[str, ...] = (), create: bool = True) -> bool:
    """Check that ``out`` can be ``kind``'s output folder and mark it as one (``create``).

    Returns True when ``out`` already holds a ``kind`` output (to resume or, with
    --overwrite, to replace); a folder with other content — no marker, and none of the
    ``legacy`` files that outputs of earlier qvl versions hold — is refused, so qvl never
    deletes what it did not write. A file where the folder should be, or a folder it may
    not write to, is an error too."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file, not a folder; choose a folder for --out")
    existing = False
    # a folder holding only a marker is one a command claimed and then failed in (a typo in its
    # settings): nothing to keep or resume, so any command may take it
    if out.is_dir() and any(p.name != MARKER for p in out.iterdir()):
        marker = out / MARKER
        owner = None
        if marker.is_file():
            try:
                owner = read_json(marker).get("kind")
            except (OSError, ValueError, AttributeError, RecursionError):  # a marker qvl did not write
                owner = None
        elif any((out / name).exists() for name in legacy):
            owner = kind
        if owner is None:
            raise OutputError(f"{out}: exists, is not empty and is not a qvl output; choose a new or empty --out "
                              "(qvl only ever replaces what it wrote)")
        if owner != kind:
            raise OutputError(f"{out}: holds a qvl {owner} output, not a {kind} output; choose another --out")
        existing = True
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / MARKER, {"kind": kind})
        except OSError as e:
            raise OutputError(f"{out}: cannot write here ({e.strerror})") from None
    return existing


def remove_stale(out: Path) -> None:
    """Folders a killed run left beside ``out`` (``OUT.tmp-PID``, ``OUT.old-PID``), when that
    process is gone: every writer of a whole output folder calls it before building its own."""
    for kind in ("tmp", "old"):
        for leftover in out.parent.glob(f"{glob.escape(out.name)}.{kind}-*"):
            pid = leftover.name.rsplit("-", 1)[1]
            if leftover.is_dir() and pid.isascii() and pid.isdigit() and int(pid) < 1 << 31 and not _alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def replacing(out: Path) -> Iterator[Path]:
    """A fresh folder ``OUT.tmp-PID`` beside ``out`` to build a whole output in: when the block
    ends it takes ``out``'s place (an old ``out`` renamed aside, then deleted), so a reader sees
    the old output or the new one, never half; an error deletes it. What killed runs left
    beside ``out`` is removed first."""
    remove_stale(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot write beside it ({e.strerror})") from None
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
