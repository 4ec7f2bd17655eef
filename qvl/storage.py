"""Atomic writes: every file qvl produces appears whole or not at all.

A run killed mid-write leaves only ``*.tmp-*`` files behind, which the next run
overwrites; readers never see half a parquet file or half a JSON report.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq


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


def write_parquet(path: str | Path, table: pa.Table, compression: str = "zstd") -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=compression)


class ParquetSink:
    """Streams tables into one parquet file, renamed into place on ``commit``.

    Writing nothing still commits a valid empty file with ``schema``.
    """

    def __init__(self, path: str | Path, schema: pa.Schema, compression: str = "zstd"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = _tmp_path(self.path)
        self.schema = schema
        self._writer = pq.ParquetWriter(self.tmp, schema, compression=compression)
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
