"""A Qwen-VL-style model: open_clip ViT -> position-aware adapter -> causal LM.

The adapter is one cross-attention layer whose learnable queries (256 in Qwen-VL) read
the ViT's patch tokens; fixed 2-D sin-cos positions are added to queries and keys (the
queries' grid interpolated to the patch grid, at any resolution), not to values. Its outputs replace
the LLM's input embeddings at the ``<imgpad>`` positions, image by image, in order.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import torch
import torch.nn.functional as F
from torch import nn

from qvl.boundary import convert, decode_json
from qvl.errors import QvlError, RecordError

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

    def architecture(self) -> dict:
        """What the weights' shapes and computation depend on (the stage table does not)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("name", "stages")}


MAX_RESOLUTION = 4096  # image side a model is built at: 448 in the paper; 4096 px is 200 MB of pixels
MAX_PRESET_BYTES = 1 << 20
Dim = Annotated[int, msgspec.Meta(ge=1, le=1 << 16)]
Layers = Annotated[int, msgspec.Meta(ge=1, le=1024)]
Heads = Annotated[int, msgspec.Meta(ge=1, le=1024)]
Eps = Annotated[float, msgspec.Meta(gt=0, le=1)]
Resolution = Annotated[int, msgspec.Meta(ge=1, le=MAX_RESOLUTION)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


def _per_stage(kind):
    """One value per stage (1, 2, 3)."""
    return Annotated[list[kind], msgspec.Meta(min_length=3, max_length=3)]


class PresetError(QvlError):
    pass


class VisionSpec(msgspec.Struct, forbid_unknown_fields=True):
    open_clip_config: Name | None = None
    width: Dim | None = None
    layers: Layers | None = None
    heads: Heads | None = None
    patch_size: Annotated[int, msgspec.Meta(ge=1, le=1024)] | None = None
    mlp_ratio: Annotated[float, msgspec.Meta(gt=0, le=64)] | None = None
    class_token: bool | None = None
    pos_table: Annotated[int, msgspec.Meta(ge=1, le=1024)] | None = None
    norm_eps: Eps | None = None


class AdapterSpec(msgspec.Struct, forbid_unknown_fields=True):
    heads: Heads | None = None
    window: bool | None = None
    slot_positions: bool | None = None
    stored_positions: bool | None = None
    norm_eps: Eps | None = None


class LlmSpec(msgspec.Struct, forbid_unknown_fields=True):
    """The transformers Qwen2 fields a preset may set."""

    vocab_size: Annotated[int, msgspec.Meta(ge=1, le=1 << 22)] | None = None
    hidden_size: Dim | None = None
    num_hidden_layers: Layers | None = None
    num_attention_heads: Heads | None = None
    num_key_value_heads: Heads | None = None
    head_dim: Dim | None = None
    intermediate_size: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] | None = None
    max_position_embeddings: Annotated[int, msgspec.Meta(ge=1, le=1 << 24)] | None = None
    rms_norm_eps: Eps | None = None
    rope_theta: Annotated[float, msgspec.Meta(gt=0, le=1e12)] | None = None
    tie_word_embeddings: bool | None = None
    hidden_act: Literal["silu", "gelu", "relu", "gelu_new", "gelu_pytorch_tanh"] | None = None
    initializer_range: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    attention_dropout: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None


class StagesSpec(msgspec.Struct, forbid_unknown_fields=True):
    """Per-stage overrides of the paper's table (``stages.Stage``)."""

    resolution: _per_stage(Resolution) | None = None
    seq_len: _per_stage(Annotated[int, msgspec.Meta(ge=1, le=1 << 24)]) | None = None
    lr: _per_stage(Annotated[float, msgspec.Meta(gt=0, le=10)]) | None = None
    min_lr: _per_stage(Annotated[float, msgspec.Meta(ge=0, le=10)]) | None = None
    warmup_steps: _per_stage(Annotated[int, msgspec.Meta(ge=0, le=1 << 40)]) | None = None
    micro_batch: _per_stage(Annotated[int, msgspec.Meta(ge=1, le=1 << 16)]) | None = None
    accumulation: _per_stage(Annotated[int, msgspec.Meta(ge=1, le=1 << 16)]) | None = None
    max_steps: _per_stage(Annotated[int, msgspec.Meta(ge=0, le=1 << 40)]) | None = None
    weight_decay: _per_stage(Annotated[float, msgspec.Meta(ge=0, le=10)]) | None = None
    grad_clip: _per_stage(Annotated[float, msgspec.Meta(gt=0, le=1e6)]) | None = None
    vit_layer_decay: _per_stage(Annotated[float, msgspec.Meta(gt=0, le=1)]) | None = None
    eps: _per_stage(Eps) | None = None


class PresetSpec(msgspec.Struct, forbid_unknown_fields=True):
    """A preset file (``.toml``, or a checkpoint's ``preset.json``) as it may be written."""

    name: Name
    tokenizer: Name
    image_tokens: Annotated[int, msgspec.Meta(ge=1, le=4096)]
    vision: VisionSpec = msgspec.field(default_factory=VisionSpec)
    adapter: AdapterSpec = msgspec.field(default_factory=AdapterSpec)
    llm: LlmSpec = msgspec.field(default_factory=LlmSpec)
    stages: StagesSpec = msgspec.field(default_factory=StagesSpec)


def _set(spec: msgspec.Struct) -> dict:
    return {k: v for k, v in msgspec.structs.asdict(spec).items() if v is not None}


NAMED_TOKENIZERS = ("qwen-vl", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "bytes")  # those load_tokenizer knows by name


def _check_preset(spec: PresetSpec) -> str | None:
    """What makes a well-typed preset unbuildable, or None."""
    v, llm = spec.vision, spec.llm
    if spec.tokenizer not in NAMED_TOKENIZERS and not (Path(spec.tokenizer) / "tokenizer.json").is_file():
        return f"tokenizer {spec.tokenizer!r}: use {', '.join(NAMED_TOKENIZERS)}, or a folder holding tokenizer.json"
    if math.isqrt(spec.image_tokens) ** 2 != spec.image_tokens:
        return f"image_tokens {spec.image_tokens} must be a square number (the adapter's query grid)"
    if v.open_clip_config is None:
        missing = [k for k in ("width", "layers", "heads", "patch_size") if getattr(v, k) is None]
        if missing:
            return f"[vision] needs {', '.join(missing)} (or open_clip_config)"
        if v.width % v.heads:
            return f"[vision] width {v.width} is not a multiple of heads {v.heads}"
    if llm.hidden_size is not None and llm.num_attention_heads is not None and llm.head_dim is None \
            and llm.hidden_size % llm.num_attention_heads:
        return f"[llm] hidden_size {llm.hidden_size} is not a multiple of num_attention_heads {llm.num_attention_heads}"
    if llm.num_attention_heads is not None and llm.num_key_value_heads is not None \
            and llm.num_attention_heads % llm.num_key_value_heads:
        return "[llm] num_attention_heads must be a multiple of num_key_value_heads"
    if llm.hidden_size is not None and spec.adapter.heads is not None and llm.hidden_size % spec.adapter.heads:
        return f"[adapter] heads {spec.adapter.heads} must divide the LLM's hidden_size {llm.hidden_size}"
    return None


def preset_from_dict(data: object, where: str) -> ModelConfig:
    """A decoded preset (TOML table or JSON object), checked field by field, as a ``ModelConfig``."""
    try:
        spec = convert(data, PresetSpec)
    except RecordError as e:
        raise PresetError(f"{where}: not a qvl preset ({e})") from None
    problem = _check_preset(spec)
    if problem:
        raise PresetError(f"{where}: {problem}")
    return ModelConfig(spec.name, spec.tokenizer, spec.image_tokens, _set(spec.vision), _set(spec.adapter),
                       _set(spec.llm), _set(spec.stages))


def load_preset(name_or_path: str) -> ModelConfig:
    """A bundled preset by name (``tiny``, ``qwen-vl``), a preset ``.toml``, or the
    ``preset.json`` a checkpoint carries."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PRESETS / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESETS.glob("*.toml")))
        raise PresetError(f"preset {name_or_path!r}: not a file and not one of {known}")
    try:
        if path.stat().st_size > MAX_PRESET_BYTES:
            raise PresetError(f"{path}: larger than {MAX_PRESET_BYTES:,} bytes; not a qvl preset")
        raw = path.read_bytes()
    except OSError as e:
        raise PresetError(f"{path}: unreadable ({e.strerror or e})") from None
    try:
        data = decode_json(raw) if path.suffix == ".json" else tomllib.loads(raw.decode("utf-8"))
    except (RecordError, ValueError) as e:  # TOMLDecodeError, UnicodeDecodeError, an int of 4300+ digits
        raise PresetError(f"{path}: not a qvl preset ({str(e)[:300]})") from None
    except RecursionError:  # tomllib recurses once per nested array or table
        raise PresetError(f"{path}: not a qvl preset (nested too deeply)") from None
    return preset_from_dict(data, str(path))


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


LLM_NEEDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def check_buildable(cfg: ModelConfig, vocab_size: int, resolution: int, llm_path: str | None) -> None:
    """Refuse, before allocating anything, a preset whose model cannot be built here: an
    ``[llm]`` table without its sizes (transformers' defaults are a 7B model) or a model whose
    fp32 weights alone exceed this machine's memory (counted on the meta device). An LLM from a
    local folder (``--llm``) is the folder's own."""
    if llm_path is not None:
        return
    missing = [k for k in LLM_NEEDS if k not in cfg.llm]
    if missing:
        raise PresetError(f"preset {cfg.name}: [llm] needs {', '.join(missing)} (or give --llm PATH)")
    with torch.device("meta"):
        model = QwenVL(cfg, vocab_size, 0, resolution)
    parameters = sum(p.numel() for p in model.parameters())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if parameters * 4 > memory:
        raise PresetError(f"preset {cfg.name}: a model of {parameters / 1e9:.1f}B parameters "
                          f"({parameters * 4 / 2 ** 30:.0f} GiB in fp32), more than this machine's "
                          f"{memory / 2 ** 30:.0f} GiB of memory")


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
        if torch.empty(0).device.type != "meta":
            check_buildable(cfg, vocab_size, resolution, llm_path)
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
