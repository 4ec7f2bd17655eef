"""`qvl format multitask|sft --engine ray`: the records cut into parts, each part rendered,
tokenized, checked and given its images by one Ray task, the same samples as the local engine.

The order is the local one. The driver reads the records in input order and cuts them into
parts of ``part_records``; part ``k`` writes its samples, one a row and in order, into
``_parts/k/``. Unpacked, those files *are* the output: taken part after part they hold the
local engine's rows in the local order (the files are cut at other rows: read the shards in
order, not file by file). Packed, the driver replays the local engine's packing — per task a
buffer of ``pack_buffer`` samples in input order, best-fit when it fills, then what is left,
task by task in the order their buffers began — on the samples' lengths alone, and Ray tasks
assemble those rows from the parts' files: the same packed rows, in the same order. Counts,
duplicate ids and rejects are merged in part order, so the manifest and ``rejects.parquet``
are the local engine's too.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa

from qvl.common.engines import EngineSettings, RayEngine
from qvl.common.progress import progress_bar
from qvl.formats import families
from qvl.formats.build import FormatSettings, _best_fit, _Build, row_columns, run_format
from qvl.formats.images import ImageStore
from qvl.formats.records import each_record
from qvl.formats.render.sequence import Encoded
from qvl.formats.shards import ShardWriter

PART_RECORDS = 4096  # records a Ray task renders: big enough to amortise a task, small enough to spread


@dataclass(frozen=True)
class Sample:
    """Where one written sample lies (part, row in that part's files) and what packing needs."""

    part: int
    row: int
    task: str
    length: int


class _Part(_Build):
    """A part's build: every sample its own row (packing is the driver's), and the ids it saw,
    in order, for the run's duplicate count."""

    def __init__(self, *args):
        super().__init__(*args)
        self.pack_to = None
        self.ids: list[str] = []
        self.written: list[tuple[str, int]] = []

    def render(self, record):
        try:
            return super().render(record)
        finally:
            self.ids.append(record.id)

    def emit(self, rows: list[list[Encoded]]) -> None:
        self.written.extend((row[0].task, len(row[0].input_ids)) for row in rows)
        super().emit(rows)


def render_part(kind: str, settings: FormatSettings, images: Path | None, downloads: Path | None,
                records: list[tuple], folder: Path) -> dict:
    """One part of the records into ``folder`` as one-sample rows; its counts and rejects."""
    model = families.family(settings.model)
    build = _Part(kind, settings, ImageStore(images, downloads, settings.max_pixels), model)
    folder.mkdir(parents=True)
    build.writer = ShardWriter(folder, max_rows=settings.shard_rows, positions=model.sized_images)
    build.stats["records"] = each_record(records, build.render, build.add, build.reject_record, "", "", False)
    build.finish()
    build.writer.close()
    return {"files": build.writer.files, "stats": build.stats, "rejected": build.rejected,
            "by_task": dict(build.by_task), "by_source": dict(build.by_source), "ids": build.ids,
            "rejects": build.writer.rejects, "written": build.written}


def pack_plan(samples: list[Sample], capacity: int, buffer: int) -> list[list[Sample]]:
    """The rows the local engine packs, in its order: per task, a buffer best-fit when it holds
    ``buffer`` samples; at the end, what is left, task by task as their buffers began."""
    rows: list[list[Sample]] = []
    buffers: dict[str, list[Sample]] = {}
    for sample in samples:
        buffers.setdefault(sample.task, []).append(sample)
        if len(buffers[sample.task]) >= buffer:
            rows += _best_fit(buffers.pop(sample.task), capacity, size=lambda s: s.length)
    for task in list(buffers):
        rows += _best_fit(buffers.pop(task), capacity, size=lambda s: s.length)
    return rows


def _read_part(files: list[Path]) -> pa.Table:
    tables = [pa.ipc.open_stream(pa.memory_map(str(p))).read_all() for p in files]
    return pa.concat_tables(tables) if tables else None


def _encoded(table: pa.Table, row: int, positions: bool) -> Encoded:
    """One written sample read back as the ``Encoded`` it was written from."""
    values = {name: table.column(name)[row].as_py() for name in ("id", "task", "source", "images")}
    sample = Encoded(values["id"], values["task"], values["source"],
                     table.column("input_ids")[row].values.to_numpy(zero_copy_only=False),
                     table.column("labels")[row].values.to_numpy(zero_copy_only=False), [])
    sample.loaded = values["images"]
    if positions:
        sample.positions = np.array(table.column("position_ids")[row].as_py(), dtype=np.int32)
    return sample


def pack_rows(rows: list[list[Sample]], parts: dict[int, list[Path]], folder: Path, positions: bool) -> list[Path]:
    """Packed rows assembled from the parts' samples into ``folder``."""
    tables = {k: _read_part(files) for k, files in parts.items()}
    folder.mkdir(parents=True)
    writer = ShardWriter(folder, max_rows=len(rows) + 1, positions=positions)
    writer.write(row_columns([[_encoded(tables[s.part], s.row, positions) for s in row] for row in rows], positions))
    writer.close()
    return writer.files


def _parts(records, size: int):
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


def _merge(build: _Build, result: dict, seen: set[str]) -> None:
    """A part's counts into the run's, in part order (duplicate ids as the local run counts them)."""
    build.stats.update(result["stats"])
    build.rejected.update(result["rejected"])
    for key, counts in result["by_task"].items():
        build.by_task[key].update(counts)
    for key, counts in result["by_source"].items():
        build.by_source[key].update(counts)
    for sample_id in result["ids"]:
        if sample_id in seen:
            build.duplicates[sample_id] += 1
        seen.add(sample_id)
    build.writer.rejects.extend(result["rejects"])


def _render_all(ray: RayEngine, build: _Build, records, tmp: Path, part_records: int, show_progress: bool) -> list[dict]:
    """Every part rendered on Ray, at most two parts a CPU in flight; results in part order."""
    remote = ray.ray.remote(num_cpus=1, max_retries=2)(render_part)
    limit = 2 * max(1, int(ray.resources().get("CPU", 1)))
    pending: dict = {}
    results: dict[int, dict] = {}
    with progress_bar(disable=not show_progress) as bar:
        task = bar.add_task(f"format {build.kind} on Ray", total=None, unit="records")

        def take_one() -> None:
            done, _ = ray.ray.wait(list(pending), num_returns=1)
            results[pending.pop(done[0])] = result = ray.ray.get(done[0])
            bar.advance(task, result["stats"]["records"])

        for k, chunk in enumerate(_parts(records, part_records)):
            while len(pending) >= limit:
                take_one()
            pending[remote.remote(build.kind, build.settings, build.store.root, build.store.downloads, chunk,
                                  tmp / "_parts" / f"{k:06d}")] = k
        while pending:
            take_one()
    return [results[k] for k in sorted(results)]


def _adopt(build: _Build, files: list[Path]) -> None:
    """Shards written by Ray tasks moved into the output, in order, as its next shards."""
    for path in files:
        moved = build.writer.tmp / f"ray-{len(build.writer.files):06d}.arrow"
        Path(path).rename(moved)
        build.writer.adopt(moved)


def produce_on_ray(engine: EngineSettings, part_records: int = PART_RECORDS):
    """A ``produce`` for ``run_format``: the parts on Ray, then the rows in the local order."""

    def produce(build: _Build, records, show_progress: bool) -> None:
        tmp = build.writer.tmp
        with RayEngine(engine.address, engine.workers) as ray:
            results = _render_all(ray, build, records, tmp, part_records, show_progress)
            seen: set[str] = set()
            for result in results:
                _merge(build, result, seen)
            if build.settings.pack_to:
                _pack(ray, build, results, tmp)
            else:
                for result in results:
                    _adopt(build, result["files"])
                build.stats["rows"], build.stats["row_tokens"] = build.stats["samples"], build.stats["tokens"]
        for folder in ("_parts", "_packed"):
            shutil.rmtree(tmp / folder, ignore_errors=True)

    return produce


def _pack(ray: RayEngine, build: _Build, results: list[dict], tmp: Path) -> None:
    """The local engine's packed rows, assembled by Ray tasks a shard's worth at a time."""
    samples = [Sample(k, i, t, n) for k, r in enumerate(results) for i, (t, n) in enumerate(r["written"])]
    rows = pack_plan(samples, build.settings.pack_to, build.settings.pack_buffer)
    build.stats["rows"] = len(rows)
    build.stats["row_tokens"] = sum(s.length for row in rows for s in row)
    remote = ray.ray.remote(num_cpus=1, max_retries=2)(pack_rows)
    step = build.settings.shard_rows
    refs = []
    for i in range(0, len(rows), step):
        group = rows[i:i + step]
        parts = {k: results[k]["files"] for k in sorted({s.part for row in group for s in row})}
        refs.append(remote.remote(group, parts, tmp / "_packed" / f"{i // step:06d}", build.model.sized_images))
    for files in ray.ray.get(refs):
        _adopt(build, files)


def run_format_on_ray(kind: str, inputs: list[Path], out: Path, images: Path | None = None,
                      downloads: Path | None = None, settings: FormatSettings | None = None, overwrite: bool = False,
                      show_progress: bool = True, records=None, extra: dict | None = None,
                      engine: EngineSettings | None = None, part_records: int = PART_RECORDS) -> dict:
    """``run_format`` with the records rendered on Ray: the local engine's samples and manifest."""
    return run_format(kind, inputs, out, images, downloads, settings, overwrite, show_progress, records, extra,
                      produce=produce_on_ray(engine or EngineSettings("ray"), part_records))
