"""LoRA and Q-LoRA fine-tuning through ``peft``, as the released Qwen-VL's ``finetune.py`` does it.

What the release trains with ``--use_lora`` (its ``finetune.py``): LoRA r=64, alpha=16, dropout
0.05, bias none on ``c_attn``, ``attn.c_proj``, ``w1``, ``w2``; ``modules_to_save = ["wte",
"lm_head"]`` unless the model's path contains "chat" or it is Q-LoRA. Its ``fix_vit`` block runs only
*without* LoRA, and ``get_peft_model`` freezes every base parameter, so under LoRA the ViT **and**
the adapter (``attn_pool``) stay fixed: only the LoRA matrices (and the saved modules) train.

qvl's model uses Qwen2's names: the release's fused ``c_attn`` is ``q_proj``/``k_proj``/``v_proj``.
LoRA on ``c_attn`` (A: r x h, B: 3h x r) is LoRA on q, k, v sharing one A (and one dropout mask)
with three B's (``SharedDown``), so the parameters and the computation are the release's.

A run's checkpoint holds the trainable tensors only (``adapter.safetensors``) and, in
``meta.json``'s ``lora``, the settings and the base checkpoint they apply to (its path and
``fingerprint``); loading it rebuilds the base, applies the adapters and merges them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import torch
import torch.distributed as dist
from torch import nn

from qvl.common import remote, storage
from qvl.errors import QvlError

ADAPTERS = "adapter.safetensors"
RELEASE_TARGETS = ("c_attn", "attn.c_proj", "w1", "w2")
TO_QVL = {"c_attn": ("q_proj", "k_proj", "v_proj"), "attn.c_proj": ("o_proj",), "w1": ("up_proj",),
          "w2": ("gate_proj",), "wte": ("embed_tokens",), "lm_head": ("lm_head",)}
RELEASE_SAVED = ("wte", "lm_head")  # the base model's modules_to_save in the release (for new tokens)
ADAPTER = "default"  # peft's adapter name
MAX_ALPHA = 1e4  # alpha / r scales the update: above this it is no fine-tune (and 1e300 overflows to NaN)


class LoraError(QvlError):
    pass


@contextlib.contextmanager
def _no_hub_kernels():
    """Import peft and bitsandbytes without bitsandbytes fetching a CPU kernel's code from the
    Hugging Face hub (it tries ``kernels.get_kernel`` on AVX512-BF16 CPUs, and warns when it
    cannot): qvl runs no code from a hub. Its own CPU 4-bit path is used instead."""
    held = sys.modules.get("kernels", ...)
    sys.modules["kernels"] = None  # `from kernels import get_kernel` -> ImportError, handled by bitsandbytes
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
        if held is ...:
            sys.modules.pop("kernels", None)
        else:
            sys.modules["kernels"] = held


def _peft():
    """The ``peft`` module, imported without hub kernels (``_no_hub_kernels``)."""
    with _no_hub_kernels():
        import peft
        import peft.tuners.lora  # noqa: F401  (imports bitsandbytes where it is installed)
    return peft


@dataclass
class LoraSettings:
    """The release's ``LoraArguments`` defaults; the CLI only fills them."""

    r: int = 64
    alpha: float = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = RELEASE_TARGETS  # release names (TO_QVL maps them)
    chat: bool | None = None  # None: as the release decides, "chat" in the base's name
    q_lora: bool = False  # the base's linear layers in 4-bit NF4 (bitsandbytes)


def check_stage(stage: int, option: str = "--lora") -> None:
    """LoRA adapts the LLM: stage 1, where the LLM is frozen, has nothing for it (train and plan)."""
    if stage == 1:
        raise LoraError(f"{option}: stage 1 trains the ViT and adapter with the LLM frozen; LoRA adapts the LLM "
                        "(use --stage 2 or 3)")


def check(lora: LoraSettings, stage: int, init, fsdp: bool) -> None:
    """Each LoRA option in range, and a run it can apply to; one line naming the option."""
    check_stage(stage)
    if init is None:
        raise LoraError("--lora needs --init: the base or chat checkpoint the adapters apply to "
                            "(e.g. qvl convert from-qwen-vl's --out)")
    if fsdp:
        raise LoraError("--lora with --fsdp: LoRA's trainable tensors are small; run it under DDP (no --fsdp)")
    if isinstance(lora.r, bool) or not isinstance(lora.r, int) or not 1 <= lora.r <= 4096:
        raise LoraError(f"--lora-r {lora.r!r}: the adapters' rank, an integer from 1 to 4,096")
    if isinstance(lora.alpha, bool) or not isinstance(lora.alpha, (int, float)) or not 0 < lora.alpha <= MAX_ALPHA:
        raise LoraError(f"--lora-alpha {lora.alpha!r}: above 0 and at most {MAX_ALPHA:,.0f} (the update is scaled "
                        "by alpha / r)")  # NaN fails too
    if not isinstance(lora.dropout, (int, float)) or not 0 <= lora.dropout < 1:
        raise LoraError(f"--lora-dropout {lora.dropout!r}: a probability from 0 to below 1")
    unknown = [t for t in lora.targets if t not in TO_QVL or t in RELEASE_SAVED]
    if unknown or not lora.targets:
        raise LoraError(f"LoRA targets {list(lora.targets)!r}: use the release's {', '.join(RELEASE_TARGETS)}")
    if lora.q_lora and lora.chat is False:
        raise LoraError("--q-lora with --lora-base: the release's Q-LoRA trains no wte/lm_head (modules_to_save), "
                        "on a base model too; use --lora --lora-base, or --q-lora alone")
    if lora.q_lora:
        check_q_lora()


def check_q_lora() -> None:
    try:
        with _no_hub_kernels():
            import bitsandbytes  # noqa: F401
    except ImportError:
        raise LoraError("--q-lora needs bitsandbytes (pip install 'qvl[qlora]'): its 4-bit NF4 layers "
                            "hold the base") from None


def modules_to_save(lora: LoraSettings, chat: bool) -> tuple[str, ...]:
    """The release's rule: the base model (not chat, not Q-LoRA) also trains ``wte`` and ``lm_head``."""
    return () if lora.q_lora or chat else RELEASE_SAVED


def is_chat(init: Path, converted_from: str | None) -> bool:
    """The release's test, ``"chat" in model_name_or_path.lower()``, on the --init folder and the
    release folder it was converted from."""
    return any("chat" in str(name).lower() for name in (init, converted_from) if name)


# ---------------------------------------------------------------- the adapters in the model


class SharedDown(nn.Module):
    """One LoRA A for q, k and v: LoRA on the release's fused ``c_attn``. Qwen2's attention
    calls q, k and v on the same hidden states one after another; the first call computes
    A(dropout(x)) and the next ``users - 1`` calls on that tensor reuse it (one dropout mask, as
    one fused layer has; a call on another tensor computes afresh, so a recomputed forward under
    activation checkpointing is exact too). ``weight`` is A's, for peft's merge."""

    def __init__(self, down: nn.Linear, dropout: nn.Module, users: int):
        super().__init__()
        self.down, self.dropout, self.users = down, dropout, users
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._left = 0

    @property
    def weight(self) -> torch.Tensor:
        return self.down.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x is not self._input or self._left == 0:
            self._input, self._output, self._left = x, self.down(self.dropout(x)), self.users
        out = self._output
        self._left -= 1
        if self._left == 0:  # hold no activations past the attention call
            self._input = self._output = None
        return out


def _share_fused(llm: nn.Module, groups: list[tuple[str, ...]]) -> None:
    """Every layer's projections of each group (q, k, v) share the first one's A and dropout."""
    for module in list(llm.modules()):
        for group in groups:
            layers = [getattr(module, name, None) for name in group]
            if len(group) < 2 or not all(hasattr(layer, "lora_A") for layer in layers):
                continue
            first = layers[0]
            shared = SharedDown(first.lora_A[ADAPTER], first.lora_dropout[ADAPTER], len(group))
            for layer in layers:
                layer.lora_A[ADAPTER] = shared
                layer.lora_dropout[ADAPTER] = nn.Identity()


def quantize_llm(llm: nn.Module, device: torch.device) -> None:
    """Q-LoRA's base: every linear layer of the LLM's blocks as bitsandbytes 4-bit NF4 (double
    quantisation, QLoRA's defaults), computing in fp32 (bf16 on CUDA); ``lm_head`` and the
    embedding stay as they are, as in transformers' ``load_in_4bit``."""
    with _no_hub_kernels():
        import bitsandbytes as bnb

    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    for module in list(llm.model.layers.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, child.bias is not None,
                                      compute_dtype=compute, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, name, q.to(device))
    llm.is_loaded_in_4bit = True  # what prepare_model_for_kbit_training reads


def check_rank(llm: nn.Module, lora: LoraSettings, option: str = "--lora-r") -> None:
    """A rank at most min(in, out) of every layer it adapts: above it, A and B only add parameters
    (the update's rank cannot exceed the layer's)."""
    names = {name for t in lora.targets for name in TO_QVL[t]}
    layers = [(min(m.in_features, m.out_features), n.rsplit(".", 1)[-1], m.in_features, m.out_features)
              for n, m in llm.named_modules() if n.rsplit(".", 1)[-1] in names and isinstance(m, nn.Linear)]
    if layers and lora.r > min(layers)[0]:
        width, name, inp, out = min(layers)
        raise LoraError(f"{option} {lora.r}: above the width of a layer it adapts ({name}, {inp:,} -> {out:,}): "
                        f"a rank above min(in, out) = {width:,} adds parameters, not rank")


def apply(model: nn.Module, lora: LoraSettings, saved: tuple[str, ...], device: torch.device | None = None,
          option: str = "--lora-r"):
    """Freeze the whole model (as ``get_peft_model`` does: the ViT and adapter too), then LoRA on
    the LLM's targets and trainable copies of ``saved`` (release names, ``modules_to_save``);
    q, k, v share one A. Q-LoRA first quantises the base (``quantize_llm``) and prepares it with
    peft's ``prepare_model_for_kbit_training``. Returns peft's ``LoraModel`` (to merge)."""
    _peft()
    from peft import LoraConfig, prepare_model_for_kbit_training
    from peft.tuners.lora import LoraModel

    check_rank(model.llm, lora, option)
    model.requires_grad_(False)
    if lora.q_lora:
        quantize_llm(model.llm, device or torch.device("cpu"))
        prepare_model_for_kbit_training(model.llm, use_gradient_checkpointing=False)  # qvl's own checkpointing
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                        target_modules=[name for t in lora.targets for name in TO_QVL[t]],
                        modules_to_save=[name for release in saved for name in TO_QVL[release]] or None,
                        # a preset whose LLM ties embeddings and lm_head (tiny) keeps one trained copy of both
                        ensure_weight_tying=bool(getattr(model.llm.config, "tie_word_embeddings", False)))
    tuner = LoraModel(model.llm, config, ADAPTER)
    _share_fused(model.llm, [TO_QVL[t] for t in lora.targets])
    return tuner


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors LoRA trains, by name (a shared A once)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_adapters(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    with storage.atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable(model).items()}, str(tmp))


def read_adapters(path: Path, entries: dict | None = None) -> dict[str, torch.Tensor]:
    """``save_adapters``' tensors, each floating point (fp16/bf16 are upcast where they are copied)
    and finite, or one error naming the file and the tensor."""
    from safetensors.torch import load_file

    from qvl.trainer.checkpoint import CheckpointError, read_safetensors_header

    entries = read_safetensors_header(path) if entries is None else entries
    for key, entry in sorted(entries.items()):
        if entry.dtype not in FLOATS:
            raise CheckpointError(f"{path}: tensor {key} is {entry.dtype}; adapters are floating point "
                                  f"({', '.join(FLOATS)})")
    loaded = load_file(str(path))
    for key, tensor in sorted(loaded.items()):
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {key} holds NaN or infinite values ("
                                  f"{int((~torch.isfinite(tensor)).sum()):,} of {tensor.numel():,})")
    return loaded


def load_adapters(model: nn.Module, path: Path) -> None:
    """``save_adapters``'s file into a model ``apply`` prepared: the same names and shapes, or one
    error naming the file and the tensors."""
    from qvl.trainer.checkpoint import CheckpointError, read_safetensors_header

    entries = read_safetensors_header(path)
    own = trainable(model)
    wrong = sorted(set(entries) ^ set(own)) + sorted(
        f"{k} {tuple(e.shape)} (the model's {tuple(own[k].shape)})" for k, e in entries.items()
        if k in own and tuple(e.shape) != tuple(own[k].shape))
    if wrong:
        raise CheckpointError(f"{path}: not the adapters of this model and LoRA settings: {', '.join(wrong[:3])}"
                              + (f" and {len(wrong) - 3:,} more" if len(wrong) > 3 else ""))
    loaded = read_adapters(path, entries)
    with torch.no_grad():
        for key, tensor in loaded.items():
            own[key].copy_(tensor)


# ---------------------------------------------------------------- the base a run applies to


FINGERPRINT_BUDGET, SAMPLE_BYTES, MIN_SAMPLE_BYTES = 32 << 20, 64 << 10, 256
FLOATS = ("F16", "BF16", "F32", "F64")  # safetensors dtypes an adapter tensor may have


def fingerprint(path: Path) -> str:
    """sha256 of a safetensors file's header (names, dtypes, shapes, offsets), its size and
    three blocks of every tensor's bytes (start, middle, end; a small tensor whole). The block is
    64 KiB, shrunk so that all of them fit ``FINGERPRINT_BUDGET`` (32 MiB; ~11 KiB a block for
    the 9.6B model's ~1,000 tensors) but never below 256 bytes (so a file of more than ~44,000
    tensors reads 768 bytes a tensor): the read is bounded whatever the size, so checking a 19 GB base costs a fraction
    of a second, unlike a full hash (minutes). It survives a copy or a move (size and mtime
    would not). Sampling every tensor, not the file (where the embedding and ``lm_head`` fill
    most blocks), catches a base that differs in any tensor that changed throughout, as every
    weight a LoRA merge or a fine-tune touches does; a single edited value elsewhere would go unseen."""
    from qvl.trainer.checkpoint import read_safetensors_header

    entries = read_safetensors_header(path, LoraError)
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        h.update(f.read(length))  # read_safetensors_header bounds it
        h.update(str(size).encode())
        start = 8 + length
        block = max(MIN_SAMPLE_BYTES, min(SAMPLE_BYTES, FINGERPRINT_BUDGET // (3 * max(len(entries), 1))))
        for _, entry in sorted(entries.items(), key=lambda item: tuple(item[1].data_offsets)):
            begin, stop = entry.data_offsets
            if stop - begin <= 3 * block:
                spans = [(begin, stop - begin)]
            else:
                spans = [(begin, block), ((begin + stop - block) // 2, block), (stop - block, block)]
            for offset, n in spans:
                f.seek(start + offset)
                h.update(f.read(n))
    return "sha256-tensors:" + h.hexdigest()


def _legacy_fingerprint(path: Path) -> str:
    """The first releases' fingerprint (64 blocks of 64 KiB spread over the file): recomputed
    only to check a checkpoint that recorded one."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        h.update(f.read(min(length, 16 << 20)))
        h.update(str(size).encode())
        start = 8 + length
        for i in range(64):
            f.seek(start + (size - start) * i // 64)
            h.update(f.read(64 << 10))
    return "sha256-sampled:" + h.hexdigest()


def fingerprint_as(path: Path, recorded: str) -> str:
    """``path``'s fingerprint in the scheme of a ``recorded`` one (a run may predate the current one)."""
    return _legacy_fingerprint(path) if recorded.startswith("sha256-sampled:") else fingerprint(path)


class BaseRecord(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    fingerprint: str


class LoraRecord(msgspec.Struct, forbid_unknown_fields=True):
    """``meta.json``'s ``lora``: the settings and the base they apply to, in the ranges ``check``
    allows the options (a damaged record: one line naming the file and the field)."""

    r: Annotated[int, msgspec.Meta(ge=1, le=4096)]
    alpha: Annotated[float, msgspec.Meta(gt=0, le=MAX_ALPHA)]
    dropout: Annotated[float, msgspec.Meta(ge=0, lt=1)]
    targets: list[Literal["c_attn", "attn.c_proj", "w1", "w2"]]
    modules_to_save: list[Literal["wte", "lm_head"]]
    chat: bool
    q_lora: bool
    base: BaseRecord

    def settings(self) -> LoraSettings:
        return LoraSettings(self.r, self.alpha, self.dropout, tuple(self.targets), self.chat, self.q_lora)


class _Meta(msgspec.Struct):
    lora: LoraRecord | None = None


def record(lora: LoraSettings, init: Path) -> dict:
    """What a run's checkpoint says about its adapters (``LoraRecord``), for the --init base
    (recorded by its URL where it came from a bucket: the local mirror differs between machines)."""
    if not (init / "model.safetensors").is_file():
        raise LoraError(f"--init {init}: no model.safetensors (a LoRA run's checkpoint holds its adapters only; "
                        "qvl convert merge makes a base of it)")
    converted = msgspec.json.decode((init / "meta.json").read_bytes()).get("converted_from")  # checked: read_meta
    chat = lora.chat if lora.chat is not None else is_chat(init, converted if isinstance(converted, str) else None)
    return {"r": lora.r, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets),
            "modules_to_save": list(modules_to_save(lora, chat)), "chat": chat, "q_lora": lora.q_lora,
            "base": {"path": remote.origin(init), "fingerprint": fingerprint(init / "model.safetensors")}}


def read_record(folder: Path) -> LoraRecord | None:
    """The checkpoint's LoRA record, None for a checkpoint of whole weights."""
    from qvl.boundary import read_json_file
    from qvl.trainer.checkpoint import MAX_META_BYTES, CheckpointError

    path = folder / "meta.json"
    if not path.is_file():
        return None
    return read_json_file(path, _Meta, MAX_META_BYTES, CheckpointError).lora


def shown(path) -> str:
    """A path for a message: as it is, or escaped (repr) when it holds control characters (a
    recorded path is read from a file)."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def base_of(folder: Path, rec: LoraRecord, base: Path | None) -> Path:
    """The base checkpoint of a LoRA checkpoint: ``base`` (--base) or the recorded one, checked
    against the recorded fingerprint; a recorded URL is fetched (or its mirror reused)."""
    if base is not None:
        chosen = Path(base)
    elif remote.is_remote(rec.base.path):
        chosen = remote.input_any(rec.base.path, show_progress=False)  # a run's checkpoint/: inside its commit
    else:
        chosen = Path(rec.base.path)
    from qvl.trainer.checkpoint import weights_path

    recorded = shown(rec.base.path[:300] + ("…" if len(rec.base.path) > 300 else ""))
    try:
        weights = weights_path(chosen)  # a base with shards only: says to consolidate it
        present = weights.is_file()
    except OSError:  # a recorded path no file system takes (too long)
        weights, present = chosen / "model.safetensors", False
    if not present:
        if base is not None and read_record(chosen) is not None:
            raise LoraError(f"{folder}: LoRA adapters; --base {shown(chosen)} is a LoRA run's checkpoint too (adapters "
                            f"only), not a base: give the checkpoint they were trained on ({recorded})")
        given = f"--base {shown(chosen)}" if base is not None else f"its base {recorded}"
        raise LoraError(f"{folder}: LoRA adapters; {given} is missing (no model.safetensors): give --base with the "
                        f"checkpoint they were trained on ({recorded})")
    found = fingerprint_as(weights, rec.base.fingerprint)
    if found != rec.base.fingerprint:
        raise LoraError(f"{folder}: LoRA adapters trained on {recorded} ({shown(rec.base.fingerprint[-12:])}); "
                        f"{shown(chosen)} is another model ({found[-12:]}): give --base with the checkpoint they were "
                        "trained on")
    return chosen


def load_checkpoint(folder: str | Path, explicit_preset: str | None = None, base: Path | None = None):
    """``checkpoint.load_checkpoint``'s (model, preset, tokenizer, meta) for any checkpoint: whole
    weights, or a LoRA run's (its base with the adapters merged, ``load``)."""
    from qvl.trainer import checkpoint

    if read_record(Path(folder)) is not None:
        return load(Path(folder), explicit_preset, base)
    refuse_base(folder, base)
    return checkpoint.load_checkpoint(folder, explicit_preset)


def refuse_base(folder, base: Path | None) -> None:
    """--base names a LoRA run's base: for a checkpoint of whole weights it would be ignored."""
    if base is not None:
        raise LoraError(f"--base {base}: {folder} is not a LoRA run's checkpoint (it holds whole weights, no "
                        "adapters to apply to a base): drop --base")


def load(folder: Path, explicit_preset: str | None = None, base: Path | None = None, merge: bool = True):
    """(model in eval mode, preset, tokenizer, meta) of a LoRA checkpoint: its base (``base_of``)
    at the run's resolution, the adapters applied (on a full-precision base, also for Q-LoRA) and,
    with ``merge``, merged into it (peft's ``merge_and_unload``: a plain qvl model)."""
    from qvl.trainer.checkpoint import load_checkpoint, read_meta

    folder = Path(folder)
    rec = read_record(folder)
    model, preset, tok, _ = load_checkpoint(base_of(folder, rec, base), explicit_preset)
    meta = read_meta(folder)
    model.vision.set_resolution(meta.resolution)
    settings = rec.settings()
    settings.q_lora = False
    tuner = apply(model, settings, tuple(rec.modules_to_save), option=f"{folder / 'meta.json'}: lora.r")
    load_adapters(model, folder / ADAPTERS)
    if merge:
        tuner.merge_and_unload()
    return model.eval(), preset, tok, msgspec.structs.asdict(meta)


def write_merged(checkpoint: Path, out: Path, base: Path | None = None, dtype: torch.dtype | None = None) -> dict:
    """A LoRA checkpoint merged into its base, written as a plain qvl checkpoint folder."""
    from safetensors.torch import save_file

    from qvl.trainer.checkpoint import saved_names

    model, preset, _, meta = load(checkpoint, None, base)
    state = model.state_dict()
    weights = {k: (state[k].to(dtype) if dtype else state[k]).contiguous() for k in saved_names(model)}  # tied: once
    with storage.atomic_path(out / "model.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    storage.write_json(out / "preset.json", preset.to_dict())
    merged = {"stage": meta["stage"], "step": meta["step"], "preset": preset.name, "resolution": meta["resolution"],
              "merged_from": remote.origin(checkpoint), "tensors": len(weights)}
    storage.write_json(out / "meta.json", merged)
    return merged


# ---------------------------------------------------------------- the adapters for the release's model


QVL_TO_RELEASE = {"q_proj": "attn.c_attn", "k_proj": "attn.c_attn", "v_proj": "attn.c_attn", "o_proj": "attn.c_proj",
                  "up_proj": "mlp.w1", "gate_proj": "mlp.w2"}
LORA_KEY = re.compile(r"llm\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.default\.(?:down\.)?weight")
SAVED_KEY = {"llm.model.embed_tokens.modules_to_save.default.weight": "transformer.wte.weight",
             "llm.lm_head.modules_to_save.default.weight": "lm_head.weight"}


def release_adapters(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``save_adapters``' tensors in the names peft saves for the release's model: q, k and v's
    B stacked into ``c_attn``'s (their shared A is its A), the saved modules as ``wte``/``lm_head``."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key in SAVED_KEY:
            out[SAVED_KEY[key]] = tensor
            continue
        m = LORA_KEY.fullmatch(key)
        if m is None or m.group(2) not in QVL_TO_RELEASE:
            raise LoraError(f"{key}: not an adapter tensor qvl's LoRA trains")
        layer, proj, side = m.groups()
        name = f"transformer.h.{layer}.{QVL_TO_RELEASE[proj]}.lora_{side}.weight"
        if QVL_TO_RELEASE[proj] == "attn.c_attn" and side == "B":
            fused.setdefault(name, {})[proj] = tensor
        else:
            out[name] = tensor
    for name, parts in fused.items():
        out[name] = torch.cat([parts[p] for p in ("q_proj", "k_proj", "v_proj")])
    return {"base_model.model." + k: v.contiguous() for k, v in out.items()}


def export_peft(checkpoint: Path, out: Path) -> dict:
    """A LoRA run's adapters as a peft folder for the release's model (``adapter_config.json`` with
    finetune.py's config, ``adapter_model.safetensors``): ``PeftModel.from_pretrained`` on
    ``Qwen-VL(-Chat)`` loads them, as it loads the adapters of the release's own LoRA runs."""
    _peft()
    from peft import LoraConfig
    from safetensors.torch import save_file

    rec = read_record(checkpoint)
    if rec is None:
        raise LoraError(f"{checkpoint}: not a LoRA run's checkpoint (its meta.json has no lora record)")
    config = LoraConfig(r=rec.r, lora_alpha=rec.alpha, lora_dropout=rec.dropout, bias="none", task_type="CAUSAL_LM",
                        target_modules=list(rec.targets), modules_to_save=list(rec.modules_to_save) or None)
    tensors = release_adapters(read_adapters(checkpoint / ADAPTERS))
    try:
        storage.claim(out, "peft adapters")
    except storage.OutputError as e:
        raise LoraError(str(e)) from None
    config.save_pretrained(str(out))
    with storage.atomic_path(out / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return {"tensors": len(tensors), "bytes": (out / "adapter_model.safetensors").stat().st_size}


# ---------------------------------------------------------------- a run's checkpoint


def save_checkpoint(folder: Path, model: nn.Module, optimizer, loader_state: dict, step: int, world: int,
                    main: bool, preset, meta: dict) -> None:
    """A LoRA run's checkpoint: ``adapter.safetensors`` (the trainable tensors) in place of the
    whole model, and what ``checkpoint.save_checkpoint`` writes besides (a collective)."""
    loaders = [None] * world
    if world > 1:
        dist.all_gather_object(loaders, loader_state)
    else:
        loaders = [loader_state]
    if not main:
        return
    folder.mkdir(parents=True, exist_ok=True)
    save_adapters(model, folder / ADAPTERS)
    with storage.atomic_path(folder / "state.pt") as tmp:
        torch.save({"optimizer": optimizer.state_dict(), "loader": loaders, "step": step,
                    "torch_rng": torch.get_rng_state()}, tmp)
    storage.write_json(folder / "preset.json", preset.to_dict())
    storage.write_json(folder / "meta.json", meta)


def refuse_as_init(init: Path | None) -> None:
    """A full run's --init that is a LoRA run's checkpoint (adapters only): one line saying so
    and how to make a base of it."""
    if init is None:
        return
    init = Path(init)
    if not (init / "model.safetensors").is_file() and read_record(init) is not None:
        raise LoraError(f"--init {init}: a LoRA run's checkpoint (its adapters only, no model.safetensors): "
                        "qvl convert merge makes a base of it, or continue it with --lora on its base")


def check_resume_kind(folder: Path, record: dict | None) -> None:
    """A full run resumes a full run's checkpoint: a LoRA run's (adapters only) needs --lora."""
    from qvl.trainer.checkpoint import CheckpointError

    if record is None and read_record(folder) is not None:
        raise CheckpointError(f"{folder}: a LoRA run's checkpoint (adapters only): add --lora, with the run's "
                              "--lora-* settings, to resume it")


def resume(folder: Path, model: nn.Module, optimizer, loader, run_record: dict, init: Path) -> int:
    """Adapters, optimiser, data position and torch RNG of ``save_checkpoint``'s folder, once its
    LoRA record is the run's (same settings, same base by fingerprint: it may have moved; ``init``
    is where this run reads it); its step."""
    from qvl.trainer.checkpoint import CheckpointError, load_state
    from qvl.trainer.checkpoint import error_clause as why

    saved = read_record(folder)
    if saved is None:
        raise CheckpointError(f"{folder}: not a LoRA run's checkpoint (its meta.json has no lora record): "
                              "resume it without --lora")
    saved_rec = msgspec.to_builtins(saved)
    options = {"r": "--lora-r", "alpha": "--lora-alpha", "dropout": "--lora-dropout", "chat": "--lora-chat/--lora-base",
               "q_lora": "--q-lora", "modules_to_save": "--lora-chat/--lora-base"}
    for key, option in options.items():
        if saved_rec[key] != run_record[key]:
            raise CheckpointError(f"{folder}: its LoRA {key} is {saved_rec[key]!r}, this run's {run_record[key]!r} "
                                  f"({option}): resume with the checkpoint's settings")
    if saved_rec["targets"] != run_record["targets"]:
        raise CheckpointError(f"{folder}: its LoRA targets are {saved_rec['targets']!r}, this run's "
                              f"{run_record['targets']!r}")
    base = init / "model.safetensors"
    found = run_record["base"]["fingerprint"]
    if saved.base.fingerprint.split(":")[0] != found.split(":")[0]:
        found = fingerprint_as(base, saved.base.fingerprint)
    if found != saved.base.fingerprint:
        raise CheckpointError(f"{folder}: its LoRA base is {shown(saved.base.path)} ({shown(saved.base.fingerprint[-12:])}), "
                              f"this run's --init {shown(run_record['base']['path'])} another model ({found[-12:]})")
    load_adapters(model, folder / ADAPTERS)
    state = load_state(folder / "state.pt")  # weights-only; a damaged file is one line without torch's advice
    try:
        optimizer.load_state_dict(state["optimizer"])
        loader.restore(state["loader"])
        torch.set_rng_state(state["torch_rng"])
        return int(state["step"])
    except Exception as e:  # a state.pt of another run
        raise CheckpointError(f"{folder}: cannot resume from this checkpoint ({why(e)})") from None


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in trainable(model).values())

