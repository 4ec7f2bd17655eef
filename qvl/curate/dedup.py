"""Rule 12, ``duplicate``: several texts for one image — keep the longest.

One image is one URL, or one image hash where the table has one (``sha256`` after
download). Rows are routed to hash partitions by that key while the shards stream, so
each partition is de-duplicated alone in bounded memory and no table ever holds the
whole input. Ties on length keep the row that came first in the input.
"""

from __future__ import annotations

import math

import polars as pl

HASH_SEED = 0x51_57_4C  # fixed: a resumed run must route every key where it went before


def key_expr(columns: list[str]) -> pl.Expr:
    if "sha256" in columns:
        return pl.coalesce(pl.col("sha256").cast(pl.String), pl.col("url"))
    return pl.col("url")


def partition_count(estimated_rows: int, rows_per_partition: int, max_partitions: int, workers: int = 1) -> int:
    """About ``rows_per_partition`` rows each; more than one is rounded up to a multiple of
    ``workers``: three partitions on two workers would leave one worker a second round alone."""
    n = math.ceil(estimated_rows / max(1, rows_per_partition))
    if n > 1:
        n = math.ceil(n / max(1, workers)) * max(1, workers)
    return max(1, min(max_partitions, n))


def partition_of(frame: pl.DataFrame, partitions: int) -> pl.Expr:
    return (key_expr(frame.columns).hash(seed=HASH_SEED) % partitions).cast(pl.Int32)


def split_duplicates(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(kept, duplicates) of one partition; kept in input order."""
    ranked = frame.with_columns(_key=key_expr(frame.columns), _len=pl.col("text").str.len_chars()).sort(
        ["_key", "_len", "_seq"], descending=[False, True, False]
    )
    first = ranked.get_column("_key").is_first_distinct()
    kept = ranked.filter(first).sort("_seq").drop("_key", "_len")
    dups = ranked.filter(~first).sort("_seq").drop("_key", "_len")
    return kept, dups
