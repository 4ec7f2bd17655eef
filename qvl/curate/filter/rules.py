"""Qwen-VL stage-1 cleaning rules, one small pure function each (DESIGN.md §1).

A drop rule maps settings to a boolean polars expression, true where a row fails; a
rewrite rule maps the text expression to a cleaned one. Expressions run vectorised over a
whole batch, on one machine or inside a Ray task, unchanged. ``apply`` evaluates them all
and names, per row, the first rule that failed (``drop_reason``) and every one that did
(``failed_rules``). Language id (``lang``) and de-duplication (``duplicate``) are rules 11
and 12 too, but need a model and a global view: see ``langid`` and ``dedup``.
"""

from __future__ import annotations

import html as _html
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import polars as pl

from qvl.curate.settings import FilterSettings

# ---------------------------------------------------------------- patterns

# A real HTML tag: a letter after "<" (so "< 3" or "<3" stay), optional attributes.
HTML_TAG = r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>"
# C0 controls but tab/newline/CR (whitespace, collapsed by `irregular`), DEL, C1 controls,
# zero-width space, LRM/RLM, bidi embeddings/overrides (U+202A-E) and isolates (U+2066-9),
# the BOM: invisible, and able to make text render other than it reads.
CONTROL_CHARS = r"[\x{00}-\x{08}\x{0B}\x{0C}\x{0E}-\x{1F}\x{7F}-\x{9F}\x{200B}\x{200E}\x{200F}\x{202A}-\x{202E}\x{2066}-\x{2069}\x{FEFF}]"
# URLs, e-mails, file names and camera file stems, in one pass. ASCII classes and ASCII
# word boundaries keep the regex on the fast engine (a Unicode \b is ~10x slower).
IRREGULAR = "|".join(
    [
        r"(?i:(?:https?|ftp)://\S+)",
        r"(?i:www\.\S+)",
        r"[A-Za-z0-9_.+-]+@[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+",
        r"(?i:[A-Za-z0-9_-]+\.(?:jpe?g|png|gif|bmp|webp|tiff?|heic|svg|mp4|mov|pdf)(?-u:\b))",
        r"(?-u:\b)(?:IMG|DSC|DSCN|DSCF|DCIM|PXL|MVIMG)[_-]?[0-9]{3,}[A-Za-z0-9_]*",
    ]
)
# Any whitespace run -> one space, written so plain single spaces never match.
EXTRA_SPACE = r"[\s--[ ]]\s*| \s+"
PUNCTUATION = r"!?.,;:*~#=_+|/\\-"
# Emoji: presentation-by-default pictographs, flags (regional indicators), the emoji
# variation selector, ZWJ joiners, keycaps, skin tones and tag sequences.
EMOJI = (
    r"[\p{Emoji_Presentation}\p{Regional_Indicator}\x{FE0F}\x{200D}\x{20E3}"
    r"\x{1F3FB}-\x{1F3FF}\x{E0020}-\x{E007F}]"
)
# What English/Chinese captions may hold: Latin (ASCII, Latin-1), CJK ideographs (with
# extensions A/B and compatibility), CJK symbols and punctuation, full-width forms,
# general punctuation, whitespace. Anything else drops the row.
NOT_EN_ZH = (
    r"[^\x{0000}-\x{00FF}\x{2000}-\x{206F}\x{3000}-\x{303F}\x{3400}-\x{4DBF}"
    r"\x{4E00}-\x{9FFF}\x{F900}-\x{FAFF}\x{FF00}-\x{FFEF}\x{20000}-\x{2A6DF}\s]"
)
HAN = r"\p{Han}"
WORD = r"[^\s\p{Han}\x{3000}-\x{303F}\x{FF00}-\x{FFEF}]+"

TEXT_RAW = pl.col("text_raw")
TEXT = pl.col("text")


# ---------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    name: str
    kind: str  # "drop" or "rewrite"
    build: Callable  # drop: (settings) -> fail expr; rewrite: (text expr, settings) -> text expr
    setting: Callable[[FilterSettings], str]  # the setting in force, for the report
    # The same rule on PLAIN rows, where its outcome is known without a regex (a
    # rewrite that changes nothing, a check that cannot fail); None: ``build`` as is.
    plain: Callable | None = None


def missing_url(s: FilterSettings) -> pl.Expr:
    return pl.col("url").is_null() | (pl.col("url").str.strip_chars() == "")


def dataset_tag(s: FilterSettings) -> pl.Expr:
    if not s.dataset_tags:
        return pl.lit(False)
    tags = "|".join(t.replace("\\", "\\\\") for t in s.dataset_tags)
    return TEXT_RAW.str.contains(f"<(?:{tags})>").fill_null(False)


_HTML_TAG_RE = re.compile(HTML_TAG)


def _html_to_text(text: str) -> str:
    """Unescape, then strip tags, until nothing changes: ``&lt;b&gt;`` is a tag once
    unescaped, ``&amp;lt;`` an entity twice, ``<<b>img>`` a tag once the inner one is gone."""
    while True:
        cleaned = _HTML_TAG_RE.sub(" ", _html.unescape(text))
        if cleaned == text:
            return text
        text = cleaned


# the entities web captions hold most; with them, a pass of html.unescape is one replace_many
COMMON_ENTITIES = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;"]
COMMON_CHARS = ["&", "<", ">", '"', "'"]
# what html.unescape would decode beyond those (named without ";", numeric, other names), and
# controls, which Python's \s counts as space inside a tag and the regex engine does not
NEEDS_PYTHON = r"&(?:#|[A-Za-z])|[\x00-\x1f\x7f-\x9f]"


def _strip_html(values: pl.Series) -> pl.Series:
    """``_html_to_text`` on the rows that hold ``<`` or ``&`` (a few percent of web text):
    vectorised while only the common entities and tags are in play, each pass checked for an
    entity those do not cover; such rows (rare) take ``html.unescape`` itself."""
    has = values.str.contains("[<&]").fill_null(False)
    if not has.any():
        return values
    idx = has.arg_true()
    text = values.gather(idx)
    python = pl.Series([False] * text.len())
    for _ in range(16):
        python = python | text.str.replace_many(COMMON_ENTITIES, [""] * len(COMMON_ENTITIES)).str.contains(NEEDS_PYTHON).fill_null(False)
        cleaned = text.str.replace_many(COMMON_ENTITIES, COMMON_CHARS).str.replace_all(HTML_TAG, " ")
        if cleaned.equals(text):
            break
        text = cleaned
    else:
        python = pl.Series([True] * text.len())  # did not settle: the exact loop decides
    if python.any():
        slow = python.arg_true()
        text = text.scatter(slow, [_html_to_text(v) for v in values.gather(idx.gather(slow)).to_list()])
    return values.scatter(idx, text)


def strip_html(text: pl.Expr, s: FilterSettings) -> pl.Expr:
    return text.map_batches(_strip_html, return_dtype=pl.String)


@lru_cache(maxsize=1)
def not_nfc_stable() -> str:
    """A character class of what NFC may change or combine (marks, characters that are not
    NFC alone, Hangul jamo), so that text holding none of them — nearly all captions — skips
    the normalisation. Built once per process from the tables of the engine that normalises
    (polars: its regex ``\\p{M}`` and its own NFC), ~0.1 s."""
    codes = np.concatenate([np.arange(0xD800), np.arange(0xE000, 0x30000)])  # no surrogates
    chars = pl.Series([chr(c) for c in codes.tolist()], dtype=pl.String)
    jamo = (codes >= 0x1100) & (codes <= 0x11FF)
    unstable = (chars.str.contains(r"^\p{M}$") | (chars.str.normalize("NFC") != chars)).to_numpy() | jamo
    picked = codes[unstable]
    breaks = np.flatnonzero(np.diff(picked) != 1)
    firsts, lasts = picked[np.r_[0, breaks + 1]], picked[np.r_[breaks, picked.size - 1]]
    return "[" + "".join(f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in zip(firsts.tolist(), lasts.tolist())) + "]"


def _nfc(values: pl.Series) -> pl.Series:
    needs = values.str.contains(not_nfc_stable()).fill_null(False)
    if not needs.any():
        return values
    idx = needs.arg_true()
    return values.scatter(idx, values.gather(idx).str.normalize("NFC"))


def clean_unicode(text: pl.Expr, s: FilterSettings) -> pl.Expr:
    """NFC first, so a decomposed ``café`` meets the character rules as the ``café`` it is;
    invisible controls become a space (never nothing: removing one could join ``<`` and a
    letter into a tag, or two words into one)."""
    return text.map_batches(_nfc, return_dtype=pl.String).str.replace_all(CONTROL_CHARS, " ")


# Irregular spans with the whitespace around them, and any other whitespace run: each -> one
# space, in one pass. Collapsing punctuation runs afterwards neither creates nor joins spaces, so
# this is what removing the spans, then collapsing runs, then whitespace gives (tested).
IRREGULAR_OR_SPACE = rf"(?:\s*(?:{IRREGULAR}))+\s*|{EXTRA_SPACE}"


def remove_irregular(text: pl.Expr, s: FilterSettings) -> pl.Expr:
    marks = PUNCTUATION
    run = f"([{marks}])[{marks}]{{{s.max_punct_run},}}"
    return text.str.replace_all(IRREGULAR_OR_SPACE, " ").str.replace_all(run, "$1").str.strip_chars()


def empty_text(s: FilterSettings) -> pl.Expr:
    return TEXT.is_null() | (TEXT == "")


def _short_side() -> pl.Expr:
    return pl.min_horizontal("width", "height")


def aspect_ratio(s: FilterSettings) -> pl.Expr:
    long_side = pl.max_horizontal("width", "height").cast(pl.Float64)
    short = _short_side().cast(pl.Float64)
    known = pl.col("width").is_not_null() & pl.col("height").is_not_null()
    return (known & ((short <= 0) | (long_side / short > s.max_aspect_ratio))).fill_null(False)


def too_small(s: FilterSettings) -> pl.Expr:
    known = pl.col("width").is_not_null() & pl.col("height").is_not_null()
    return (known & (_short_side() < s.min_side)).fill_null(False)


def clip_threshold(s: FilterSettings) -> pl.Expr:
    """The clip_score threshold that applies to each row's source (null: none)."""
    return pl.col("source").replace_strict(
        s.clip_thresholds, default=s.clip_threshold_default, return_dtype=pl.Float64
    )


INVALID_SCORES = pl.col("invalid_scores")


def invalid_score(s: FilterSettings) -> pl.Expr:
    """A score column the row's file has, holding no finite value for the row, where that score's
    rule is on for the row's source. The threshold rules pass a null score, so without this a
    NaN or an empty cell would keep a row its score might have dropped; a file without the column
    is another matter (its rows are unscored and pass). ``invalid_scores`` names such scores per
    row (readers.py), so the fact survives into the outputs and ``--from-ledger``."""
    if s.keep_unscored:
        return pl.lit(False)
    limits = {"clip_score": clip_threshold(s), **{n: score_threshold(s, n) for n in ("nsfw", "watermark", "aesthetic")}}
    on = [INVALID_SCORES.list.contains(n) & t.is_not_null() for n, t in limits.items() if n not in s.skip_rules]
    return pl.any_horizontal(on).fill_null(False) if on else pl.lit(False)


def _invalid_setting(s: FilterSettings) -> str:
    what = "a score column the file has with no finite value (null, NaN, inf) where that score's rule is on"
    return what + (": kept (keep_unscored)" if s.keep_unscored else "")


def clip_score(s: FilterSettings) -> pl.Expr:
    return (pl.col("clip_score") < clip_threshold(s)).fill_null(False)


def score_threshold(s: FilterSettings, score: str) -> pl.Expr:
    """The threshold of a published score for each row's source (null: the rule is off there)."""
    return pl.col("source").replace_strict(getattr(s, f"{score}_thresholds"),
                                           default=getattr(s, f"{score}_threshold_default"), return_dtype=pl.Float64)


def nsfw(s: FilterSettings) -> pl.Expr:
    return (pl.col("nsfw") > score_threshold(s, "nsfw")).fill_null(False)


def watermark(s: FilterSettings) -> pl.Expr:
    return (pl.col("watermark") > score_threshold(s, "watermark")).fill_null(False)


def aesthetic(s: FilterSettings) -> pl.Expr:
    return (pl.col("aesthetic") < score_threshold(s, "aesthetic")).fill_null(False)


def _thresholds(s: FilterSettings, score: str, op: str) -> str:
    table, default = getattr(s, f"{score}_thresholds"), getattr(s, f"{score}_threshold_default")
    parts = [f"{k} {op} {v}" for k, v in table.items()] + ([f"other {op} {default}"] if default is not None else [])
    return ", ".join(parts) or "off"


def emoji(s: FilterSettings) -> pl.Expr:
    return TEXT.str.contains(EMOJI).fill_null(False)


def non_en_zh_chars(s: FilterSettings) -> pl.Expr:
    return TEXT.str.contains(NOT_EN_ZH).fill_null(False)


# Text where counting spaces is not enough: Han, CJK/full-width punctuation, or any
# whitespace other than single inner spaces.
_NEEDS_REGEX_COUNT = r"[\p{Han}\x{3000}-\x{303F}\x{FF00}-\x{FFEF}]|[\s--[ ]]|  |^ | $"


def _count_units(values: pl.Series) -> pl.Series:
    """Most captions are single-spaced Latin text whose units are its spaces + 1; only the
    rest pay for the two regex counts."""
    units = (values.str.count_matches(" ", literal=True) + 1).cast(pl.UInt32)
    units = pl.select(pl.when(values.str.len_bytes() == 0).then(0).otherwise(units)).to_series().cast(pl.UInt32)
    slow = values.str.contains(_NEEDS_REGEX_COUNT).fill_null(False)
    if slow.any():
        idx = slow.arg_true()
        subset = values.gather(idx)
        # one pass: each Han character is a match, each run of other non-space characters one more
        exact = subset.str.count_matches(f"{HAN}|{WORD}").cast(pl.UInt32)
        units = units.scatter(idx, exact)
    return units


def length_units(text: pl.Expr) -> pl.Expr:
    """Whitespace-separated words (outside CJK) plus CJK characters."""
    return text.map_batches(_count_units, return_dtype=pl.UInt32)


UNITS = pl.col("units")  # measured once per row by ``evaluate``; kept in the outputs and the ledger


def length(s: FilterSettings) -> pl.Expr:
    return ((UNITS < s.min_units) | (UNITS > s.max_units)).fill_null(False)


# Most web captions are plain single-spaced printable ASCII with none of the characters
# the text rules look for. One regex pass finds the rest; only those pay for every rule.
NOT_PLAIN = (
    r"[^ -~]|[<&@]|://|(?i:www\.)|\.[A-Za-z]|  |^ | $|^$|IMG|DSC|DCIM|PXL"
    r"|[!?.,;:*~#=_+|/\\-]{4}"
)


def _never(s: FilterSettings) -> pl.Expr:
    return pl.lit(False)


def _unchanged(text: pl.Expr, s: FilterSettings) -> pl.Expr:
    return text


# Pipeline order. Input checks first (a row that could not be read or has no URL never
# reaches the text rules), then DESIGN.md's rules 1-10 (with ``unicode``, qvl's, between 2 and 3); `lang` (11) and `duplicate` (12)
# follow in langid.py and dedup.py.
RULES: tuple[Rule, ...] = (
    Rule("missing_url", "drop", missing_url, lambda s: "url null or blank"),
    Rule("dataset_tag", "drop", dataset_tag, lambda s: "<" + ">, <".join(s.dataset_tags) + ">", _never),
    Rule("html", "rewrite", strip_html, lambda s: "entities unescaped and tags removed, to a fixed point", _unchanged),
    Rule("unicode", "rewrite", clean_unicode,
         lambda s: "NFC; C0/C1 controls, DEL, zero-width and bidi controls -> space", _unchanged),
    Rule("irregular", "rewrite", remove_irregular,
         lambda s: f"URLs, e-mails, file names removed; punctuation runs > {s.max_punct_run} collapsed",
         _unchanged),
    Rule("empty_text", "drop", empty_text, lambda s: "nothing left after rewriting"),
    Rule("aspect_ratio", "drop", aspect_ratio, lambda s: f"long/short side > {s.max_aspect_ratio}"),
    Rule("too_small", "drop", too_small, lambda s: f"short side < {s.min_side} px"),
    Rule("invalid_score", "drop", invalid_score, _invalid_setting),
    Rule("clip_score", "drop", clip_score,
         lambda s: ", ".join(f"{k} < {v}" for k, v in s.clip_thresholds.items())
         + (f", other < {s.clip_threshold_default}" if s.clip_threshold_default is not None else "")),
    Rule("nsfw", "drop", nsfw, lambda s: "published NSFW probability: " + _thresholds(s, "nsfw", ">")),
    Rule("watermark", "drop", watermark,
         lambda s: "published watermark probability: " + _thresholds(s, "watermark", ">")),
    Rule("aesthetic", "drop", aesthetic, lambda s: "published aesthetic score: " + _thresholds(s, "aesthetic", "<")),
    Rule("emoji", "drop", emoji, lambda s: "any emoji", _never),
    Rule("non_en_zh_chars", "drop", non_en_zh_chars, lambda s: "a character outside Latin/CJK/punctuation",
         _never),
    Rule("length", "drop", length, lambda s: f"units < {s.min_units} or > {s.max_units}"),
)
INPUT_ERRORS = ("malformed_row", "invalid_utf8")
LANG = "lang"
DUPLICATE = "duplicate"
BALANCE = ("clip_top_fraction", "no_entry", "balance", "lang_mix")  # after rule 12: curate/filter/balance.py
DROP_ORDER: tuple[str, ...] = (
    INPUT_ERRORS + tuple(r.name for r in RULES if r.kind == "drop") + (LANG, DUPLICATE) + BALANCE
)
REWRITES: tuple[str, ...] = tuple(r.name for r in RULES if r.kind == "rewrite")


def fail_column(name: str) -> str:
    return f"_fail_{name}"


def apply(frame: pl.DataFrame, s: FilterSettings) -> pl.DataFrame:
    """Rewrite ``text_raw`` into ``text`` and evaluate every drop rule on every row.

    Adds ``text``, ``_changed_<rewrite>`` flags, ``_fail_<rule>`` flags and ``drop_reason``
    (null for survivors). A rule named in ``s.skip_rules`` is evaluated as never failing.
    Plain rows take each rule's known shortcut; the result is the same either way (tested).
    """
    if s.max_punct_run < 3 or frame.height < 1024:
        return evaluate(frame, s)
    plain = ~frame.get_column("text_raw").str.contains(NOT_PLAIN).fill_null(True)
    n_plain = plain.sum()
    if n_plain == 0:
        return evaluate(frame, s)
    frame = frame.with_row_index("_row")
    parts = [evaluate(frame.filter(plain), s, plain=True)]
    if n_plain < frame.height:
        parts.append(evaluate(frame.filter(~plain), s))
    return pl.concat(parts).sort("_row").drop("_row")


def evaluate(frame: pl.DataFrame, s: FilterSettings, plain: bool = False) -> pl.DataFrame:
    """Every active rule on every row of ``frame``; ``plain``: rows known to be PLAIN."""
    active = [r for r in RULES if r.name not in s.skip_rules]

    def build(rule: Rule) -> Callable:
        return rule.plain if plain and rule.plain is not None else rule.build

    text = TEXT_RAW
    steps = []
    for rule in (r for r in active if r.kind == "rewrite"):
        steps.append((rule.name, text, build(rule)(text, s)))
        text = pl.col(f"_after_{rule.name}")
    for name, before, after in steps:
        frame = frame.with_columns(after.alias(f"_after_{name}")).with_columns(
            (before.ne_missing(pl.col(f"_after_{name}"))).alias(f"_changed_{name}")
        )
    frame = frame.with_columns(text.alias("text")).drop([f"_after_{n}" for n, _, _ in steps])
    # plain rows are single-spaced with no CJK: their units are their spaces + 1
    units = (TEXT.str.count_matches(" ", literal=True) + 1).cast(pl.UInt32) if plain else length_units(TEXT)
    frame = frame.with_columns(units=units)
    drops = [r for r in active if r.kind == "drop"]
    frame = frame.with_columns([build(r)(s).alias(fail_column(r.name)) for r in drops])
    reasons = [pl.col("_input_error")] + [
        pl.when(pl.col(fail_column(r.name))).then(pl.lit(r.name)) for r in drops
    ]
    return frame.with_columns(drop_reason=pl.coalesce(reasons))


def failed_rules(frame: pl.DataFrame) -> pl.Expr:
    """Every rule that failed on a row, in pipeline order (its input error, if any, first).

    A bitmask per row (one bit per rule) beside the input error, then one list per distinct
    pair — a batch holds a few dozen — joined back: several times faster than a string per row."""
    names = [n for n in DROP_ORDER if fail_column(n) in frame.columns]
    mask = pl.sum_horizontal(pl.lit(0, pl.UInt64), *[
        pl.col(fail_column(n)).fill_null(False).cast(pl.UInt64) * (1 << i) for i, n in enumerate(names)])

    def lists(keys: pl.Series) -> pl.Series:
        rows = keys.struct.unnest()
        unique = rows.unique()
        table = unique.with_columns(failed=pl.Series(
            [([error] if error is not None else []) + [n for i, n in enumerate(names) if m >> i & 1]
             for error, m in unique.iter_rows()], dtype=pl.List(pl.String)))
        return rows.join(table, on=["error", "mask"], how="left", maintain_order="left",
                         nulls_equal=True).get_column("failed")

    return pl.struct(pl.col("_input_error").cast(pl.String).alias("error"), mask.alias("mask")).map_batches(
        lists, return_dtype=pl.List(pl.String))
