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


NOT_HAN_BUT_ZH = "1969/1970/1971/1972 CHEVELLE/ MALIBU BLACK PERFORATED HEADLINER, NEW / IN STOCK"  # fastText: zh 0.55
NOT_ZH_LOW = "13 ' ( COMMERCIAL GRADE ) POND AERATION WINDMILL AERATOR WIND MILL"  # fastText: zh 0.15, then en 0.12


def test_a_label_the_script_only_said_not_zh_about_is_held_to_the_threshold():
    out = tag([NOT_ZH_LOW], second_opinion=False)
    assert out.get_column("lang_by").to_list() == ["script"] and out.get_column("lang").to_list() != ["zh"]
    assert out.get_column("_fail_lang").to_list() == [True]  # was kept at 0.12
    assert tag([NOT_ZH_LOW]).get_column("lang_by").to_list() == ["lingua"]  # doubtful: lingua decides


@pytest.mark.parametrize("change", [["--no-second-opinion"], ["--second-opinion-below", "0.5", "--min-lang-score", "0.4"]])
def test_from_ledger_rebuilds_the_script_correction_of_rows_lingua_decided(tmp_path, change):
    from typer.testing import CliRunner

    from qvl.cli import app

    texts = [NOT_HAN_BUT_ZH, NOT_ZH_LOW, *CC3M_DROPPED_BY_FASTTEXT, *OTHER_LANGUAGES]
    pl.DataFrame({"url": [f"https://img.example/{i}.jpg" for i in range(len(texts))], "text": texts}).write_parquet(
        tmp_path / "pairs.parquet")
    runner = CliRunner()
    base = ["curate", "filter", "--workers", "1", "--no-progress"]
    assert runner.invoke(app, [*base, str(tmp_path / "pairs.parquet"), "--out", str(tmp_path / "prev")]).exit_code == 0
    again = runner.invoke(app, [*base, "--from-ledger", str(tmp_path / "prev"), "--out", str(tmp_path / "again"), *change])
    fresh = runner.invoke(app, [*base, str(tmp_path / "pairs.parquet"), "--out", str(tmp_path / "fresh"), *change])
    assert again.exit_code == 0 and fresh.exit_code == 0, again.output + fresh.output
    cols = ["row_id", "lang", "lang_by", "lang_fasttext", "lang_lingua"]

    def rows(out: str) -> pl.DataFrame:
        files = [*(tmp_path / out).glob("kept/*.parquet"), *(tmp_path / out).glob("rejected/*.parquet")]
        return pl.concat([pl.read_parquet(f).select(cols) for f in files]).sort("row_id")

    assert rows("again").equals(rows("fresh"))
    assert "zh" not in rows("again").filter(pl.col("row_id") == "pairs.parquet:0").get_column("lang").to_list()


@pytest.mark.parametrize(("settings", "message"), [
    ({"languages": ("en", "xx")}, "xx: not lid.176 labels"),
    ({"languages": ("en", "nb")}, "nb: not lid.176 labels"),
])
def test_unknown_language_codes_are_refused_before_any_row(tmp_path, settings, message):
    from qvl.curate.filter.pipeline import run_filter

    pl.DataFrame({"url": ["https://a/1.jpg"], "text": ["a dog on the beach"]}).write_parquet(tmp_path / "p.parquet")
    with pytest.raises(langid.LangModelError, match=message):
        run_filter([tmp_path / "p.parquet"], tmp_path / "out", FilterSettings(**settings), show_progress=False)


def test_a_mix_over_a_language_the_run_drops_is_refused():
    from qvl.recipes import SettingError

    with pytest.raises(SettingError, match="fr: not among the kept languages"):
        FilterSettings(lang_mix={"en": 0.9, "fr": 0.1})
    FilterSettings(lang_mix={"en": 0.9, "fr": 0.1}, languages=("en", "fr"))  # kept: fine
