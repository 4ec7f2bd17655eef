"""The position-aware vision-language adapter and its fixed 2-D sin-cos positions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qvl.trainer.vision import resize_positions


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
