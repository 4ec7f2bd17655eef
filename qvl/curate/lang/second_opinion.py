"""Rule 11's second opinion: lingua on the Latin-script captions fastText doubts.

lid.176 is weak on short captions: on CC3M's validation split (15,833 English alt-texts) it
drops 1.8% — "group of horses in a paddock" below 0.5 for ``en``, "A plate of dumplings with soy
sauce" ``es`` 0.86. lingua (``lingua-language-detector``: n-gram models of 1-5 characters inside
its wheel, built for short text) reads such captions right. Its accurate mode costs ~1.7 ms a
caption over all 49 Latin-script languages it knows, so it weighs only those that matter for the
caption: the run's Latin-script languages and the eight fastText itself found likeliest (~0.25 ms).
Its fast mode (trigrams only) is ~3x cheaper again but confidently wrong on short English
("vector illustration of a vintage tv ." is French to it, 0.998): CC3M's English dropped would be
0.28-0.59%, not 0.07%. Measured by ``benchmarks/curate_langid.py``.
"""

from __future__ import annotations

from functools import lru_cache

# fastText's top labels to weigh beside the run's languages: fewer make lingua faster, and keep
# more foreign captions (a caption's true language missing from the choice); measured at 8
FASTTEXT_CANDIDATES = 8
# with fewer choices than this (fastText's labels are languages lingua does not know), lingua
# weighs every Latin-script language instead
MIN_CANDIDATES = 3


@lru_cache(maxsize=1)
def _languages() -> tuple[tuple, dict[str, tuple]]:
    """(lingua's Latin-script languages, lid.176 code -> those languages); lid.176 writes
    Norwegian as ``no``, lingua as Bokmål and Nynorsk."""
    from lingua import Language

    latin = tuple(sorted(Language.all_with_latin_script(), key=lambda lang: lang.name))
    by_code: dict[str, tuple] = {}
    for lang in latin:
        for code in (lang.iso_code_639_1.name.lower(), lang.iso_code_639_3.name.lower()):
            by_code[code] = (*by_code.get(code, ()), lang)
    by_code["no"] = by_code["nb"] + by_code["nn"]
    return latin, by_code


def code(language) -> str:
    """A lingua language as the lid.176 code the run's ``languages`` are written in."""
    name = language.iso_code_639_1.name.lower()
    return "no" if name in ("nb", "nn") else name


@lru_cache(maxsize=4096)
def _detector(languages: frozenset):
    """lingua's accurate detector over ``languages``; models are loaded once per process and shared."""
    from lingua import LanguageDetectorBuilder

    return LanguageDetectorBuilder.from_languages(*languages).build()


def candidates(kept: tuple[str, ...], fasttext_labels: list[str]) -> frozenset:
    """The languages lingua weighs for one caption."""
    latin, by_code = _languages()
    chosen = {lang for c in (*kept, *fasttext_labels[:FASTTEXT_CANDIDATES]) for lang in by_code.get(c, ())}
    return frozenset(chosen) if len(chosen) >= MIN_CANDIDATES else frozenset(latin)


def judge(texts: list[str], fasttext_labels: list[list[str]], kept: tuple[str, ...]) -> tuple[list[str], list[float]]:
    """lingua's likeliest language (a lid.176 code) and its confidence for each text."""
    labels: list[str] = []
    scores: list[float] = []
    for text, theirs in zip(texts, fasttext_labels):
        top = _detector(candidates(kept, theirs)).compute_language_confidence_values(text)[0]
        labels.append(code(top.language))
        scores.append(top.value)
    return labels, scores
