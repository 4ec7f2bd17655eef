"""The subset's balance after rules 1-12: the top-fraction threshold is the exact k-th largest
score of the whole run, the language mix is exact (within a row per language), MetaCLIP
balancing keeps about min(count, t) per entry — and the local engine, Ray and --from-ledger
decide alike."""

from __future__ import annotations

import json
import random

import numpy as np
import polars as pl
import pytest

from qvl.curate.filter import balance
from qvl.curate.filter.balance import uniform
from qvl.curate.filter.pipeline import run_filter
from qvl.curate.settings import FilterSettings, RunSettings
from tests.conftest import needs_shared_data

ANIMALS = ["zebra", "giraffe", "lion", "otter", "heron", "walrus"]
ZH_SUBJECTS = ["一只小狗", "一只小猫", "一辆红色汽车", "一座古老房子", "一棵大树"]
ZH_PLACES = ["在公园里玩耍", "停在街道旁边", "在河边休息", "在雪地里奔跑"]


def write(path, rows: list[dict]) -> None:
    pl.DataFrame(rows).write_parquet(path)


def kept_of(out) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(p) for p in sorted((out / "kept").glob("*.parquet"))])


def counts_by_reason(report: dict) -> dict[str, int]:
    return {r["step"]: r["dropped"] for r in report["funnel"]}


def test_top_fraction_threshold_is_the_kth_largest_of_the_run(tmp_path):
    rng = np.random.default_rng(0)
    n = 6000
    scores = rng.uniform(0.2, 0.45, n).round(6)
    write(tmp_path / "pairs.parquet", [{"url": f"http://x.test/{i}.jpg", "text": f"a photo of object number {i}",
                                        "clip_score": float(s), "source": "web" if i % 3 else "other"}
                                       for i, s in enumerate(scores)])
    settings = FilterSettings(skip_rules=("lang",), clip_thresholds={}, clip_top_fraction=0.3)
    report = run_filter([tmp_path / "pairs.parquet"], tmp_path / "out", settings,
                        RunSettings(workers=2, rows_per_partition=1500), show_progress=False)
    assert report["dedup_partitions"] > 1
    kept = kept_of(tmp_path / "out")
    for source in ("web", "other"):
        group = np.array([s for i, s in enumerate(scores) if (source == "web") == bool(i % 3)])
        k = int(np.ceil(0.3 * group.size))
        expected = float(np.sort(group)[::-1][k - 1])
        assert report["balance"]["clip_top_fraction"]["groups"][source]["threshold"] == expected
        mine = kept.filter(pl.col("source") == source)
        assert mine.height == k and mine["clip_score"].min() == expected
    assert counts_by_reason(report)["clip_top_fraction"] == n - kept.height and report["accounted"]


FR_CAPTIONS = ["une photo d'un {} noir assis sur la table de la cuisine, numéro {}",
               "un vieux {} près du pont de pierre au-dessus de la rivière, numéro {}"]
MIX = {"en": 0.773, "zh": 0.227}


def assert_exact_mix(report: dict, out, mix: dict[str, float], seed: int) -> dict[str, int]:
    """The kept set holds each language of the mix within one row of T x share, T the largest
    total the survivors allow; the kept rows of a language are its survivors of lowest draw;
    a language outside the mix keeps none. Returns the kept counts."""
    section = report["balance"]["lang_mix"]
    before = section["counts_before"]
    total = min(before.get(lang, 0) / share for lang, share in mix.items() if share > 0)
    kept = kept_of(out)
    kept = kept.with_columns(draw=uniform(seed, "lang_mix", kept["row_id"]))
    dropped = pl.concat([pl.read_parquet(f) for f in (out / "rejected").glob("balance-*.parquet")])
    dropped = dropped.filter(pl.col("drop_reason") == "lang_mix")
    dropped = dropped.with_columns(draw=uniform(seed, "lang_mix", dropped["row_id"]))
    counts = dict(kept.group_by("lang").len().iter_rows())
    assert counts == {lang: n for lang, n in section["kept"].items() if n}, (counts, section)
    for lang, n in before.items():
        assert counts.get(lang, 0) + dropped.filter(pl.col("lang") == lang).height == n
        if mix.get(lang, 0) > 0:
            assert abs(counts[lang] - total * mix[lang]) <= 1 and counts[lang] <= n, (lang, counts, total)
            mine, lost = kept.filter(pl.col("lang") == lang), dropped.filter(pl.col("lang") == lang)
            if lost.height:  # every kept row sorts before the cut, every dropped one not
                last = mine.sort("draw", "row_id").select("draw", "row_id").row(-1)
                first = lost.sort("draw", "row_id").select("draw", "row_id").row(0)
                assert last < tuple(section["cut"][lang].values()) <= first
        else:
            assert counts.get(lang, 0) == 0
    assert sum(counts.values()) == report["kept_rows"] and report["accounted"]
    return counts


@pytest.fixture(scope="module")
def thinned(tmp_path_factory):
    """Rows that duplicates, too-small images, the top-80% CLIP cut and MetaCLIP balancing all
    thin before the mix, and French captions that survive the rules but are not in the mix."""
    folder = tmp_path_factory.mktemp("balance-thinned")
    rng = random.Random(5)
    rows = []
    for i in range(12_000):
        if i % 10 < 6:
            text = f"a {rng.choice(['red', 'blue', 'old'])} {rng.choice(ANIMALS)} standing near the river {i}"
        elif i % 10 < 9:
            text = f"{rng.choice(ZH_SUBJECTS)}{rng.choice(ZH_PLACES)}，编号{i}"
        else:
            text = rng.choice(FR_CAPTIONS).format(rng.choice(["chat", "chien"]), i)
        small = i % 7 == 0
        rows.append({"url": f"http://x.test/{i % 11_000}.jpg", "text": text, "clip_score": round(rng.uniform(0.2, 0.4), 6),
                     "width": 60 if small else 400, "height": 60 if small else 300})
    write(folder / "pairs.parquet", rows)
    entries = folder / "entries.txt"
    entries.write_text("\n".join(ANIMALS[:4] + ["小狗", "汽车", "chat", "chien"]) + "\n")
    settings = FilterSettings(clip_thresholds={}, clip_top_fraction=0.8, clip_top_by="source_lang",
                              languages=("en", "zh", "fr"), balance_entries=str(entries), balance_t=300,
                              lang_mix=MIX, balance_seed=7)
    return folder / "pairs.parquet", settings


def test_lang_mix_is_exact_after_every_other_step(thinned, tmp_path):
    pairs, settings = thinned
    report = run_filter([pairs], tmp_path / "out", settings, RunSettings(workers=2, rows_per_partition=1500),
                        show_progress=False)
    dropped = counts_by_reason(report)
    assert report["dedup_partitions"] == 8
    steps = ("duplicate", "too_small", "clip_top_fraction", "no_entry", "balance", "lang_mix")
    assert all(dropped[step] > 0 for step in steps), dropped
    counts = assert_exact_mix(report, tmp_path / "out", MIX, 7)
    assert set(report["balance"]["lang_mix"]["counts_before"]) == {"en", "zh", "fr"} and "fr" not in counts


def test_a_cut_inside_a_bucket_is_found_by_the_extra_pass(thinned, tmp_path, monkeypatch):
    """With 16 buckets each holds hundreds of rows: the cut falls inside one, and the pass that
    gathers its rows from every partition finds the same cut as the fine histogram did."""
    pairs, settings = thinned
    run = RunSettings(workers=1, rows_per_partition=1500)  # inline, so the patched bucket count holds
    fine = run_filter([pairs], tmp_path / "fine", settings, run, show_progress=False)
    monkeypatch.setattr(balance, "MIX_BUCKETS", 16)
    coarse = run_filter([pairs], tmp_path / "coarse", settings, run, show_progress=False)
    cuts = coarse["balance"]["lang_mix"]["cut"]
    assert cuts and all(c["row_id"] for c in cuts.values()), cuts  # a row, not a bucket's end
    assert_exact_mix(coarse, tmp_path / "coarse", MIX, 7)
    assert fine["funnel"] == coarse["funnel"]
    assert _rows(tmp_path / "fine", "kept").equals(_rows(tmp_path / "coarse", "kept"))


@needs_shared_data
def test_lang_mix_is_exact_on_real_laion_captions(shared_data, tmp_path):
    """10,000 real LAION rows (mostly English, some French and German, which survive the rules
    here but are not in the mix) given CLIP scores, with 3,000 Chinese captions beside them; the
    top 70% by CLIP per source and language is kept before the mix, over four partitions."""
    rng = np.random.default_rng(11)
    laion = pl.read_parquet(shared_data / "external" / "laion_img2dataset" / "test_10000.parquet")
    laion.with_columns(similarity=pl.Series(rng.uniform(0.25, 0.4, laion.height).round(6))).write_parquet(
        tmp_path / "laion.parquet")
    words = random.Random(12)
    write(tmp_path / "zh.parquet", [{"url": f"http://zh.test/{i}.jpg", "clip_score": float(rng.uniform(0.25, 0.4)),
                                     "text": f"{words.choice(ZH_SUBJECTS)}{words.choice(ZH_PLACES)}，编号{i}"}
                                    for i in range(3000)])
    settings = FilterSettings(clip_thresholds={}, clip_top_fraction=0.7, clip_top_by="source_lang",
                              languages=("en", "zh", "fr", "de"), lang_mix=MIX, balance_seed=3)
    report = run_filter([tmp_path / "laion.parquet", tmp_path / "zh.parquet"], tmp_path / "out", settings,
                        RunSettings(workers=2, rows_per_partition=3000), show_progress=False)
    assert report["dedup_partitions"] == 6 and counts_by_reason(report)["clip_top_fraction"] > 0
    before = report["balance"]["lang_mix"]["counts_before"]
    assert before["en"] > 4000 and before["fr"] > 0 and before["de"] > 0, before
    counts = assert_exact_mix(report, tmp_path / "out", MIX, 3)
    assert counts["en"] == before["en"] and counts["zh"] < before["zh"]  # the Chinese side is cut


def test_metaclip_balancing_keeps_about_t_per_entry(tmp_path):
    rng = random.Random(2)
    sizes = {"zebra": 3000, "giraffe": 1200, "lion": 400, "otter": 150, "heron": 40}
    rows, i = [], 0
    for entry, n in sizes.items():
        for _ in range(n):
            rows.append({"url": f"http://x.test/{i}.jpg", "text": f"a {entry} seen from far away number {i}"})
            i += 1
    for _ in range(200):  # matches no entry
        rows.append({"url": f"http://x.test/{i}.jpg", "text": f"an empty field under the sky number {i}"})
        i += 1
    rng.shuffle(rows)
    write(tmp_path / "pairs.parquet", rows)
    entries = tmp_path / "entries.txt"
    entries.write_text("\n".join([*sizes, "walrus"]) + "\n")
    t = 500
    settings = FilterSettings(skip_rules=("lang",), balance_entries=str(entries), balance_t=t)
    report = run_filter([tmp_path / "pairs.parquet"], tmp_path / "out", settings,
                        RunSettings(workers=2, rows_per_partition=1500), show_progress=False)
    kept = kept_of(tmp_path / "out")
    for entry, n in sizes.items():
        got = kept.filter(pl.col("text").str.contains(entry)).height
        p = min(1.0, t / n)
        assert abs(got - n * p) <= 4 * (n * p * (1 - p)) ** 0.5 + 1e-9, (entry, got, n * p)
    assert counts_by_reason(report)["no_entry"] == 200
    entries_report = report["balance"]["entries"]
    assert entries_report["largest_before"] == 3000 and entries_report["largest_after"] < 700
    assert (tmp_path / "out" / "balance.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("balance-mixed")
    rng = random.Random(3)
    rows = []
    for i in range(6000):
        if i % 4 == 0:
            text = f"{rng.choice(ZH_SUBJECTS)}{rng.choice(ZH_PLACES)}，编号{i}"
        else:
            text = f"a {rng.choice(['red', 'blue'])} {rng.choice(ANIMALS)} near the water {i}"
        rows.append({"url": f"http://x.test/{i}.jpg", "text": text, "clip_score": round(rng.uniform(0.2, 0.4), 5),
                     "width": rng.choice([150, 400, 800]), "height": 400})
    write(folder / "pairs.parquet", rows)
    entries = folder / "entries.txt"
    entries.write_text("\n".join(ANIMALS + ["小狗", "汽车"]) + "\n")
    settings = FilterSettings(clip_thresholds={}, clip_top_fraction=0.6, clip_top_by="source_lang",
                              balance_entries=str(entries), balance_t=400, lang_mix={"en": 0.6, "zh": 0.4})
    return folder, settings


def _rows(out, part: str) -> pl.DataFrame:
    files = sorted((out / part).glob("*.parquet"))
    return pl.concat([pl.read_parquet(f).select("row_id", *(["drop_reason"] if part == "rejected" else []))
                      for f in files]).sort("row_id")


def test_ray_and_from_ledger_decide_alike(mixed, tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional extra; CI installs it")
    folder, settings = mixed
    run = RunSettings(workers=2, rows_per_partition=1500)
    local = run_filter([folder / "pairs.parquet"], tmp_path / "local", settings, run, show_progress=False)
    on_ray = run_filter([folder / "pairs.parquet"], tmp_path / "ray", settings,
                        RunSettings(engine="ray", workers=2, rows_per_partition=1500), show_progress=False)
    assert json.dumps(local["funnel"]) == json.dumps(on_ray["funnel"])
    assert local["balance"] == on_ray["balance"]
    assert_exact_mix(local, tmp_path / "local", settings.lang_mix, settings.balance_seed)
    for part in ("kept", "rejected"):
        assert _rows(tmp_path / "local", part).equals(_rows(tmp_path / "ray", part)), part
    # a looser size rule decided again from the ledger equals a fresh run with it
    looser = FilterSettings(**{**settings.__dict__, "min_side": 100})
    again = run_filter([], tmp_path / "again", looser, run, from_ledger=tmp_path / "local", show_progress=False)
    fresh = run_filter([folder / "pairs.parquet"], tmp_path / "fresh", looser, run, show_progress=False)
    assert again["funnel"] == fresh["funnel"] and again["kept_rows"] > local["kept_rows"]
    assert _rows(tmp_path / "again", "kept").equals(_rows(tmp_path / "fresh", "kept"))
    assert_exact_mix(again, tmp_path / "again", settings.lang_mix, settings.balance_seed)


def test_a_plot_of_no_match_says_nothing_on_stderr(tmp_path):
    """No caption matched an entry: matplotlib warned "No artists with labels found" on legend()."""
    import warnings

    from qvl.curate.filter.balance import plot_entries

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_entries({0: 0}, {}, tmp_path / "balance.png")
    assert (tmp_path / "balance.png").read_bytes()[:4] == b"\x89PNG"
