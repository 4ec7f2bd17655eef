"""Phase 1 of a filter run, per input shard: the rules and language id over its batches; its rejects,
ledger rows and survivors (routed to dedup hash partitions) written, then its marker."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import polars as pl
import pyarrow as pa

from qvl.common import storage
from qvl.curate.filter import dedup, rethreshold, rules
from qvl.curate.filter import stats as st
from qvl.curate.filter.paths import Paths
from qvl.curate.lang import langid
from qvl.curate.settings import FilterSettings
from qvl.curate.sources import readers
from qvl.curate.sources.layouts import SCORES
from qvl.curate.sources.shards import Shard
from qvl.schemas import REJECTED_PAIR

INTERNAL = {"_seq", "_part", "_input_error", "_non_finite"}
INTERNAL_PREFIXES = ("_fail_", "_changed_")


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


def public_table(frame: pl.DataFrame, schema: pa.Schema) -> pa.Table:
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


def process_shard(
    shard: Shard, out: Path, settings: FilterSettings, batch_rows: int, partitions: int,
    progress=None,
) -> dict:
    """Rules and language id over one shard; returns its marker (stats, row groups). ``progress``:
    the engine's queue (anything with ``put``), given each batch's row count."""
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
            table = public_table(rejected, REJECTED_PAIR)
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


