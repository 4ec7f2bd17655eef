"""The funnel report of a filter run: JSON for machines, Markdown and a PNG for people.

Its shape follows Table 6 of the Qwen-VL paper (pairs per language and dataset, before
and after cleaning), with the funnel rule by rule so every dropped row has a reason.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from qvl import storage
from qvl.curate import rules
from qvl.curate import stats as st
from qvl.curate.settings import FilterSettings


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
            # rows without a published score pass its rule: how many, per score
            "unscored": {score: totals.get("unscored", {}).get(score, {}).get(source, 0)
                         for score in ("nsfw", "watermark", "aesthetic")},
            # a NaN/infinite size or score: read as unknown (sizes checked after download)
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
    lines += ["", "| dataset | input | kept | kept % | CLIP-unscored rows | top drop reasons |",
              "|---|---:|---:|---:|---:|---|"]
    for source, row in report["by_source"].items():
        top = sorted(row["dropped"].items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"| {source} | {_n(row['input'])} | {_n(row['kept'])} | {row['kept_pct']:.2f}% | "
                     f"{_n(row['clip_unscored'])} | {', '.join(f'{k} {_n(v)}' for k, v in top)} |")
    lines += ["", "## Languages kept", "", "| language | kept | share |", "|---|---:|---:|"]
    for lang, row in report["by_language"].items():
        lines.append(f"| {lang} | {_n(row['kept'])} | {row['share_pct']:.2f}% |")
    xc = report["lang_cross_check"]
    alone = xc.get("script_only", {})
    lines += ["", f"Script cross-check changed **{_n(xc['changed'])}** fastText labels"
              + (": " + ", ".join(f"{k} {_n(v)}" for k, v in xc["by_change"].items()) if xc["by_change"] else "")
              + "." + (f" The script alone decided **{_n(st.total(alone))}** captions (Han characters only, no"
                       " kana, hangul or Latin letters: Chinese, fastText not asked)." if alone else ""),
              "", "## Rewrites", "", "| rule | rows changed | what |", "|---|---:|---|"]
    for name, row in report["rewrites"].items():
        lines.append(f"| {name} | {_n(row['rows_changed'])} | {row['setting']} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r for r in report["funnel"] if r["step"] == "input" or r["dropped"]]
    fig = Figure(figsize=(13, 0.45 * len(steps) + 2.5))
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1.3]})
    names = [r["step"] for r in steps][::-1]
    remaining = [r["remaining"] for r in steps][::-1]
    bars = ax.barh(names, remaining, color="#4C72B0")
    for bar, r in zip(bars, steps[::-1]):
        label = f"{r['remaining']:,}" + (f"  (−{r['dropped']:,})" if r["dropped"] else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + label, va="center", fontsize=8)
    ax.set_xlabel("rows remaining after the step")
    ax.set_title(f"Stage-1 cleaning funnel: {report['input_rows']:,} → {report['kept_rows']:,} pairs")
    ax.set_xlim(0, max(remaining or [1]) * 1.35)
    langs = list(report["by_language"])
    sources = list(report["by_source"])
    bottom = [0] * len(langs)
    for source in sources:
        vals = [report["by_source"][source]["kept_by_lang"].get(lang, 0) for lang in langs]
        ax2.bar(langs, vals, bottom=bottom, label=source)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, lang in enumerate(langs):
        ax2.text(i, bottom[i], f"{report['by_language'][lang]['share_pct']:.1f}%", ha="center", va="bottom")
    ax2.set_title("kept pairs by language")
    if sources:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    with storage.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def write(out: Path, report: dict) -> None:
    storage.write_json(out / "report.json", report)
    storage.write_text(out / "report.md", markdown(report))
    plot(report, out / "funnel.png")
