"""What `qvl train` is asked to do (``TrainSettings``) and its checks: plain data and the ranges a
preset allows, no torch. ``train`` runs them before anything loads; the CLI checks a recipe's
[stage] and each option with them, so an error names the option it came from."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from qvl.boundary import convert
from qvl.errors import QvlError, RecordError
from qvl.recipes import resolve
from qvl.trainer.preset import StagesSpec
from qvl.trainer.stages import STAGES, Stage

if TYPE_CHECKING:
    from qvl.trainer.lora import LoraSettings


@dataclass
class TrainSettings:
    stage: int
    data: Path | str  # a `qvl format` output folder, or its URL (s3://…: streamed, see data.Shards)
    out: Path
    preset: str | None = None  # None: the --init checkpoint's, else "tiny"
    max_steps: int | None = None
    init: Path | None = None  # a checkpoint folder of the previous stage
    resume: bool = False
    overwrite: bool = False  # replace the run in ``out`` (its checkpoint, metrics and plot)
    llm: str | None = None  # local Hugging Face folder (real preset)
    seed: int = 0
    checkpoint_every: int = 100
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimiser state (else DDP)
    cpu_offload: bool = False  # under --fsdp: sharded parameters, gradients and the optimiser step on the CPU
    precision: str = "auto"  # bf16 autocast where the device computes bf16 natively, else fp32; or bf16 / fp32
    max_rejected: float = 0.01  # a fraction of the shards' input records
    overrides: dict = dataclasses.field(default_factory=dict)  # stage fields from a recipe / CLI
    overrides_from: str = "stage overrides"  # where they come from, for errors: a recipe's file and table
    cache_gb: float = 4.0  # local disk for shards streamed from a URL (an LRU cache, never a full copy)
    data_workers: int = 2  # loader processes decoding images (0: in the training process)
    shuffle_window: int = 4  # shards whose rows are shuffled together
    activation_checkpointing: bool | None = None  # None: as the preset says (on for qwen-vl, off for tiny)
    log: bool = True
    progress: bool = False  # a progress bar (steps/s, ETA, loss) instead of a line every 10 steps
    lora: LoraSettings | None = None  # LoRA / Q-LoRA on the --init base (qvl/trainer/lora.py)


class SettingsError(QvlError):
    """A training setting out of range, said before anything loads (a micro-batch of 0 or a
    seed numpy refuses would otherwise hang or fail minutes in)."""


MAX_STEPS = 1 << 40  # as a preset's [stages] allows
MAX_SEED = (1 << 32) - 1  # numpy's seeds


def check_settings(s: TrainSettings) -> None:
    """The run's own numbers, each named as its option: steps, seed, reject fraction, checkpoint
    interval; then the stage overrides (``check_overrides``)."""
    if s.stage not in STAGES:
        raise SettingsError(f"--stage {s.stage!r}: use 1, 2 or 3")
    if s.max_steps is not None and (isinstance(s.max_steps, bool) or not isinstance(s.max_steps, int)
                                    or not 0 <= s.max_steps <= MAX_STEPS):
        raise SettingsError(f"--max-steps {s.max_steps!r}: a number of optimiser steps from 0 to {MAX_STEPS:,}")
    if isinstance(s.seed, bool) or not isinstance(s.seed, int) or not 0 <= s.seed <= MAX_SEED:
        raise SettingsError(f"--seed {s.seed!r}: an integer from 0 to {MAX_SEED:,}")
    if not isinstance(s.max_rejected, (int, float)) or not 0 <= s.max_rejected <= 1:  # NaN fails too
        raise SettingsError(f"--max-rejected {s.max_rejected!r}: a fraction from 0 to 1")
    if isinstance(s.checkpoint_every, bool) or not isinstance(s.checkpoint_every, int) or s.checkpoint_every < 1:
        raise SettingsError(f"checkpoint_every {s.checkpoint_every!r}: at least 1 step")
    if not isinstance(s.cache_gb, (int, float)) or not 0 < s.cache_gb < 1e6:  # NaN fails too
        raise SettingsError(f"--cache-gb {s.cache_gb!r}: gigabytes of local disk, above 0")
    if isinstance(s.data_workers, bool) or not isinstance(s.data_workers, int) or not 0 <= s.data_workers <= 256:
        raise SettingsError(f"--data-workers {s.data_workers!r}: loader processes, 0 to 256")
    if isinstance(s.shuffle_window, bool) or not isinstance(s.shuffle_window, int) or not 1 <= s.shuffle_window <= 4096:
        raise SettingsError(f"--shuffle-window {s.shuffle_window!r}: shards shuffled together, 1 to 4,096")
    if s.cpu_offload and not s.fsdp:
        raise SettingsError("--cpu-offload: offloads FSDP's shards; add --fsdp (under torchrun)")
    if s.lora is not None:
        from qvl.trainer import lora

        lora.check(s.lora, s.stage, s.init, s.fsdp)
    check_overrides(s.overrides, s.overrides_from)


def _one_stage(hint):
    """``_per_stage(X) | None`` -> ``X``: the range a preset's [stages] allows for one value."""
    per_stage = typing.get_args(hint)[0]  # Annotated[list[X], Meta]
    return typing.get_args(typing.get_args(per_stage)[0])[0]


StageValues = msgspec.defstruct(
    "StageValues", [(name, _one_stage(hint) | None, None)
                    for name, hint in typing.get_type_hints(StagesSpec, include_extras=True).items()])


def check_overrides(overrides: dict, where: str) -> None:
    """Stage overrides (a recipe's [stage], --micro-batch, --lr ...): known fields of ``Stage``
    of the right type (``recipes.fill``), in the ranges a preset's [stages] allows; an error
    names ``where`` and the setting."""
    if not overrides:
        return
    resolve(Stage, dataclasses.asdict(STAGES[1]), overrides, where=where)
    try:
        convert({k: v for k, v in overrides.items() if k in StageValues.__struct_fields__}, StageValues)
    except RecordError as e:
        raise SettingsError(f"{where}: {e}") from None
