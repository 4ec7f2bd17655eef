"""Training batches from `qvl format` shards: memory-mapped Arrow, images decoded and
resized here (never in the model), packed rows kept apart by a block-diagonal mask."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from qvl.boundary import Count, read_json_file
from qvl.errors import QvlError
from qvl.schemas.samples import IGNORE_INDEX, SAMPLE

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class DataError(QvlError):
    pass


MAX_MANIFEST_BYTES = 64 << 20
ShardFile = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class ManifestSettings(msgspec.Struct):
    image_tokens: Annotated[int, msgspec.Meta(ge=1, le=4096)]


class Manifest(msgspec.Struct):
    """The fields of a `qvl format` ``manifest.json`` that training reads (the rest is a report)."""

    records: Count
    rejected: Count
    shards: Annotated[list[ShardFile], msgspec.Meta(max_length=1 << 20)]
    tokenizer: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    settings: ManifestSettings
    model: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] = "qwen-vl"
    vocab_size: Count | None = None


def _read_shard(path: Path) -> pa.Table:
    """One shard, memory-mapped and checked whole (offsets, lengths, the schema qvl writes): a
    damaged file is one error naming it, never a crash in the middle of a run."""
    if not path.is_file():
        raise DataError(f"{path}: listed in manifest.json but missing")
    try:
        table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        table.validate(full=True)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable shard (damaged or not Arrow: {str(e)[:200]})") from None
    for field in SAMPLE:
        if table.schema.get_field_index(field.name) < 0 or table.schema.field(field.name).type != field.type:
            raise DataError(f"{path}: column {field.name} is missing or not {field.type} (not a `qvl format` shard)")
    return table


class Shards:
    """Rows of one `qvl format` output folder, memory-mapped (no copy into RAM)."""

    def __init__(self, folder: Path, max_rejected_fraction: float = 0.01):
        folder = Path(folder)
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise DataError(f"{folder}: no manifest.json (is this the --out of `qvl format`?)")
        self.manifest = read_json_file(manifest_path, Manifest, MAX_MANIFEST_BYTES, DataError)
        records, rejected = self.manifest.records, self.manifest.rejected
        if rejected > records:
            raise DataError(f"{manifest_path}: rejected ({rejected:,}) exceeds records ({records:,})")
        if records and rejected / records > max_rejected_fraction:
            raise DataError(
                f"{folder}: {rejected:,} of {records:,} input records were rejected "
                f"({rejected / records:.1%} > {max_rejected_fraction:.1%}); see rejects.parquet, "
                "or raise --max-rejected if that is intended")
        for i, name in enumerate(self.manifest.shards):
            if Path(name).name != name or name in (".", "..") or "\x00" in name:
                raise DataError(f"{manifest_path}: shards[{i}] {name!r} is not a file name in the folder")
        tables = [_read_shard(folder / name) for name in self.manifest.shards]
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
    spans: list[list[tuple[str, int, int]]]  # per row: (task, start, end) of each shard row packed into it
    sample_ids: list[list[str]]


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Row indices grouped into bins of at most ``capacity`` tokens (a row longer than that has
    its own): first fit, longest first (ties in their order)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def collate(rows: list[dict], resolution: int, pad_id: int,
            pixels: list[list[torch.Tensor]] | None = None, pack_to: int | None = None) -> Batch:
    """Rows as one batch; ``pixels`` (each row's images, decoded) if the caller decoded them.

    With ``pack_to``, rows are first packed together (``pack_rows``) into rows of at most that
    many tokens. The math is the padded batch's: each sample attends only to itself, positions
    restart, and a packed row's first label is not predicted from the row before it (unpacked, a
    row's first token is never a target) — so the loss and its gradient are the same, on fewer
    padded tokens."""
    pixels = pixels if pixels is not None else [[load_image(img["bytes"], resolution) for img in row["images"]]
                                                for row in rows]
    lengths = [len(r["input_ids"]) for r in rows]
    groups = pack_rows(lengths, pack_to) if pack_to else [[i] for i in range(len(rows))]
    length = max(sum(lengths[i] for i in group) for group in groups)
    b = len(groups)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((b, length), dtype=torch.long)
    mask = torch.full((b, 1, length, length), float("-inf"))
    causal = torch.triu(torch.full((length, length), float("-inf")), 1)
    images, spans, sample_ids = [], [], []
    for i, group in enumerate(groups):
        start = 0
        spans.append([])
        sample_ids.append([])
        for k, r in enumerate(group):
            row, n = rows[r], len(rows[r]["input_ids"])
            ids[i, start:start + n] = torch.tensor(row["input_ids"])
            labels[i, start:start + n] = torch.tensor(row["labels"])
            if k:
                labels[i, start] = IGNORE_INDEX
            sample_start = start
            for sample_len in row["sample_lengths"]:
                end = sample_start + sample_len
                positions[i, sample_start:end] = torch.arange(sample_len)
                mask[i, 0, sample_start:end, sample_start:end] = causal[:sample_len, :sample_len]
                sample_start = end
            spans[i].append((row["task"], start, start + n))
            sample_ids[i] += row["sample_ids"]
            images += pixels[r]
            start += n
        for j in range(start, length):  # padding attends to itself only (no all -inf rows)
            mask[i, 0, j, j] = 0.0
    return Batch(ids, labels, positions, mask, torch.stack(images) if images else None, spans, sample_ids)


class Loader:
    """Seeded, resumable order over rows: epoch e is a permutation of rows; rank r of w
    takes every w-th micro-batch. ``position`` (epoch, batches taken) is checkpointed."""

    def __init__(self, shards: Shards, micro_batch: int, resolution: int, pad_id: int, seq_len: int,
                 seed: int, rank: int = 0, world: int = 1, log=print, vocab_size: int | None = None,
                 image_pad: tuple[int, int] | None = None):
        self.shards, self.micro_batch, self.resolution, self.pad_id = shards, micro_batch, resolution, pad_id
        self.seq_len, self.seed, self.rank, self.world, self.log = seq_len, seed, rank, world, log
        self.vocab_size, self.image_pad = vocab_size, image_pad  # image_pad: (<imgpad> id, tokens per image)
        self.epoch, self.taken = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))

    def state(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken}

    def restore(self, state: dict) -> None:
        self.epoch, self.taken = int(state["epoch"]), int(state["taken"])
        self._order = self._permutation()

    def problem(self, row: dict) -> str | None:
        """Why a row cannot be trained on (its shard passed Arrow's checks, its values may still be
        scribbled), or None."""
        ids, n = row["input_ids"], len(row["input_ids"])
        if n > self.seq_len:
            return f"over-long row ({n} > {self.seq_len} tokens)"
        if n == 0 or len(row["labels"]) != n or sum(row["sample_lengths"]) != n or min(row["sample_lengths"]) < 1:
            return "inconsistent row (input_ids, labels and sample_lengths disagree)"
        if self.vocab_size is not None and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            return f"token ids outside the vocabulary (0..{self.vocab_size - 1})"
        if any(not (t == IGNORE_INDEX or 0 <= t < (self.vocab_size or 1 << 31)) for t in row["labels"]):
            return "labels outside the vocabulary"
        if self.image_pad is not None and ids.count(self.image_pad[0]) != len(row["images"]) * self.image_pad[1]:
            return f"{ids.count(self.image_pad[0])} <imgpad> tokens for {len(row['images'])} images"
        return None

    def next(self) -> Batch:
        per_step = self.micro_batch * self.world
        skipped = 0
        while True:
            start = self.taken * per_step + self.rank * self.micro_batch
            if start + self.micro_batch > len(self._order):
                self.epoch, self.taken = self.epoch + 1, 0
                self._order = self._permutation()
                if self.micro_batch * self.world > len(self._order):
                    raise DataError(f"{len(self._order)} rows cannot fill one step of {per_step}")
                continue
            self.taken += 1
            rows, pixels = [], []
            for i in self._order[start:start + self.micro_batch]:
                row = self.shards.row(int(i))
                problem = self.problem(row)
                if problem is None:
                    try:
                        images = [load_image(img["bytes"] or b"", self.resolution) for img in row["images"]]
                    except (OSError, ValueError, Image.DecompressionBombError) as e:
                        problem = f"an image does not decode ({str(e)[:100]})"
                if problem is not None:
                    self.log(f"skipped {problem}: {row['sample_ids']}")
                    skipped += 1
                    if skipped > len(self._order):
                        raise DataError("no row of the shards can be trained on (see the skipped rows above)")
                    continue
                rows.append(row)
                pixels.append(images)
            if rows:
                # unpacked multitask samples padded to a micro-batch's longest are ~1.6x their tokens;
                # rows a quarter longer than that take most of them (a stage-2 step of the demo: 25%
                # less time), while longer rows would cost more in attention than they save
                longest = max(len(row["input_ids"]) for row in rows)
                return collate(rows, self.resolution, self.pad_id, pixels, min(self.seq_len, longest * 5 // 4))
