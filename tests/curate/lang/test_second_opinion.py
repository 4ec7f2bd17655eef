"""lingua's second opinion on the Latin-script captions fastText doubts (real models)."""

from __future__ import annotations

import polars as pl
import pytest

from qvl.curate.lang import langid, second_opinion
from qvl.curate.settings import FilterSettings

# CC3M validation captions (all English) that lid.176 alone drops: below 0.5 for en, or another label
CC3M_DROPPED_BY_FASTTEXT = ["group of horses in a paddock", "woman tipping hat in a field", "heart shape on a beach",
                            "A plate of dumplings with soy sauce"]
# captions in other Latin-script languages, short as alt-text is
OTHER_LANGUAGES = ["Ein kleiner Hund spielt im Garten", "une maison au bord de la mer", "un perro corre en la playa",
                   "een fiets staat tegen de muur", "una ragazza legge un libro al parco",
                   "en katt sover i solen på verandan", "uma casa velha na montanha"]


def tag(texts: list[str], **settings) -> pl.DataFrame:
    return langid.tag(pl.DataFrame({"text": texts}), FilterSettings(**settings))


def test_english_captions_fasttext_drops_are_kept_by_lingua():
    alone = tag(CC3M_DROPPED_BY_FASTTEXT, second_opinion=False)
    assert alone.get_column("_fail_lang").all()  # what fastText decides alone
    out = tag(CC3M_DROPPED_BY_FASTTEXT)
    assert out.get_column("_fail_lang").to_list() == [False] * 4
    assert out.get_column("lang").to_list() == ["en"] * 4
    assert out.get_column("lang_by").to_list() == ["lingua"] * 4
    # both opinions stand in the row: fastText's as it was, lingua's that decided
    assert out.get_column("lang_fasttext").to_list() == alone.get_column("lang").to_list()
    assert out.get_column("lang_fasttext_score").to_list() == alone.get_column("lang_score").to_list()
    assert out.get_column("lang_lingua").to_list() == ["en"] * 4
    assert out.get_column("lang_score").to_list() == out.get_column("lang_lingua_score").to_list()
    assert all(0 < p <= 1 for p in out.get_column("lang_lingua_score"))


def test_other_languages_stay_dropped():
    out = tag(OTHER_LANGUAGES)
    assert out.get_column("_fail_lang").all()
    assert "en" not in out.get_column("lang").to_list()


def test_only_unsure_latin_script_rejections_are_asked():
    texts = ["a dog playing on the beach at sunset with children",  # en, sure: kept by fastText
             "Der Hund spielt mit den Kindern im Garten hinter dem Haus",  # de, sure: dropped by fastText
             "一只金毛犬在海滩上玩耍",  # the script decides
             "日本語のテキストです",  # kana: not Latin script
             "iPhone 手机壳 新款"]  # Han with Latin letters: not Latin script alone
    out = tag(texts)
    assert out.get_column("lang_lingua").to_list() == [None] * 5
    assert out.get_column("lang_by").to_list() == ["fasttext", "fasttext", "script", "fasttext", "script"]


def test_the_doubt_thresholds_are_settings():
    text = ["a dog playing on the beach at sunset with children"]
    assert tag(text, min_lang_score=0.9999).get_column("lang_by").to_list() == ["lingua"]
    assert tag(text, min_lang_score=0.9999, second_opinion=False).get_column("_fail_lang").to_list() == [True]
    german = ["Ein kleiner Hund spielt im Garten"]  # de 0.999
    assert tag(german).get_column("lang_lingua").to_list() == [None]
    asked = tag(german, second_opinion_below=1.0)  # every other label doubtful
    assert asked.get_column("lang_lingua").to_list() == ["de"] and asked.get_column("_fail_lang").to_list() == [True]


def test_a_run_keeping_another_language_lets_lingua_keep_it():
    text = ["un perro corre en la playa"]
    assert tag(text, languages=("en", "es"), min_lang_score=0.9999).get_column("lang").to_list() == ["es"]
    assert tag(text, languages=("en", "es"), min_lang_score=0.9999).get_column("_fail_lang").to_list() == [False]


def test_lingua_weighs_fasttexts_candidates_and_the_kept_languages():
    chosen = second_opinion.candidates(("en", "zh"), ["es", "pt", "ceb", "no"])
    assert {second_opinion.code(lang) for lang in chosen} == {"en", "es", "pt", "no"}  # zh, ceb: not lingua's
    latin, _ = second_opinion._languages()
    assert second_opinion.candidates(("en",), ["ceb"]) == frozenset(latin)  # too few to choose among


def test_norwegian_is_written_as_lid176_writes_it():
    from lingua import Language

    assert second_opinion.code(Language.BOKMAL) == second_opinion.code(Language.NYNORSK) == "no"
    assert second_opinion.code(Language.ENGLISH) == "en"


@pytest.mark.parametrize("settings", [{"second_opinion": "yes"}, {"second_opinion_below": 1.5}])
def test_bad_settings_are_named(settings):
    from qvl.recipes import SettingError

    with pytest.raises(SettingError, match=next(iter(settings))):
        FilterSettings(**settings)


def test_the_run_records_both_opinions_and_why_tells_them(tmp_path):
    from typer.testing import CliRunner

    from qvl.cli import app

    rows = [{"url": f"https://img.example/{i}.jpg", "caption": t}
            for i, t in enumerate(CC3M_DROPPED_BY_FASTTEXT + OTHER_LANGUAGES)]
    pl.DataFrame(rows).write_parquet(tmp_path / "pairs.parquet")
    runner = CliRunner()
    result = runner.invoke(app, ["curate", "filter", str(tmp_path / "pairs.parquet"), "--map", "url=url,text=caption",
                                 "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    kept = pl.read_parquet(tmp_path / "out" / "kept" / "*.parquet")
    assert sorted(kept.get_column("text_raw")) == sorted(CC3M_DROPPED_BY_FASTTEXT)
    ledger = pl.read_parquet(tmp_path / "out" / "ledger" / "filter" / "*.parquet")
    assert ledger.filter(pl.col("lang_by") == "lingua").height == 4 + ledger.filter(
        (pl.col("lang_by") == "lingua") & (pl.col("drop_reason") == "lang")).height
    report = (tmp_path / "out" / "report.md").read_text()
    assert "lingua gave a second opinion" in report and "**4** kept" in report
    why = runner.invoke(app, ["curate", "why", str(tmp_path / "out"), "pairs.parquet:0"], env={"COLUMNS": "200"})
    assert why.exit_code == 0 and "by lingua (fastText: " in why.output
