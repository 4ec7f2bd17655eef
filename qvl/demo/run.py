"""`qvl demo`: the whole pipeline on the bundled synthetic data, end to end."""

from __future__ import annotations

from pathlib import Path

from qvl.curate.filter.pipeline import run_filter
from qvl.curate.settings import RunSettings
from qvl.demo.learn import DemoWorld, run_learning_demo, timed
from qvl.demo.pairs import write_demo_pairs
from qvl.demo.world import write_annotations
from qvl.formats.build import FormatSettings, run_format


def run_demo(out: Path, rows_per_shard: int = 4000, show_progress: bool = True, learn: bool = True,
             world: DemoWorld | None = None, log=print) -> dict:
    """Generate the demo pairs and curate them; returns the paths a person looks at."""
    seconds: dict[str, float] = {}
    with timed(seconds, "curate", log):
        raw = write_demo_pairs(out / "raw_pairs", rows_per_shard=rows_per_shard)
        curated = out / "curated"
        report = run_filter(raw, curated, run=RunSettings(), overwrite=True, show_progress=show_progress)
    with timed(seconds, "format", log):
        annotations = write_annotations(out / "world")
        formatted = {}
        for kind in ("multitask", "sft"):
            formatted[kind] = run_format(kind, [annotations[kind]], out / "shards" / kind, annotations["images"],
                                         settings=FormatSettings(), overwrite=True, show_progress=show_progress)
    learned = run_learning_demo(out / "learn", out / "eval.json", world, log, show_progress, seconds) \
        if learn else None
    results = {
        "raw pairs": out / "raw_pairs",
        "kept pairs": curated / "kept",
        "rejected pairs": curated / "rejected",
        "report": curated / "report.md",
        "funnel": curated / "funnel.png",
        "multitask shards": out / "shards" / "multitask",
        "sft shards": out / "shards" / "sft",
        "summary": f"{report['input_rows']:,} raw pairs -> {report['kept_rows']:,} kept "
        + ", ".join(f"{k} {v['share_pct']:.1f}%" for k, v in report["by_language"].items())
        + "; " + "; ".join(f"{k}: {m['samples']:,} samples, {m['tokens']:,} tokens, {m['rejected']} rejected"
                           for k, m in formatted.items()),
    }
    if learned is not None:
        results["training runs"] = out / "learn"
        results["evaluation"] = out / "eval.json"
        results["summary"] += (
            f"; after stages 1-3 ({learned['minutes']:.1f} min): grounding accuracy {learned['grounding_acc']:.2f} "
            f"(untrained {learned['grounding_acc_untrained']:.2f}), caption exact match "
            f"{learned['chat_caption_em']:.2f}; stage 2 on the multitask prompts: grounding "
            f"{learned['stage2']['grounding_acc']:.2f}, caption {learned['stage2']['caption_em']:.2f}, "
            f"VQA {learned['stage2']['vqa_em']:.2f}; stage 3 with LoRA instead: grounding "
            f"{learned['lora_grounding_acc']:.2f} (the stage-2 model in chat {learned['stage2_chat_grounding_acc']:.2f})")
    return results
