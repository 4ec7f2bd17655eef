"""`qvl format multitask|sft`: records in, tokenized shards + manifest + rejects out.

Records stream in batches: render (errors -> rejects), tokenize the whole batch at once,
check the length, read the images, then write rows in input order — or pack them, per
task, best-fit into rows of at most ``pack_to`` tokens. Every input record ends up in a
shard or in ``rejects.parquet`` with its file, line and reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from qvl import __version__
from qvl.common import pixels, storage
from qvl.common.engines import EngineSettings
from qvl.errors import AnnotationError
from qvl.formats import families, shards
from qvl.formats.families import MODELS, vision
from qvl.formats.images import ImageStore
from qvl.formats.records import (
    Record,
    check_folders,
    each_record,
    file_records,
    given_id,
)
from qvl.formats.render import chatml, multitask
from qvl.formats.render.sequence import Encoded, Plan, assemble
from qvl.formats.shards import ShardWriter
from qvl.formats.tokenizers import load_tokenizer
from qvl.recipes import require


@dataclass
class FormatSettings:
    tokenizer: str = "qwen-vl"
    image_tokens: int = 256  # <imgpad> per image: the adapter's query count
    max_len: int = 2048  # longer samples are rejected, never truncated
    pack_to: int | None = None  # pack samples of one task into rows of at most this many tokens
    pack_buffer: int = 4096  # samples per task considered together by best-fit
    batch: int = 512
    shard_rows: int = 20_000
    max_pixels: int = pixels.MAX_PIXELS  # larger images are rejected before decoding (bombs)
    model: str = "qwen-vl"  # or qwen2-vl, qwen2.5-vl, qwen3-vl (families.py): template, images, boxes
    min_image_pixels: int | None = None  # the newer families' resize bounds (None: the released processor's)
    max_image_pixels: int | None = None

    def __post_init__(self) -> None:
        require(self.image_tokens >= 1, "image_tokens", f"{self.image_tokens}: an image needs at least one token")
        require(self.max_len >= 1, "max_len", f"{self.max_len}: must be >= 1")
        require(self.pack_to is None or self.pack_to >= 1, "pack_to", f"{self.pack_to}: must be >= 1")
        for key in ("pack_buffer", "batch", "shard_rows", "max_pixels"):
            require(getattr(self, key) >= 1, key, f"{getattr(self, key)}: must be >= 1")
        for key, most in LIMITS.items():
            value = getattr(self, key)
            require(value is None or value <= most, key, f"{value}: must be <= {most:,}")
        require(self.model in MODELS, "model", f"{self.model!r}: use {', '.join(MODELS)}")
        if not families.family(self.model).sized_images:
            for key in ("min_image_pixels", "max_image_pixels"):
                require(getattr(self, key) is None, key, "only for --model qwen2-vl, qwen2.5-vl or qwen3-vl "
                                                         "(Qwen-VL's images are 448x448)")
        else:
            vision.pixel_bounds(families.family(self.model), self.min_image_pixels, self.max_image_pixels)


@dataclass
class FormatJob:
    """One `qvl format multitask|sft` as the CLI gathers it: what to read, where to write, how."""

    kind: str  # multitask or sft
    inputs: list[Path]
    out: Path
    settings: FormatSettings
    images: Path | None = None
    downloads: Path | None = None
    overwrite: bool = False
    show_progress: bool = True
    records: Iterable[tuple[str, int, str, dict | AnnotationError]] | None = None  # from importers, for --from
    engine: EngineSettings = dataclasses.field(default_factory=EngineSettings)  # where: the same samples


# Upper bounds of the settings: far past any real use, each keeps one number from asking for
# unbounded memory or time (a 10^9-token row, a 10^9-sample packing buffer).
LIMITS = {"image_tokens": 1 << 16, "max_len": 1 << 20, "pack_to": 1 << 20, "pack_buffer": 1 << 20, "batch": 1 << 16,
          "shard_rows": 1 << 24, "max_pixels": 1 << 30}


def _check_length(plan: Plan, limit: int, per_token: int | None) -> None:
    """A plan whose text must make more than ``limit`` tokens is too long, known from its length
    in characters (a token of the tokenizer covers at most ``per_token`` of them) before anything
    is encoded: a 100 MB turn costs nothing, and never reaches the tokenizer."""
    if per_token is not None and plan.chars > limit * per_token:
        raise AnnotationError(f"at least {-(-plan.chars // per_token):,} tokens > {limit} ({plan.chars:,} characters "
                              "of text)", "too_long")


def _int_lists(pieces: list[np.ndarray], lengths: list[int]) -> pa.Array:
    """Rows of int32 arrays as an Arrow list<int32> column: one flat copy, no per-row objects."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(pieces)))


def _position_lists(rows: list[list[Encoded]], lengths: list[int]) -> pa.Array:
    """A list<list<int32>> column: per row its three position lists (temporal, height, width),
    the samples of a packed row laid end to end."""
    flat = np.concatenate([np.concatenate([s.positions[dim] for s in row]) for row in rows for dim in range(3)])
    inner = np.zeros(3 * len(rows) + 1, dtype=np.int32)
    np.cumsum(np.repeat(lengths, 3), out=inner[1:])
    outer = np.arange(0, 3 * len(rows) + 1, 3, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(outer), pa.ListArray.from_arrays(pa.array(inner), pa.array(flat)))


def row_columns(rows: list[list[Encoded]], positions: bool) -> dict:
    """The shard columns of ``rows``, each a list of samples laid end to end (one: unpacked)."""
    lengths = [sum(len(s.input_ids) for s in row) for row in rows]
    columns = {
        "id": [row[0].id if len(row) == 1 else f"packed:{row[0].id}+{len(row) - 1}" for row in rows],
        "input_ids": _int_lists([s.input_ids for row in rows for s in row], lengths),
        "labels": _int_lists([s.labels for row in rows for s in row], lengths),
        "images": [[img for s in row for img in s.loaded] for row in rows],
        "task": [row[0].task for row in rows],
        "source": [row[0].source for row in rows],
        "sample_ids": [[s.id for s in row] for row in rows],
        "sample_lengths": [[len(s.input_ids) for s in row] for row in rows],
    }
    if positions:  # each sample's own positions, from 0: a packed row trains as its samples alone
        columns["position_ids"] = _position_lists(rows, lengths)
    return columns


def _best_fit(samples: list, capacity: int, size=lambda e: len(e.input_ids)) -> list[list]:
    """Best-fit decreasing: each sample into the fullest bin it still fits."""
    bins: list[list] = []
    free: list[int] = []
    for s in sorted(samples, key=lambda e: -size(e)):
        n = size(s)
        best = -1
        for i, room in enumerate(free):
            if n <= room and (best < 0 or room < free[best]):
                best = i
        if best < 0:
            bins.append([s])
            free.append(capacity - n)
        else:
            bins[best].append(s)
            free[best] -= n
    return bins


def _vision(settings: FormatSettings, model: families.Family, store: ImageStore):
    """(tokenizer, image tokens, resize, merged patch grid, image-pad id): Qwen-VL's fixed count
    of tokens an image, or the newer families' count from each image's resized size."""
    if not model.sized_images:
        return load_tokenizer(settings.tokenizer), settings.image_tokens, None, None, None
    tok = load_tokenizer(settings.model if settings.tokenizer == "qwen-vl" else settings.tokenizer, settings.model)
    families.check_tokenizer(tok, model)

    def resized_of(ref: str) -> tuple[int, int]:
        return vision.image_tokens(model, *store.size(ref), settings.min_image_pixels, settings.max_image_pixels)[1]

    def image_tokens(ref: str) -> int:
        width, height = resized_of(ref)
        return (width // model.factor) * (height // model.factor)

    def grid(ref: str) -> tuple[int, int]:  # the merged patch grid: (rows, columns)
        width, height = resized_of(ref)
        return height // model.factor, width // model.factor
    return tok, image_tokens, resized_of, grid, tok.special("<|image_pad|>")


class _Build:
    """One run's rendering and rows: each record rendered (``render``, the loop's step), the
    plans tokenized a batch at a time, checked, and written in input order or packed per task;
    every count the manifest gives."""

    def __init__(self, kind: str, settings: FormatSettings, store: ImageStore, model: families.Family):
        self.kind, self.settings, self.store, self.model = kind, settings, store, model
        self.writer: ShardWriter | None = None  # once the output's temp folder is open: the tokenizer loads before
        self.tok, self.image_tokens, self.resized_of, self.grid, self.image_pad = _vision(settings, model, store)
        self.ctx = multitask.Context(self.tok, self.image_tokens, store.size, model, self.resized_of)
        self.limit = min(settings.max_len, settings.pack_to or settings.max_len)
        self.pack_to = settings.pack_to  # None: every sample its own row
        self.stats: Counter = Counter()
        self.rejected: Counter = Counter()
        self.by_task: dict[str, Counter] = defaultdict(Counter)
        self.by_source: dict[tuple[str, str], Counter] = defaultdict(Counter)
        self.buffers: dict[str, list[Encoded]] = defaultdict(list)
        self.seen_ids: set[str] = set()
        self.duplicates: Counter = Counter()
        self.batch: list[tuple[str, int, Plan]] = []

    def reject(self, file: str, line: int, sample_id: str | None, reason: str, detail: str) -> None:
        self.writer.reject(file, line, sample_id, reason, detail)
        self.rejected[reason] += 1

    def reject_record(self, record: Record, error: AnnotationError) -> None:
        """A record unread has no id of its own: its reject's id is empty."""
        self.reject(record.file, record.line, None if isinstance(record.data, AnnotationError) else record.id,
                    error.reason, str(error))

    def render(self, record: Record) -> Plan:
        record.id = given_id(record.data, record.id)
        if record.id in self.seen_ids:  # kept (the records differ), counted and shown
            self.duplicates[record.id] += 1
        self.seen_ids.add(record.id)
        if self.kind == "sft":
            plan = chatml.render(chatml.parse(record.data), record.id, self.tok, self.image_tokens, self.model,
                                 self.resized_of)
        else:
            plan = multitask.render(record.data, record.id, self.ctx)
        _check_length(plan, self.limit, self.tok.max_token_chars)
        return plan

    def add(self, record: Record, plan: Plan) -> None:
        self.batch.append((record.file, record.line, plan))
        if len(self.batch) >= self.settings.batch:
            self.process(self.batch)
            self.batch = []

    def finish(self) -> None:
        if self.batch:
            self.process(self.batch)
        for task in list(self.buffers):
            self.flush_packed(task)

    def emit(self, rows: list[list[Encoded]]) -> None:
        if not rows:
            return
        self.stats["rows"] += len(rows)
        self.stats["row_tokens"] += sum(len(s.input_ids) for row in rows for s in row)
        self.writer.write(row_columns(rows, self.model.sized_images))

    def flush_packed(self, task: str) -> None:
        self.emit(_best_fit(self.buffers.pop(task, []), self.pack_to))

    def _tokenized(self, batch: list[tuple[str, int, Plan]]) -> list[tuple[tuple[str, int, Plan], Encoded]]:
        try:
            return list(zip(batch, assemble([plan for _, _, plan in batch], self.tok)))
        except ValueError:  # the tokenizer refused a text (tiktoken: a run of 1M spaces): reject that one alone
            pairs = []
            for item in batch:
                try:
                    pairs.append((item, assemble([item[2]], self.tok)[0]))
                except ValueError as e:
                    self.reject(item[0], item[1], item[2].id, "untokenizable",
                                f"the tokenizer refused a text: {str(e)[:200]}")
            return pairs

    def process(self, batch: list[tuple[str, int, Plan]]) -> None:
        ready = []
        for (file, line, _), sample in self._tokenized(batch):
            n = len(sample.input_ids)
            if n > self.limit:
                self.reject(file, line, sample.id, "too_long", f"{n} tokens > {self.limit}")
                continue
            try:
                sample.loaded = [dict(zip(("bytes", "path"), self.store.read(ref))) for ref in sample.images]
                if self.model.sized_images:
                    sample.positions = vision.mrope_positions(sample.input_ids, self.image_pad,
                                                              [self.grid(ref) for ref in sample.images])
            except AnnotationError as e:
                self.reject(file, line, sample.id, e.reason, str(e))
                continue
            self.stats["samples"] += 1
            self.stats["tokens"] += n
            self.stats["supervised_tokens"] += sample.supervised
            self.stats["images"] += len(sample.images)
            self.by_task[sample.task]["samples"] += 1
            self.by_task[sample.task]["tokens"] += n
            self.by_source[(sample.source, sample.task)]["samples"] += 1
            self.by_source[(sample.source, sample.task)]["tokens"] += n
            ready.append(sample)
        if self.pack_to:
            for sample in ready:
                self.buffers[sample.task].append(sample)
                if len(self.buffers[sample.task]) >= self.settings.pack_buffer:
                    self.flush_packed(sample.task)
        else:
            self.emit([[s] for s in ready])

    def manifest(self, inputs: list[Path], extra: dict | None) -> dict:
        settings, stats, rejected, by_source = self.settings, self.stats, self.rejected, self.by_source
        capacity = stats["rows"] * settings.pack_to if settings.pack_to else None
        manifest = {
            "kind": self.kind,
            "qvl": __version__,
            "tokenizer": self.tok.name,
            "model": settings.model,
            "vocab_size": self.tok.vocab_size,
            "settings": dataclasses.asdict(settings),
            "inputs": [str(p) for p in inputs],
            "records": stats["records"],
            "samples": stats["samples"],
            "rows": stats["rows"],
            "rejected": sum(rejected.values()),
            "rejected_by_reason": dict(sorted(rejected.items())),
            "tokens": stats["tokens"],
            "supervised_tokens": stats["supervised_tokens"],
            "images": stats["images"],
            "by_task": {t: dict(c) for t, c in sorted(self.by_task.items())},
            "by_source": {source: {t: dict(c) for (src, t), c in sorted(by_source.items()) if src == source}
                          for source in sorted({src for src, _ in by_source})},
            "duplicate_ids": {"samples": sum(self.duplicates.values()), "examples": sorted(self.duplicates)[:20]},
            "packing": {"capacity_tokens": capacity, "real_tokens": stats["row_tokens"],
                        "efficiency": round(stats["row_tokens"] / capacity, 4) if capacity else None},
        }
        manifest.update(extra or {})
        manifest["fingerprint"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
        if manifest["records"] != manifest["samples"] + manifest["rejected"]:
            raise AssertionError("format: records lost between input and output")
        return manifest


def produce_here(build: _Build, records: Iterable, show_progress: bool) -> None:
    """The local engine: every record through this process, rows written as they come."""
    build.stats["records"] = each_record(records, build.render, build.add, build.reject_record,
                                         f"format {build.kind}", "samples", show_progress)
    build.finish()


def run_format(
    kind: str, inputs: list[Path], out: Path, images: Path | None = None, downloads: Path | None = None,
    settings: FormatSettings | None = None, overwrite: bool = False, show_progress: bool = True,
    records: Iterable[tuple[str, int, str, dict | AnnotationError]] | None = None, extra: dict | None = None,
    produce=produce_here,
) -> dict:
    """Render ``inputs`` (qvl's annotation files; or ``records``, from importers) into shards;
    ``produce`` fills the shards and counts (here, or ``qvl.formats.on_ray.produce_on_ray``)."""
    settings = settings or FormatSettings()
    check_folders(images, downloads)
    records = file_records(inputs) if records is None else records
    store = ImageStore(images, downloads, settings.max_pixels)
    model = families.family(settings.model)
    build = _Build(kind, settings, store, model)
    shards.claim(out, overwrite)
    with storage.replacing(out) as tmp:
        build.writer = writer = ShardWriter(tmp, max_rows=settings.shard_rows, positions=model.sized_images)
        try:
            produce(build, records, show_progress)
            manifest = build.manifest(inputs, extra)
            order = {str(p): i for i, p in enumerate(inputs)}
            writer.rejects.sort(key=lambda r: (order.get(r["file"], len(order)), r["file"], r["line"]))
            writer.finish(manifest)
            return manifest
        except BaseException:
            writer.abort()
            raise
