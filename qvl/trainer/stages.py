"""The stage table of Qwen-VL (Table 8) as data: what trains, at what size and rate."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stage:
    number: int
    name: str
    trains: tuple[str, ...]  # of "vision", "adapter", "llm"
    resolution: int
    seq_len: int
    lr: float
    min_lr: float
    warmup_steps: int
    # shared by every stage (paper defaults)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    vit_layer_decay: float = 0.95
    micro_batch: int = 8
    accumulation: int = 1
    max_steps: int = 1000
    extra: dict = field(default_factory=dict)


STAGES: dict[int, Stage] = {
    1: Stage(1, "pre-train", ("vision", "adapter"), 224, 512, 2e-4, 1e-6, 500),
    2: Stage(2, "multitask", ("vision", "adapter", "llm"), 448, 2048, 5e-5, 1e-5, 400),
    3: Stage(3, "sft", ("adapter", "llm"), 448, 2048, 1e-5, 1e-6, 3000),
}
