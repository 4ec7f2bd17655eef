"""The vision tower: open_clip's VisionTransformer, or the released Qwen-VL's ``PatchViT``,
giving all patch tokens at any square resolution."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qvl.trainer.preset import VisionConfig


def resize_positions(table: torch.Tensor, side: int) -> torch.Tensor:
    """A square table of positions [n*n, C] resized to [side*side, C] by bicubic interpolation
    (torch's, a = -0.75, no antialiasing: what the release's get_abs_pos computes)."""
    old = int(math.isqrt(table.shape[0]))
    if old == side:
        return table
    grid = table.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(side * side, -1).to(table.dtype)


def resize_class_positions(table: torch.Tensor, side: int) -> torch.Tensor:
    """open_clip's position table (class token, then a square grid) with its grid resized to
    side x side (bicubic); also used on a table read from a file for a sharded model."""
    old = int(math.isqrt(table.shape[0] - 1))
    if old == side:
        return table
    cls, grid = table[:1], table[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(side * side, -1)])


class PatchViT(nn.Module):
    """The released Qwen-VL's ViT: no class token; a learned position table of its own
    size (16x16: 224 / 14) resized to the patch grid at every forward, so one set of weights
    serves 224 and 448 px; LayerNorm eps 1e-6. Its blocks are open_clip's (the release's
    per-head q/k/v layout is permuted into nn.MultiheadAttention's at conversion)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        from functools import partial

        from open_clip.transformer import LayerNorm, Transformer

        width, table = cfg.width, cfg.pos_table
        norm = partial(LayerNorm, eps=cfg.norm_eps)
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(table * table, width))
        self.ln_pre = norm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio, norm_layer=norm)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels)
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # [B, grid*grid, width], row-major
        x = x + resize_positions(self.positional_embedding, grid).to(x.dtype)
        return self.transformer(self.ln_pre(x))


class VisionEncoder(nn.Module):
    """All patch tokens of a ViT (no class token out, no pooling): open_clip's
    VisionTransformer (``class_token = true``, the default), or the release's ``PatchViT``."""

    def __init__(self, cfg: VisionConfig, image_size: int):
        super().__init__()
        from open_clip.transformer import VisionTransformer

        self.cfg = cfg = cfg.resolved()
        if cfg.class_token:
            self.vit = VisionTransformer(
                image_size=image_size, patch_size=cfg.patch_size, width=cfg.width, layers=cfg.layers,
                heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, output_dim=cfg.width, output_tokens=True)
            self.vit.proj = None  # the pooled CLIP embedding is not used: every parameter must reach the loss
        else:
            self.vit = PatchViT(cfg)
        self.width = cfg.width
        self.patch_size = cfg.patch_size
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
        new = size // self.patch_size
        pos = self.vit.positional_embedding
        self.vit.positional_embedding = nn.Parameter(resize_class_positions(pos.data, new),
                                                     requires_grad=pos.requires_grad)
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
        return self.cfg.layers + 1
