"""Each rule alone, on crafted rows: the exact drop_reason, and every failed rule listed."""

from __future__ import annotations

import polars as pl
import pytest

from qvl.curate.filter import rules
from qvl.curate.settings import FilterSettings


def frame(rows: list[dict]) -> pl.DataFrame:
    base = {"url": "https://x.test/a.jpg", "text_raw": "a dog on the beach", "width": 640, "height": 480,
            "clip_score": 0.35, "nsfw": None, "watermark": None, "aesthetic": None, "source": "laion",
            "_input_error": None, "invalid_scores": []}
    return pl.DataFrame([{**base, **r} for r in rows],
                        schema_overrides={"_input_error": pl.String, "invalid_scores": pl.List(pl.String), "clip_score": pl.Float64, "nsfw": pl.Float64,
                                          "watermark": pl.Float64, "aesthetic": pl.Float64,
                                          "url": pl.String, "text_raw": pl.String})


def run(rows: list[dict], **settings) -> pl.DataFrame:
    return rules.apply(frame(rows), FilterSettings(**settings))


def reasons(rows: list[dict], **settings) -> list[str | None]:
    return run(rows, **settings).get_column("drop_reason").to_list()


def test_clean_row_survives_unchanged():
    out = run([{}])
    assert out.get_column("drop_reason").to_list() == [None]
    assert out.get_column("text").to_list() == ["a dog on the beach"]


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"url": None}, "missing_url"),
        ({"url": "  "}, "missing_url"),
        ({"text_raw": "Photo of <PERSON> at the beach"}, "dataset_tag"),
        ({"text_raw": None}, "empty_text"),
        ({"text_raw": "<br/> <img src='x.jpg'>"}, "empty_text"),
        ({"text_raw": "https://example.com/photo.jpg"}, "empty_text"),
        ({"width": 1200, "height": 300}, "aspect_ratio"),  # 4.0 > 3.0
        ({"width": 199, "height": 400}, "too_small"),
        ({"clip_score": 0.279}, "clip_score"),  # LAION B/32 threshold 0.28
        ({"nsfw": 0.51}, "nsfw"),  # LAION punsafe above 0.5
        ({"watermark": 0.81}, "watermark"),
        ({"text_raw": "a dog on the beach 😀"}, "emoji"),
        ({"text_raw": "a flag on the beach 🇨🇳"}, "emoji"),
        ({"text_raw": "a family on the beach 👨‍👩‍👧"}, "emoji"),
        ({"text_raw": "keycap one 1️⃣ on the beach"}, "emoji"),
        ({"text_raw": "Красивый дом у реки"}, "non_en_zh_chars"),
        ({"text_raw": "川の近くの美しい家"}, "non_en_zh_chars"),
        ({"text_raw": "two words"}, "length"),
        ({"text_raw": " ".join(["word"] * 257)}, "length"),
        ({"_input_error": "invalid_utf8"}, "invalid_utf8"),
    ],
)
def test_each_rule_names_itself(row, reason):
    assert reasons([row]) == [reason]


def test_thresholds_are_edges_not_off_by_one():
    assert reasons([{"width": 900, "height": 300}]) == [None]  # exactly 3.0 passes
    assert reasons([{"width": 200, "height": 200}]) == [None]  # exactly 200 passes
    assert reasons([{"clip_score": 0.28}]) == [None]
    assert reasons([{"text_raw": "three short words"}]) == [None]
    assert reasons([{"text_raw": " ".join(["word"] * 256)}]) == [None]


def test_unknown_sizes_and_scores_pass():
    assert reasons([{"width": None, "height": None, "clip_score": None}]) == [None]


def test_clip_threshold_is_per_source():
    rows = [{"source": "datacomp", "clip_score": 0.25}, {"source": "laion", "clip_score": 0.25},
            {"source": "mine", "clip_score": 0.01}]
    assert reasons(rows) == [None, "clip_score", None]
    assert reasons(rows, clip_threshold_default=0.1) == [None, "clip_score", "clip_score"]


def test_chinese_length_counts_characters():
    assert reasons([{"text_raw": "一只狗"}]) == [None]  # 3 characters = 3 units
    assert reasons([{"text_raw": "小狗"}]) == ["length"]
    assert rules_units("一只金毛犬 on the beach") == 8


def rules_units(text: str) -> int:
    return pl.select(rules.length_units(pl.lit(text))).item()


def test_html_rewrite_strips_tags_and_unescapes():
    out = run([{"text_raw": "<p><b>Fish</b> &amp; chips &#39;fresh&#x27; &lt;3</p>"}])
    assert out.get_column("text").to_list() == ["Fish & chips 'fresh' <3"]
    assert out.get_column("_changed_html").to_list() == [True]


def test_irregular_rewrite():
    raw = "Sunset   over the sea!!!!!! see https://t.co/x www.foo.com mail me@ex.com IMG_1234.jpg DSC_0042 ..."
    out = run([{"text_raw": raw}])
    assert out.get_column("text").to_list() == ["Sunset over the sea! see mail ..."]
    assert out.get_column("_changed_irregular").to_list() == [True]


def test_irregular_in_one_pass_equals_its_three_steps():
    """``remove_irregular`` folds span removal and whitespace collapsing into one regex pass; on
    random mixes of spans, punctuation runs, whitespace and words it must equal removing the
    spans, then collapsing punctuation runs, then whitespace (the rule as DESIGN.md states it)."""
    import random

    rng = random.Random(7)
    pieces = [" ", "  ", "\t", "\n", "\u3000", "!", "!!!!", "....", "-", ".", "/", "http://x.y/z", "www.a.com",
              "a@b.cd", "IMG_1234", "pic.jpg", "word", "x", "汉字", "é"]
    texts = pl.Series(["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(20_000)])
    settings = FilterSettings()
    run_re = f"([{rules.PUNCTUATION}])[{rules.PUNCTUATION}]{{{settings.max_punct_run},}}"
    steps = (texts.str.replace_all(rules.IRREGULAR, " ").str.replace_all(run_re, "$1")
             .str.replace_all(rules.EXTRA_SPACE, " ").str.strip_chars())
    one_pass = pl.select(rules.remove_irregular(pl.lit(texts), settings)).to_series()
    assert one_pass.to_list() == steps.to_list()
    assert (one_pass != texts).sum() > 10_000  # the mixes do exercise the rule


def test_text_that_needs_no_rewrite_is_not_counted_as_changed():
    out = run([{"text_raw": "a < b and 3 > 2 on the beach"}])
    assert out.get_column("text").to_list() == ["a < b and 3 > 2 on the beach"]
    assert out.get_column("_changed_html").to_list() == [False]


def test_failed_rules_lists_every_failure_in_order():
    out = run([{"text_raw": "<PERSON> 😀", "width": 100, "height": 1000, "clip_score": 0.1}])
    rej = out.filter(pl.col("drop_reason").is_not_null())
    assert rej.get_column("drop_reason").to_list() == ["dataset_tag"]
    assert rej.select(rules.failed_rules(rej)).to_series().to_list() == [
        ["dataset_tag", "aspect_ratio", "too_small", "clip_score", "emoji", "non_en_zh_chars", "length"]
    ]


def test_skipped_rule_never_drops():
    assert reasons([{"text_raw": "two words"}], skip_rules=("length",)) == [None]
    # an emoji is also outside the en/zh characters: skipping `emoji` hands the row on
    assert reasons([{"text_raw": "a dog on the beach 😀"}], skip_rules=("emoji",)) == ["non_en_zh_chars"]


def test_dataset_tags_are_a_setting():
    assert reasons([{"text_raw": "a photo of <CITY> at night"}]) == [None]
    assert reasons([{"text_raw": "a photo of <CITY> at night"}], dataset_tags=("CITY",)) == ["dataset_tag"]


def test_plain_row_shortcuts_give_the_same_result_as_every_rule(tmp_path):
    """`apply` lets plain ASCII rows take each rule's shortcut; the outcome must be exactly
    that of running every rule on every row, on noisy demo data and crafted edge cases."""
    from qvl.curate.sources import readers, shards
    from qvl.demo.pairs import write_demo_pairs

    edge = ["a b c", "a  b c", " a b c", "a b c ", "a b", "x y z.", "see www.foo.com now", "IMG 1234 ok",
            "wow!!! nice one", "wow!!!! nice one", "a.b c d", "a@b c d", "tab\there ok", "", "3 < 4 ok",
            "fish & chips ok", "ab cd ef " * 40, "DSC0042 my photo", "a - b - c", "dots ... here ok"]
    frames = [pl.concat(list(readers.read_batches(shards.open_shard(p, i), 100_000)), how="diagonal_relaxed")
              for i, p in enumerate(write_demo_pairs(tmp_path, rows_per_shard=1500))]
    demo = pl.concat([f.select("url", "text_raw", "width", "height", "clip_score", "nsfw", "watermark", "aesthetic",
                               "source", "_input_error", "invalid_scores")
                      for f in frames], how="vertical_relaxed")
    crafted = frame([{"text_raw": t} for t in edge * 60])
    for data in (demo, crafted.select(demo.columns)):
        for settings in (FilterSettings(), FilterSettings(skip_rules=("irregular",)), FilterSettings(max_units=5)):
            fast = rules.apply(data, settings)
            full = rules.evaluate(data, settings)
            assert fast.equals(full)


@pytest.mark.parametrize("raw, text", [
    ("&lt;b&gt;bold&lt;/b&gt; text on a page", "bold text on a page"),  # tags found after unescaping
    ("fish &amp;amp; chips on a plate", "fish & chips on a plate"),  # unescaped to a fixed point
    ("&lt;img&gt;secret.png&lt;/img&gt; a dog on a beach", "a dog on a beach"),
    ("&amp;lt;ref&amp;gt;a cat&amp;lt;/ref&amp;gt; on a mat", "a cat on a mat"),
    ("<<b>img>a cat on a mat", "< img>a cat on a mat"),  # a tag becomes a space: no tag joins up again
    ("<i<b>>mg>a cat on a mat", "mg>a cat on a mat"),  # <i > left by the inner tag is a tag itself
    ("3 &lt; 4 and 5 &gt; 2 ok", "3 < 4 and 5 > 2 ok"),  # not markup: stays
])
def test_cleaning_never_emits_markup(raw, text):
    assert run([{"text_raw": raw}]).get_column("text").to_list() == [text]


@pytest.mark.parametrize("raw, text", [
    ("a dog\u202eon the beach", "a dog on the beach"),  # bidi override
    ("a dog\u2066on\u2069 the beach", "a dog on the beach"),  # isolates
    ("a\x00 dog\x07 on\x7f the\x85 beach\u200b", "a dog on the beach"),  # C0, DEL, C1, zero-width space
    ("a dog &#x202E;on the beach", "a dog on the beach"),  # one that an entity spelt
    ("<\u202eimg>a dog on the beach", "< img>a dog on the beach"),  # removal never makes a tag
])
def test_control_and_bidi_characters_become_spaces(raw, text):
    out = run([{"text_raw": raw}])
    assert out.get_column("text").to_list() == [text]
    assert out.get_column("_changed_unicode").to_list() == [True]


def test_nfc_before_the_character_rules():
    nfd, nfc = "un caf\u0065\u0301 au bord de la mer", "un caf\u00e9 au bord de la mer"
    out = run([{"text_raw": nfd}, {"text_raw": nfc}])
    assert out.get_column("drop_reason").to_list() == [None, None]
    assert out.get_column("text").to_list() == [nfc, nfc]
    assert out.get_column("_changed_unicode").to_list() == [True, False]


def test_published_scores_per_source_and_unscored_rows_pass():
    rows = [{"nsfw": 0.5, "watermark": 0.8}, {"nsfw": None, "watermark": None, "aesthetic": None},
            {"source": "coyo", "nsfw": 0.3}, {"aesthetic": 4.9}, {"aesthetic": 5.1}]
    assert reasons(rows) == [None, None, None, None, None]  # at the threshold passes; aesthetic is off
    assert reasons(rows, nsfw_thresholds={"coyo": 0.2}, aesthetic_threshold_default=5.0) == \
        [None, None, "nsfw", "aesthetic", None]
    assert reasons([{"nsfw": 0.99}], nsfw_threshold_default=None) == [None]  # switched off


def test_the_vectorised_html_path_equals_html_unescape_and_strip():
    """Entity and tag soup, common and rare, nested and cut: every row equals the exact loop."""
    import random

    rng = random.Random(0)
    pieces = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&amp;lt;", "&amp;amp;", "&lt;b&gt;", "<b>", "</b>", "<", ">",
              "&", "&copy;", "&amp", "&lt", "&#x41;", "&#65;", "&AMP;", "<br/>", "<a href='x'>", "a", " ", "cat",
              "<<b>i>", "&amp;#39;", "\x1c", "<b\x1cx>", "&nbsp;", "中文"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(3000)]
    series = pl.Series(texts)
    assert rules._strip_html(series).to_list() == [rules._html_to_text(t) for t in texts]


def test_nfc_only_where_it_can_change_something_gives_nfc_everywhere():
    import random
    import unicodedata

    rng = random.Random(1)
    alphabet = ["e", "\u0301", "\u00e9", "a", "\u0308", "\uf900", "\u212b", "\u1100", "\u1161", "\u11a8", "中", " ",
                "\u0958", "\u2126", "\u00c5", "x", "\u0323"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10))) for _ in range(2000)]
    assert rules._nfc(pl.Series(texts)).to_list() == [unicodedata.normalize("NFC", t) for t in texts]


def test_the_nfc_prefilter_holds_what_nfc_may_change_or_combine():
    """Rows without these characters skip the normalisation: it must hold every mark, every
    character NFC changes alone, the Hangul jamo — and none of the characters captions are
    made of."""
    held = pl.Series(["\u0301", "\u0308", "\u3099", "\u212b", "\uf900", "\u1161", "\u11a8", "\u0dca", "\U0001d165"])
    plain = pl.Series(["a", "é", "中", "가", "ß", "ﬁ", "Ω", "😀", " "])
    assert held.str.contains(rules.not_nfc_stable()).all()
    assert not plain.str.contains(rules.not_nfc_stable()).any()


def test_failed_rules_keeps_any_input_error_first_then_the_rules_in_order():
    frame = pl.DataFrame({"_input_error": [None, "malformed_row", "a_reason_added_later", None],
                          rules.fail_column("emoji"): [True, True, None, False],
                          rules.fail_column("clip_score"): [True, False, True, False]})
    assert frame.select(rules.failed_rules(frame)).to_series().to_list() == [
        ["clip_score", "emoji"], ["malformed_row", "emoji"], ["a_reason_added_later", "clip_score"], []]


def test_a_broken_score_fails_invalid_score_first_where_its_rule_is_on():
    """``invalid_scores`` names the scores whose column the file has but whose value is null/NaN/inf
    (readers.py); a null score not named there comes from a file without the column: unscored."""
    rows = [{"clip_score": None, "invalid_scores": ["clip_score"]},
            {"watermark": None, "invalid_scores": ["watermark"]},
            {"clip_score": None},  # the file has no clip score: the rule does not apply
            {"source": "cc3m", "clip_score": None, "invalid_scores": ["clip_score"]},  # no clip threshold for cc3m
            {"aesthetic": None, "invalid_scores": ["aesthetic"]},  # aesthetic is off by default
            {"text_raw": "two words", "clip_score": None, "invalid_scores": ["clip_score", "nsfw"]}]
    out = run(rows)
    assert out.get_column("drop_reason").to_list() == ["invalid_score", "invalid_score", None, None, None,
                                                       "invalid_score"]
    assert out.select(rules.failed_rules(out)).to_series()[5].to_list() == ["invalid_score", "length"]
    assert reasons(rows[4:5], aesthetic_threshold_default=5.0) == ["invalid_score"]
    assert reasons(rows[:2], keep_unscored=True) == [None, None]  # they pass, as unscored rows do
    assert reasons(rows[:2], watermark_threshold_default=None, clip_thresholds={}) == [None, None]  # rules off
    assert reasons(rows[:2], skip_rules=("clip_score", "watermark")) == [None, None]
    order = [r.name for r in rules.RULES]
    assert order.index("invalid_score") + 1 == order.index("clip_score")
