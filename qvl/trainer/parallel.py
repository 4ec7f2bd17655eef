"""How the model is spread over ranks: one process, DDP (a whole replica per rank) or FSDP
(parameters, gradients and optimiser state sharded, one unit per ViT block and LLM layer,
for models that do not fit one device) — and the three things that differ between them:
wrapping, skipping the gradient sync inside an accumulation, whole-model checkpoints.

Both DDP and FSDP average gradients over ranks, so the loop's loss scaling is the same.
Weights are always saved whole (gathered to rank 0): a stage trained under FSDP starts the
next one (``--init``) under DDP or on one process, and the reverse.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def wrap(model: nn.Module, world: int, fsdp: bool) -> nn.Module:
    if world == 1:
        return model
    if not fsdp:
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for block in model.vision.vit.transformer.resblocks:
        fully_shard(block)
    for layer in model.llm.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


@contextlib.contextmanager
def no_sync(wrapped: nn.Module, world: int, fsdp: bool):
    """Accumulate gradients locally (no all-reduce / reduce-scatter) inside the block."""
    if world == 1:
        yield
    elif fsdp:
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        with wrapped.no_sync():
            yield


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Whole model and optimiser state dicts (on rank 0; every rank must call this)."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return (get_model_state_dict(model, options=_options()),
            get_optimizer_state_dict(model, optimizer, options=_options()))


def unique_tensors(state: dict) -> dict:
    """Tied weights (the LLM's embeddings and output layer) once: safetensors refuses aliases."""
    seen, out = set(), {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.shape)
        if key not in seen:
            seen.add(key)
            out[name] = tensor.contiguous()
    return out


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optim_state: dict) -> None:
    """The reverse of ``full_state`` under FSDP: rank 0's whole state dicts spread to every rank."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, model_state, options=_options(broadcast_from_rank0=True, strict=False))
    set_optimizer_state_dict(model, optimizer, optim_state, options=_options(broadcast_from_rank0=True))


def grad_norm(value) -> float:
    """clip_grad_norm_'s result as a number (a DTensor under FSDP)."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)
