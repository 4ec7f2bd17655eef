"""Counts that add up: nested {key: {key: int}} dictionaries summed across batches,
shards and partitions (and, on Ray, across tasks)."""

from __future__ import annotations

from typing import Any

import polars as pl


def add(stats: dict, path: tuple[str, ...], n: int) -> None:
    node = stats
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = node.get(path[-1], 0) + int(n)


def merge(into: dict, other: dict) -> dict:
    for key, value in other.items():
        if isinstance(value, dict):
            merge(into.setdefault(key, {}), value)
        else:
            into[key] = into.get(key, 0) + value
    return into


def count_by(stats: dict, name: str, frame: pl.DataFrame, columns: list[str]) -> None:
    """Add the row counts of ``frame`` grouped by ``columns`` under ``stats[name]``."""
    if frame.height == 0:
        return
    for row in frame.group_by(columns).len().iter_rows():
        *keys, n = row
        add(stats, (name, *[str(k) for k in keys]), n)


def total(node: Any) -> int:
    if isinstance(node, dict):
        return sum(total(v) for v in node.values())
    return int(node)
