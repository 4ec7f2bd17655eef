"""A Qwen-VL-style model: open_clip ViT (``vision``) -> position-aware adapter (``adapter``)
-> causal LM, from a preset (``preset``).

The adapter is one cross-attention layer whose learnable queries (256 in Qwen-VL) read
the ViT's patch tokens; fixed 2-D sin-cos positions are added to queries and keys (the
queries' grid interpolated to the patch grid, at any resolution), not to values. Its outputs replace
the LLM's input embeddings at the ``<imgpad>`` positions, image by image, in order.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from qvl.trainer.adapter import Adapter
from qvl.trainer.preset import LLMConfig, ModelConfig, PresetError
from qvl.trainer.vision import VisionEncoder

LLM_NEEDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def check_buildable(cfg: ModelConfig, vocab_size: int, resolution: int, llm_path: str | None,
                    shards: int = 1) -> None:
    """Refuse, before allocating anything, a preset whose model cannot be built here: an
    ``[llm]`` table without its sizes (transformers' defaults are a 7B model) or a model whose
    fp32 weights alone exceed this machine's memory (counted on the meta device; under FSDP
    this machine holds 1/``shards`` of them: its processes' shares). An LLM from a local folder (``--llm``) is the
    folder's own."""
    if llm_path is not None:
        return
    missing = [k for k in LLM_NEEDS if getattr(cfg.llm, k) is None]
    if missing:
        raise PresetError(f"preset {cfg.name}: [llm] needs {', '.join(missing)} (or give --llm PATH)")
    with torch.device("meta"):
        model = QwenVL(cfg, vocab_size, 0, resolution)
    parameters = sum(p.numel() for p in model.parameters())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if parameters * 4 / shards > memory:
        raise PresetError(f"preset {cfg.name}: a model of {parameters / 1e9:.1f}B parameters "
                          f"({parameters * 4 / 2 ** 30:.0f} GiB in fp32"
                          f"{f', over {shards} processes' if shards > 1 else ''}), more than this machine's "
                          f"{memory / 2 ** 30:.0f} GiB of memory")


def build_llm(cfg: LLMConfig, vocab_size: int, llm_path: str | None) -> nn.Module:
    """A transformers Qwen2 causal LM from the preset's ``[llm]`` fields (``vocab_size`` there
    wins over the tokenizer's: a converted release has 151,936 rows), or a local folder."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if llm_path and torch.empty(0).device.type == "meta":  # a sharded build: the folder's architecture, filled later
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(llm_path, local_files_only=True)
        config._attn_implementation = "sdpa"
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if llm_path:
        return AutoModelForCausalLM.from_pretrained(llm_path, local_files_only=True, attn_implementation="sdpa",
                                                    torch_dtype=torch.float32)
    config = Qwen2Config(**{"vocab_size": vocab_size, **cfg.qwen2_fields()})
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config)


class QwenVL(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, image_pad_id: int, resolution: int,
                 llm_path: str | None = None, llm_on_meta: bool = False):
        """``llm_on_meta``: the LLM only as an architecture (the meta device), the ViT and adapter
        built for real: the random weights a whole build gives them, for a sharded build whose
        LLM comes from a folder (loading one draws no random numbers)."""
        super().__init__()
        if torch.empty(0).device.type != "meta":
            check_buildable(cfg, vocab_size, resolution, llm_path)
        self.config = cfg
        self.image_pad_id = image_pad_id
        self.vision = VisionEncoder(cfg.vision, resolution)
        with torch.device("meta") if llm_on_meta else contextlib.nullcontext():
            self.llm = build_llm(cfg.llm, vocab_size, llm_path)
        width = self.llm.get_input_embeddings().weight.shape[1]
        a = cfg.adapter
        self.adapter = Adapter(cfg.image_tokens, self.vision.width, width, a.heads, a.window, a.slot_positions,
                               a.stored_positions, a.norm_eps)
        if self.llm.get_input_embeddings().weight.shape[0] < vocab_size:
            raise ValueError(f"the LLM's embedding has {self.llm.get_input_embeddings().weight.shape[0]:,} rows; "
                             f"the tokenizer needs {vocab_size:,}")
        self.image_token_spread: float | None = None  # std across a batch's images, averaged

    def set_trainable(self, parts: tuple[str, ...]) -> None:
        """Train the named parts (vision, adapter, llm); what the release keeps fixed stays fixed."""
        for part in ("vision", "adapter", "llm"):
            getattr(self, part).requires_grad_(part in parts)
        if isinstance(self.adapter.pos_embed, nn.Parameter):
            self.adapter.pos_embed.requires_grad_(False)

    def set_activation_checkpointing(self, on: bool) -> None:
        """Keep only each ViT block's and LLM layer's input in the forward pass and recompute the
        rest in the backward (non-reentrant: the gradients are the ones kept activations give)."""
        self.vision.vit.transformer.grad_checkpointing = on
        if on:
            self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            self.llm.config.use_cache = False  # a KV cache is for generation; with recomputation it is refused
        else:
            self.llm.activation_checkpointing_disable()

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.vision(pixels))

    def embed(self, input_ids: torch.Tensor, pixels: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the adapter's outputs at the ``<imgpad>`` positions. Without
        images the vision tower still runs (on one blank image, adding zero), so data-parallel
        ranks with and without images run the same graph."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_pad = input_ids == self.image_pad_id
        if pixels is None or pixels.shape[0] == 0:
            size = self.vision.resolution
            blank = torch.zeros(1, 3, size, size, device=embeds.device, dtype=embeds.dtype)
            return embeds + 0.0 * self.image_features(blank).sum()
        features = self.image_features(pixels).to(embeds.dtype)
        if features.shape[0] > 1:  # LEARNING.md: collapse shows as this falling towards 0
            self.image_token_spread = float(features.detach().float().std(0).mean())
        if int(is_pad.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(f"{int(is_pad.sum())} <imgpad> tokens for {features.shape[0]} images of "
                             f"{features.shape[1]} tokens each")
        return embeds.masked_scatter(is_pad.unsqueeze(-1), features.reshape(-1, features.shape[-1]))

    def forward(self, input_ids: torch.Tensor, pixels: torch.Tensor | None, attention_mask=None,
                position_ids=None) -> torch.Tensor:
        """Logits over the vocabulary for every position."""
        out = self.llm(inputs_embeds=self.embed(input_ids, pixels), attention_mask=attention_mask,
                       position_ids=position_ids)
        return out.logits
