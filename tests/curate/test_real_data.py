"""Real public captions (../shared/data): CC3M validation and LAION rows."""

from __future__ import annotations

import polars as pl

from qvl.curate.filter import stats as st
from qvl.curate.filter.pipeline import run_filter
from qvl.curate.settings import RunSettings
from tests.conftest import needs_shared_data


@needs_shared_data
def test_cc3m_validation_captions(shared_data, tmp_path):
    tsv = shared_data / "cc3m" / "Validation_GCC-1.1.0-Validation.tsv"
    report = run_filter([tsv], tmp_path / "out", run=RunSettings(workers=1), show_progress=False)
    assert report["input_rows"] == 15_833 and report["accounted"]
    assert list(report["by_source"]) == ["cc3m"]
    # CC3M captions are English, hypernymised and already clean: nearly all survive; language id
    # drops 283 (1.79%) by fastText alone, lingua keeps all but 11 of them
    assert report["by_language"]["en"]["kept"] > 0.998 * 15_833
    assert {r["step"]: r["dropped"] for r in report["funnel"]}["lang"] <= 0.003 * 15_833
    kept = pl.read_parquet(tmp_path / "out" / "kept" / "*.parquet")
    assert kept.get_column("row_id").str.starts_with("Validation_GCC-1.1.0-Validation.tsv:").all()


@needs_shared_data
def test_laion_rows(shared_data, tmp_path):
    parquet = shared_data / "external" / "laion_img2dataset" / "test_10000.parquet"
    report = run_filter([parquet], tmp_path / "out", run=RunSettings(workers=1), show_progress=False)
    assert report["input_rows"] == 10_000 and report["accounted"]
    assert report["by_source"]["laion"]["clip_unscored"] == 10_000  # this file has no similarity column
    # multilingual: thousands of other languages dropped; of the Latin-script captions fastText
    # would drop unsurely (mostly English product titles), lingua keeps thousands
    assert {r["step"]: r["dropped"] for r in report["funnel"]}["lang"] > 400
    assert st.total(report["lang_second_opinion"]["kept"]) > 2000
    kept = pl.read_parquet(tmp_path / "out" / "kept" / "*.parquet")
    rescued = kept.filter(pl.col("lang_by") == "lingua")
    assert rescued.height == st.total(report["lang_second_opinion"]["kept"])
    assert rescued.get_column("lang_fasttext").is_not_null().all() and (rescued.get_column("lang") == "en").all()
