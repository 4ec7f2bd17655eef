"""A qvl checkpoint folder: ``model.safetensors`` (the whole model), ``preset.json`` (the
architecture it was built with), ``meta.json`` (stage, step, resolution) and, for resuming,
``state.pt`` (``save_checkpoint`` writes a run's, ``resume`` reads it back). The preset
travels with the weights, so ``qvl generate``, ``qvl train --init`` (and evaluation) need no
``--preset``; one given that builds another architecture is an error.

Every file is decoded here into a typed, ranged structure before anything is built from it:
``meta.json`` into ``CheckpointMeta``, a ``.safetensors`` header into ``TensorEntry``s whose
offsets are checked against the file's size (a truncated file or a header that claims 4 TB is
one error naming the file, never a read past its end).
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Annotated

import msgspec
import torch
import torch.distributed as dist

from qvl.boundary import Count, decode_json, read_json_file
from qvl.common import storage
from qvl.errors import QvlError, RecordError
from qvl.trainer import parallel
from qvl.trainer.model import QwenVL
from qvl.trainer.preset import ModelConfig, Name, Resolution, load_preset

MAX_HEADER_BYTES = 16 << 20  # a safetensors header: Qwen-VL-Chat's largest is ~100 KB
MAX_META_BYTES = 1 << 20

# safetensors dtype -> bytes per element (the format's whole list)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class CheckpointError(QvlError):
    pass


class CheckpointMeta(msgspec.Struct):
    """``meta.json``: what a checkpoint says about itself (other keys are kept by whoever wrote them)."""

    resolution: Resolution
    stage: Annotated[int, msgspec.Meta(ge=0, le=3)] = 0
    step: Count = 0
    preset: Name | None = None


class TensorEntry(msgspec.Struct, forbid_unknown_fields=True):
    """One tensor of a safetensors header: dtype, shape, [begin, end) in the data after the header."""

    dtype: str
    shape: Annotated[list[Count], msgspec.Meta(max_length=16)]
    data_offsets: Annotated[list[Count], msgspec.Meta(min_length=2, max_length=2)]


def read_safetensors_header(path: Path, error=CheckpointError) -> dict[str, TensorEntry]:
    """The tensors of a ``.safetensors`` file from its header alone (the first 8 bytes give the
    header's length, refused above ``MAX_HEADER_BYTES`` before it is read), each checked to lie
    inside the file: in order, without gaps or overlaps, ending where the file ends."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise error(f"{path}: truncated ({size} bytes; a safetensors file starts with an 8-byte header length)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise error(f"{path}: not a safetensors file, or truncated (its header claims {length:,} bytes; "
                            f"the file holds {size:,}, and qvl reads headers up to {MAX_HEADER_BYTES:,})")
            header = f.read(length)
    except OSError as e:
        raise error(f"{path}: unreadable ({e.strerror or e})") from None
    try:
        raw = decode_json(header, dict[str, msgspec.Raw])
        raw.pop("__metadata__", None)
        entries = {key: decode_json(value, TensorEntry) for key, value in raw.items()}
    except RecordError as e:
        raise error(f"{path}: a damaged safetensors header ({e})") from None
    data_bytes, end = size - 8 - length, 0
    for key, entry in sorted(entries.items(), key=lambda item: tuple(item[1].data_offsets)):
        begin, stop = entry.data_offsets
        if entry.dtype not in DTYPE_BYTES:
            raise error(f"{path}: tensor {key}: unknown dtype {entry.dtype[:20]!r}")
        if begin != end or stop - begin != math.prod(entry.shape) * DTYPE_BYTES[entry.dtype]:
            raise error(f"{path}: tensor {key}: its bytes [{begin:,}, {stop:,}) do not fit its shape "
                        f"{tuple(entry.shape)} of {entry.dtype} after the previous tensor (ends at {end:,})")
        end = stop
    if end != data_bytes:
        raise error(f"{path}: truncated or padded: its header describes {end:,} bytes of tensors, "
                    f"the file holds {data_bytes:,}")
    return entries


def read_meta(folder: Path) -> CheckpointMeta:
    path = folder / "meta.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a checkpoint folder (no meta.json; give a run's checkpoint/ folder "
                              "or the --out of qvl convert)")
    return read_json_file(path, CheckpointMeta, MAX_META_BYTES, CheckpointError)


def read_preset(folder: str | Path, explicit: str | None = None) -> ModelConfig:
    """The checkpoint's preset; ``explicit`` (a name or file) may replace it only when it
    builds the same architecture (its stage table may differ)."""
    folder = Path(folder)
    carried = folder / "preset.json"
    chosen = load_preset(explicit) if explicit else None
    if not carried.is_file():  # checkpoints written before presets travelled with them
        if chosen is None:
            meta = read_meta(folder)
            try:
                return load_preset(meta.preset or "tiny")
            except QvlError:
                raise CheckpointError(f"{folder}: no preset.json; give the preset it was trained with "
                                      "(--preset)") from None
        return chosen
    own = load_preset(str(carried))
    if chosen is not None and chosen.architecture() != own.architecture():
        raise CheckpointError(f"--preset {explicit}: builds another model than the checkpoint {folder} holds "
                              f"(its preset: {own.name}); leave --preset out to use the checkpoint's")
    return chosen or own


FLOATING = {"F16", "BF16", "F32", "F64"}  # a model's weights; anything else is not a checkpoint qvl wrote


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n:,} more" if len(items) > n else "")


def load_weights(model: QwenVL, path: Path, what: str) -> None:
    """``path`` into ``model``; a damaged file, one of another architecture (keys or shapes that
    differ, named a few at a time), weights that are not floating point or not finite, is one
    error naming the file and the tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    entries = read_safetensors_header(path)
    odd = sorted(f"{key} ({entry.dtype})" for key, entry in entries.items() if entry.dtype not in FLOATING)
    if odd:
        raise CheckpointError(f"{path}: tensors that are not floating point ({', '.join(sorted(FLOATING))}): "
                              f"{_few(odd)}")
    own = model.state_dict()
    shapes = sorted(f"{key} {tuple(entry.shape)} (the model's {tuple(own[key].shape)})"
                    for key, entry in entries.items() if key in own and tuple(entry.shape) != tuple(own[key].shape))
    stored = {own[key].data_ptr() for key in entries if key in own}
    missing = sorted(key for key in own if key not in entries and own[key].data_ptr() not in stored)  # tied: saved once
    unexpected = sorted(key for key in entries if key not in own)
    for problem, keys in (("shapes that differ", shapes), ("missing tensors", missing),
                          ("tensors the model does not have", unexpected)):
        if keys:
            raise CheckpointError(f"{path}: not weights of {what}: {problem}: {_few(keys)}")
    try:
        load_model(model, str(path))
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        raise CheckpointError(f"{path}: cannot load into {what} ({' '.join(str(e).split())[:300]})") from None
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {key} holds NaN or infinite values; a model cannot run on it")


def load_checkpoint(folder: str | Path, explicit_preset: str | None = None):
    """(model in eval mode, preset, tokenizer, meta) of a checkpoint folder, on the CPU;
    ``meta`` is ``meta.json``'s checked fields as a dict."""
    from qvl.formats.tokenizers import IMG_PAD, load_tokenizer

    folder = Path(folder)
    meta = read_meta(folder)
    preset = read_preset(folder, explicit_preset)
    tok = load_tokenizer(preset.tokenizer)
    model = QwenVL(preset, tok.vocab_size, tok.special(IMG_PAD), meta.resolution)
    load_weights(model, folder / "model.safetensors", f"preset {preset.name}")
    return model.eval(), preset, tok, msgspec.structs.asdict(meta)


def save_checkpoint(folder: Path, model: QwenVL, optimizer, loader_state: dict, step: int, fsdp: bool, world: int,
                    main: bool, preset: ModelConfig, meta: dict) -> None:
    """A training run's checkpoint: whole weights, optimiser, every rank's data position and the
    torch RNG (``state.pt``, for resuming), ``preset.json`` and ``meta.json``. A collective:
    every rank calls it, rank 0 writes."""
    from safetensors.torch import save_file, save_model

    loaders = [None] * world
    if world > 1:
        dist.all_gather_object(loaders, loader_state)
    else:
        loaders = [loader_state]
    weights, optimizer_state = parallel.full_state(model, optimizer, fsdp)  # a collective under FSDP
    if not main:
        return
    folder.mkdir(parents=True, exist_ok=True)
    with storage.atomic_path(folder / "model.safetensors") as tmp:
        if fsdp:
            save_file(parallel.unique_tensors(weights), str(tmp))
        else:
            save_model(model, str(tmp))
    with storage.atomic_path(folder / "state.pt") as tmp:
        torch.save({"optimizer": optimizer_state, "loader": loaders, "step": step,
                    "torch_rng": torch.get_rng_state()}, tmp)
    storage.write_json(folder / "preset.json", preset.to_dict())
    storage.write_json(folder / "meta.json", meta)


def resume(folder: Path, model: QwenVL, optimizer, loader, fsdp: bool, main: bool) -> int:
    """Weights, optimiser, the data position and the torch RNG from ``save_checkpoint``'s
    folder; its step. The loader is given every rank's position (the run may have had another
    world size). Anything damaged is one CheckpointError naming the folder."""
    from safetensors.torch import load_file, load_model

    try:
        state = torch.load(folder / "state.pt", weights_only=True)
        if fsdp:
            weights = load_file(str(folder / "model.safetensors")) if main else {}
            parallel.load_full_state(model, optimizer, weights, state["optimizer"] if main else {})
        else:
            load_model(model, str(folder / "model.safetensors"))
            optimizer.load_state_dict(state["optimizer"])
        loader.restore(state["loader"])
        step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
    except Exception as e:  # torch/safetensors raise many types for a damaged file
        raise CheckpointError(f"{folder}: cannot resume from this checkpoint ({type(e).__name__}: "
                              f"{str(e)[:300]})") from None
    return step
