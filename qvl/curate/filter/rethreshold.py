"""`qvl curate filter --from-ledger PREV --out NEW`: new thresholds, no text rules again.

A finished run holds every input row once (kept or rejected) with its cleaned text and
the measures its rules took: width and height, the CLIP score, ``units`` (the length
rule's), the language label and score, ``invalid_scores`` (the scores whose column the
input had but whose value was broken: a null score alone cannot tell that from a file
without the column) and ``failed_rules`` (every rule that failed).
Re-thresholding reads those rows back as its input and decides again: the text rules
(``dataset_tag``, ``emoji``, ``non_en_zh_chars`` …) keep their recorded outcome, the
threshold rules (``aspect_ratio``, ``too_small``, ``invalid_score``, ``clip_score``, the published scores,
``length``, ``lang``)
are evaluated on the recorded measures with the new settings. Language id runs only on
rows that now survive and were never labelled; duplicates are found again among the new
survivors. The new run has the full output contract (kept, rejected, ledger, report).

Settings that change the text or a recorded outcome (``dataset_tags``,
``max_punct_run``, the rewrites, ``lang_model``, switching a rule back on) cannot be
re-derived and are refused: run the filter on the raw input for those.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from qvl.curate.filter import report as report_mod
from qvl.curate.filter import rules
from qvl.curate.lang import langid
from qvl.curate.settings import FilterSettings
from qvl.curate.sources import layouts
from qvl.curate.sources.shards import SEQ_ROW_BITS, Shard
from qvl.errors import QvlError
from qvl.recipes import fill
from qvl.schemas.pairs import check_columns

SCORE_SETTINGS = {f"{score}_{kind}" for score in ("nsfw", "watermark", "aesthetic")
                  for kind in ("thresholds", "threshold_default")}
RETHRESHOLDABLE = {"min_side", "max_aspect_ratio", "clip_thresholds", "clip_threshold_default", "min_units",
                   "max_units", "languages", "min_lang_score", "second_opinion", "second_opinion_below", "skip_rules",
                   *SCORE_SETTINGS, "keep_unscored",
                   # decided again on the new survivors (their text matched again for balancing)
                   "clip_top_fraction", "clip_top_by", "balance_entries", "balance_t", "lang_mix", "balance_seed"}
MEASURED = ("aspect_ratio", "too_small", "invalid_score", "clip_score", "nsfw", "watermark", "aesthetic", "length")
TEXT_RULES = ("missing_url", "dataset_tag", "empty_text", "emoji", "non_en_zh_chars")
FORMAT = "qvl-run"  # Shard.format of a previous run's output file


class LedgerError(QvlError):
    pass


def previous_settings(prev: Path) -> FilterSettings:
    report = prev / "report.json"
    if not report.is_file() or not (prev / "_state" / "run.json").is_file():
        raise LedgerError(f"{prev}: not the --out of a finished `qvl curate filter` (no report.json / _state)")
    try:
        values = report_mod.read(report)["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        raise LedgerError(f"{report}: not a qvl filter report (no JSON object with its settings)") from None
    if not isinstance(values, dict):
        raise LedgerError(f"{report}: settings: not a table")
    # a run from before the published-score rules had none: they were off
    values.update({f"{s}_threshold_default": None for s in ("nsfw", "watermark", "aesthetic")
                   if f"{s}_threshold_default" not in values})
    return fill(FilterSettings, values, f"{report} settings")  # typed and checked like a recipe


def check_settings(old: FilterSettings, new: FilterSettings) -> None:
    changed = [f.name for f in dataclasses.fields(FilterSettings) if getattr(old, f.name) != getattr(new, f.name)]
    fixed = [name for name in changed if name not in RETHRESHOLDABLE]
    if fixed:
        raise LedgerError(f"--from-ledger cannot change {', '.join(fixed)}: they change the text or a recorded "
                          "outcome; run the filter on the raw input instead")
    back_on = [r for r in old.skip_rules if r not in new.skip_rules and r not in
               (*MEASURED, rules.LANG, rules.DUPLICATE)]
    if back_on:
        raise LedgerError(f"--from-ledger cannot switch {', '.join(back_on)} back on: the previous run never "
                          "evaluated it")


def shards_of(prev: Path) -> list[Shard]:
    """Every output file of the previous run (kept and rejected) as an input shard."""
    run_json = prev / "_state" / "run.json"
    try:
        state = report_mod.read(run_json)
        names = state.get("input_names") or [Path(p).name for p in state["inputs"]]  # runs before qvl.common.inputs
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise LedgerError(f"{run_json}: damaged ({type(e).__name__}: {str(e)[:200]})") from None
    if not names or not all(isinstance(n, str) for n in names):
        raise LedgerError(f"{run_json}: damaged (input names are not a list of file names)")
    if len(set(names)) != len(names):
        raise LedgerError(f"{prev}: input file names repeat, so row ids do not name one input row")
    files = sorted((prev / "kept").glob("*.parquet")) + sorted((prev / "rejected").glob("*.parquet"))
    layout = layouts.from_mapping({"url": "url", "text": "text"})
    return [Shard(path, i, FORMAT, None, layout, None, _checked(path), origin=tuple(names))
            for i, path in enumerate(files)]


def _checked(path: Path) -> int:
    """The rows of a previous run's output file, after checking it holds every column the rules
    read with the type the run wrote (a damaged or hand-edited file is one LedgerError naming it)."""
    try:
        f = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError
        raise LedgerError(f"{path}: not a readable parquet file ({str(e)[:200]})") from None
    schema = f.schema_arrow
    try:
        check_columns(schema, {**dict.fromkeys(("row_id", "url", "text", "source", "lang", "lang_by"), "string"),
                               **dict.fromkeys(("width", "height", "clip_score", "units", "lang_score"), "number")},
                      str(path), optional={**dict.fromkeys(("nsfw", "watermark", "aesthetic", "lang_fasttext_score",
                                                            "lang_lingua_score"), "number"),
                                           **dict.fromkeys(("lang_fasttext", "lang_lingua"), "string"),
                                           "drop_reason": "string"})
    except QvlError as e:
        raise LedgerError(f"{e} (not an output of `qvl curate filter`)") from None
    for name in ("failed_rules", "invalid_scores"):
        if name not in schema.names:
            continue
        t = schema.field(name).type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_string(t.value_type) \
                and not pa.types.is_large_string(t.value_type):
            raise LedgerError(f"{path}: column {name!r} is {t}, expected a list of names")
    return f.metadata.num_rows


def read_batches(shard: Shard, batch_rows: int) -> Iterator[pl.DataFrame]:
    """A previous run's rows, with their original order key rebuilt from the row id."""
    index = {name: i for i, name in enumerate(shard.origin)}
    for batch in pq.ParquetFile(shard.path).iter_batches(batch_size=batch_rows):
        frame = pl.from_arrow(batch)
        frame = frame.with_columns([pl.lit(None, pl.Float64).alias(c) for c in ("nsfw", "watermark", "aesthetic")
                                    if c not in frame.columns])  # outputs of runs before these scores
        # outputs of runs before these lists: no rule failed / no score was told apart as broken
        frame = frame.with_columns([pl.lit([], pl.List(pl.String)).alias(c) for c in ("failed_rules", "invalid_scores")
                                    if c not in frame.columns])
        # row ids are "<file>:<line>"; a file name holding ":" keeps its last part as the line
        file = frame.get_column("row_id").str.replace(r":[0-9]+$", "")
        line = frame.get_column("row_id").str.extract(r":([0-9]+)$", 1).cast(pl.Int64)
        seq = file.replace_strict(index, default=None, return_dtype=pl.Int64) * (1 << SEQ_ROW_BITS) + line
        if seq.null_count():
            bad = frame.get_column("row_id").filter(seq.is_null())[0]
            raise LedgerError(f"{shard.path}: row_id {bad!r} is not FILE:LINE of the run's inputs")
        errors = frame.get_column("failed_rules").list.first().cast(pl.String)
        frame = frame.with_columns(
            _seq=seq,
            _input_error=pl.when(errors.is_in(list(rules.INPUT_ERRORS))).then(errors),
        ).drop([c for c in ("drop_reason",) if c in frame.columns])
        yield frame


def evaluate(frame: pl.DataFrame, s: FilterSettings) -> pl.DataFrame:
    """Rules 1-10 again: recorded outcomes for the text rules, new thresholds on measures."""
    failed = pl.col("failed_rules")
    checks = {}
    for rule in rules.RULES:
        if rule.kind != "drop" or rule.name in s.skip_rules:
            continue
        if rule.name in TEXT_RULES:
            checks[rule.name] = failed.list.contains(rule.name)
        else:
            checks[rule.name] = rule.build(s)
    frame = frame.with_columns([expr.alias(rules.fail_column(name)) for name, expr in checks.items()])
    reasons = [pl.col("_input_error")] + [pl.when(pl.col(rules.fail_column(n))).then(pl.lit(n)) for n in checks]
    frame = frame.with_columns(drop_reason=pl.coalesce(reasons))
    # rules.failed_rules rebuilds the list from the _fail_ columns, lang included below
    return frame.drop("failed_rules")


def tag(survivors: pl.DataFrame, s: FilterSettings) -> pl.DataFrame:
    """Language: the recorded script and fastText opinions where they decided, with lingua asked
    where the new settings doubt them; the rows lingua decided and those never labelled run
    through language id again (fastText's recorded top label alone cannot rebuild the script's
    correction of it), as a fresh run would."""
    if rules.LANG in s.skip_rules:
        return langid.tag(survivors, s)
    survivors = survivors.with_row_index("_order").with_columns(  # outputs of runs before lingua lack some
        [pl.lit(None, t).alias(c) for c, t in langid.LANG_OUTPUTS.items() if c not in survivors.columns])
    labelled = pl.col("lang_by").is_in(["fasttext", "script"]).fill_null(False)
    fresh = langid.tag(survivors.filter(~labelled).drop(*langid.LANG_OUTPUTS, strict=False), s)
    return pl.concat([langid.settle(survivors.filter(labelled), s), fresh],
                     how="diagonal_relaxed").sort("_order").drop("_order")
