"""The key map between the released Qwen-VL's tensor names and qvl's: every tensor group with
the change of layout it needs each way. Pure names and reshapes, so conversion in either
direction, and the checks that every tensor is used once, read one table.

Two groups change layout, exactly and reversibly: the ViT's fused ``in_proj`` (interleaved per
head in the release, [all q; all k; all v] in ``nn.MultiheadAttention``) and the LLM's fused
``c_attn`` (split into Qwen2's ``q_proj``, ``k_proj``, ``v_proj``)."""

from __future__ import annotations

from typing import Callable

import torch

from qvl.trainer.preset import ModelConfig


def _per_head_to_mha(heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The release's in_proj rows (h0 q, h0 k, h0 v, h1 q …) -> [all q; all k; all v]."""
    def convert(t: torch.Tensor) -> torch.Tensor:
        width = t.shape[0] // 3
        return t.reshape(heads, 3, width // heads, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()
    return convert


def _mha_to_per_head(heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The inverse of ``_per_head_to_mha``: [all q; all k; all v] -> per head."""
    def convert(t: torch.Tensor) -> torch.Tensor:
        width = t.shape[0] // 3
        return t.reshape(3, heads, width // heads, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()
    return convert


def key_map(preset: ModelConfig) -> list[tuple[tuple[str, ...], tuple[str, ...], Callable, Callable]]:
    """(release keys, qvl keys, release -> qvl, qvl -> release), one entry per tensor group."""
    same = (lambda t: t, lambda t: t)
    entries: list = []

    def add(release, qvl, there=same[0], back=same[1]):
        entries.append(((release,) if isinstance(release, str) else release,
                        (qvl,) if isinstance(qvl, str) else qvl, there, back))

    v = "transformer.visual."
    add(v + "conv1.weight", "vision.vit.conv1.weight")
    add(v + "positional_embedding", "vision.vit.positional_embedding")
    for part in ("weight", "bias"):
        add(v + f"ln_pre.{part}", f"vision.vit.ln_pre.{part}")
        add(v + f"ln_post.{part}", f"adapter.ln_post.{part}")
    heads = preset.vision.heads
    for m in range(preset.vision.layers):
        src, dst = f"{v}transformer.resblocks.{m}.", f"vision.vit.transformer.resblocks.{m}."
        for name in ("ln_1", "ln_2", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
            for part in ("weight", "bias"):
                add(f"{src}{name}.{part}", f"{dst}{name}.{part}")
        for part in ("weight", "bias"):
            add(f"{src}attn.in_proj.{part}", f"{dst}attn.in_proj_{part}", _per_head_to_mha(heads),
                _mha_to_per_head(heads))
    add(v + "proj", "adapter.proj")
    p = v + "attn_pool."
    for name in ("pos_embed", "query", "kv_proj.weight", "attn.in_proj_weight", "attn.in_proj_bias",
                 "attn.out_proj.weight", "attn.out_proj.bias", "ln_q.weight", "ln_q.bias", "ln_kv.weight",
                 "ln_kv.bias"):
        add(p + name, "adapter." + name)
    add("transformer.wte.weight", "llm.model.embed_tokens.weight")
    add("transformer.ln_f.weight", "llm.model.norm.weight")
    add("lm_head.weight", "llm.lm_head.weight")
    for n in range(preset.llm.num_hidden_layers):
        src, dst = f"transformer.h.{n}.", f"llm.model.layers.{n}."
        add(src + "ln_1.weight", dst + "input_layernorm.weight")
        add(src + "ln_2.weight", dst + "post_attention_layernorm.weight")
        add(src + "attn.c_proj.weight", dst + "self_attn.o_proj.weight")
        add(src + "mlp.w1.weight", dst + "mlp.up_proj.weight")
        add(src + "mlp.w2.weight", dst + "mlp.gate_proj.weight")  # the release's SiLU branch
        add(src + "mlp.c_proj.weight", dst + "mlp.down_proj.weight")
        for part in ("weight", "bias"):
            add(src + f"attn.c_attn.{part}", tuple(dst + f"self_attn.{x}_proj.{part}" for x in "qkv"),
                lambda t: [c.contiguous() for c in t.chunk(3)], lambda *ts: torch.cat(ts))
    return entries
