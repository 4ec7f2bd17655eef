"""`qvl train --stage N`: setup (model, data, optimiser), the loop, and the checkpoint it
saves and resumes from (``checkpoint.save_checkpoint``, ``checkpoint.resume``). Runs on a CPU (tiny preset) or under torchrun, one process per device: DDP, or
FSDP (``--fsdp``) for models that do not fit one device.

The loss of an optimiser step is the mean over every supervised token of the step, on
every rank: each micro-batch contributes its token *sum*, divided by the step's total
supervised-token count (all-reduced before the backward passes), so the value does not
depend on micro-batch size, accumulation, rank count or packing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import msgspec
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError

from qvl.boundary import Count, decode_json
from qvl.common import remote, storage
from qvl.common.progress import progress_bar
from qvl.errors import QvlError, RecordError
from qvl.formats.tokenizers import IMG_PAD, load_tokenizer
from qvl.recipes import resolve
from qvl.schemas.samples import IGNORE_INDEX
from qvl.trainer import lora, parallel
from qvl.trainer.checkpoint import (
    CheckpointError,
    SafetensorsReader,
    Weights,
    check_names,
    error_clause,
    llm_folder_weights,
    load_weights,
    read_meta,
    read_preset,
    resume,
    save_checkpoint,
    weights_path,
)
from qvl.trainer.data import Loader, Shards
from qvl.trainer.model import QwenVL, check_buildable
from qvl.trainer.preset import ModelConfig, load_preset
from qvl.trainer.settings import TrainSettings, check_settings
from qvl.trainer.stages import STAGES, Stage
from qvl.trainer.vision import resize_class_positions


def stage_for(settings: TrainSettings, preset) -> Stage:
    """The paper's row, scaled by the preset's per-stage overrides, then the user's."""
    stage = dataclasses.replace(STAGES[settings.stage])
    for key, values in preset.stages.items():
        setattr(stage, key, values[settings.stage - 1])
    stage = resolve(Stage, dataclasses.asdict(stage), settings.overrides, where=settings.overrides_from)
    if settings.max_steps is not None:
        stage.max_steps = settings.max_steps
    return stage


def lr_at(step: int, stage: Stage) -> float:
    """Linear warm-up to the peak, cosine decay to the minimum at max_steps."""
    if step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    progress = min(1.0, (step - stage.warmup_steps) / max(1, stage.max_steps - stage.warmup_steps))
    return stage.min_lr + 0.5 * (stage.lr - stage.min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model: QwenVL, stage: Stage) -> list[dict]:
    """AdamW groups: no decay on biases, norms, embeddings and queries; the ViT's layers
    scaled by decay ** (depth from the top)."""
    groups: dict[tuple, dict] = {}
    top = model.vision.cfg.layers + 1
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "embed" in name or "norm" in name or name.endswith(".query") or ".ln_" in name
        scale = stage.vit_layer_decay ** (top - model.vision.layer_of(name[len("vision."):])) \
            if name.startswith("vision.") else 1.0
        key = (no_decay, scale)
        group = groups.setdefault(key, {"params": [], "weight_decay": 0.0 if no_decay else stage.weight_decay,
                                        "lr_scale": scale, "name": f"{'no_decay' if no_decay else 'decay'}@{scale:.3f}"})
        group["params"].append(p)
    return list(groups.values())


class RunError(QvlError):
    """A run folder that cannot be used as asked; the message says what to do instead."""


class LossError(QvlError, FloatingPointError):
    """A loss that is NaN or infinite: the run stops, in one line naming the step and the samples."""


def check_run_folder(s: TrainSettings) -> None:
    """Never destroy a run silently: training into a folder that holds one needs --resume
    (continue it) or --overwrite (replace it); --resume needs a checkpoint to resume from."""
    checkpoint = s.out / "checkpoint"
    try:
        existing = storage.claim(s.out, "train", legacy=("checkpoint/meta.json", "metrics.jsonl"))
    except storage.OutputError as e:
        raise RunError(str(e)) from None
    if s.resume and s.overwrite:
        raise RunError("--resume continues a run, --overwrite replaces it: choose one")
    if s.resume and not (checkpoint / "state.pt").is_file():
        raise RunError(f"{s.out}: no checkpoint to resume from ({checkpoint / 'state.pt'} is missing); "
                       "run without --resume to start this run")
    if existing and not s.resume:
        if not s.overwrite:
            try:
                step = read_meta(checkpoint).step
            except QvlError:  # no or a damaged meta.json: the run is there all the same
                step = None
            raise RunError(f"{s.out}: holds a training run" + (f" (checkpoint at step {step})" if step is not None else "")
                           + "; --resume continues it, --overwrite replaces it, or choose another --out")
        shutil.rmtree(checkpoint, ignore_errors=True)
        for name in ("metrics.jsonl", "loss.png"):
            (s.out / name).unlink(missing_ok=True)
    if s.init is not None and not (Path(s.init) / "meta.json").is_file():
        raise RunError(f"--init {s.init}: not a checkpoint folder (no meta.json; give a run's checkpoint/ folder)")
    if s.init is not None:
        read_meta(Path(s.init))  # every rank reads it again; a damaged one is said here, once


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast on GPUs and on CPUs with bf16 instructions (AVX512-BF16, AMX). Elsewhere
    torch emulates bf16 matrix products: ~80x slower than fp32 on an AVX2 AMD EPYC (512x512:
    217 ms vs 2.7 ms), which turns a minute of tiny-preset training into an hour."""
    if precision not in ("auto", "bf16", "fp32"):
        raise RunError(f"precision {precision!r}: use auto, bf16 or fp32")
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    native = (getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
              or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return device.type == "cpu" and native


@dataclass
class Run:
    """One process's share of a training run: what setup builds and the loop advances."""

    settings: TrainSettings
    world: int
    rank: int
    device: torch.device
    preset: ModelConfig
    stage: Stage
    model: QwenVL
    wrapped: torch.nn.Module  # the model under DDP or FSDP (the model itself on one process)
    fsdp: bool
    loader: Loader
    optimizer: torch.optim.Optimizer
    bf16: bool
    say: Callable[[str], None]
    step: int = 0
    lora: dict | None = None  # a LoRA run's record (lora.record): its settings and base

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def global_batch(self) -> int:
        """Rows per optimiser step, over every rank."""
        return self.stage.micro_batch * self.stage.accumulation * self.world

    def save(self) -> None:
        """The checkpoint at this step (a collective: every rank calls it); under FSDP sharded,
        with the whole ``model.safetensors`` at the run's end. A save that fails (a full disk)
        is one line; the previous checkpoint stays whole (writes are atomic, shards committed last)."""
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            self._save()
        except (OSError, RuntimeError, CheckpointException, SafetensorError) as e:
            if isinstance(e, RuntimeError) and self.loader.explain(e) is not None:
                raise  # a loader worker died meanwhile: run_to_end says why
            raise RunError(f"{self.settings.out / 'checkpoint'}: the checkpoint of step {self.step} could not be "
                           f"written ({error_clause(e)}); the previous one is kept: free space, then --resume") from None

    def _save(self) -> None:
        s, stage = self.settings, self.stage
        meta = {"stage": stage.number, "step": self.step, "preset": self.preset.name,
                "global_batch": self.global_batch,
                "resolution": stage.resolution, "precision": "bf16" if self.bf16 else "fp32", "settings": str(s)}
        if self.lora is not None:
            lora.save_checkpoint(s.out / "checkpoint", self.model, self.optimizer, self.loader.state(), self.step,
                                 self.world, self.main, self.preset, {**meta, "lora": self.lora})
        else:
            save_checkpoint(s.out / "checkpoint", self.model, self.optimizer, self.loader.state(), self.step,
                            self.fsdp, self.world, self.main, self.preset, meta,
                            consolidate=self.step >= stage.max_steps)
        if self.main:
            remote.commit_now(s.out)  # a run in a bucket: a killed run resumes from here, on any machine


def _start(s: TrainSettings) -> tuple[int, int, torch.device]:
    """(world, rank, device): the process group joined, seeds set, the run folder checked by
    rank 0 and its verdict shared, so every rank stops with the same message."""
    check_settings(s)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # FSDP's mesh and NCCL use the current device, else every rank takes cuda:0
    random.seed(s.seed)
    np.random.seed(s.seed)
    torch.manual_seed(s.seed)
    problem = None
    if rank == 0:
        try:
            check_run_folder(s)
        except QvlError as e:
            problem = str(e)
    if world > 1:
        shared = [problem]
        dist.broadcast_object_list(shared, src=0)
        problem = shared[0]
    if problem:
        raise RunError(problem)
    return world, rank, device


def _build_model(s: TrainSettings, preset: ModelConfig, stage: Stage, tok, record: dict | None = None,
                 device: torch.device = torch.device("cpu"), fsdp: bool = False, bf16: bool = False,
                 world: int = 1) -> QwenVL:
    """Built at the resolution the weights were trained at (``--init``), then interpolated to
    this stage's; trainable parts as the stage says; on ``device``. Under FSDP
    (``parallel.build_sharded``) built on the meta device and each rank's shards read from
    ``--init``'s file, or the ``--llm`` folder's safetensors, one tensor at a time; random
    weights no file holds (a fresh model, or the ViT and adapter beside ``--llm``) are built
    here whole, as without FSDP: same seed, same weights."""
    start_res = read_meta(Path(s.init)).resolution if s.init else stage.resolution
    init = None if s.init is None else weights_path(s.init)
    what = f"preset {preset.name} (--init)" if s.init is not None else f"--llm {s.llm}"

    def build(load: bool) -> QwenVL:
        model = QwenVL(preset, tok.vocab_size, tok.special(IMG_PAD), start_res, s.llm)
        if load and init is not None:
            load_weights(model, init, what)
        model.vision.set_resolution(stage.resolution)
        model.set_trainable(stage.trains)
        if record is not None:  # what the release trains under LoRA: the adapters alone (lora.apply)
            lora.apply(model, s.lora, tuple(record["modules_to_save"]), device)
        checkpointing = s.activation_checkpointing
        model.set_activation_checkpointing(preset.activation_checkpointing if checkpointing is None else checkpointing)
        return model

    if not fsdp:
        model = build(True)
        if bf16 and record is not None:  # LoRA's frozen base in bf16, as the release fine-tunes it: half its memory
            parallel.freeze_in_bf16(model)
        return model.to(device)
    if s.llm is None:
        check_buildable(preset, tok.vocab_size, start_res, None,
                        world // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if init is None and s.llm is None:
        weights = build(False).state_dict()
    elif init is None:
        parts = QwenVL(preset, tok.vocab_size, tok.special(IMG_PAD), start_res, s.llm, llm_on_meta=True)
        weights = Weights(*llm_folder_weights(s.llm), ("", {k: v for k, v in parts.state_dict().items()
                                                            if not k.startswith("llm.")}))
    else:
        weights = SafetensorsReader(init)
        with torch.device("meta"):
            check_names(QwenVL(preset, tok.vocab_size, tok.special(IMG_PAD), start_res, s.llm), weights.entries, init,
                        what)
    grid = stage.resolution // preset.vision.patch_size

    def adapt(name: str, tensor: torch.Tensor) -> torch.Tensor:  # --init's positions at this stage's resolution
        class_token = name == "vision.vit.positional_embedding" and preset.vision.resolved().class_token
        return resize_class_positions(tensor, grid) if class_token else tensor

    return parallel.build_sharded(lambda: build(False), weights, what, device, bf16, s.cpu_offload, adapt)


def _open_data(s: TrainSettings, preset: ModelConfig, stage: Stage, tok, rows: int, rank: int, world: int,
               say) -> Loader:
    """The shards' loader (local or streamed: ``data.Shards``), once their manifest matches the
    model (architecture, tokenizer, image tokens, a vocabulary inside the embedding's ``rows``)."""
    shards = Shards(s.data, s.max_rejected, s.cache_gb)
    manifest = shards.manifest
    if manifest.model != "qwen-vl":
        raise ValueError(f"{s.data}: rendered for {manifest.model}; qvl train trains Qwen-VL's architecture "
                         "(render with --model qwen-vl, or train it with ms-swift or LLaMA-Factory: qvl format export)")
    if manifest.tokenizer != tok.name or manifest.settings.image_tokens != preset.image_tokens:
        raise ValueError(f"{s.data}: formatted with tokenizer {manifest.tokenizer} and "
                         f"{manifest.settings.image_tokens} image tokens; preset {preset.name} needs "
                         f"{tok.name} and {preset.image_tokens} (re-run qvl format with --tokenizer/--image-tokens)")
    if (manifest.vocab_size or 0) > rows:
        raise ValueError(f"{s.data}: its tokenizer has {manifest.vocab_size:,} ids; the model's embedding "
                         f"{rows:,} rows")
    return Loader(shards, stage.micro_batch, stage.resolution, tok.special("<|endoftext|>"), stage.seq_len,
                  s.seed, rank, world, log=say, vocab_size=rows, image_pad=(tok.special(IMG_PAD), preset.image_tokens),
                  workers=s.data_workers, window=s.shuffle_window)


def setup(s: TrainSettings) -> Run:
    """Everything before the first step: processes, model, data, optimiser; a resumed run's
    checkpoint loaded and its metrics cut back to it."""
    world, rank, device = _start(s)
    main = rank == 0
    say = (lambda message: print(message, flush=True)) if main and s.log else (lambda message: None)

    preset = read_preset(s.init, s.preset) if s.init is not None else load_preset(s.preset or "tiny")
    stage = stage_for(s, preset)
    tok = load_tokenizer(preset.tokenizer)
    record = lora.record(s.lora, Path(s.init)) if s.lora is not None else None
    if record is None:
        lora.refuse_as_init(s.init)
    fsdp = s.fsdp and world > 1
    if s.fsdp and world == 1:
        say("notice: --fsdp shards the model over the processes of torchrun (--nproc_per_node 2 or more); "
            "this run is one process, unsharded")
    bf16 = use_bf16(s.precision, device)
    model = _build_model(s, preset, stage, tok, record, device, fsdp, bf16, world)
    wrapped = model if fsdp else parallel.wrap(model, world)
    rows = model.llm.get_input_embeddings().weight.shape[0]
    loader = _open_data(s, preset, stage, tok, rows, rank, world, say)
    optimizer = torch.optim.AdamW(param_groups(model, stage), lr=stage.lr, betas=stage.betas, eps=stage.eps)
    run = Run(s, world, rank, device, preset, stage, model, wrapped, fsdp, loader, optimizer, bf16, say, lora=record)
    metrics_path = s.out / "metrics.jsonl"
    if s.resume:
        try:
            lora.check_resume_kind(s.out / "checkpoint", record)
            run.step = lora.resume(s.out / "checkpoint", model, optimizer, loader, record, Path(s.init)) if record else \
                resume(s.out / "checkpoint", model, optimizer, loader, fsdp, main)
            before = read_meta(s.out / "checkpoint").global_batch
        except CheckpointError as e:
            raise RunError(f"{e}; --overwrite starts the run again") from None
        say(f"resumed at step {run.step}")
        if before is not None and before != run.global_batch:
            say(f"notice: the global batch changed from {before} to {run.global_batch} rows per step (micro-batch "
                f"{stage.micro_batch} x accumulation {stage.accumulation} x {world} processes); --accumulation "
                "keeps it")
        if main and metrics_path.exists():  # drop lines past the checkpoint: the curve continues exactly
            storage.write_text(metrics_path, "".join(line + "\n" for line in _metrics_until(metrics_path, run.step)))
    elif main and metrics_path.exists():
        metrics_path.unlink()
    loader.check()
    return run


def _optimizer_step(run: Run, autocast) -> tuple[dict, float, float, float]:
    """One optimiser step over ``accumulation`` micro-batches: its metrics line, and its loss,
    gradient norm and learning rate unrounded (for the log)."""
    stage, model, world, device = run.stage, run.model, run.world, run.device
    started = time.perf_counter()
    lr = lr_at(run.step, stage)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    micro = [run.loader.next() for _ in range(stage.accumulation)]
    tokens = torch.tensor(float(sum(int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in micro)))
    if world > 1:
        dist.all_reduce(tokens)
    total_loss = 0.0
    task_loss: dict[str, list[float]] = {}
    for i, batch in enumerate(micro):
        with autocast:
            logits = run.wrapped(batch.input_ids.to(device), None if batch.pixels is None else batch.pixels.to(device),
                                 batch.attention_mask.to(device), batch.position_ids.to(device))
        targets = batch.labels[:, 1:].to(device)
        per_token = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                    ignore_index=IGNORE_INDEX, reduction="none")
        loss = per_token.sum() / tokens.clamp(min=1) * world  # DDP and FSDP average gradients over ranks
        if not torch.isfinite(loss):
            raise LossError(f"step {run.step}: loss is {loss.item()} on samples {batch.sample_ids}; try a lower "
                            "--lr, or look at those samples")
        if i == len(micro) - 1:
            loss.backward()
        else:
            with parallel.no_sync(run.wrapped, world, run.fsdp):
                loss.backward()
        total_loss += loss.item() / world
        for row, spans in enumerate(batch.spans):
            for task, start, end in spans:
                part = slice(max(start - 1, 0), end - 1)  # per_token[t] is the loss of token t + 1
                entry = task_loss.setdefault(task, [0.0, 0])
                entry[0] += float(per_token[row, part].detach().sum())
                entry[1] += int((targets[row, part] != IGNORE_INDEX).sum())
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_norm = parallel.grad_norm(torch.nn.utils.clip_grad_norm_(trainable, stage.grad_clip))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if world > 1:
        reduced = torch.tensor([total_loss])
        dist.all_reduce(reduced)
        total_loss = float(reduced)
    run.step += 1
    seconds = time.perf_counter() - started
    n_tokens = sum(b.input_ids.numel() for b in micro) * world
    n_images = sum(0 if b.pixels is None else b.pixels.shape[0] for b in micro) * world
    record = {"step": run.step, "loss": round(total_loss, 6),
            "lr": {g["name"]: g["lr"] for g in run.optimizer.param_groups},
            "grad_norm": round(grad_norm, 4), "tokens_per_s": round(n_tokens / seconds, 1),
            "images_per_s": round(n_images / seconds, 1),
            "image_token_spread": None if model.image_token_spread is None else round(model.image_token_spread, 6),
            "task_loss": {t: round(v[0] / max(1, v[1]), 6) for t, v in sorted(task_loss.items())}}
    return record, total_loss, grad_norm, lr


def loop(run: Run) -> None:
    """Steps to the stage's ``max_steps``: a metrics line each, a checkpoint every ``checkpoint_every``."""
    s, stage = run.settings, run.stage
    metrics_path = s.out / "metrics.jsonl"
    trains = "LoRA (the rest frozen)" if run.lora else ", ".join(stage.trains)
    run.say(f"stage {stage.number} ({stage.name}): trains {trains}; {stage.max_steps} steps of "
            f"{stage.micro_batch}x{stage.accumulation}x{run.world}; lr {stage.lr:g}->{stage.min_lr:g}, "
            f"res {stage.resolution}, "
            f"{sum(p.numel() for p in run.model.parameters() if p.requires_grad) / 1e6:.2f}M trainable, "
            f"{'bf16 autocast' if run.bf16 else 'fp32'}")
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16)
    bar = progress_bar(disable=not (run.main and s.progress))
    bar_task = bar.add_task(f"stage {stage.number}", total=stage.max_steps, completed=run.step, unit="steps")
    with bar:
        while run.step < stage.max_steps:
            record, loss, grad_norm, lr = _optimizer_step(run, autocast)
            if run.main:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                bar.update(bar_task, completed=run.step, description=f"stage {stage.number} loss {loss:.3f}")
                if s.log and not s.progress and (run.step % 10 == 0 or run.step == stage.max_steps):
                    run.say(f"step {run.step}/{stage.max_steps} loss {loss:.4f} lr {lr:.2e} "
                            f"grad {grad_norm:.2f} {record['tokens_per_s']:.0f} tok/s")
            if run.step % s.checkpoint_every == 0 and run.step < stage.max_steps:
                run.save()


def run_to_end(run: Run) -> None:
    """The loop and the final save (the final weights, also for a zero-step run: a stage's
    starting point); the loader's workers stopped however it ends."""
    try:
        loop(run)
        run.save()
    except RuntimeError as e:
        explained = run.loader.explain(e)
        if explained is None:
            raise
        raise explained from None
    finally:
        run.loader.close()


def train(s: TrainSettings) -> dict:
    """One stage's run. Under torchrun it joins the process group and leaves it at the end,
    unless the caller joined one already: then it is used and kept, which is how to call
    ``train`` twice in one process (torch re-joining a group it left in the same launch reads
    the last group's rendezvous and can hang)."""
    own_group = not dist.is_initialized()
    run = setup(s)
    run_to_end(run)
    if run.main and (s.out / "metrics.jsonl").exists():
        plot_loss(s.out / "metrics.jsonl", s.out / "loss.png")
    if run.world > 1:
        dist.barrier()
        if own_group:
            dist.destroy_process_group()
    return {"steps": run.step, "out": str(s.out)}


class MetricsLine(msgspec.Struct):
    step: Count


def _metrics_until(path: Path, step: int) -> list[str]:
    """The lines of ``metrics.jsonl`` up to ``step`` (a resumed run continues the curve exactly);
    a line that is not a metrics record is an error naming it."""
    kept = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            if decode_json(line, MetricsLine).step <= step:
                kept.append(line)
        except RecordError as e:
            raise RunError(f"{path}:{number}: not a metrics line ({e}); --overwrite starts the run again") from None
    return kept


def plot_loss(metrics: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="total", lw=2)
    for task in sorted({t for r in rows for t in r["task_loss"]}):
        pts = [(r["step"], r["task_loss"][task]) for r in rows if task in r["task_loss"]]
        if len({t for r in rows for t in r["task_loss"]}) > 1:
            ax.plot(*zip(*pts), label=task, lw=0.8, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over supervised tokens)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with storage.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
