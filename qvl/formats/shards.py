"""Arrow shards that Hugging Face ``datasets`` opens, written whole or not at all.

The output folder has the layout of ``Dataset.save_to_disk``: ``data-XXXXX-of-NNNNN.arrow``
(Arrow IPC streams, what ``Dataset.from_file`` reads), ``state.json`` and
``dataset_info.json``, plus qvl's ``manifest.json`` and ``rejects.parquet``. It is
built in a temporary folder beside the target and renamed into place at the end
(``storage.replacing``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from qvl.boundary import Count, read_json_file
from qvl.common import storage
from qvl.schemas.samples import REJECT, SAMPLE, SAMPLE_MROPE


def _sequence(value_type: str) -> dict:
    return {"feature": {"dtype": value_type, "_type": "Value"}, "_type": "List"}


KIND = "format"

# datasets' Features.to_dict() of the SAMPLE schema, written out so that formatting never
# pays for importing datasets (a test checks it against datasets' own).
FEATURES = {
    "id": {"dtype": "string", "_type": "Value"},
    "input_ids": _sequence("int32"),
    "labels": _sequence("int32"),
    "images": {"feature": {"_type": "Image"}, "_type": "List"},
    "task": {"dtype": "string", "_type": "Value"},
    "source": {"dtype": "string", "_type": "Value"},
    "sample_ids": _sequence("string"),
    "sample_lengths": _sequence("int32"),
}
FEATURES_MROPE = {**FEATURES, "position_ids": {"feature": _sequence("int32"), "_type": "List"}}


def claim(out: Path, overwrite: bool) -> None:
    """``out`` may become a format output: new, empty, or a format output to --overwrite."""
    if storage.claim(out, KIND, legacy=("manifest.json",), create=False) and not overwrite:
        raise FileExistsError(f"{out}: holds a qvl format output; choose another --out or --overwrite")


class ShardWriter:
    """Shards, rejects and manifest into ``tmp``, the folder ``storage.replacing`` swaps in."""

    def __init__(self, tmp: Path, max_rows: int = 20_000, max_bytes: int = 512 << 20, positions: bool = False):
        self.schema, self.features = (SAMPLE_MROPE, FEATURES_MROPE) if positions else (SAMPLE, FEATURES)
        self.tmp = tmp
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self.files: list[Path] = []
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._rows = self._bytes = 0
        self.rejects: list[dict] = []

    def _open(self) -> None:
        path = self.tmp / f"data-{len(self.files):05d}.arrow"
        self.files.append(path)
        self._writer = pa.ipc.new_stream(str(path), self.schema)
        self._rows = self._bytes = 0

    def write(self, rows: dict) -> None:
        batch = pa.RecordBatch.from_pydict(rows, schema=self.schema)
        if self._writer is None or self._rows >= self.max_rows or self._bytes >= self.max_bytes:
            if self._writer is not None:
                self._writer.close()
            self._open()
        self._writer.write_batch(batch)
        self._rows += batch.num_rows
        self._bytes += batch.nbytes

    def reject(self, file: str, line: int, sample_id: str | None, reason: str, detail: str) -> None:
        self.rejects.append({"file": file, "line": line, "id": sample_id, "reason": reason, "detail": detail})

    def close(self) -> None:
        """The shard being written, closed: its rows are final (a Ray part's output)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def adopt(self, path: Path) -> None:
        """A finished shard written elsewhere (a Ray task) becomes this output's next one."""
        self.close()
        self.files.append(path)

    def finish(self, manifest: dict) -> None:
        if self._writer is None and not self.files:  # no sample: one shard holding one empty batch
            self._open()
            self._writer.write_batch(pa.RecordBatch.from_arrays([pa.array([], f.type) for f in self.schema],
                                                               schema=self.schema))
        self.close()
        n = len(self.files)
        names = []
        for i, path in enumerate(self.files):
            name = f"data-{i:05d}-of-{n:05d}.arrow"
            path.rename(self.tmp / name)
            names.append(name)
        storage.write_json(self.tmp / "state.json", {
            "_data_files": [{"filename": name} for name in names], "_fingerprint": manifest["fingerprint"],
            "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
            "_output_all_columns": False, "_split": None})
        storage.write_json(self.tmp / "dataset_info.json", {
            "citation": "", "description": "qvl tokenized training samples", "features": self.features,
            "homepage": "", "license": ""})
        pq.write_table(pa.Table.from_pylist(self.rejects, schema=REJECT), self.tmp / "rejects.parquet")
        storage.write_json(self.tmp / "manifest.json", {**manifest, "shards": names})
        storage.write_json(self.tmp / storage.MARKER, {"kind": KIND})

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.close()


class Manifest(msgspec.Struct):
    """What readers of a format output rely on in its ``manifest.json`` (the rest is a report)."""

    tokenizer: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    records: Count
    rejected: Count
    model: Annotated[str, msgspec.Meta(max_length=64)] = "qwen-vl"
    shards: list[Annotated[str, msgspec.Meta(max_length=4096)]] = []


MAX_MANIFEST = 64 << 20  # bytes: a manifest is a report of a few kilobytes


def read_manifest(folder: Path) -> Manifest:
    """``folder``'s manifest, typed; a missing, damaged or foreign one is one error naming the file."""
    return read_json_file(Path(folder) / "manifest.json", Manifest, MAX_MANIFEST,
                          hint=f" (not a qvl format manifest: is {folder} the --out of `qvl format`?)")
