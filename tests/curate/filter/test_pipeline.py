"""`qvl curate filter` end to end: accounting, dedup, resume after a kill, run state."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qvl.curate.filter import stats as st
from qvl.curate.filter.pipeline import RunStateError, run_filter
from qvl.curate.settings import FilterSettings, RunSettings
from qvl.demo.pairs import write_demo_pairs
from qvl.schemas import CURATED_PAIR, REJECTED_PAIR, validate_table


def outputs(out: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    kept = pl.concat([pl.read_parquet(p) for p in sorted((out / "kept").glob("*.parquet"))], how="diagonal_relaxed")
    rejected = pl.concat([pl.read_parquet(p) for p in sorted((out / "rejected").glob("*.parquet"))],
                         how="diagonal_relaxed")
    return kept.sort("row_id"), rejected.sort("row_id")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    raw = write_demo_pairs(root / "raw", rows_per_shard=1500)
    report = run_filter(raw, root / "out", run=RunSettings(workers=2, batch_rows=700), show_progress=False)
    return raw, root / "out", report


def test_every_row_is_kept_or_rejected_exactly_once(demo_run):
    raw, out, report = demo_run
    kept, rejected = outputs(out)
    assert report["accounted"] and report["input_rows"] == 1500 * 3 + 750
    assert kept.height + rejected.height == report["input_rows"]
    ids = pl.concat([kept.get_column("row_id"), rejected.get_column("row_id")])
    assert ids.n_unique() == report["input_rows"]
    assert report["kept_rows"] == kept.height
    for rule in report["funnel"][1:]:
        assert rejected.filter(pl.col("drop_reason") == rule["step"]).height == rule["dropped"]


def test_outputs_follow_the_schemas(demo_run):
    _, out, _ = demo_run
    for part in (out / "kept").glob("*.parquet"):
        validate_table(pq.read_table(part), CURATED_PAIR, str(part))
    for part in (out / "rejected").glob("*.parquet"):
        validate_table(pq.read_table(part), REJECTED_PAIR, str(part))
    assert (out / "funnel.png").read_bytes()[:4] == b"\x89PNG"
    assert "Funnel" in (out / "report.md").read_text()


def test_kept_rows_are_clean_and_tagged(demo_run):
    _, out, report = demo_run
    kept, rejected = outputs(out)
    assert set(kept.get_column("lang").unique()) == {"en", "zh"}
    assert kept.get_column("url").n_unique() == kept.height
    assert not kept.get_column("text").str.contains("<|&amp;|http").any()
    zh_share = report["by_language"]["zh"]["share_pct"]
    assert 10 < zh_share < 35  # the demo is ~25% Chinese before cleaning
    # the layouts' own columns travel along: DataComp's uid, the LAION passthrough
    assert "uid" in kept.columns
    reasons = set(rejected.get_column("drop_reason").unique())
    assert {"dataset_tag", "emoji", "non_en_zh_chars", "length", "lang", "duplicate", "clip_score",
            "too_small", "aspect_ratio", "empty_text"} <= reasons


def test_duplicates_keep_the_longest_caption(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"url": "http://a/1", "text": "a dog on the beach"},
            {"url": "http://a/1", "text": "a brown dog running on the sandy beach"},
            {"url": "http://a/2", "text": "a cat on the sofa"},
            {"url": "http://a/1", "text": "a dog on a beach"},
            {"url": "http://a/2", "text": "a cat in the sofa"}]  # same length: first one wins
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = run_filter([p], tmp_path / "out", run=RunSettings(workers=1), show_progress=False)
    kept, rejected = outputs(tmp_path / "out")
    assert kept.get_column("row_id").to_list() == ["d.jsonl:2", "d.jsonl:3"]
    assert rejected.get_column("drop_reason").to_list() == ["duplicate"] * 3
    assert rejected.get_column("failed_rules").to_list() == [["duplicate"]] * 3
    assert {r["step"]: r["dropped"] for r in report["funnel"]}["duplicate"] == 3


def test_the_ledger_has_every_row_and_why_reads_it(demo_run):
    from qvl.curate.why import explain

    raw, out, report = demo_run
    ledger = pl.read_parquet(out / "ledger" / "filter" / "*.parquet")
    assert ledger.height == report["input_rows"] and ledger["row_id"].n_unique() == ledger.height
    short = ledger.filter(pl.col("drop_reason") == "length").row(0, named=True)
    story = explain(out, short["row_id"])
    assert story["verdict"] == "rejected by length"
    assert {s["step"]: s["value"] for s in story["steps"]}["length"] == f"{short['units']} units"
    dups = pl.read_parquet(out / "ledger" / "duplicates" / "*.parquet")
    dropped = {r["step"]: r["dropped"] for r in report["funnel"]}
    assert dups.height == dropped["duplicate"] and dups["duplicate_of"].null_count() == 0
    lost = explain(out, dups["row_id"][0])
    assert lost["verdict"] == "rejected by duplicate" and dups["duplicate_of"][0] in lost["steps"][-1]["value"]
    winner = explain(out, dups["duplicate_of"][0])
    assert winner["verdict"].startswith("kept") and {s["step"]: s["outcome"] for s in winner["steps"]}["lang"] == "pass"


def test_captions_the_script_decides_are_counted_and_explained(tmp_path):
    """A Han-only caption is Chinese without a fastText call: kept with no score, counted in
    the report apart from the labels the cross-check changed, and `why` says so."""
    from qvl.curate.why import explain

    p = tmp_path / "zh.jsonl"
    rows = [{"url": "http://a/1", "text": "一只金毛犬在海滩上玩耍"},
            {"url": "http://a/2", "text": "a brown dog running on the sandy beach"},
            {"url": "http://a/3", "text": "iPhone 手机壳 新款 黑色"}]
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    report = run_filter([p], tmp_path / "out", run=RunSettings(workers=1), show_progress=False)
    kept, _ = outputs(tmp_path / "out")
    by_row = {r["row_id"]: r for r in kept.iter_rows(named=True)}
    assert (by_row["zh.jsonl:1"]["lang"], by_row["zh.jsonl:1"]["lang_by"], by_row["zh.jsonl:1"]["lang_score"]) == \
        ("zh", "script", None)
    assert by_row["zh.jsonl:2"]["lang_by"] == "fasttext" and by_row["zh.jsonl:2"]["lang_score"] > 0.5
    assert report["lang_cross_check"]["script_only"] == {"zh": 1}
    assert "The script alone decided **1** captions" in (tmp_path / "out" / "report.md").read_text()
    story = {s["step"]: s["value"] for s in explain(tmp_path / "out", "zh.jsonl:1")["steps"]}
    assert story["lang"] == "zh by script (Han characters only; fastText not asked)"


def test_dedup_across_shards_and_partitions(tmp_path):
    """The same URL in two shards meets in one hash partition, whatever the partition count."""
    urls = [f"http://x/{i}" for i in range(200)]
    for k in range(2):
        pq.write_table(pa.table({"url": urls, "text": [f"a dog on the beach number {i}" + " x" * k
                                                      for i in range(200)]}), tmp_path / f"s{k}.parquet")
    run_filter([tmp_path / "s0.parquet", tmp_path / "s1.parquet"], tmp_path / "out",
               run=RunSettings(workers=1, rows_per_partition=37), show_progress=False)
    kept, rejected = outputs(tmp_path / "out")
    assert len(list((tmp_path / "out" / "_state" / "partitions").glob("*.json"))) == 11
    assert kept.height == 200 and kept.get_column("row_id").str.starts_with("s1.parquet").all()
    assert rejected.height == 200


def test_dedup_partitions_come_in_rounds_of_the_workers():
    from qvl.curate.filter.dedup import partition_count

    assert partition_count(3_000_000, 1_000_000, 4096, workers=2) == 4  # not 3: no lone second round
    assert partition_count(2_000_000, 1_000_000, 4096, workers=2) == 2
    assert partition_count(5_000_000, 1_000_000, 4096, workers=4) == 8
    assert partition_count(10, 1_000_000, 4096, workers=8) == 1  # one partition's worth stays one
    assert partition_count(9_000_000, 1_000_000, 6, workers=4) == 6  # the cap wins


def test_bad_rows_go_to_rejects_with_reasons(tmp_path):
    p = tmp_path / "cc.tsv"
    p.write_bytes(b"a dog on the beach\thttp://x/1\nbroken line\n\xff\xfe bad bytes here\thttp://x/2\n"
                  b"a cat on the sofa\t\n")
    run_filter([p], tmp_path / "out", run=RunSettings(workers=1), show_progress=False)
    kept, rejected = outputs(tmp_path / "out")
    assert kept.get_column("row_id").to_list() == ["cc.tsv:1"]
    assert dict(zip(rejected.get_column("row_id"), rejected.get_column("drop_reason"))) == {
        "cc.tsv:2": "malformed_row", "cc.tsv:3": "invalid_utf8", "cc.tsv:4": "missing_url"}


def test_a_run_refuses_other_settings_in_the_same_folder(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"url": "http://a/1", "text": "a dog on the beach"}) + "\n")
    run_filter([p], tmp_path / "out", run=RunSettings(workers=1), show_progress=False)
    with pytest.raises(RunStateError, match="other inputs or settings"):
        run_filter([p], tmp_path / "out", FilterSettings(min_side=10), RunSettings(workers=1), show_progress=False)
    report = run_filter([p], tmp_path / "out", FilterSettings(min_side=10), RunSettings(workers=1),
                        overwrite=True, show_progress=False)
    assert report["settings"]["min_side"] == 10


def test_killed_run_resumes_to_the_same_result(tmp_path):
    raw = write_demo_pairs(tmp_path / "raw", rows_per_shard=30000, seed=7)
    raw += write_demo_pairs(tmp_path / "raw2", rows_per_shard=30000, seed=8)
    args = [sys.executable, "-m", "qvl.cli", "curate", "filter", *map(str, raw), "--workers", "1",
            "--batch-rows", "5000", "--no-progress"]
    subprocess.run([*args, "--out", str(tmp_path / "whole")], check=True, capture_output=True)

    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen([*args, "--out", str(interrupted)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = interrupted / "_state" / "shards"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (markers.is_dir() and any(markers.glob("*.json"))):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(markers.glob("*.json")))
    assert 1 <= done < len(raw), "the run must have been killed part-way"
    assert not (interrupted / "report.json").exists()

    subprocess.run([*args, "--out", str(interrupted)], check=True, capture_output=True)
    kept_a, rejected_a = outputs(tmp_path / "whole")
    kept_b, rejected_b = outputs(interrupted)
    assert kept_a.equals(kept_b) and rejected_a.equals(rejected_b)
    assert json.loads((tmp_path / "whole" / "report.json").read_text())["funnel"] == \
        json.loads((interrupted / "report.json").read_text())["funnel"]
    assert not list(interrupted.rglob("*.tmp-*"))


def test_from_ledger_equals_a_fresh_run_with_the_new_thresholds(demo_run, tmp_path):
    raw, out, report = demo_run
    looser = FilterSettings(min_side=100, min_units=2, clip_thresholds={"laion": 0.2, "coyo": 0.28, "datacomp": 0.2},
                            nsfw_threshold_default=0.9, watermark_thresholds={"laion": 0.95})
    again = run_filter([], tmp_path / "again", looser, RunSettings(workers=2, batch_rows=700), from_ledger=out,
                       show_progress=False)
    fresh = run_filter(raw, tmp_path / "fresh", looser, RunSettings(workers=2, batch_rows=700), show_progress=False)
    assert again["kept_rows"] > report["kept_rows"]  # looser thresholds let more through
    dropped = {r["step"]: r["dropped"] for r in report["funnel"]}
    assert dropped["nsfw"] > 0 and dropped["watermark"] > 0  # LAION's published scores at work
    assert report["by_source"]["laion"]["unscored"]["nsfw"] == 0 and report["by_source"]["datacomp"]["unscored"] == \
        {"nsfw": report["by_source"]["datacomp"]["input"], "watermark": report["by_source"]["datacomp"]["input"],
         "aesthetic": report["by_source"]["datacomp"]["input"]}
    assert again["funnel"] == fresh["funnel"] and again["by_language"] == fresh["by_language"]
    (k1, r1), (k2, r2) = outputs(tmp_path / "again"), outputs(tmp_path / "fresh")
    cols = ["row_id", "text", "lang", "units"]
    assert k1.select(cols).equals(k2.select(cols))
    assert r1.select("row_id", "drop_reason", "failed_rules").equals(r2.select("row_id", "drop_reason", "failed_rules"))


@pytest.mark.parametrize("change", [{"min_lang_score": 0.95}, {"second_opinion": False},
                                    {"second_opinion_below": 0.3}, {"languages": ("en",)}])
def test_from_ledger_decides_language_as_a_fresh_run(demo_run, tmp_path, change):
    """Recorded fastText opinions are re-thresholded and lingua asked again where the new settings
    doubt them: the same labels, deciders and outcomes as a fresh run."""
    raw, out, report = demo_run
    assert st.total(report["lang_second_opinion"]["kept"]) > 0  # the previous run had lingua decide some
    runs = RunSettings(workers=2, batch_rows=700)
    again = run_filter([], tmp_path / "again", FilterSettings(**change), runs, from_ledger=out, show_progress=False)
    fresh = run_filter(raw, tmp_path / "fresh", FilterSettings(**change), runs, show_progress=False)
    assert again["funnel"] == fresh["funnel"] and again["lang_second_opinion"] == fresh["lang_second_opinion"]
    (k1, r1), (k2, r2) = outputs(tmp_path / "again"), outputs(tmp_path / "fresh")
    cols = ["row_id", "lang", "lang_score", "lang_by", "lang_fasttext", "lang_lingua", "lang_lingua_score"]
    assert k1.select(cols).equals(k2.select(cols)) and r1.select(cols).equals(r2.select(cols))


def test_from_ledger_refuses_what_needs_the_raw_text(demo_run, tmp_path):
    from qvl.curate.filter.rethreshold import LedgerError

    raw, out, report = demo_run
    with pytest.raises(LedgerError, match="dataset_tags"):
        run_filter([], tmp_path / "x", FilterSettings(dataset_tags=("PERSON",)), from_ledger=out, show_progress=False)


def broken_score_inputs(folder: Path) -> list[Path]:
    """Demo shards with scores broken as real files break them: NaN and inf in LAION's columns,
    an aesthetic column with gaps, and a JSONL whose `source` mixes LAION rows (some without a
    clip score, or with an empty one) and CC3M rows (no clip threshold: their gaps do not matter)."""
    raw = write_demo_pairs(folder, rows_per_shard=800)
    laion = pl.read_parquet(raw[0])
    k = pl.int_range(laion.height) % 17
    laion.with_columns(
        similarity=pl.when(k == 0).then(float("nan")).otherwise("similarity"),
        pwatermark=pl.when(k == 3).then(float("inf")).otherwise("pwatermark"),
        aesthetic=pl.when(k == 5).then(None).otherwise(pl.when(k % 2 == 0).then(5.5).otherwise(4.5)),
    ).write_parquet(raw[0])
    mixed = folder / "mixed.jsonl"
    with open(mixed, "w") as f:
        for i in range(60):
            row = {"url": f"https://img.example.com/mixed/{i}.jpg", "text": f"a small boat on a quiet lake number {i}",
                   "source": "laion" if i % 2 else "cc3m", "clip_score": 0.35}
            if i % 3 == 1:  # the first line has the key: the file has the column
                del row["clip_score"]
            elif i % 5 == 0:
                row["clip_score"] = ""
            f.write(json.dumps(row) + "\n")
    return [*raw, mixed]


@pytest.mark.parametrize("before, after", [
    ({"keep_unscored": True}, {"keep_unscored": False, "aesthetic_threshold_default": 5.0}),
    ({"aesthetic_threshold_default": 5.0}, {"keep_unscored": True, "watermark_threshold_default": None}),
])
def test_from_ledger_decides_invalid_score_as_a_fresh_run(tmp_path, before, after):
    from qvl.curate.why import explain

    raw = broken_score_inputs(tmp_path / "raw")
    runs = RunSettings(workers=1, batch_rows=700)
    prev = run_filter(raw, tmp_path / "prev", FilterSettings(**before), runs, show_progress=False)
    new = FilterSettings(**{**before, **after})
    again = run_filter([], tmp_path / "again", new, runs, from_ledger=tmp_path / "prev", show_progress=False)
    fresh = run_filter(raw, tmp_path / "fresh", new, runs, show_progress=False)
    invalid = {r["step"]: r["dropped"] for r in (fresh if before.get("keep_unscored") else prev)["funnel"]}
    assert invalid["invalid_score"] > 0 and invalid["invalid_score"] != {
        r["step"]: r["dropped"] for r in (prev if before.get("keep_unscored") else fresh)["funnel"]}["invalid_score"]
    assert again["funnel"] == fresh["funnel"] and again["by_language"] == fresh["by_language"]
    (k1, r1), (k2, r2) = outputs(tmp_path / "again"), outputs(tmp_path / "fresh")
    assert k1.select("row_id", "invalid_scores").equals(k2.select("row_id", "invalid_scores"))
    assert r1.select("row_id", "drop_reason", "failed_rules").equals(r2.select("row_id", "drop_reason", "failed_rules"))
    mixed = prev["by_source"]
    assert mixed["cc3m"]["invalid_scores"]["clip_score"] == 14 and mixed["laion"]["invalid_scores"]["clip_score"] > 14
    out = tmp_path / ("fresh" if before.get("keep_unscored") else "prev")
    story = {s["step"]: s for s in explain(out, "mixed.jsonl:2")["steps"]}  # laion, no clip_score key
    assert story["invalid_score"]["outcome"] == "FAIL" and story["clip_score"]["value"].startswith("broken")
    assert explain(out, "mixed.jsonl:5")["verdict"].startswith("kept")  # cc3m: no clip threshold
