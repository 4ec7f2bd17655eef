"""The local streaming engine of `qvl curate filter`.

Phase 1, per input shard (in parallel processes; shard_phase.py): read batches, run the
rules and language id, write the shard's rejects and its survivors routed to dedup hash
partitions. Phase 2, per partition (partition_phase.py): drop duplicates, write the kept
rows (or stage them for the balance steps). Every output
file is written atomically and followed by a marker in ``OUT/_state``; a run that is
killed and started again skips what its markers say is done and ends with the same
result. ``kept + rejected == input`` always: each row is written exactly once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import polars as pl

from qvl import __version__
from qvl.common import storage
from qvl.common.inputs import DuplicateInput, input_names
from qvl.curate.filter import balance, dedup, engines, rethreshold, rules
from qvl.curate.filter import stats as st
from qvl.curate.filter.partition_phase import dedup_partition, run_balance
from qvl.curate.filter.paths import Paths
from qvl.curate.filter.shard_phase import process_shard
from qvl.curate.lang import langid
from qvl.curate.settings import FilterSettings, RunSettings
from qvl.curate.sources.shards import InputError, Shard, discover, open_shard
from qvl.errors import QvlError


class RunStateError(QvlError, RuntimeError):
    pass


def _fingerprint(shards: list[Shard], settings: FilterSettings, mapping, source) -> str:
    inputs = [(str(s.path.resolve()), s.path.stat().st_size, s.path.stat().st_mtime_ns) for s in shards]
    blob = json.dumps(
        {"inputs": inputs, "settings": dataclasses.asdict(settings), "mapping": mapping, "source": source,
         "qvl": __version__, "polars": pl.__version__},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _prepare(out: Path, shards: list[Shard], settings: FilterSettings, run: RunSettings,
             mapping, source, overwrite: bool, workers: int) -> int:
    """Create or check the run's state; returns the partition count."""
    paths = Paths(out)
    state_file = paths.state / "run.json"
    fingerprint = _fingerprint(shards, settings, mapping, source)
    storage.claim(out, "curate filter", legacy=("_state/run.json",))
    if state_file.exists() and not overwrite:
        from qvl.curate.filter import report as report_mod

        try:
            state = report_mod.read(state_file)
            old_fingerprint, partitions = state["fingerprint"], int(state["partitions"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RunStateError(f"{state_file}: damaged ({type(e).__name__}: {str(e)[:200]}); "
                                "use another --out, or --overwrite to replace the run") from None
        if old_fingerprint != fingerprint:
            raise RunStateError(
                f"{out}: holds a run of other inputs or settings; use another --out, or --overwrite to replace it"
            )
    else:
        if overwrite:
            for sub in ("kept", "rejected", "ledger", "_work", "_state"):
                shutil.rmtree(out / sub, ignore_errors=True)
            for name in ("report.json", "report.md", "funnel.png"):
                (out / name).unlink(missing_ok=True)
        partitions = dedup.partition_count(sum(s.est_rows for s in shards), run.rows_per_partition,
                                           run.max_partitions, workers)
        storage.write_json(state_file, {"fingerprint": fingerprint, "partitions": partitions,
                                        "inputs": [str(s.path) for s in shards],
                                        "input_names": [s.name for s in shards]})
    for folder in (paths.kept, paths.rejected, paths.survivors, paths.ledger / "filter",
                   paths.ledger / "duplicates"):  # leftovers of a killed run
        if folder.exists():
            for tmp in folder.glob("*.tmp-*"):
                tmp.unlink()
    return partitions


def run_filter(
    inputs: list[str | Path], out: str | Path, settings: FilterSettings | None = None,
    run: RunSettings | None = None, mapping: dict[str, str] | None = None, source: str | None = None,
    overwrite: bool = False, show_progress: bool = True, from_ledger: str | Path | None = None,
) -> dict:
    """Filter ``inputs`` into ``out`` — or, with ``from_ledger``, re-decide a previous run's
    rows with new thresholds; returns the report (also written as JSON/MD/PNG)."""
    from qvl.common.progress import (
        progress_bar,  # here, not above: the worker processes need no rich
    )
    from qvl.curate.filter import report as report_mod

    settings = settings or FilterSettings()
    run = run or RunSettings()
    known = {r.name for r in rules.RULES} | {rules.LANG, rules.DUPLICATE}
    bad = [r for r in settings.skip_rules if r not in known]
    if bad:
        raise RunStateError(f"unknown rule(s) to skip: {', '.join(bad)}; rules: {', '.join(sorted(known))}")
    out = Path(out)
    paths = Paths(out)
    if from_ledger is not None:
        prev = Path(from_ledger)
        if inputs:
            raise rethreshold.LedgerError("--from-ledger reads the previous run's rows: give no inputs")
        rethreshold.check_settings(rethreshold.previous_settings(prev), settings)
        if prev.resolve() == out.resolve():
            raise rethreshold.LedgerError("--from-ledger needs a new --out (the previous run is its input)")
        shards = rethreshold.shards_of(prev)
    else:
        files = discover(inputs)
        try:
            names = input_names(files)
        except DuplicateInput as e:
            raise InputError(str(e)) from None
        shards = [open_shard(p, i, mapping, source, name) for i, (p, name) in enumerate(zip(files, names))]
    if rules.LANG not in settings.skip_rules:
        langid.identifier(settings.lang_model)  # fail now, not in a worker, if the model is missing
        langid.check_languages(settings)
    if settings.balance_entries:
        balance.read_entries(settings.balance_entries)  # fail now, not in a worker, if the file holds no entries
    workers = run.workers or os.cpu_count() or 1
    partitions = _prepare(out, shards, settings, run, mapping, source, overwrite, workers)

    markers = {s.key: storage.read_json(paths.shard_marker(s)) for s in shards if paths.shard_marker(s).exists()}
    shard_jobs = {s.key: (s, out, settings, run.batch_rows, partitions) for s in shards if s.key not in markers}
    part_markers = {k: storage.read_json(paths.partition_marker(k)) for k in range(partitions)
                    if paths.partition_marker(k).exists()}
    timing = {}
    with progress_bar(disable=not show_progress) as bar, engines.open_engine(run, workers) as executor:
        rows_task = bar.add_task("filter", total=sum(j[0].est_rows for j in shard_jobs.values()), unit="rows")
        started = time.perf_counter()
        for key, marker in executor.run(process_shard, shard_jobs, lambda n: bar.advance(rows_task, n)):
            markers[key] = marker
        timing["filter_s"] = round(time.perf_counter() - started, 3)
        bar.update(rows_task, total=bar.tasks[rows_task].completed)

        sources_of: dict[int, list[tuple[str, list[int]]]] = defaultdict(list)
        for shard in shards:
            m = markers[shard.key]
            for k, groups in m["row_groups"].items():
                sources_of[int(k)].append((m["survivors"], groups))
        staged = balance.active(settings)
        part_jobs = {k: (out, k, sources_of.get(k, []), staged) for k in range(partitions) if k not in part_markers}
        part_task = bar.add_task("dedup", total=len(part_jobs), unit="partitions")
        started = time.perf_counter()
        for k, marker in executor.run(dedup_partition, part_jobs):
            part_markers[k] = marker
            bar.advance(part_task)
        timing["dedup_s"] = round(time.perf_counter() - started, 3)
        balance_report = None
        if staged:
            started = time.perf_counter()
            balance_markers, balance_report = run_balance(executor, out, settings, partitions)
            timing["balance_s"] = round(time.perf_counter() - started, 3)

    totals: dict = {}
    for m in [*markers.values(), *part_markers.values()]:
        st.merge(totals, m["stats"])
    if balance_report is not None:  # the kept rows are the balance steps': theirs replace dedup's
        totals["kept"] = {}
        for m in balance_markers:
            st.merge(totals, m["stats"])
    report = report_mod.build(totals, settings, shards, partitions)
    if from_ledger is not None:  # rewrites were not run again: they are the previous run's
        previous = report_mod.read(Path(from_ledger) / "report.json")
        report.update(rewrites=previous["rewrites"], inputs=previous["inputs"], from_ledger=str(from_ledger))
    if balance_report is not None:
        report["balance"] = balance_report
    report["timing"] = timing  # of this invocation only: a resumed run reports what it did
    report_mod.write(out, report)
    shutil.rmtree(out / "_work", ignore_errors=True)
    return report
