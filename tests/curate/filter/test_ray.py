"""`--engine ray`: the same input through a local two-CPU Ray and the local engine gives
identical kept, rejected, ledger and report."""

from __future__ import annotations

import json

import polars as pl
import pytest

from qvl.curate.filter.pipeline import run_filter
from qvl.curate.settings import RunSettings
from qvl.demo.pairs import write_demo_pairs

ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'qvl[ray]'); CI installs it")


def _tables(out, folder):
    files = sorted((out / folder).rglob("*.parquet"))
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed").sort("row_id")


def test_ray_engine_equals_the_local_engine(tmp_path):
    raw = write_demo_pairs(tmp_path / "raw", rows_per_shard=1200)
    local = run_filter(raw, tmp_path / "local", run=RunSettings(workers=2, batch_rows=500, rows_per_partition=900),
                       show_progress=False)
    on_ray = run_filter(raw, tmp_path / "ray", run=RunSettings(engine="ray", workers=2, batch_rows=500,
                                                               rows_per_partition=900), show_progress=False)
    assert local["dedup_partitions"] > 1 and local["input_rows"] > 4000
    for key in ("funnel", "by_source", "by_language", "rewrites", "lang_cross_check", "kept_rows", "accounted"):
        assert json.dumps(on_ray[key], sort_keys=True) == json.dumps(local[key], sort_keys=True), key
    for folder in ("kept", "rejected", "ledger/filter", "ledger/duplicates"):
        assert _tables(tmp_path / "ray", folder).equals(_tables(tmp_path / "local", folder)), folder
