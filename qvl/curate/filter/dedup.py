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
    """(kept, duplicates) of one partition, each in input order. Each key's winner is found on
    a numeric order (longest text first, then the earliest row) and one hash pass over the keys:
    the partition's rows are never sorted by their string keys."""
    if not frame.get_column("_seq").is_sorted():
        frame = frame.sort("_seq")
    # a stable sort on length: rows of equal length stay in input order, the earliest first
    order = frame.select(pl.arg_sort_by(pl.col("text").str.len_chars(), descending=True, maintain_order=True)).to_series()
    first = frame.select(key_expr(frame.columns)).to_series().gather(order).is_first_distinct()
    winner = pl.repeat(False, frame.height, eager=True).scatter(order, first)
    return frame.filter(winner), frame.filter(~winner)
