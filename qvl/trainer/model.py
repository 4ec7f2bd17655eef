"""A Qwen-VL-style model: open_clip ViT -> position-aware adapter -> causal LM.

The adapter is one cross-attention layer whose learnable queries (256 in Qwen-VL) read
the ViT's patch tokens; fixed 2-D sin-cos positions are added to queries and keys (the
queries' grid interpolated to the patch grid, at any resolution), not to values. Its outputs replace
the LLM's input embeddings at the ``<imgpad>`` positions, image by image, in order.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PRESETS = Path(__file__).parent / "presets"


@dataclass
class ModelConfig:
    name: str
    tokenizer: str
    image_tokens: int
    vision: dict
    adapter: dict
    llm: dict
    stages: dict = field(default_factory=dict)


    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return cls(data["name"], data["tokenizer"], int(data["image_tokens"]), data.get("vision", {}),
                   data.get("adapter", {}), data.get("llm", {}), data.get("stages", {}))

    def architecture(self) -> dict:
        """What the weights' shapes and computation depend on (the stage table does not)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("name", "stages")}


def load_preset(name_or_path: str) -> ModelConfig:
    """A bundled preset by name (``tiny``, ``qwen-vl``), a preset ``.toml``, or the
    ``preset.json`` a checkpoint carries."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PRESETS / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.toml")))
        raise ValueError(f"preset {name_or_path!r}: not a file and not one of {known}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        return ModelConfig.from_dict(data)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a qvl preset ({e})") from None


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions (half the channels for y, half for x): [h*w, dim]."""
    if dim % 4:
        raise ValueError("sin-cos positions need a width divisible by 4")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        angles = coord[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def sincos_2d_xy(dim: int, side: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table, the order the released Qwen-VL stores (x half first, then y;
    sin then cos in each): [side*side, dim]."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half // 2, dtype=torch.float64) / (half / 2))
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coord in (xs.reshape(-1), ys.reshape(-1)):
        angles = coord[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


def resize_positions(table: torch.Tensor, side: int) -> torch.Tensor:
    """A square table of positions [n*n, C] resized to [side*side, C] by bicubic interpolation
    (torch's, a = -0.75, no antialiasing: what the release's get_abs_pos computes)."""
    old = int(math.isqrt(table.shape[0]))
    if old == side:
        return table
    grid = table.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(side * side, -1).to(table.dtype)


class PatchViT(nn.Module):
    """The released Qwen-VL's ViT: no class token; a learned position table of its own
    size (16x16: 224 / 14) resized to the patch grid at every forward, so one set of weights
    serves 224 and 448 px; LayerNorm eps 1e-6. Its blocks are open_clip's (the release's
    per-head q/k/v layout is permuted into nn.MultiheadAttention's at conversion)."""

    def __init__(self, cfg: dict):
        super().__init__()
        from functools import partial

        from open_clip.transformer import LayerNorm, Transformer

        width, table = cfg["width"], cfg.get("pos_table", 16)
        norm = partial(LayerNorm, eps=cfg.get("norm_eps", 1e-6))
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg["patch_size"], stride=cfg["patch_size"], bias=False)
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(table * table, width))
        self.ln_pre = norm(width)
        self.transformer = Transformer(width, cfg["layers"], cfg["heads"], cfg.get("mlp_ratio", 4.0),
                                       norm_layer=norm)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels)
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # [B, grid*grid, width], row-major
        x = x + resize_positions(self.positional_embedding, grid).to(x.dtype)
        return self.transformer(self.ln_pre(x))


class VisionEncoder(nn.Module):
    """All patch tokens of a ViT (no class token out, no pooling): open_clip's
    VisionTransformer (``class_token = true``, the default), or the release's ``PatchViT``."""

    def __init__(self, cfg: dict, image_size: int):
        super().__init__()
        from open_clip.transformer import VisionTransformer

        if "open_clip_config" in cfg:
            import open_clip

            oc = open_clip.get_model_config(cfg["open_clip_config"])["vision_cfg"]
            cfg = {"width": oc["width"], "layers": oc["layers"], "heads": oc["width"] // oc.get("head_width", 64),
                   "patch_size": oc["patch_size"], "mlp_ratio": oc.get("mlp_ratio", 4.0),
                   **{k: v for k, v in cfg.items() if k != "open_clip_config"}}
        self.cfg = dict(cfg)
        if cfg.get("class_token", True):
            self.vit = VisionTransformer(
                image_size=image_size, patch_size=cfg["patch_size"], width=cfg["width"], layers=cfg["layers"],
                heads=cfg["heads"], mlp_ratio=cfg.get("mlp_ratio", 4.0), output_dim=cfg["width"], output_tokens=True)
            self.vit.proj = None  # the pooled CLIP embedding is not used: every parameter must reach the loss
        else:
            self.vit = PatchViT(cfg)
        self.width = cfg["width"]
        self.patch_size = cfg["patch_size"]
        self.resolution = image_size

    @property
    def grid(self) -> int:
        return self.resolution // self.patch_size

    def set_resolution(self, size: int) -> None:
        """Interpolate the learned position embedding to a new square resolution (224 -> 448);
        ``PatchViT`` resizes its table at every forward and keeps it as it is."""
        if size == self.resolution:
            return
        if size % self.patch_size:
            raise ValueError(f"resolution {size} is not a multiple of the patch size {self.patch_size}")
        if isinstance(self.vit, PatchViT):
            self.resolution = size
            return
        old, new = self.grid, size // self.patch_size
        pos = self.vit.positional_embedding.data
        cls, grid = pos[:1], pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
        self.vit.positional_embedding = nn.Parameter(
            torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(new * new, -1)]), requires_grad=pos.requires_grad)
        self.vit.grid_size = (new, new)
        self.vit.image_size = (size, size)
        self.resolution = size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if isinstance(self.vit, PatchViT):
            return self.vit(pixels)
        _, tokens = self.vit(pixels)
        return tokens

    def layer_of(self, name: str) -> int:
        """Depth of a parameter for layer-wise LR decay: 0 embeddings, 1..L blocks, L+1 head."""
        if name.startswith("vit.transformer.resblocks."):
            return int(name.split(".")[3]) + 1
        if name.startswith(("vit.conv1", "vit.class_embedding", "vit.positional_embedding", "vit.ln_pre")):
            return 0
        return self.cfg["layers"] + 1


class Adapter(nn.Module):
    """Position-aware vision-language adapter: one cross-attention layer, learnable queries.

    Two options for models trained from scratch in minutes (the tiny preset; off in the
    paper's): ``window`` lets each query read only the patches inside its cell of the
    query grid, and ``slot_positions`` adds each query's 2-D position (projected) to its
    output token. A from-scratch ViT trained on captions spreads *what* is in the image
    over every patch, and a 3-layer LLM cannot recover slot order from RoPE alone: without
    both, the demo's model learns captions but never *where* (issue #4's note)."""

    def __init__(self, queries: int, kv_dim: int, out_dim: int, heads: int, window: bool = False,
                 slot_positions: bool = False, stored_positions: bool = False, norm_eps: float = 1e-5):
        super().__init__()
        side = int(math.isqrt(queries))
        if side * side != queries:
            raise ValueError(f"adapter queries must be a square number (got {queries})")
        self.side = side
        self.query = nn.Parameter(torch.randn(queries, out_dim) * 0.02)
        if stored_positions:  # the release's: a saved, frozen parameter, loaded as it was trained
            self.pos_embed = nn.Parameter(sincos_2d_xy(out_dim, side), requires_grad=False)
        else:  # computed, never saved
            self.register_buffer("pos_embed", sincos_2d(out_dim, side, side), persistent=False)
        self.kv_proj = nn.Linear(kv_dim, out_dim, bias=False)
        self.ln_q, self.ln_kv, self.ln_post = (nn.LayerNorm(out_dim, eps=norm_eps) for _ in range(3))
        self.attn = nn.MultiheadAttention(out_dim, heads, batch_first=True)
        # outputs start at the scale of the LLM's token embeddings (std 0.02), not 100x above it
        self.proj = nn.Parameter(torch.randn(out_dim, out_dim) * 0.02 * out_dim ** -0.5)
        self.out_dim = out_dim
        self.window = window
        self.slot_proj = nn.Linear(out_dim, out_dim, bias=False) if slot_positions else None
        if self.slot_proj is not None:
            nn.init.normal_(self.slot_proj.weight, std=0.02 * out_dim ** -0.5)

    def key_positions(self, grid: int) -> torch.Tensor:
        """The queries' positions interpolated to the patch grid (as Qwen-VL's get_abs_pos
        does): a key and a query at the same place in the image get the same position."""
        return resize_positions(self.pos_embed, grid)

    def window_mask(self, grid: int) -> torch.Tensor:
        """[queries, grid*grid] additive mask: a query sees the patches whose centre lies in
        its cell of the query grid (the nearest patch when its cell holds none)."""
        centre = (torch.arange(grid, dtype=torch.float64) + 0.5) * self.side / grid  # in query cells
        cell = centre.floor().long()
        qy, qx = torch.meshgrid(torch.arange(self.side), torch.arange(self.side), indexing="ij")
        py, px = torch.meshgrid(cell, cell, indexing="ij")
        inside = (qy.reshape(-1, 1) == py.reshape(1, -1)) & (qx.reshape(-1, 1) == px.reshape(1, -1))
        cy, cx = torch.meshgrid(centre, centre, indexing="ij")
        dist = (qy.reshape(-1, 1) + 0.5 - cy.reshape(1, -1)) ** 2 + (qx.reshape(-1, 1) + 0.5 - cx.reshape(1, -1)) ** 2
        nearest = F.one_hot(dist.argmin(1), grid * grid).bool()
        allowed = torch.where(inside.any(1, keepdim=True), inside, nearest)
        return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, n, _ = patches.shape
        grid = int(math.isqrt(n))
        key_pos = self.key_positions(grid).to(patches.dtype)
        kv = self.ln_kv(self.kv_proj(patches))
        q = self.ln_q(self.query).unsqueeze(0).expand(b, -1, -1)
        mask = self.window_mask(grid).to(device=patches.device, dtype=q.dtype) if self.window else None
        out, _ = self.attn(q + self.pos_embed.to(q.dtype), kv + key_pos, kv, attn_mask=mask, need_weights=False)
        out = self.ln_post(out) @ self.proj.to(out.dtype)
        if self.slot_proj is not None:
            out = out + self.slot_proj(self.pos_embed.to(out.dtype))
        return out


def build_llm(cfg: dict, vocab_size: int, llm_path: str | None) -> nn.Module:
    """A transformers Qwen2 causal LM from the preset's ``[llm]`` fields (``vocab_size`` there
    wins over the tokenizer's: a converted release has 151,936 rows), or a local folder."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if llm_path:
        return AutoModelForCausalLM.from_pretrained(llm_path, local_files_only=True, attn_implementation="sdpa",
                                                    torch_dtype=torch.float32)
    config = Qwen2Config(**{"vocab_size": vocab_size, "tie_word_embeddings": True, **cfg})
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config)


class QwenVL(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, image_pad_id: int, resolution: int,
                 llm_path: str | None = None):
        super().__init__()
        self.config = cfg
        self.image_pad_id = image_pad_id
        self.vision = VisionEncoder(cfg.vision, resolution)
        self.llm = build_llm(cfg.llm, vocab_size, llm_path)
        width = self.llm.get_input_embeddings().weight.shape[1]
        self.adapter = Adapter(cfg.image_tokens, self.vision.width, width, cfg.adapter.get("heads", 8),
                               cfg.adapter.get("window", False), cfg.adapter.get("slot_positions", False),
                               cfg.adapter.get("stored_positions", False), cfg.adapter.get("norm_eps", 1e-5))
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
