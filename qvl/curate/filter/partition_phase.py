"""Phases 2 and 3 of a filter run, per dedup hash partition: duplicates dropped, then (when asked)
the balance steps over the partitions' kept rows."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from qvl.common import storage
from qvl.curate.filter import balance, dedup, rules
from qvl.curate.filter import stats as st
from qvl.curate.filter.paths import Paths
from qvl.curate.filter.shard_phase import public_table
from qvl.curate.settings import FilterSettings
from qvl.schemas import CURATED_PAIR, REJECTED_PAIR


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
                              public_table(kept, CURATED_PAIR))
        st.count_by(stats, "kept", kept, ["source", "lang"])
    if dups is not None and dups.height:
        dups = dups.with_columns(drop_reason=pl.lit(rules.DUPLICATE), failed_rules=pl.lit([rules.DUPLICATE]))
        storage.write_parquet(paths.rejected / f"duplicate-{k:05d}.parquet", public_table(dups, REJECTED_PAIR))
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
            storage.write_parquet(paths.kept / f"part-{k:05d}.parquet", public_table(kept, CURATED_PAIR))
        if dropped.height:
            storage.write_parquet(paths.rejected / f"balance-{k:05d}.parquet", public_table(dropped, REJECTED_PAIR))
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
        for _, found in executor.run(balance_boundary, {k: (out, k, partial) for k in range(partitions)}):
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
        gathered = [r for _, r in executor.run(balance_gather, {k: (out, k, settings) for k in range(partitions)})]
        plan = balance.Plan(balance.thresholds(gathered, settings.clip_top_fraction)
                            if settings.clip_top_fraction is not None else {}, balance.merge_counts(gathered))
        survivors: dict = {"lang": {}, "hist": {}}
        for _, f in executor.run(balance_first, {k: (out, k, settings, plan) for k in range(partitions)}):
            balance.add_into(survivors["lang"], f.get("lang", {}))
            balance.add_into(survivors["hist"], f.get("hist", {}))
        cuts = _mix_cuts(executor, out, settings, partitions, survivors) if settings.lang_mix else {}
        storage.write_json(plan_file, {"top": plan.top, "entries_before": {str(i): n for i, n in plan.entry_counts.items()},
                                       "lang_before_mix": survivors["lang"], "lang_cuts": cuts})
        for k, marker in executor.run(balance_finish, {k: (out, k, settings, cuts) for k in todo}):
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


