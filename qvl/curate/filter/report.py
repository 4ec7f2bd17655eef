"""The funnel report of a filter run: JSON for machines, Markdown and a PNG for people.

Its shape follows Table 6 of the Qwen-VL paper (pairs per language and dataset, before
and after cleaning), with the funnel rule by rule so every dropped row has a reason.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from qvl.boundary import read_json_file
from qvl.common import storage
from qvl.curate.filter import rules
from qvl.curate.filter import stats as st
from qvl.curate.settings import FilterSettings
from qvl.curate.sources.layouts import SCORES

MAX_JSON_BYTES = 64 << 20  # a report or a run's state is a few KB; a larger file is not one of them


def read(path: str | Path) -> dict:
    """A JSON object a filter run wrote (``report.json``, its state), read strictly: a file that
    is larger than any report, not UTF-8, not JSON, holds NaN or infinity (Python's ``json``
    reads and writes them, no other reader does) or arrays nested deeper than the interpreter
    recurses is a ValueError (``OSError`` if unreadable) for the caller to name the file in."""
    return read_json_file(path, dict, MAX_JSON_BYTES, ValueError)


def build(totals: dict, settings: FilterSettings, shards, partitions: int) -> dict:
    input_rows = st.total(totals.get("input", {}))
    dropped = {name: st.total(totals.get("dropped", {}).get(name, {})) for name in rules.DROP_ORDER}
    kept_rows = st.total(totals.get("kept", {}))
    rejected_rows = sum(dropped.values())
    settings_of = {r.name: r.setting(settings) for r in rules.RULES}
    settings_of[rules.LANG] = f"{', '.join(settings.languages)}; fastText score >= {settings.min_lang_score}"
    settings_of[rules.DUPLICATE] = "same URL (or image hash): keep the longest text"
    settings_of.update({
        "clip_top_fraction": f"top {settings.clip_top_fraction} by CLIP score per {settings.clip_top_by}"
        if settings.clip_top_fraction is not None else "off",
        "no_entry": f"matches none of {settings.balance_entries}" if settings.balance_entries else "off",
        "balance": f"MetaCLIP: keep with p = max over matched entries of min(1, {settings.balance_t} / count)"
        if settings.balance_entries else "off",
        "lang_mix": ", ".join(f"{k} {v:.1%}" for k, v in settings.lang_mix.items()) if settings.lang_mix else "off"})
    remaining = input_rows
    funnel = [{"step": "input", "dropped": 0, "remaining": remaining}]
    for name in rules.DROP_ORDER:
        remaining -= dropped[name]
        funnel.append({
            "step": name, "setting": settings_of.get(name, "unreadable input row"),
            "skipped": name in settings.skip_rules, "dropped": dropped[name], "remaining": remaining,
            "dropped_pct_of_input": round(100 * dropped[name] / input_rows, 3) if input_rows else 0.0,
        })
    by_source = {}
    for source, n in sorted(totals.get("input", {}).items()):
        kept_by_lang = totals.get("kept", {}).get(source, {})
        by_source[source] = {
            "input": n,
            "kept": st.total(kept_by_lang),
            "kept_pct": round(100 * st.total(kept_by_lang) / n, 2) if n else 0.0,
            "kept_by_lang": dict(sorted(kept_by_lang.items())),
            "dropped": {r: totals["dropped"][r][source] for r in rules.DROP_ORDER
                        if source in totals.get("dropped", {}).get(r, {})},
            "clip_unscored": totals.get("clip_unscored", {}).get(source, 0),
            # rows whose file has no column of a published score: its rule does not apply; per score
            "unscored": {score: totals.get("unscored", {}).get(score, {}).get(source, 0)
                         for score in ("nsfw", "watermark", "aesthetic")},
            # a score column the file has, its value null/NaN/inf: dropped by invalid_score where the
            # score's rule is on (kept with keep_unscored), per score
            "invalid_scores": {score: totals.get("invalid_scores", {}).get(score, {}).get(source, 0)
                               for score in SCORES},
            # a NaN/infinite/absurd size or score: read as null (sizes checked after download; a score
            # is then one of invalid_scores)
            "non_finite_numbers": totals.get("non_finite", {}).get(source, 0),
        }
    langs: dict[str, int] = {}
    for by_lang in totals.get("kept", {}).values():
        for lang, n in by_lang.items():
            langs[lang] = langs.get(lang, 0) + n
    by_language = {lang: {"kept": n, "share_pct": round(100 * n / kept_rows, 2) if kept_rows else 0.0}
                   for lang, n in sorted(langs.items(), key=lambda kv: -kv[1])}
    relabelled = totals.get("lang_relabelled", {})
    return {
        "input_rows": input_rows,
        "kept_rows": kept_rows,
        "rejected_rows": rejected_rows,
        "accounted": input_rows == kept_rows + rejected_rows,
        "funnel": funnel,
        "rewrites": {name: {"rows_changed": st.total(totals.get("rewritten", {}).get(name, {})),
                            "setting": settings_of[name]} for name in rules.REWRITES},
        "by_source": by_source,
        "by_language": by_language,
        "lang_cross_check": {"changed": st.total(relabelled), "by_change": dict(sorted(relabelled.items())),
                             "script_only": totals.get("lang_script_only", {})},
        "lang_second_opinion": {outcome: totals.get("lang_second_opinion", {}).get(outcome, {})
                                for outcome in ("kept", "dropped")},
        "inputs": [str(s.path) for s in shards],
        "dedup_partitions": partitions,
        "settings": dataclasses.asdict(settings),
    }


def extend(base: dict, stage: str, steps: dict[str, str], dropped: dict[str, dict[str, int]],
           kept: dict[str, dict[str, int]], extra: dict | None = None) -> dict:
    """The funnel of ``base`` (a filter report) continued by a later stage's drop steps.

    ``steps``: step name -> its setting, in order; ``dropped``: step -> source -> rows;
    ``kept``: source -> language -> rows kept after the stage. Rows the stage received are
    ``base``'s kept rows, so input == kept + rejected still holds across both stages."""
    report = json.loads(json.dumps(base))  # a deep copy
    remaining = report["kept_rows"]
    for name, setting in steps.items():
        n = sum(dropped.get(name, {}).values())
        remaining -= n
        report["funnel"].append({
            "step": name, "setting": setting, "skipped": False, "dropped": n, "remaining": remaining,
            "dropped_pct_of_input": round(100 * n / report["input_rows"], 3) if report["input_rows"] else 0.0,
            "stage": stage})
    report["kept_rows"] = sum(sum(v.values()) for v in kept.values())
    report["rejected_rows"] += sum(sum(v.values()) for v in dropped.values())
    report["accounted"] = report["input_rows"] == report["kept_rows"] + report["rejected_rows"]
    for source, row in report["by_source"].items():
        row["kept_by_lang"] = dict(sorted(kept.get(source, {}).items()))
        row["kept"] = sum(row["kept_by_lang"].values())
        row["kept_pct"] = round(100 * row["kept"] / row["input"], 2) if row["input"] else 0.0
        for name in steps:
            if dropped.get(name, {}).get(source):
                row["dropped"][name] = dropped[name][source]
    langs: dict[str, int] = {}
    for by_lang in kept.values():
        for lang, n in by_lang.items():
            langs[lang] = langs.get(lang, 0) + n
    report["by_language"] = {
        lang: {"kept": n, "share_pct": round(100 * n / report["kept_rows"], 2) if report["kept_rows"] else 0.0}
        for lang, n in sorted(langs.items(), key=lambda kv: -kv[1])}
    report.setdefault("stages", {})[stage] = extra or {}
    return report


def _n(x: int) -> str:
    return f"{x:,}"


def markdown(report: dict) -> str:
    lines = [
        "# qvl curate — report" + (f" (filter, then {', '.join(report['stages'])})" if report.get("stages") else ""),
        "",
        f"**{_n(report['input_rows'])}** input rows → **{_n(report['kept_rows'])}** kept, "
        f"{_n(report['rejected_rows'])} rejected "
        f"({'every row accounted for' if report['accounted'] else 'COUNTS DO NOT ADD UP'}).",
        "",
        "## Funnel (first rule that dropped each row)",
        "",
        "| step | setting | dropped | % of input | remaining |",
        "|---|---|---:|---:|---:|",
    ]
    for row in report["funnel"]:
        if row["step"] == "input":
            lines.append(f"| input | | | | {_n(row['remaining'])} |")
            continue
        setting = "(switched off)" if row["skipped"] else row["setting"]
        lines.append(f"| {row['step']} | {setting} | {_n(row['dropped'])} | "
                     f"{row['dropped_pct_of_input']:.2f}% | {_n(row['remaining'])} |")
    lines += ["", "## Pairs per language and dataset (Qwen-VL Table 6)", "",
              "| language | dataset | original | cleaned | remaining |", "|---|---|---:|---:|---:|"]
    for lang in report["by_language"]:
        for source, row in report["by_source"].items():
            n = row["kept_by_lang"].get(lang, 0)
            if n:
                lines.append(f"| {lang} | {source} | {_n(row['input'])} | {_n(n)} | "
                             f"{100 * n / row['input']:.2f}% |")
    lines += ["", "| dataset | input | kept | kept % | CLIP-unscored rows | broken scores | top drop reasons |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for source, row in report["by_source"].items():
        top = sorted(row["dropped"].items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"| {source} | {_n(row['input'])} | {_n(row['kept'])} | {row['kept_pct']:.2f}% | "
                     f"{_n(row['clip_unscored'])} | {_n(sum(row.get('invalid_scores', {}).values()))} | "
                     f"{', '.join(f'{k} {_n(v)}' for k, v in top)} |")
    lines += ["", "## Languages kept", "", "| language | kept | share |", "|---|---:|---:|"]
    for lang, row in report["by_language"].items():
        lines.append(f"| {lang} | {_n(row['kept'])} | {row['share_pct']:.2f}% |")
    xc = report["lang_cross_check"]
    alone = xc.get("script_only", {})
    lines += ["", f"Script cross-check changed **{_n(xc['changed'])}** fastText labels"
              + (": " + ", ".join(f"{k} {_n(v)}" for k, v in xc["by_change"].items()) if xc["by_change"] else "")
              + "." + (f" The script alone decided **{_n(st.total(alone))}** captions (Han characters only, no"
                       " kana, hangul or Latin letters: Chinese, fastText not asked)." if alone else ""),
              *_second_opinion_line(report.get("lang_second_opinion")),
              "", "## Rewrites", "", "| rule | rows changed | what |", "|---|---:|---|"]
    for name, row in report["rewrites"].items():
        lines.append(f"| {name} | {_n(row['rows_changed'])} | {row['setting']} |")
    return "\n".join(lines) + "\n"


def _second_opinion_line(counts: dict | None) -> list[str]:
    if not counts or not any(counts.values()):
        return []
    kept, dropped = st.total(counts.get("kept", {})), st.total(counts.get("dropped", {}))
    return ["", f"lingua gave a second opinion on **{_n(kept + dropped)}** Latin-script captions fastText "
                f"would have dropped: **{_n(kept)}** kept, {_n(dropped)} dropped."]


PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def plot(report: dict, path: Path) -> None:
    """funnel.png: rows remaining after each step that dropped some, and the kept pairs per
    language stacked by source. Drawn with Pillow: importing matplotlib alone (~1 s) was the
    slowest step of a small run, and a bar chart needs none of it."""
    from PIL import Image, ImageDraw, ImageFont

    steps = [r for r in report["funnel"] if r["step"] == "input" or r["dropped"]]
    font, small, title = (ImageFont.load_default(size=n) for n in (14, 12, 16))
    row, top, left, span = 34, 56, 190, 640  # funnel rows, their top, the bars' x and longest length
    panel = left + span + 190  # the language panel's left edge
    langs, sources = list(report["by_language"]), list(report["by_source"])
    legend = 16 * ((len(sources) + 1) // 2)  # two sources a line
    height = max(top + row * len(steps) + 50, 400 + legend)
    image = Image.new("RGB", (panel + 330, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text(((left + panel) / 2, 20), f"Stage-1 cleaning funnel: {report['input_rows']:,} -> "
              f"{report['kept_rows']:,} pairs", font=title, fill="black", anchor="mm")
    peak = max([r["remaining"] for r in steps] or [1]) or 1
    for i, r in enumerate(steps):
        y = top + i * row
        end = left + span * r["remaining"] / peak
        draw.rectangle([left, y + 5, max(left + 1, end), y + row - 5], fill=PALETTE[0])
        draw.text((left - 8, y + row / 2), r["step"], font=font, fill="black", anchor="rm")
        label = f"{r['remaining']:,}" + (f"  (-{r['dropped']:,})" if r["dropped"] else "")
        draw.text((end + 6, y + row / 2), label, font=small, fill="black", anchor="lm")
    axis = top + row * len(steps) + 4
    draw.line([left, top, left, axis], fill="black")
    draw.text((left + span / 2, axis + 18), "rows remaining after the step", font=small, fill="black", anchor="mm")

    draw.text((panel + 150, 44), "kept pairs by language", font=font, fill="black", anchor="mm")
    base, tallest = height - 54 - legend, max([row["kept"] for row in report["by_language"].values()] or [1]) or 1
    width = min(80, 260 // max(1, len(langs)))
    for i, lang in enumerate(langs):
        x = panel + 20 + i * (width + 12)
        y = base
        for j, source in enumerate(sources):
            n = report["by_source"][source]["kept_by_lang"].get(lang, 0)
            h = (base - 90) * n / tallest
            if n:
                draw.rectangle([x, y - h, x + width, y], fill=PALETTE[j % len(PALETTE)])
            y -= h
        draw.text((x + width / 2, y - 4), f"{report['by_language'][lang]['share_pct']:.1f}%", font=small,
                  fill="black", anchor="md")
        draw.text((x + width / 2, base + 6), lang, font=small, fill="black", anchor="ma")
    draw.line([panel + 10, base, panel + 300, base], fill="black")
    for j, source in enumerate(sources):  # legend
        y = base + 28 + 16 * (j // 2)
        x = panel + 20 + 150 * (j % 2)
        draw.rectangle([x, y, x + 10, y + 10], fill=PALETTE[j % len(PALETTE)])
        draw.text((x + 14, y + 5), source[:18], font=small, fill="black", anchor="lm")
    with storage.atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def write(out: Path, report: dict) -> None:
    storage.write_json(out / "report.json", report)
    storage.write_text(out / "report.md", markdown(report))
    plot(report, out / "funnel.png")
