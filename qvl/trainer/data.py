"""Training batches from `qvl format` shards, local or streamed from a bucket: memory-mapped
Arrow in a seeded order across shards that resumes exactly (``stream``), images decoded and
resized here (never in the model), packed rows kept apart by a block-diagonal mask."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec
import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from qvl.boundary import Count, decode_json, read_json_file
from qvl.common import remote
from qvl.errors import QvlError, RecordError
from qvl.schemas.samples import IGNORE_INDEX, SAMPLE
from qvl.trainer.stream import Position, ShardCache, window_rows, windows

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


def _read_shard(path: Path, name: str) -> pa.Table:
    """One shard, memory-mapped and checked whole (offsets, lengths, the schema qvl writes): a
    damaged file is one error naming it (``name``: its path or URL), never a crash mid-run."""
    try:
        table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        table.validate(full=True)
    except FileNotFoundError:
        raise DataError(f"{name}: listed in manifest.json but missing") from None
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{name}: not a readable shard (damaged or not Arrow: {str(e)[:200]})") from None
    for field in SAMPLE:
        if table.schema.get_field_index(field.name) < 0 or table.schema.field(field.name).type != field.type:
            raise DataError(f"{name}: column {field.name} is missing or not {field.type} (not a `qvl format` shard)")
    return table


DEFAULT_CACHE_GB = 4.0


class Shards:
    """A `qvl format` output folder, local or committed at a URL (``s3://``, ``gs://`` …): its
    manifest, read at once, and its shards, read a few at a time (``tables``). A URL's shards go
    through a bounded ``ShardCache``; a local folder's are memory-mapped where they lie."""

    def __init__(self, folder: str | Path, max_rejected_fraction: float = 0.01, cache_gb: float = DEFAULT_CACHE_GB):
        self.where = remote.location(folder)
        if isinstance(self.where, str):
            self.manifest, sizes = self._remote_manifest(self.where)
            self.cache: ShardCache | None = ShardCache(self.where, sizes, int(cache_gb * 1e9))
        else:
            self.manifest, self.cache = self._local_manifest(self.where), None
        records, rejected = self.manifest.records, self.manifest.rejected
        if rejected > records:
            raise DataError(f"{self._name('manifest.json')}: rejected ({rejected:,}) exceeds records ({records:,})")
        if records and rejected / records > max_rejected_fraction:
            raise DataError(
                f"{self.where}: {rejected:,} of {records:,} input records were rejected "
                f"({rejected / records:.1%} > {max_rejected_fraction:.1%}); see rejects.parquet, "
                "or raise --max-rejected if that is intended")
        for i, name in enumerate(self.manifest.shards):
            if Path(name).name != name or name in (".", "..") or "\x00" in name:
                raise DataError(f"{self._name('manifest.json')}: shards[{i}] {name!r} is not a file name in the folder")
            if not (name in self.cache.sizes if self.cache else (self.where / name).is_file()):
                raise DataError(f"{self._name(name)}: listed in manifest.json but missing")
        if not self.manifest.shards:
            raise DataError(f"{self.where}: holds no rows")

    @staticmethod
    def _local_manifest(folder: Path) -> Manifest:
        path = folder / "manifest.json"
        if not path.is_file():
            raise DataError(f"{folder}: no manifest.json (is this the --out of `qvl format`?)")
        return read_json_file(path, Manifest, MAX_MANIFEST_BYTES, DataError)

    @staticmethod
    def _remote_manifest(url: str) -> tuple[Manifest, dict[str, dict]]:
        """The manifest of the output committed at ``url``, and its objects (name -> size and
        id: a shard republished at the same size is another shard); an output not committed
        (still writing, or died) is refused."""
        committed = remote.committed(url)
        fs, path = remote.filesystem(url)
        if committed is None:
            bucket = path.split("/", 1)[0]
            with remote.errors(url):
                if not fs.exists(bucket):
                    raise remote.RemoteError(f"{url}: no such bucket ({bucket})")
            raise remote.RemoteError(f"{url}: no committed qvl output here (no {remote.COMMITTED}): a run still "
                                     "writing, one that stopped before it finished, or not a qvl format output")
        sizes = remote.entries(url, committed)
        if "manifest.json" not in sizes:
            raise DataError(f"{url}: no manifest.json (is this the --out of `qvl format`?)")
        name = remote.join(url, "manifest.json")
        with remote.errors(name), fs.open(remote.join(path, "manifest.json"), "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise DataError(f"{name}: over {MAX_MANIFEST_BYTES:,} bytes")
        try:
            return decode_json(data.removeprefix(b"\xef\xbb\xbf"), Manifest), sizes
        except RecordError as e:
            raise DataError(f"{name}: {e}") from None

    def _name(self, name: str) -> str:
        return remote.join(self.where, name) if self.cache else str(self.where / name)

    def tables(self, indices: list[int]) -> list[pa.Table]:
        """Shards ``indices`` (of the manifest's list), read and checked."""
        names = [self.manifest.shards[i] for i in indices]
        paths = self.cache.use(names) if self.cache else [self.where / name for name in names]
        return [_read_shard(path, self._name(name)) for path, name in zip(paths, names)]

    def prefetch(self, indices: list[int]) -> None:
        if self.cache:
            self.cache.prefetch([self.manifest.shards[i] for i in indices])


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


@dataclass
class _Window:
    """One window of an epoch, read: where it starts in the epoch's sequence, its row order, its rows."""

    index: int
    start: int
    order: np.ndarray
    table: pa.Table

    @property
    def end(self) -> int:
        return self.start + len(self.order)

    def row(self, i: int) -> dict:
        j = int(self.order[i - self.start])
        return {name: self.table.column(name)[j].as_py() for name in self.table.column_names}


class _Walker:
    """A reader's way through the global sequence (``stream`` says what it is): windows read
    forward as rows are asked for, the next one prefetched, those behind dropped."""

    def __init__(self, shards: Shards, seed: int, window: int):
        self.shards, self.seed, self.window = shards, seed, window
        self.epoch, self.plan, self.held = -1, [], []

    def _start(self, position: Position) -> None:
        if position.epoch != self.epoch or not self.held or self.held[0].start > position.consumed:
            self.epoch = position.epoch
            self.plan = windows(self.seed, self.epoch, len(self.shards.manifest.shards), self.window)
            self.held = [self._read(position.window, position.window_start)]

    def _read(self, index: int, start: int) -> _Window:
        shards = self.plan[index]
        tables = self.shards.tables(shards)
        following = self.plan[index + 1] if index + 1 < len(self.plan) else \
            windows(self.seed, self.epoch + 1, len(self.shards.manifest.shards), self.window)[0]
        self.shards.prefetch(following)
        table = pa.concat_tables(tables)
        return _Window(index, start, window_rows(self.seed, self.epoch, index, table.num_rows), table)

    def reaches(self, position: Position, end: int) -> bool:
        """Whether the epoch holds ``end`` rows (reading windows up to it)."""
        self._start(position)
        while self.held[-1].end < end and self.held[-1].index + 1 < len(self.plan):
            self.held.append(self._read(self.held[-1].index + 1, self.held[-1].end))
        return self.held[-1].end >= end

    def rows(self, position: Position, start: int, count: int) -> list[dict]:
        """Rows ``start`` .. ``start + count`` of the epoch (``reaches`` said they exist)."""
        self.reaches(position, start + count)
        return [next(w for w in self.held if w.start <= i < w.end).row(i) for i in range(start, start + count)]

    def at(self, epoch: int, consumed: int) -> Position:
        """The position of row ``consumed`` (held), windows before it let go."""
        while len(self.held) > 1 and self.held[0].end <= consumed:
            self.held.pop(0)
        return Position(epoch, consumed, self.held[0].index, self.held[0].start)

    def epoch_rows(self) -> int:
        """Rows in the epoch (all of its windows held)."""
        return self.held[-1].end


@dataclass
class StreamSettings:
    """What decides a reader's batches (its copy travels to each loader worker)."""

    micro_batch: int
    resolution: int
    pad_id: int
    seq_len: int
    seed: int
    rank: int = 0
    world: int = 1
    window: int = 4  # shards whose rows are shuffled together
    vocab_size: int | None = None
    image_pad: tuple[int, int] | None = None  # (<imgpad> id, tokens per image)


@dataclass
class Item:
    """What a loader worker hands over: a micro-batch (or the error that ended its reading), its
    epoch, the rank's position after it, and the rows it skipped (said by the main process)."""

    batch: Batch | None
    epoch: int
    after: Position
    skipped: list[str]
    error: QvlError | None = None


class StreamDataset(IterableDataset):
    """A rank's micro-batches of the global sequence: slot ``t`` of an epoch is rows
    ``[t*m*w, (t+1)*m*w)`` and rank ``r`` takes ``[t*m*w + r*m, ... + m)``; a slot that does not
    fit whole ends the epoch. Loader worker ``i`` of ``n`` takes slots ``i, i+n, …`` of the rank's,
    decoding and collating them in its process. Its ``state_dict`` (the ``Position`` of its next
    slot) is what ``StatefulDataLoader`` snapshots with every batch, per worker."""

    def __init__(self, shards: Shards, settings: StreamSettings):
        self.shards, self.settings = shards, settings
        self.position, self.fresh = Position(), True  # fresh: the worker's offset not applied yet

    def state_dict(self) -> dict:
        return {"position": msgspec.to_builtins(self.position), "fresh": self.fresh}

    def load_state_dict(self, state: dict) -> None:
        self.position, self.fresh = msgspec.convert(state["position"], Position), bool(state["fresh"])

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        walker = _Walker(self.shards, self.settings.seed, self.settings.window)
        skipped: list[str] = []
        try:
            if self.fresh:
                self.position = self._advance(walker, self._fit(walker, self.position), worker)
            fed = self.position.epoch  # the last epoch that gave this reader a batch
            while True:
                position = self.position
                start = position.consumed + self.settings.rank * self.settings.micro_batch
                rows = walker.rows(position, start, self.settings.micro_batch)
                after = self._advance(walker, position, 1)
                self.position, self.fresh = self._advance(walker, after, workers - 1), False
                batch = self._batch(rows, skipped)
                if batch is not None:
                    fed = position.epoch
                    yield Item(batch, position.epoch, after, skipped)
                    skipped = []
                elif self.position.epoch > fed + 1:  # a whole epoch without one row to train on
                    raise DataError("no row of the shards can be trained on (see the skipped rows above)")
        except QvlError as e:  # handed over as an item: a worker's exception would arrive with its traceback
            yield Item(None, self.position.epoch, self.position, skipped, e)

    def check(self, position: Position) -> None:
        """Read the window ``position`` needs, here: a shard missing, damaged or refused is said
        before a run starts (the reading itself happens in the loader's workers)."""
        self._fit(_Walker(self.shards, self.settings.seed, self.settings.window), position)

    def _fit(self, walker: _Walker, position: Position) -> Position:
        """``position``, or the next epoch's start where its slot does not fit whole."""
        per_slot = self.settings.micro_batch * self.settings.world
        if walker.reaches(position, position.consumed + per_slot):
            return position
        if position.consumed == 0:
            rows = walker.epoch_rows()
            raise DataError(f"{self.shards.where}: holds no rows" if not rows else
                            f"{rows} rows cannot fill one step of {per_slot}")
        return self._fit(walker, Position(position.epoch + 1))

    def _advance(self, walker: _Walker, position: Position, slots: int) -> Position:
        for _ in range(slots):
            nxt = position.consumed + self.settings.micro_batch * self.settings.world
            position = self._fit(walker, walker.at(position.epoch, nxt) if walker.reaches(position, nxt) else
                                 Position(position.epoch + 1))
        return position

    def _batch(self, rows: list[dict], skipped: list[str]) -> Batch | None:
        """The rows that can be trained on, decoded and collated; the others named in ``skipped``."""
        s = self.settings
        good, pixels = [], []
        for row in rows:
            problem = row_problem(row, s.seq_len, s.vocab_size, s.image_pad)
            if problem is None:
                try:
                    images = [load_image(img["bytes"] or b"", s.resolution) for img in row["images"]]
                except (OSError, ValueError, Image.DecompressionBombError) as e:
                    problem = f"an image does not decode ({str(e)[:100]})"
            if problem is not None:
                skipped.append(f"skipped {problem}: {row['sample_ids']}")
                continue
            good.append(row)
            pixels.append(images)
        if not good:
            return None
        # unpacked multitask samples padded to a micro-batch's longest are ~1.6x their tokens;
        # rows a quarter longer than that take most of them (a stage-2 step of the demo: 25%
        # less time), while longer rows would cost more in attention than they save
        longest = max(len(row["input_ids"]) for row in good)
        return collate(good, s.resolution, s.pad_id, pixels, min(s.seq_len, longest * 5 // 4))


def row_problem(row: dict, seq_len: int, vocab_size: int | None, image_pad: tuple[int, int] | None) -> str | None:
    """Why a row cannot be trained on (its shard passed Arrow's checks, its values may still be
    scribbled), or None."""
    ids, n = row["input_ids"], len(row["input_ids"])
    if n > seq_len:
        return f"over-long row ({n} > {seq_len} tokens)"
    if n == 0 or len(row["labels"]) != n or sum(row["sample_lengths"]) != n or min(row["sample_lengths"]) < 1:
        return "inconsistent row (input_ids, labels and sample_lengths disagree)"
    if vocab_size is not None and not 0 <= min(ids) <= max(ids) < vocab_size:
        return f"token ids outside the vocabulary (0..{vocab_size - 1})"
    if any(not (t == IGNORE_INDEX or 0 <= t < (vocab_size or 1 << 31)) for t in row["labels"]):
        return "labels outside the vocabulary"
    if image_pad is not None and ids.count(image_pad[0]) != len(row["images"]) * image_pad[1]:
        return f"{ids.count(image_pad[0])} <imgpad> tokens for {len(row['images'])} images"
    return None


def _as_is(item):
    return item


class Loader:
    """A rank's micro-batches from ``StreamDataset`` through torchdata's ``StatefulDataLoader``
    (``workers`` processes decode and collate; 0: in this one).

    Why this engine and not MosaicML ``streaming`` or ``litdata``: both read only their own
    format (MDS, litdata chunks), so 70–100 TB of shards would be re-encoded and stored twice,
    while `qvl format` already writes Arrow with the images inline, which pyarrow memory-maps as
    it is. ``StatefulDataLoader`` checkpoints each worker's dataset state with every batch
    (``snapshot_every_n_steps=1``) — exact, and without replaying — over any dataset that says
    its own state; the order and the cache (``stream``) are a few pure functions over the files.

    ``state()`` (one per rank, all gathered into the checkpoint): ``position``, the rank's place
    in the global sequence after its last batch (world-size free), and ``dataloader``, the
    engine's own state (per-worker positions), with the ``world`` and ``workers`` it holds for.
    ``restore`` takes every rank's: at the same world size and workers it loads the engine's
    state (the same batches as an unbroken run); otherwise each rank starts at the earliest
    rank's position (the same for all ranks unless one skipped a micro-batch of only bad rows)
    and takes its share of the sequence from there: no row of the epoch repeated or skipped."""

    def __init__(self, shards: Shards, micro_batch: int, resolution: int, pad_id: int, seq_len: int,
                 seed: int, rank: int = 0, world: int = 1, log=print, vocab_size: int | None = None,
                 image_pad: tuple[int, int] | None = None, workers: int = 0, window: int = 4):
        self.settings = StreamSettings(micro_batch, resolution, pad_id, seq_len, seed, rank, world, window,
                                       vocab_size, image_pad)
        self.shards, self.log, self.workers = shards, log, workers
        self.dataset = StreamDataset(shards, self.settings)
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in torch
            warnings.simplefilter("ignore", UserWarning)
            self.dataloader = StatefulDataLoader(self.dataset, batch_size=None, num_workers=workers,
                                                 collate_fn=_as_is, generator=torch.Generator().manual_seed(seed),
                                                 multiprocessing_context="fork" if workers else None)
        self.position = Position()
        self.epoch = 0  # of the last batch
        self._batches = None

    def next(self) -> Batch:
        if self._batches is None:
            self._batches = iter(self.dataloader)
        item = next(self._batches)
        for message in item.skipped:
            self.log(message)
        if item.error is not None:
            raise item.error
        self.position, self.epoch = item.after, item.epoch
        return item.batch

    def check(self) -> None:
        self.dataset.check(self.position)

    def explain(self, e: RuntimeError) -> DataError | None:
        """A worker killed by SIGBUS as what it almost always is here: torch blames shared memory
        (its error surfaces wherever the main process is, e.g. in the backward)."""
        chain, seen = [], e  # torch may raise "exited unexpectedly" from the "killed by signal: Bus error"
        while seen is not None and len(chain) < 8:
            chain.append(str(seen))
            seen = seen.__cause__ or seen.__context__
        if any("DataLoader worker" in text and "Bus error" in text for text in chain):
            return DataError(f"{self.shards.where}: a loader process died of a bus error: a shard changed or was cut "
                             "short while this run read it (local shards are memory-mapped); write or restore the "
                             "shards, then --resume")
        return None

    def close(self) -> None:
        """Stop the worker processes now: left to the garbage collector, which may finalise the
        iterator's queues first, each worker waited out its 5 s join timeout (10 s a run)."""
        if self._batches is not None and hasattr(self._batches, "_shutdown_workers"):
            self._batches._shutdown_workers()
        self._batches = None

    def state(self) -> dict:
        return {"position": msgspec.to_builtins(self.position), "world": self.settings.world,
                "workers": self.workers, "dataloader": self.dataloader.state_dict()}

    def restore(self, states: list[dict]) -> None:
        """Continue from the ``state()`` of every rank of a checkpoint's run."""
        try:
            saved = [msgspec.convert({k: s[k] for k in ("position", "world", "workers")}, SavedState)
                     for s in states]
        except (KeyError, TypeError, msgspec.ValidationError) as e:
            raise DataError(f"the checkpoint's data position is not this qvl's ({str(e)[:100]}); the order of "
                            "its batches cannot be continued") from None
        mine = saved[self.settings.rank] if len(saved) == self.settings.world else None
        if mine is not None and mine.world == self.settings.world and mine.workers == self.workers:
            self.dataloader.load_state_dict(states[self.settings.rank]["dataloader"])
            self.position = mine.position
        else:
            self.position = min((s.position for s in saved), key=lambda p: (p.epoch, p.consumed))
            self.dataset.load_state_dict({"position": msgspec.to_builtins(self.position), "fresh": True})
        self._batches = None


class SavedState(msgspec.Struct):
    position: Position
    world: Annotated[int, msgspec.Meta(ge=1)]
    workers: Annotated[int, msgspec.Meta(ge=0)]
