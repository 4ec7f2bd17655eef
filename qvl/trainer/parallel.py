"""How the model is spread over ranks: one process, DDP (a whole replica per rank) or FSDP2
(``fully_shard`` per ViT block and LLM layer, then the rest: parameters, gradients and
optimiser state sharded, for models that do not fit one device).

Under FSDP the model is built on the meta device (no memory), sharded, and each rank then
fills only its own shards from the weights' files, one tensor at a time (``build_sharded``):
started from files (``--init``, ``--llm``) no rank holds the whole model. Checkpoints are
sharded too (``checkpoint``, DCP). ``--cpu-offload`` keeps the shards, their gradients and
the AdamW step in host memory (FSDP2's ``CPUOffloadPolicy``).

Precision under FSDP with bf16 on (``policies``): compute in bf16 (parameters all-gathered
in bf16), gradients reduced in fp32, the trained parameters kept as fp32 sharded master
weights with fp32 AdamW state. bf16 master weights would lose the small updates of fine
tuning: next to a weight of 1.0 bf16 holds steps of 2**-7 = 0.0078, so an AdamW update of
lr 1e-5 (|Δ| ≈ 1e-5) rounds back to the same weight, step after step (``tests``:
``test_bf16_master_weights_lose_small_updates``). Parts the stage freezes (stage 1's LLM,
stage 3's ViT) have no update to lose: they are stored in bf16 (``freeze_in_bf16``), half
their memory, and computed from exactly as before (the compute was bf16 already).

Both DDP and FSDP average gradients over ranks, so the loop's loss scaling is the same.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Mapping

import torch
from torch import nn

from qvl.errors import QvlError


class ShardingError(QvlError):
    """A model that cannot be built sharded as asked (a tensor the weights do not hold)."""


def policies(bf16: bool, cpu_offload: bool) -> dict:
    """``fully_shard``'s keyword arguments: the precision described above (fp32 everywhere when
    bf16 is off: FSDP's default), and CPU offload (sharded parameters, gradients and the
    optimiser step on the CPU; the device only holds a unit's gathered parameters)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    precision = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    return {"mp_policy": precision, "offload_policy": offload}


def freeze_in_bf16(model: nn.Module) -> None:
    """Frozen parameters stored in bf16 (before sharding): no optimiser reads them, no update
    can be lost, the forward casts them to bf16 anyway."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(torch.bfloat16)


def shard(model: nn.Module, bf16: bool, cpu_offload: bool) -> None:
    """``fully_shard`` each ViT block and LLM layer, then the root (embeddings, adapter, head)."""
    from torch.distributed.fsdp import fully_shard

    if bf16:
        freeze_in_bf16(model)
    kwargs = policies(bf16, cpu_offload)
    for block in model.vision.vit.transformer.resblocks:
        fully_shard(block, **kwargs)
    for layer in model.llm.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def wrap(model: nn.Module, world: int) -> nn.Module:
    """The model under DDP (one process: itself)."""
    return model if world == 1 else nn.parallel.DistributedDataParallel(model)


def _fresh_buffer(module: nn.Module, name: str) -> torch.Tensor:
    """A non-persistent buffer (in no file: computed by its module's constructor) computed again
    after a meta build; each kind the model has is named here, any other is an error."""
    from qvl.trainer.adapter import Adapter, sincos_2d

    if isinstance(module, Adapter) and name == "pos_embed":
        return sincos_2d(module.out_dim, module.side, module.side)
    if hasattr(module, "rope_type") and name in ("inv_freq", "original_inv_freq"):  # transformers' RoPE
        with torch.device("cpu"):
            return getattr(type(module)(config=module.config), name)
    raise ShardingError(f"{type(module).__name__}.{name}: a computed buffer a meta-device build cannot fill")


def fill(model: nn.Module, weights: Mapping[str, torch.Tensor], what: str,
         adapt: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, tensor: tensor) -> None:
    """Every tensor of a sharded model after ``to_empty``: ``weights[name]`` (read now, whole,
    then dropped), ``adapt``-ed in fp32 (a position table resized, as an eager build does after
    loading into fp32), this rank's rows of it copied into the rank's shard (FSDP2 shards dim 0
    as ``torch.chunk``); tied names read once; computed buffers computed again."""
    from torch.distributed.tensor import DTensor, Shard

    groups: dict[int, list[str]] = {}
    state = model.state_dict(keep_vars=True)
    for name, tensor in state.items():
        groups.setdefault(id(tensor), []).append(name)
    with torch.no_grad():
        for names in groups.values():
            target = state[names[0]]
            name = next((n for n in names if n in weights), None)
            if name is None:
                raise ShardingError(f"{what}: no tensor {names[0]}")
            full = weights[name]
            full = adapt(name, full.float() if full.is_floating_point() else full)  # as an eager build: fp32, then cast
            if tuple(full.shape) != tuple(target.shape):
                raise ShardingError(f"{what}: tensor {name} has shape {tuple(full.shape)}, the model's "
                                    f"{tuple(target.shape)}")
            if isinstance(target, DTensor):
                if tuple(target.placements) != (Shard(0),):
                    raise ShardingError(f"{name}: placed {target.placements}, not FSDP's Shard(0)")
                mesh = target.device_mesh
                chunks = full.chunk(mesh.size(), dim=0)
                rank = mesh.get_local_rank()
                local = target.to_local()
                if local.numel():
                    local.copy_(chunks[rank])
            else:
                target.copy_(full)
            del full
        for module in model.modules():
            for name in module._non_persistent_buffers_set:
                getattr(module, name).copy_(_fresh_buffer(module, name))


def build_sharded(build: Callable[[], nn.Module], weights: Mapping[str, torch.Tensor], what: str,
                  device: torch.device, bf16: bool, cpu_offload: bool,
                  adapt: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, tensor: tensor) -> nn.Module:
    """``build()`` on the meta device, sharded, its shards allocated (on the CPU under offload)
    and filled from ``weights`` (``fill``); buffers (not sharded) on ``device``."""
    with torch.device("meta"):
        model = build()
    shard(model, bf16, cpu_offload)
    model.to_empty(device="cpu" if cpu_offload else device)
    fill(model, weights, what, adapt)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)
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


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A whole checkpoint's ``optimizer.state_dict()`` (parameters numbered in the optimiser's
    order) keyed by parameter names instead, as FSDP's ``set_optimizer_state_dict`` reads it;
    this run's optimiser is built the same way (``param_groups``), so number i is its i-th
    parameter. A state already keyed by names passes through."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = {id(p): name for name, p in model.named_parameters()}
    groups = state.get("param_groups", [])
    numbered = [i for group in groups for i in group.get("params", [])]
    if not numbered or not all(isinstance(i, int) for i in numbered):
        return state
    if sorted(numbered) != list(range(len(params))) or len(groups) != len(optimizer.param_groups):
        raise ShardingError(f"the checkpoint's optimiser holds {len(numbered)} parameters in {len(groups)} groups, "
                            f"this run's {len(params)} in {len(optimizer.param_groups)}")
    fqn = [names[id(p)] for p in params]
    return {"state": {fqn[i]: value for i, value in state.get("state", {}).items()},
            "param_groups": [{**group, "params": [fqn[i] for i in group["params"]]} for group in groups]}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                    optim_state: dict) -> None:
    """A whole-model checkpoint (one process or DDP wrote it) into a sharded model: rank 0's
    state dicts spread to every rank."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=True)
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                     broadcast_from_rank0=True, strict=False))
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)


def grad_norm(value) -> float:
    """clip_grad_norm_'s result as a number (a DTensor under FSDP)."""
    return float(value.full_tensor() if hasattr(value, "full_tensor") else value)
