"""Training batches from `qvl format` shards: memory-mapped Arrow, images decoded and
resized here (never in the model), packed rows kept apart by a block-diagonal mask."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from qvl.errors import QvlError
from qvl.schemas.samples import IGNORE_INDEX

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class DataError(QvlError):
    pass


class Shards:
    """Rows of one `qvl format` output folder, memory-mapped (no copy into RAM)."""

    def __init__(self, folder: Path, max_rejected_fraction: float = 0.01):
        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise DataError(f"{folder}: no manifest.json (is this the --out of `qvl format`?)")
        self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        records, rejected = self.manifest["records"], self.manifest["rejected"]
        if records and rejected / records > max_rejected_fraction:
            raise DataError(
                f"{folder}: {rejected:,} of {records:,} input records were rejected "
                f"({rejected / records:.1%} > {max_rejected_fraction:.1%}); see rejects.parquet, "
                "or raise --max-rejected if that is intended")
        files = [folder / name for name in self.manifest["shards"]]
        tables = [pa.ipc.open_stream(pa.memory_map(str(f))).read_all() for f in files]
        self.table = pa.concat_tables(tables) if tables else None
        if self.table is None or self.table.num_rows == 0:
            raise DataError(f"{folder}: holds no rows")

    def __len__(self) -> int:
        return self.table.num_rows

    def row(self, i: int) -> dict:
        return {name: self.table.column(name)[i].as_py() for name in self.table.column_names}


def load_image(data: bytes, size: int) -> torch.Tensor:
    """Qwen-VL's preprocessing: RGB, bicubic resize to a square, CLIP mean/std."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T], restarting at every packed sample
    attention_mask: torch.Tensor  # [B, 1, T, T] additive: block-diagonal causal
    pixels: torch.Tensor | None  # [n_images, 3, R, R] in span order
    tasks: list[str]
    sample_ids: list[list[str]]


def collate(rows: list[dict], resolution: int, pad_id: int) -> Batch:
    length = max(len(r["input_ids"]) for r in rows)
    b = len(rows)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((b, length), dtype=torch.long)
    mask = torch.full((b, 1, length, length), float("-inf"))
    causal = torch.triu(torch.full((length, length), float("-inf")), 1)
    images = []
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        start = 0
        for sample_len in row["sample_lengths"]:
            end = start + sample_len
            positions[i, start:end] = torch.arange(sample_len)
            mask[i, 0, start:end, start:end] = causal[:sample_len, :sample_len]
            start = end
        for j in range(n, length):  # padding attends to itself only (no all -inf rows)
            mask[i, 0, j, j] = 0.0
        images += [load_image(img["bytes"], resolution) for img in row["images"]]
    return Batch(ids, labels, positions, mask, torch.stack(images) if images else None,
                 [r["task"] for r in rows], [r["sample_ids"] for r in rows])


class Loader:
    """Seeded, resumable order over rows: epoch e is a permutation of rows; rank r of w
    takes every w-th micro-batch. ``position`` (epoch, batches taken) is checkpointed."""

    def __init__(self, shards: Shards, micro_batch: int, resolution: int, pad_id: int, seq_len: int,
                 seed: int, rank: int = 0, world: int = 1, log=print):
        self.shards, self.micro_batch, self.resolution, self.pad_id = shards, micro_batch, resolution, pad_id
        self.seq_len, self.seed, self.rank, self.world, self.log = seq_len, seed, rank, world, log
        self.epoch, self.taken = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))

    def state(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken}

    def restore(self, state: dict) -> None:
        self.epoch, self.taken = int(state["epoch"]), int(state["taken"])
        self._order = self._permutation()

    def next(self) -> Batch:
        per_step = self.micro_batch * self.world
        while True:
            start = self.taken * per_step + self.rank * self.micro_batch
            if start + self.micro_batch > len(self._order):
                self.epoch, self.taken = self.epoch + 1, 0
                self._order = self._permutation()
                if self.micro_batch * self.world > len(self._order):
                    raise DataError(f"{len(self._order)} rows cannot fill one step of {per_step}")
                continue
            self.taken += 1
            rows = []
            for i in self._order[start:start + self.micro_batch]:
                row = self.shards.row(int(i))
                if len(row["input_ids"]) > self.seq_len:
                    self.log(f"skipped over-long row ({len(row['input_ids'])} > {self.seq_len} tokens): "
                             f"{row['sample_ids']}")
                    continue
                rows.append(row)
            if rows:
                return collate(rows, self.resolution, self.pad_id)
