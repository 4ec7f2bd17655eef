"""fastText language id with the real lid.176 model, and the script cross-check."""

from __future__ import annotations

import fasttext
import polars as pl
import pytest

from qvl.curate.lang import langid
from qvl.curate.settings import FilterSettings

TEXTS = ["a dog playing on the beach at sunset", "一只金毛犬在海滩上玩耍", "une maison près de la rivière",
         "ein Haus am Fluss", "the cat sleeps on the sofa"]


@pytest.fixture(scope="module")
def ident():
    return langid.identifier(None)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_batch_prediction_equals_per_string_public_api(ident, n):
    """fasttext-predict's own list predict drops probabilities and mis-shapes lists of two;
    ours must equal the public single-string API for every list length."""
    model = fasttext.load_model(str(langid.default_model_path()))
    l1, p1, l2, p2 = ident.predict(TEXTS[:n])
    for i, text in enumerate(TEXTS[:n]):
        labels, probs = model.predict(text, k=2)
        assert (l1[i], l2[i]) == (labels[0][9:], labels[1][9:])
        assert p1[i] == pytest.approx(probs[0], abs=1e-6)
        assert p2[i] == pytest.approx(probs[1], abs=1e-6)


def test_empty_list(ident):
    l1, p1, _, _ = ident.predict([])
    assert l1 == [] and len(p1) == 0


def tag(texts: list[str], **settings) -> pl.DataFrame:
    return langid.tag(pl.DataFrame({"text": texts}), FilterSettings(**settings))


def test_short_chinese_caption_is_not_lost_to_ja(ident):
    assert ident.predict(["一只金毛犬在海滩上玩耍"])[0] == ["ja"]  # what fastText says alone
    out = tag(["一只金毛犬在海滩上玩耍"])
    assert out.get_column("lang").to_list() == ["zh"]
    assert out.get_column("lang_by").to_list() == ["script"]
    assert out.get_column("_fail_lang").to_list() == [False]


def test_han_only_captions_are_decided_by_script_without_asking_fasttext(ident):
    """Han without kana, hangul or Latin letters is Chinese whatever fastText says: it is
    not asked (no label, no score), so a low fastText score can no longer drop such a
    caption while one fastText called ``ja`` was kept."""
    texts = ["猫在睡觉", "123 456 海滩", "一只金毛犬在海滩上玩耍"]
    out = tag(texts, min_lang_score=0.99)
    assert out.get_column("lang").to_list() == ["zh"] * 3
    assert out.get_column("lang_by").to_list() == ["script"] * 3
    assert out.get_column("lang_score").to_list() == [None] * 3
    assert out.get_column("lang_fasttext").to_list() == [None] * 3
    assert out.get_column("_fail_lang").to_list() == [False] * 3


def test_mixed_han_and_latin_still_asks_fasttext_for_both_labels(ident):
    """Latin letters may make a caption English; fastText decides, and where its top label
    is neither zh nor en the script relabels with the second label's zh probability."""
    texts = ["iPhone 手机壳 新款", "中文 and English mixed 文字", "ni hao ma zhong guo"]
    out = tag(texts, second_opinion=False)
    l1, p1, l2, p2 = ident.predict(texts)
    assert out.get_column("lang_fasttext").to_list() == l1
    assert out.get_column("lang").to_list() == ["zh", "zh", l1[2]]
    assert out.get_column("lang_by").to_list() == ["script", "fasttext", "fasttext"]
    expected = [p2[0] if l2[0] == "zh" else 0.0, p1[1], p1[2]]
    assert out.get_column("lang_score").to_list() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_top_label_alone_is_the_first_of_the_top_two(ident, k):
    l1, p1, l2, p2 = ident.predict(TEXTS, k=k)
    full = ident.predict(TEXTS)
    assert l1 == full[0] and list(p1) == pytest.approx(list(full[1]))
    assert (l2, list(p2)) == ((full[2], list(full[3])) if k == 2 else ([""] * len(TEXTS), [0.0] * len(TEXTS)))


def test_han_without_latin_is_chinese_even_when_fasttext_says_en():
    out = tag(["猫在睡觉"])
    assert out.get_column("lang").to_list() == ["zh"]


def test_japanese_with_kana_stays_japanese_and_fails():
    out = tag(["日本語のテキストです"])
    assert out.get_column("lang").to_list() == ["ja"]
    assert out.get_column("_fail_lang").to_list() == [True]


def test_latin_only_text_is_never_zh():
    out = tag(["ni hao ma zhong guo", "a dog on the beach"])
    assert "zh" not in out.get_column("lang").to_list()


def test_other_languages_and_low_scores_fail():
    out = tag(["une belle maison près de la rivière en été", "a dog playing on the beach at sunset"])
    assert out.get_column("lang").to_list() == ["fr", "en"]
    assert out.get_column("_fail_lang").to_list() == [True, False]
    strict = tag(["a dog playing on the beach at sunset"], min_lang_score=0.9999, second_opinion=False)
    assert strict.get_column("_fail_lang").to_list() == [True]


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(langid.LangModelError, match="not found"):
        langid.LanguageIdentifier(tmp_path / "nope.ftz")
