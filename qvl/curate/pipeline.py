"""The local streaming engine of `qvl curate filter`.

Phase 1, per input shard (in parallel processes): read batches, run the rules and
language id, write the shard's rejects and its survivors routed to dedup hash
partitions. Phase 2, per partition: drop duplicates, write the kept rows. Every output
file is written atomically and followed by a marker in ``OUT/_state``; a run that is
killed and started again skips what its markers say is done and ends with the same
result. ``kept + rejected == input`` always: each row is written exactly once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from qvl import __version__, storage
from qvl.curate import balance, dedup, engines, langid, readers, rethreshold, rules
from qvl.curate import stats as st
from qvl.curate.layouts import SCORES
from qvl.curate.readers import Shard
from qvl.curate.settings import FilterSettings, RunSettings
from qvl.errors import QvlError
from qvl.inputs import DuplicateInput, input_names
from qvl.schemas import CURATED_PAIR, REJECTED_PAIR

INTERNAL = {"_seq", "_part", "_input_error", "_non_finite"}
INTERNAL_PREFIXES = ("_fail_", "_changed_")


class RunStateError(QvlError, RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Paths:
    out: Path

    @property
    def kept(self) -> Path:
        return self.out / "kept"

    @property
    def rejected(self) -> Path:
        return self.out / "rejected"

    @property
    def survivors(self) -> Path:
        return self.out / "_work" / "survivors"

    @property
    def state(self) -> Path:
        return self.out / "_state"

    @property
    def staged(self) -> Path:  # kept rows waiting for the balance steps
        return self.out / "_work" / "kept"

    @property
    def ledger(self) -> Path:
        return self.out / "ledger"

    def shard_marker(self, shard: Shard) -> Path:
        return self.state / "shards" / f"{shard.key}.json"

    def partition_marker(self, k: int) -> Path:
        return self.state / "partitions" / f"{k:05d}.json"


def ledger_rows(frame: pl.DataFrame) -> pa.Table:
    """The ledger's facts of evaluated rows: what each rule measured and decided, no text."""
    return frame.select(
        "row_id", pl.col("_seq").alias("seq"), "source", "width", "height", "clip_score", "nsfw",
        "watermark", "aesthetic", "invalid_scores",
        pl.col("units"), pl.col("text").str.len_chars().cast(pl.Int64).alias("text_chars"),
        *[pl.col(c).cast(t) for c, t in langid.LANG_OUTPUTS.items()],
        pl.col("drop_reason").cast(pl.String),
        pl.col("failed_rules").cast(pl.List(pl.String)),
    ).to_arrow()


LANG_COLUMNS = {**langid.LANG_OUTPUTS, "_fail_lang": pl.Boolean}


def with_language(frame: pl.DataFrame, passed: pl.Series, survivors: pl.DataFrame) -> pl.DataFrame:
    """The batch with its survivors' language columns put back in its row order (rows that
    failed a rule before language id have none), ``drop_reason`` completed with ``lang`` and
    ``failed_rules``: every rule each rejected row failed (kept rows: none). One frame in
    input order then gives the rejects, the ledger and the survivors without a join or a sort."""
    where = passed.arg_true()
    frame = frame.with_columns([
        pl.repeat(None, frame.height, dtype=dtype, eager=True).alias(name).scatter(
            where, survivors.get_column(name).cast(dtype))
        for name, dtype in LANG_COLUMNS.items()
    ]).with_columns(drop_reason=pl.coalesce("drop_reason", pl.when(pl.col("_fail_lang")).then(pl.lit(rules.LANG))))
    return frame.with_columns(failed_rules=rules.failed_rules(frame))  # kept rows failed none: []


def count_batch(stats: dict, frame: pl.DataFrame) -> None:
    """Per source: rows in, rows each rewrite changed, rows whose file has no column of a score
    (unscored: the rule does not apply) and rows whose value in such a column is broken (invalid:
    dropped by ``invalid_score`` or, with keep_unscored, kept), numbers that were not finite —
    one group-by over the evaluated batch."""
    def broken(score: str) -> pl.Expr:
        return pl.col("invalid_scores").list.contains(score)

    sums = {"input": pl.len(), "clip_unscored": (pl.col("clip_score").is_null() & ~broken("clip_score")).sum()}
    sums.update({f"rewritten|{name}": pl.col(f"_changed_{name}").sum() for name in rules.REWRITES
                 if f"_changed_{name}" in frame.columns})
    sums.update({f"unscored|{score}": (pl.col(score).is_null() & ~broken(score)).sum()
                 for score in ("nsfw", "watermark", "aesthetic")})
    sums.update({f"invalid_scores|{score}": broken(score).sum() for score in SCORES})
    if "_non_finite" in frame.columns:
        sums["non_finite"] = pl.col("_non_finite").sum()
    for row in frame.group_by("source").agg(**sums).iter_rows(named=True):
        source = str(row.pop("source"))
        for key, n in row.items():
            if n:
                st.add(stats, (*key.split("|"), source), n)


def _public(frame: pl.DataFrame, schema: pa.Schema) -> pa.Table:
    """The output table: the schema's columns with their exact types, then passthrough."""
    extra = [
        c for c in frame.columns
        if c not in schema.names and c not in INTERNAL and not c.startswith(INTERNAL_PREFIXES)
    ]
    chosen = frame.select([*schema.names, *extra])
    # exported in polars' own string layout (views, no copy), then cast once into the schema's
    # types; passthrough columns get the types a plain export gives them
    passthrough = chosen.select(extra).head(0).to_arrow().schema
    return chosen.to_arrow(compat_level=pl.CompatLevel.newest()).cast(pa.schema([*schema, *passthrough]))


def count_languages(stats: dict, survivors: pl.DataFrame) -> None:
    """What the script changed of fastText's labels, what it decided alone, and lingua's second
    opinions per source (asked; of those, kept)."""
    by_script = survivors.filter(pl.col("lang_by") == "script")
    st.count_by(stats, "lang_relabelled", by_script.filter(pl.col("lang_fasttext").is_not_null())
                .with_columns(_to=pl.col("lang_fasttext") + "->" + pl.col("lang")), ["_to"])
    st.count_by(stats, "lang_script_only",  # decided by the script alone: fastText never asked
                by_script.filter(pl.col("lang_fasttext").is_null() & pl.col("lang_score").is_null()), ["lang"])
    asked = survivors.filter(pl.col("lang_by") == "lingua")
    st.count_by(stats, "lang_second_opinion", asked.with_columns(
        _outcome=pl.when(pl.col("_fail_lang")).then(pl.lit("dropped")).otherwise(pl.lit("kept"))), ["_outcome", "source"])


# ---------------------------------------------------------------- phase 1


def process_shard(
    shard: Shard, out: Path, settings: FilterSettings, batch_rows: int, partitions: int,
    progress: "mp.Queue | None" = None,
) -> dict:
    """Rules and language id over one shard; returns its marker (stats, row groups)."""
    paths = Paths(out)
    stats: dict = {}
    rejected_sink: storage.ParquetSink | None = None
    survivor_sink: storage.ParquetSink | None = None
    ledger_sink: storage.ParquetSink | None = None
    row_groups: dict[int, list[int]] = defaultdict(list)
    n_groups = 0
    again = shard.format == rethreshold.FORMAT  # --from-ledger: a previous run's rows, decided anew
    read, evaluate, tag = ((rethreshold.read_batches, rethreshold.evaluate, rethreshold.tag) if again
                           else (readers.read_batches, rules.apply, langid.tag))
    try:
        for frame in read(shard, batch_rows):
            frame = evaluate(frame, settings)
            count_batch(stats, frame)

            passed = frame.get_column("drop_reason").is_null()
            survivors = tag(frame.filter(passed), settings)
            count_languages(stats, survivors)
            frame = with_language(frame, passed, survivors)
            rejected = frame.filter(pl.col("drop_reason").is_not_null())
            st.count_by(stats, "dropped", rejected, ["drop_reason", "source"])
            table = _public(rejected, REJECTED_PAIR)
            if rejected_sink is None:
                rejected_sink = storage.ParquetSink(paths.rejected / f"{shard.key}.parquet", table.schema)
            rejected_sink.write(table)

            kept = frame.filter(pl.col("drop_reason").is_null())
            facts = ledger_rows(frame)
            if ledger_sink is None:
                ledger_sink = storage.ParquetSink(paths.ledger / "filter" / f"{shard.key}.parquet", facts.schema)
            ledger_sink.write(facts)
            if kept.height:
                kept = kept.with_columns(_part=dedup.partition_of(kept, partitions))
                for (k,), part in kept.partition_by("_part", as_dict=True, maintain_order=True).items():
                    keep_cols = [c for c in part.columns if c in ("_seq", "_part") or not (
                        c in INTERNAL or c.startswith(INTERNAL_PREFIXES))]
                    # staged in polars' own string layout (views): no copy out, none back in phase 2
                    t = part.select(keep_cols).to_arrow(compat_level=pl.CompatLevel.newest())
                    if survivor_sink is None:
                        survivor_sink = storage.ParquetSink(  # snappy: the fastest write + read back
                            paths.survivors / f"{shard.key}.parquet", t.schema, compression="snappy")
                    survivor_sink.write(t)  # one write, one row group: phase 2 reads only its own
                    row_groups[int(k)].append(n_groups)
                    n_groups += 1
            if progress is not None:
                progress.put(frame.height)
        if rejected_sink is None:
            rejected_sink = storage.ParquetSink(paths.rejected / f"{shard.key}.parquet", REJECTED_PAIR)
        rejected_sink.commit()
        if ledger_sink is not None:
            ledger_sink.commit()
        if survivor_sink is not None:
            survivor_sink.commit()
    except BaseException:
        for sink in (rejected_sink, survivor_sink, ledger_sink):
            if sink is not None:
                sink.abort()
        raise
    marker = {"shard": str(shard.path), "stats": stats, "row_groups": {str(k): v for k, v in row_groups.items()},
              "survivors": str(paths.survivors / f"{shard.key}.parquet") if survivor_sink else None}
    storage.write_json(paths.shard_marker(shard), marker)
    return marker


# ---------------------------------------------------------------- phase 2


def dedup_partition(out: Path, k: int, sources: list[tuple[str, list[int]]], staged: bool = False) -> dict:
    """De-duplicate partition ``k`` from the row groups the shards routed to it; ``staged``:
    its kept rows wait in ``_work/kept`` for the balance steps."""
    paths = Paths(out)
    stats: dict = {}
    frames = [pl.from_arrow(pq.ParquetFile(path).read_row_groups(groups)) for path, groups in sources]
    if frames:
        frame = pl.concat(frames, how="diagonal_relaxed")
        kept, dups = dedup.split_duplicates(frame)
    else:
        kept = dups = None
    if kept is not None and kept.height:
        storage.write_parquet((paths.staged if staged else paths.kept) / f"part-{k:05d}.parquet",
                              _public(kept, CURATED_PAIR))
        st.count_by(stats, "kept", kept, ["source", "lang"])
    if dups is not None and dups.height:
        dups = dups.with_columns(drop_reason=pl.lit(rules.DUPLICATE), failed_rules=pl.lit([rules.DUPLICATE]))
        storage.write_parquet(paths.rejected / f"duplicate-{k:05d}.parquet", _public(dups, REJECTED_PAIR))
        winners = kept.select(_key=dedup.key_expr(kept.columns), duplicate_of=pl.col("row_id"))
        lost = dups.with_columns(_key=dedup.key_expr(dups.columns)).join(winners, on="_key", how="left")
        storage.write_parquet(paths.ledger / "duplicates" / f"{k:05d}.parquet",
                              lost.select("row_id", "duplicate_of").to_arrow())
        st.count_by(stats, "dropped", dups, ["drop_reason", "source"])
    marker = {"partition": k, "stats": stats}
    storage.write_json(paths.partition_marker(k), marker)
    return marker


# ---------------------------------------------------------------- phase 3: the balance steps


def balance_gather(out: Path, k: int, settings: FilterSettings) -> dict:
    path = Paths(out).staged / f"part-{k:05d}.parquet"
    return balance.gather(path, settings, out / "_work" / "balance" / f"{k:05d}.entries.parquet") \
        if path.exists() else {}


def balance_first(out: Path, k: int, settings: FilterSettings, plan: "balance.Plan") -> dict:
    paths = Paths(out)
    path = paths.staged / f"part-{k:05d}.parquet"
    work = paths.out / "_work" / "balance"
    return balance.first(path, settings, plan, work / f"{k:05d}.parquet", work / f"{k:05d}.entries.parquet") \
        if path.exists() else {}


def balance_boundary(out: Path, k: int, buckets: dict[str, int]) -> dict:
    work = Paths(out).out / "_work" / "balance" / f"{k:05d}.parquet"
    return balance.boundary_rows(work, buckets) if work.exists() else {}


def balance_finish(out: Path, k: int, settings: FilterSettings, cuts: dict[str, tuple[float, str]]) -> dict:
    """Write partition ``k``'s kept rows and its balance rejects; the marker's stats count the
    rows it dropped (its ``kept`` counts are those of the final kept rows)."""
    paths = Paths(out)
    path = paths.staged / f"part-{k:05d}.parquet"
    stats: dict = {}
    after: dict[int, int] = {}
    if path.exists():
        frame, after = balance.finish(path, settings, cuts, paths.out / "_work" / "balance" / f"{k:05d}.parquet")
        kept = frame.filter(pl.col("balance_reason").is_null()).drop("balance_reason")
        dropped = frame.filter(pl.col("balance_reason").is_not_null()).with_columns(
            drop_reason=pl.col("balance_reason"), failed_rules=pl.concat_list("balance_reason")).drop("balance_reason")
        if kept.height:
            storage.write_parquet(paths.kept / f"part-{k:05d}.parquet", _public(kept, CURATED_PAIR))
        if dropped.height:
            storage.write_parquet(paths.rejected / f"balance-{k:05d}.parquet", _public(dropped, REJECTED_PAIR))
            storage.write_parquet(paths.ledger / "balance" / f"{k:05d}.parquet",
                                  dropped.select("row_id", "drop_reason").to_arrow())
            st.count_by(stats, "dropped", dropped, ["drop_reason", "source"])
        st.count_by(stats, "kept", kept, ["source", "lang"])
    marker = {"partition": k, "stats": stats, "entries_after": {str(i): n for i, n in after.items()}}
    storage.write_json(paths.state / "balance" / f"{k:05d}.json", marker)
    return marker


def _mix_cuts(executor, out: Path, settings: FilterSettings, partitions: int, survivors: dict) -> dict:
    """Each language's exact cut from pass 2's counts and histograms; the boundary buckets'
    draws gathered in one extra pass when a bucket is kept in part."""
    targets = balance.mix_targets(survivors["lang"], settings.lang_mix)
    edges = balance.boundaries(survivors["hist"], targets)
    partial = {lang: b for lang, (b, need, size) in edges.items() if need < size}
    rows: dict[str, list] = {lang: [] for lang in partial}
    if partial:
        for _, found in executor.run(balance_boundary, {k: (out, k, partial) for k in range(partitions)},
                                     lambda n: None):
            for lang, frame in found.items():
                rows[lang].append(frame)
    return balance.mix_cuts(survivors["lang"], targets, edges, {lang: pl.concat(f) for lang, f in rows.items()})


def run_balance(executor, out: Path, settings: FilterSettings, partitions: int) -> tuple[list[dict], dict]:
    """The passes (gather, decide steps 1-2, the mix's boundary rows if needed, finish); resumes
    from the partitions' markers. Returns the markers and what the report says of the steps
    (thresholds, entries, the language mix's counts and cuts)."""
    paths = Paths(out)
    markers = {k: storage.read_json(paths.state / "balance" / f"{k:05d}.json") for k in range(partitions)
               if (paths.state / "balance" / f"{k:05d}.json").exists()}
    todo = [k for k in range(partitions) if k not in markers]
    plan_file = paths.state / "balance.json"
    if todo:
        gathered = [r for _, r in executor.run(balance_gather, {k: (out, k, settings) for k in range(partitions)},
                                               lambda n: None)]
        plan = balance.Plan(balance.thresholds(gathered, settings.clip_top_fraction)
                            if settings.clip_top_fraction is not None else {}, balance.merge_counts(gathered))
        survivors: dict = {"lang": {}, "hist": {}}
        for _, f in executor.run(balance_first, {k: (out, k, settings, plan) for k in range(partitions)},
                                 lambda n: None):
            balance.add_into(survivors["lang"], f.get("lang", {}))
            balance.add_into(survivors["hist"], f.get("hist", {}))
        cuts = _mix_cuts(executor, out, settings, partitions, survivors) if settings.lang_mix else {}
        storage.write_json(plan_file, {"top": plan.top, "entries_before": {str(i): n for i, n in plan.entry_counts.items()},
                                       "lang_before_mix": survivors["lang"], "lang_cuts": cuts})
        for k, marker in executor.run(balance_finish, {k: (out, k, settings, cuts) for k in todo},
                                      lambda n: None):
            markers[k] = marker
    summary = storage.read_json(plan_file)
    after: dict[int, int] = {}
    for m in markers.values():
        for i, n in m["entries_after"].items():
            after[int(i)] = after.get(int(i), 0) + n
    before = {int(i): n for i, n in summary["entries_before"].items()}
    report = {"clip_top_fraction": {"fraction": settings.clip_top_fraction, "by": settings.clip_top_by,
                                    "groups": summary["top"]} if settings.clip_top_fraction is not None else None,
              "lang_mix": _mix_report(settings.lang_mix, summary) if settings.lang_mix else None,
              "entries": {"file": settings.balance_entries, "t": settings.balance_t, "matched_entries": len(before),
                          "matches_before": sum(before.values()), "matches_after": sum(after.values()),
                          "largest_before": max(before.values(), default=0),
                          "largest_after": max(after.values(), default=0)} if settings.balance_entries else None}
    if settings.balance_entries:
        balance.plot_entries(before, after, out / "balance.png")
    return list(markers.values()), report


def _mix_report(mix: dict[str, float], summary: dict) -> dict:
    """The mix asked for, the survivors it was drawn from, what is kept of each language, and
    the cut of each language kept in part: its first row not kept (a row id "": the draw alone)."""
    counts = summary["lang_before_mix"]
    targets = balance.mix_targets(counts, mix)
    return {"target": mix, "counts_before": counts, "kept": targets,
            "cut": {lang: {"draw": draw, "row_id": row_id} for lang, (draw, row_id) in summary["lang_cuts"].items()
                    if 0 < targets[lang] < counts[lang]}}


# ---------------------------------------------------------------- the run


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
        from qvl.curate import report as report_mod

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
    from qvl.curate import report as report_mod
    from qvl.progress import progress_bar  # here, not above: the worker processes need no rich

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
        files = readers.discover(inputs)
        try:
            names = input_names(files)
        except DuplicateInput as e:
            raise readers.InputError(str(e)) from None
        shards = [readers.open_shard(p, i, mapping, source, name) for i, (p, name) in enumerate(zip(files, names))]
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
        for key, marker in executor.run(engines.shard_task, shard_jobs, lambda n: bar.advance(rows_task, n)):
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
        for k, marker in executor.run(dedup_partition, part_jobs, lambda n: None):
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
