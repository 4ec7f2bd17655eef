"""`qvl plan`: GPU memory per device for a training run, known before the run.

Weights, gradients and optimiser state are counted from the model built on the meta device
(no memory, no download), part by part, by training mode. Activations are **measured**: the
same forward + loss as ``train._optimizer_step`` runs on a copy of the model with 1-3 ViT
blocks and LLM layers at the real widths, resolution and sequence length, and a
``saved_tensors_hooks`` sums the bytes of the distinct storages autograd keeps for the
backward pass, and a dispatch mode follows every storage ops create until it is freed, through
the backward too, for the peak; per-layer and fixed parts are fitted and extrapolated to the full depth.
On the GPU training computes in bf16, which a CPU only emulates (~80x slower), so the plan's
run is on the meta device in bf16 (shapes and dtypes, no arithmetic: a few seconds, so it is
run live and nothing is cached); ``benchmarks/train_memory.py`` and the tests check that the
meta device saves exactly what a real fp32 CPU run saves.

Attention: GPUs run flash / memory-efficient kernels that keep O(S) per head (output and
log-sum-exp), not the S x S probabilities of the math kernel. The measurement routes every
``scaled_dot_product_attention`` to torch's CPU flash kernel, which keeps the same tensors
(q, k, v, the mask, output, log-sum-exp) and, unlike the meta device's default, takes qvl's
block-diagonal mask. What is modelled rather than measured is said in the table: the FSDP
units in flight, Q-LoRA's dequantised weight, the CUDA context.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from qvl.errors import QvlError
from qvl.trainer import lora
from qvl.trainer.lora import LoraSettings
from qvl.trainer.model import QwenVL
from qvl.trainer.preset import ModelConfig, load_preset
from qvl.trainer.stages import STAGES

GiB = 1 << 30
CARDS = (24, 40, 80)  # GiB: A10 / RTX 4090, A100-40GB, A100 / H100-80GB
CUDA_OVERHEAD = 0.75 * GiB  # CUDA context + cuBLAS workspace: an estimate (0.5-1 GiB), not measured
MODES = ("full", "lora", "q-lora")
FIT_DEPTHS = (1, 2, 3)  # reduced depths the per-layer figures are fitted on
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj")  # release: c_attn, attn.c_proj, w1, w2
NF4_BLOCK, NF4_BLOCK2 = 64, 256  # bitsandbytes: 64 weights per absmax; 256 absmax per fp32 constant (double quant)


class PlanError(QvlError):
    pass


@dataclass
class PlanSettings:
    """What run to plan: a preset's stage at a micro-batch and length, a mode, a GPU count."""

    preset: str = "qwen-vl-chat"
    stage: int = 3
    micro_batch: int = 1
    seq_len: int | None = None  # None: the stage's (2048 in stages 2 and 3)
    resolution: int | None = None  # None: the stage's (448 px in stages 2 and 3)
    images_per_row: int = 1
    mode: str = "full"  # full (FSDP over the GPUs), lora, q-lora (one model per GPU)
    lora_base: bool = False  # LoRA on the base model: wte and lm_head trained too (the release's modules_to_save)
    lora: LoraSettings = field(default_factory=LoraSettings)  # r, alpha, dropout as `qvl train --lora` takes them
    gpus: int = 1
    activation_checkpointing: bool | None = None  # None: the preset's
    cpu_offload: bool = False  # full: fp32 master weights, gradients and AdamW state on the CPU


def check_plan(s: PlanSettings) -> None:
    """Each setting in range, named as its option, before anything is built."""
    if s.stage not in STAGES:
        raise PlanError(f"--stage {s.stage!r}: use 1, 2 or 3")
    if s.mode not in MODES:
        raise PlanError(f"mode {s.mode!r}: use {', '.join(MODES)}")
    for option, value, low, high in (("--gpus", s.gpus, 1, 1 << 16), ("--micro-batch", s.micro_batch, 1, 1024),
                                     ("--seq-len", s.seq_len, 2, 1 << 20), ("--resolution", s.resolution, 1, 4096),
                                     ("--images-per-row", s.images_per_row, 1, 64), ("--lora-r", s.lora.r, 1, 4096)):
        if value is not None and (isinstance(value, bool) or not low <= value <= high):
            raise PlanError(f"{option} {value!r}: from {low:,} to {high:,}")
    if s.cpu_offload and s.mode != "full":
        raise PlanError("--cpu-offload: for full training under FSDP (LoRA keeps one model per GPU)")
    if s.mode != "full":
        try:
            lora.check_stage(s.stage, f"--{s.mode}")
        except lora.LoraError as e:
            raise PlanError(str(e)) from None
    if s.lora_base and s.mode == "full":
        raise PlanError("--lora-base: with --lora")
    if s.lora_base and s.mode == "q-lora":
        raise PlanError("--q-lora with --lora-base: the release's Q-LoRA trains no wte/lm_head (modules_to_save), on "
                        "a base model too; plan --lora --lora-base, or --q-lora alone")


# ---------------------------------------------------------------- the model and its parameters


def build(cfg: ModelConfig, resolution: int, vit_layers: int | None = None, llm_layers: int | None = None,
          device: str = "meta") -> QwenVL:
    """The preset's model (or a copy with fewer ViT blocks / LLM layers) on ``device``, unfilled:
    built on the meta device, then given zeroed storage on another device (saved bytes do not depend on
    values; zeros skip random initialisation and the slow arithmetic of garbage denormals)."""
    vision = cfg.vision.resolved()
    cfg = dataclasses.replace(
        cfg, vision=dataclasses.replace(vision, layers=vit_layers or vision.layers),
        llm=dataclasses.replace(cfg.llm, num_hidden_layers=llm_layers or cfg.llm.num_hidden_layers))
    if cfg.llm.vocab_size is None:
        raise PlanError(f"preset {cfg.name}: [llm] needs every size (vocab_size too) to plan without its weights")
    with torch.device("meta"):
        model = QwenVL(cfg, cfg.llm.vocab_size, 0, resolution)  # the plan's rows are never decoded
    if device != "meta":
        model.to_empty(device=device)
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                t.zero_()
    return model


def prepare(model: QwenVL, s: PlanSettings, trains: tuple[str, ...], checkpointing: bool) -> QwenVL:
    """Trainable parts as the mode says (full: the stage's parts; LoRA: the adapters only)."""
    if s.mode == "full":
        model.set_trainable(trains)
    else:
        lora.apply(model, dataclasses.replace(s.lora, q_lora=False), lora.RELEASE_SAVED if s.lora_base else ())
    model.set_activation_checkpointing(checkpointing)
    return model.train()


@dataclass
class Counts:
    """Parameters by role, counted on the meta-device model."""

    vision: int
    adapter: int
    llm: int
    trainable: int
    frozen: int
    lora: int  # LoRA A and B (0 in full training)
    modules_to_save: int  # LoRA on the base model: wte + lm_head trained
    nf4: int  # Q-LoRA: the LLM layers' linear weights stored in 4 bits
    largest_unit: int  # the largest FSDP unit (a ViT block or an LLM layer)
    root: int  # parameters of no block or layer: FSDP's root unit (embeddings, lm_head, adapter, ViT stem)


def count(model: QwenVL) -> Counts:
    """Parameters of the prepared model: per part, trainable, LoRA, what Q-LoRA quantises, FSDP units."""
    def n(params) -> int:
        return sum(p.numel() for p in params)

    adapters = {id(p): p for name, p in model.named_parameters() if ".lora_" in name}
    adapters_n = n(adapters.values())
    saved = n(p for name, p in model.named_parameters() if ".modules_to_save." in name)
    units = [*model.vision.vit.transformer.resblocks, *model.llm.model.layers]
    nf4 = n(m.weight for layer in model.llm.model.layers for m in layer.modules()
            if isinstance(m, nn.Linear) and id(m.weight) not in adapters)
    trainable = n(p for p in model.parameters() if p.requires_grad)
    return Counts(vision=n(model.vision.parameters()), adapter=n(model.adapter.parameters()),
                  llm=n(model.llm.parameters()) - adapters_n - saved, trainable=trainable, frozen=n(model.parameters()) - trainable,
                  lora=adapters_n, modules_to_save=saved, nf4=nf4, largest_unit=max(n(u.parameters()) for u in units),
                  root=n(model.parameters()) - sum(n(u.parameters()) for u in units))


def nf4_bytes(params: int) -> float:
    """NF4 with double quantisation: 4 bits a weight, one 8-bit absmax per 64 weights, one fp32
    constant per 256 absmax (bitsandbytes' defaults)."""
    return params * 0.5 + params / NF4_BLOCK + params / (NF4_BLOCK * NF4_BLOCK2) * 4


# ---------------------------------------------------------------- activations


@contextlib.contextmanager
def flash_attention():
    """Every scaled_dot_product_attention as torch's CPU flash kernel: what GPU flash /
    memory-efficient kernels keep (O(S): output and log-sum-exp), on the CPU and the meta device."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None and attn_mask.dtype != query.dtype:
            attn_mask = attn_mask.to(query.dtype)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def inputs(s: PlanSettings, image_tokens: int, resolution: int, seq_len: int, dtype: torch.dtype, device: str):
    """A micro-batch as the loader makes it: ``images_per_row`` image spans per row,
    position ids, the [B, 1, T, T] additive block-diagonal mask, labels."""
    b = s.micro_batch
    ids = torch.zeros(b, seq_len, dtype=torch.long, device=device)
    pad = torch.zeros(b, seq_len, dtype=torch.bool, device=device)
    pad[:, 1:1 + image_tokens * s.images_per_row] = True
    pixels = torch.zeros(b * s.images_per_row, 3, resolution, resolution, dtype=dtype, device=device)
    positions = torch.arange(seq_len, device=device).expand(b, -1)
    mask = torch.full((seq_len, seq_len), float("-inf"), device=device).triu(1).expand(b, 1, -1, -1).to(dtype)
    return ids, pad, pixels if s.images_per_row else None, mask, positions


class _Live(TorchDispatchMode):
    """Every storage an op creates and when it is freed (a weak reference to it fires when the
    storage itself goes, however it was held), in order: the timeline of live bytes. Views of
    ``existing`` storages (the parameters: ``weight.t()``) are not new memory."""

    def __init__(self, existing: set[int]):
        super().__init__()
        self.events: list[tuple[int, int | None]] = []  # (allocation, bytes); (allocation, None): freed
        self.current: dict[int, int] = {}  # a live storage's address -> its allocation
        self.existing = existing

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.current \
                    and t.untyped_storage()._cdata not in self.existing:
                storage, n = t.untyped_storage(), len(self.events)
                self.current[storage._cdata] = n
                self.events.append((n, storage.nbytes()))
                weakref.finalize(storage, self._free, storage._cdata, n)
        return out

    def _free(self, address: int, n: int) -> None:
        if self.current.get(address) == n:
            del self.current[address]
        self.events.append((n, None))

    def peak(self, leaving_out: set[int]) -> int:
        """The most bytes live at once, ``leaving_out`` some allocations (the gradients, counted apart)."""
        live = best = 0
        sizes: dict[int, int] = {}
        for n, size in self.events:
            if n in leaving_out:
                continue
            if size is None:
                live -= sizes.pop(n, 0)
            else:
                sizes[n] = size
                live += size
                best = max(best, live)
        return best


def step_bytes(model: QwenVL, s: PlanSettings, resolution: int, seq_len: int, dtype: torch.dtype,
               backward: bool = True) -> tuple[int, int]:
    """(saved, peak) of one micro-batch. Saved: the bytes autograd keeps from the forward and loss
    to the backward, the distinct storages the saved tensors live in, parameters excluded (counted
    as weights). Peak: the most bytes live at once in the forward, loss and backward (``backward``),
    the batch, activations and the loss's gradients, parameters and their gradients excluded. The
    forward is ``QwenVL.forward``'s (the embedding splice without its count check, which needs values)."""
    device = next(model.parameters()).device.type
    params = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}
    kept: list[torch.Tensor] = []  # alive until counted: a freed storage's address may be reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            storages[storage._cdata] = storage.nbytes()
            kept.append(t.detach())
        return t.detach()  # t itself would be a cycle through the graph (a node keeping its own output)

    live = _Live(params)
    with flash_attention(), live:
        ids, pad, pixels, mask, positions = inputs(s, model.config.image_tokens, resolution, seq_len, dtype, device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            embeds = model.llm.get_input_embeddings()(ids)
            if pixels is not None:
                features = model.image_features(pixels).to(embeds.dtype)
                embeds = embeds.masked_scatter(pad.unsqueeze(-1), features.reshape(-1, features.shape[-1]))
            logits = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
            loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="sum")
        saved = sum(storages.values())
        kept.clear()  # else the backward could not free what it has used
        if backward:
            loss.backward()
    grads = {live.current.get(p.grad.untyped_storage()._cdata) for p in model.parameters() if p.grad is not None}
    return saved, live.peak(grads) if backward else 0


@dataclass
class Activations:
    """Bytes = fixed + per_vit_block x blocks + per_llm_layer x layers, fitted on reduced depths."""

    fixed: int
    per_vit_block: int
    per_llm_layer: int
    measured: dict[tuple[int, int], int]  # (ViT blocks, LLM layers) -> bytes

    @classmethod
    def fit(cls, measured: dict[tuple[int, int], int], first: int, last: int) -> Activations:
        """The slopes over ViT blocks (one LLM layer) and LLM layers (one ViT block); the rest is fixed."""
        vit = (measured[last, first] - measured[first, first]) // (last - first)
        llm = (measured[first, last] - measured[first, first]) // (last - first)
        return cls(measured[first, first] - (vit + llm) * first, vit, llm, measured)

    def predict(self, vit_blocks: int, llm_layers: int) -> int:
        return self.fixed + self.per_vit_block * vit_blocks + self.per_llm_layer * llm_layers

    @property
    def nonlinear(self) -> int:
        """Largest gap between a measured depth and the fit (0 when each layer adds the same)."""
        return max(abs(v - self.predict(*k)) for k, v in self.measured.items())


def step_at(cfg: ModelConfig, s: PlanSettings, trains: tuple[str, ...], resolution: int, seq_len: int,
            dtype: torch.dtype, checkpointing: bool, vit_blocks: int, llm_layers: int, device: str = "meta",
            backward: bool = True) -> tuple[int, int]:
    """(saved, peak) of the preset's model with ``vit_blocks`` ViT blocks and ``llm_layers`` LLM layers."""
    model = prepare(build(cfg, resolution, vit_blocks, llm_layers, device).to(dtype), s, trains, checkpointing)
    result = step_bytes(model, s, resolution, seq_len, dtype, backward)
    if device != "meta":
        del model
        gc.collect()  # freed before the next is built: two real-width copies would not fit a small machine
    return result


def measure(cfg: ModelConfig, s: PlanSettings, trains: tuple[str, ...], resolution: int, seq_len: int,
            dtype: torch.dtype, checkpointing: bool, device: str = "meta", depths: tuple[int, ...] = FIT_DEPTHS,
            backward: bool = True) -> tuple[Activations, Activations]:
    """Saved and peak bytes fitted on ``depths`` ViT blocks (one LLM layer) and LLM layers (one
    ViT block): the slopes are the per-layer figures, the rest is fixed (the batch, embeddings,
    ViT stem, adapter, logits and the loss's fp32 upcast and gradients)."""
    first, last = depths[0], depths[-1]
    runs = {(d, first): None for d in depths} | {(first, d): None for d in depths[1:]}
    for vit, llm in runs:
        runs[vit, llm] = step_at(cfg, s, trains, resolution, seq_len, dtype, checkpointing, vit, llm, device, backward)
    return tuple(Activations.fit({k: v[i] for k, v in runs.items()}, first, last) for i in (0, 1))


# ---------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Bytes per GPU, each line as the table prints it, with how it was obtained."""

    settings: PlanSettings
    preset: str
    resolution: int
    seq_len: int
    checkpointing: bool
    counts: Counts
    activations: Activations  # saved for backward
    peak: Activations  # the most live at once in forward, loss and backward
    lines: list[tuple[str, float, str]]  # (what, bytes, how: measured / counted / modelled / estimate)

    @property
    def total(self) -> float:
        return sum(b for _, b, _ in self.lines)

    def fits(self) -> dict[int, bool]:
        return {card: self.total <= card * GiB for card in CARDS}


def plan(s: PlanSettings) -> Plan:
    """The memory one GPU needs for the run ``s`` describes."""
    check_plan(s)
    cfg = load_preset(s.preset)
    if cfg.llm.vocab_size is None:  # the tokenizer's, as qvl train builds it
        from qvl.formats.tokenizers import load_tokenizer

        try:
            vocab = load_tokenizer(cfg.tokenizer).vocab_size
        except (QvlError, OSError) as e:
            raise PlanError(f"preset {s.preset}: [llm] has no vocab_size and its tokenizer {cfg.tokenizer!r} does not "
                            f"load ({str(e)[:200]}); set vocab_size to plan without it") from None
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=vocab))
    stage = dataclasses.replace(STAGES[s.stage])
    for key, values in cfg.stages.items():
        setattr(stage, key, values[s.stage - 1])
    resolution, seq_len = s.resolution or stage.resolution, s.seq_len or stage.seq_len
    if cfg.image_tokens * s.images_per_row + 2 > seq_len:
        raise PlanError(f"--seq-len {seq_len}: too short for {s.images_per_row} image(s) of {cfg.image_tokens} "
                        "tokens per row")
    checkpointing = cfg.activation_checkpointing if s.activation_checkpointing is None else s.activation_checkpointing
    counts = count(prepare(build(cfg, resolution), s, stage.trains, checkpointing))
    acts, peak = measure(cfg, s, stage.trains, resolution, seq_len, torch.bfloat16, checkpointing)
    layers, blocks = cfg.llm.num_hidden_layers, cfg.vision.resolved().layers
    saved = acts.predict(blocks, layers)
    n = s.gpus
    lines: list[tuple[str, float, str]] = []
    if s.mode == "full":
        on_gpu = 0 if s.cpu_offload else 1
        lines += [("weights: fp32 master of trainable / N", on_gpu * counts.trainable * 4 / n, "counted"),
                  ("weights: frozen bf16 / N", on_gpu * counts.frozen * 2 / n, "counted"),
                  ("gradients: fp32 / N", on_gpu * counts.trainable * 4 / n, "counted"),
                  ("optimizer: AdamW m, v fp32 / N", on_gpu * counts.trainable * 8 / n, "counted"),
                  ("FSDP in flight: bf16 root + 2 largest units", (counts.root + 2 * counts.largest_unit) * 2,
                   "modelled")]
    else:
        base = counts.vision + counts.adapter + counts.llm
        if s.mode == "q-lora":
            lines += [("weights: LLM linears NF4 (double quant)", nf4_bytes(counts.nf4), "counted"),
                      ("weights: rest bf16 (ViT, adapter, embeddings, norms)", (base - counts.nf4) * 2, "counted")]
            lines.append(("Q-LoRA: one LLM weight dequantised to bf16", 2 * max(
                cfg.llm.hidden_size * cfg.llm.intermediate_size, cfg.llm.hidden_size ** 2), "modelled"))
        else:
            lines.append(("weights: base bf16 (frozen, whole on each GPU)", base * 2, "counted"))
        trained = counts.lora + counts.modules_to_save
        lines += [("weights: LoRA" + (" + wte, lm_head" if counts.modules_to_save else "") + " fp32", trained * 4,
                   "counted"),
                  ("gradients: fp32", trained * 4, "counted"),
                  ("optimizer: AdamW m, v fp32", trained * 8, "counted")]
    lines += [(f"activations: saved for backward ({'checkpointed' if checkpointing else 'all kept'})", saved,
               "measured (meta bf16, fitted)"),
              ("activations: backward's transient (peak - saved)", peak.predict(blocks, layers) - saved,
               "measured (meta bf16, fitted)"),
              ("CUDA context + workspace", CUDA_OVERHEAD, "estimate")]
    return Plan(s, cfg.name, resolution, seq_len, checkpointing, counts, acts, peak, lines)


def describe(p: Plan) -> str:
    """One line naming the run the table is for."""
    s = p.settings
    mode = {"full": "full training (FSDP)" if s.gpus > 1 else "full training", "lora": "LoRA",
            "q-lora": "Q-LoRA"}[s.mode] + (" on the base model (wte, lm_head trained)" if s.lora_base else "")
    return (f"{p.preset} stage {s.stage}, {mode}, {s.gpus} GPU(s), micro-batch {s.micro_batch} x {p.seq_len} tokens, "
            f"{s.images_per_row} image(s) of {p.resolution} px per row, activation checkpointing "
            f"{'on' if p.checkpointing else 'off'}{', CPU offload' if s.cpu_offload else ''}")


def table(p: Plan):
    """The plan as a rich table: one line per kind of memory, the total, and which cards it fits."""
    from rich.table import Table

    t = Table(title=describe(p), title_justify="left")
    t.add_column("per GPU", no_wrap=True)
    t.add_column("GiB", justify="right", no_wrap=True)
    t.add_column("how")
    for what, value, how in p.lines:
        t.add_row(what, f"{value / GiB:.2f}", how)
    t.add_row("[bold]total[/]", f"[bold]{p.total / GiB:.2f}[/]", "", end_section=True)
    t.add_row(f"fits {' / '.join(map(str, CARDS))} GiB", " / ".join(
        "[green]yes[/]" if ok else "[red]no[/]" for ok in p.fits().values()), "GiB, the whole card")
    c = p.counts
    t.caption = (f"parameters: vision {c.vision / 1e9:.2f}B, adapter {c.adapter / 1e6:.0f}M, LLM {c.llm / 1e9:.2f}B; "
                 f"trainable {c.trainable / 1e6:,.1f}M (meta device). Activations: "
                 f"{p.activations.fixed / GiB:.2f} GiB fixed + {p.activations.per_vit_block / 2 ** 20:.1f} MiB per ViT "
                 f"block + {p.activations.per_llm_layer / 2 ** 20:.1f} MiB per LLM layer saved, peak "
                 f"{p.peak.fixed / GiB:.2f} GiB fixed + {p.peak.per_vit_block / 2 ** 20:.1f} + "
                 f"{p.peak.per_llm_layer / 2 ** 20:.1f} MiB (bf16, flash-type attention)")
    if p.settings.cpu_offload:
        host = (c.trainable * 16 + c.frozen * 2) / p.settings.gpus
        t.caption += f". CPU memory per GPU's process for the offloaded state: {host / GiB:.1f} GiB"
    t.caption_justify = "left"
    return t
