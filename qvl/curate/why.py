"""`qvl curate why FOLDER ROW_ID`: why a pair is, or is not, in the training set.

The ledger holds one row per input row with what each rule measured and decided
(``ledger/filter/*.parquet``, ``ledger/duplicates/*.parquet`` of a filter run;
``ledger/download.parquet`` and ``ledger/clip.parquet`` of a download). Given a
download folder, the story starts at the filter run it came from.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from qvl.common import remote
from qvl.curate.filter import report as report_mod
from qvl.curate.filter import rules
from qvl.curate.images import download
from qvl.curate.images.folders import Folders
from qvl.errors import QvlError
from qvl.recipes import short


class WhyError(QvlError):
    pass


def _lookup(files: list[Path], row_id: str) -> dict | None:
    if not files:
        return None
    found = pl.scan_parquet(files).filter(pl.col("row_id") == row_id).collect()
    return found.row(0, named=True) if found.height else None


def _language(facts: dict) -> str:
    """Both models' answers where both were asked (ledgers of runs before lingua have one)."""
    if facts["lang"] is None:
        return "not evaluated (an earlier rule failed)"
    if facts["lang_score"] is None:
        return f"{facts['lang']} by {facts['lang_by']} (Han characters only; fastText not asked)"
    said = f"{facts['lang']} {facts['lang_score']:.2f} by {facts['lang_by']}"
    if facts.get("lang_by") == "lingua":
        said += f" (fastText: {facts['lang_fasttext']} {facts['lang_fasttext_score']:.2f}, doubtful)"
    return said


def _filter_story(folder: Path, row_id: str) -> tuple[list[dict], str]:
    facts = _lookup(sorted((folder / "ledger" / "filter").glob("*.parquet")), row_id)
    if facts is None:
        sample = pl.scan_parquet(sorted((folder / "ledger" / "filter").glob("*.parquet"))).head(1).collect()
        hint = f" (row ids look like {sample['row_id'][0]!r})" if sample.height else ""
        raise WhyError(f"{short(row_id)}: not an input row of the filter run in {folder}{hint}")
    s = report_mod.read(folder / "report.json")["settings"]
    failed = set(facts["failed_rules"] or [])
    w, h, score, source = facts["width"], facts["height"], facts["clip_score"], facts["source"]
    threshold = s["clip_thresholds"].get(source, s["clip_threshold_default"])
    broken = facts.get("invalid_scores") or []  # ledgers of runs before invalid_score have none

    def missing(name: str) -> str:
        return "broken (the column holds no finite value here)" if name in broken else "unscored (no such column)"

    values = {
        "aspect_ratio": (f"{w}x{h} -> {max(w, h) / min(w, h):.2f}" if min(w, h) > 0 else f"{w}x{h}")
        if w is not None and h is not None else "size unknown (checked after download)",
        "too_small": f"short side {min(w, h)}" if w is not None and h is not None else "size unknown",
        "invalid_score": ", ".join(broken) + (" (kept: keep_unscored)" if s.get("keep_unscored") else "")
        if broken else "none",
        "clip_score": missing("clip_score") if score is None else f"{score:.3f} (threshold for {source}: {threshold})",
        **{score: missing(score) if facts.get(score) is None else
           f"{facts[score]:.3f} (threshold for {source}: "
           f"{s.get(score + '_thresholds', {}).get(source, s.get(score + '_threshold_default'))})"
           for score in ("nsfw", "watermark", "aesthetic")},
        "length": f"{facts['units']} units",
        "lang": _language(facts),
    }
    steps = []
    evaluated_late = facts["drop_reason"] in (None, rules.LANG)  # lang runs on the survivors of rules 1-10
    for name in rules.DROP_ORDER:
        if name in s["skip_rules"]:
            outcome = "switched off"
        elif name in failed:
            outcome = "FAIL"
        elif name == rules.LANG and not evaluated_late:
            outcome = "not evaluated"
        elif name == rules.DUPLICATE or name in rules.BALANCE:
            continue
        else:
            outcome = "pass"
        steps.append({"stage": "filter", "step": name, "value": values.get(name, ""), "outcome": outcome})
    verdict = f"rejected by {facts['drop_reason']}" if facts["drop_reason"] else None
    if verdict is None:
        dup = _lookup(sorted((folder / "ledger" / "duplicates").glob("*.parquet")), row_id)
        steps.append({"stage": "filter", "step": rules.DUPLICATE, "outcome": "FAIL" if dup else "pass",
                      "value": f"same image as {dup['duplicate_of']}, whose text is longer" if dup else "unique URL"})
        verdict = f"rejected by {rules.DUPLICATE}" if dup else f"kept by the filter ({remote.shown(folder / 'kept')})"
        balanced = _lookup(sorted((folder / "ledger" / "balance").glob("*.parquet")), row_id) if not dup else None
        if balanced:
            steps.append({"stage": "filter", "step": balanced["drop_reason"], "outcome": "FAIL",
                          "value": "the subset's balance (report.json: balance)"})
            verdict = f"rejected by {balanced['drop_reason']}"
    return steps, verdict


def _download_story(folder: Path, row_id: str) -> tuple[list[dict], str]:
    facts = _lookup([folder / "ledger" / "download.parquet"], row_id)
    if facts is None:
        return [], "never reached the download (rejected by the filter)"
    order = download.STEPS
    size = f"{facts['image_width']}x{facts['image_height']}" if facts["image_width"] else ""
    values = {"download_failed": f"{facts['download_status'] or 'not fetched'}"
              + (f" in attempt {facts['attempt']}" if facts["attempt"] is not None else ""),
              "image_corrupt": facts["image_error"] or (f"decodes, {size}" if size else ""),
              "image_too_small": size, "image_aspect_ratio": size,
              "clip_score_computed": f"{facts['clip_score_computed']:.3f} ({facts['clip_model']})"
              if facts.get("clip_score_computed") is not None else "not computed",
              "private_address": facts["url"],
              "near_duplicate_image": f"the same picture as {facts['near_duplicate_of']}, whose text is longer"
              if facts.get("near_duplicate_of") else (f"pHash {facts['phash']:016x}" if facts.get("phash") else "")}
    reason = facts["drop_reason"]
    steps = []
    for name in order:
        outcome = "FAIL" if name == reason else ("pass" if reason is None or order.index(name) < order.index(reason)
                                                  else "not evaluated")
        steps.append({"stage": "download", "step": name, "value": values.get(name, ""), "outcome": outcome})
    if reason:
        return steps, f"rejected by {reason}: {facts['download_error'] or ''}".rstrip(": ")
    return steps, f"kept with its image {facts['image_tar']}#{facts['image_key']} ({remote.shown(folder / 'kept')})"


def explain(folder: str | Path, row_id: str) -> dict:
    """The story of ``row_id``; a folder whose ledger or report is damaged (truncated parquet,
    a report.json that is not JSON or lacks its settings) is one WhyError naming the folder."""
    folder = Path(folder)
    state = folder / "_qvl.json"
    try:
        if state.is_file():  # a download: start at its filter run
            origin = remote.input_any(remote.location(Folders(folder).read_state()["from"]))  # a URL: its mirror
            steps, verdict = _filter_story(origin, row_id)
            if verdict.startswith("kept"):
                more, verdict = _download_story(folder, row_id)
                steps += more
        elif (folder / "ledger" / "filter").is_dir():
            steps, verdict = _filter_story(folder, row_id)
        else:
            raise WhyError(f"{folder}: no ledger here (the --out of `qvl curate filter` or `qvl curate download`)")
    except WhyError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, pl.exceptions.PolarsError) as e:
        raise WhyError(f"{folder}: its ledger or report is damaged ({type(e).__name__}: {short(str(e), 200)}); "
                       "run the command again") from None
    return {"row_id": row_id, "steps": steps, "verdict": verdict}


def markdown(story: dict) -> str:
    lines = [f"# {story['row_id']}", "", f"**{story['verdict']}**", "",
             "| stage | rule | measured | outcome |", "|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['step']} | {s['value']} | {s['outcome']} |" for s in story["steps"]]
    return "\n".join(lines) + "\n"
