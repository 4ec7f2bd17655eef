"""Presets: a model's architecture and stage table, from a bundled ``.toml``, a preset file or
a checkpoint's ``preset.json``. ``[vision]``, ``[adapter]`` and ``[llm]`` are typed settings
filled by ``recipes.fill`` (a misspelt key is an error naming the file, table and key);
the rest is decoded by msgspec against ``PresetSpec``.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import msgspec

from qvl.boundary import convert, decode_json
from qvl.errors import QvlError, RecordError
from qvl.recipes import RecipeError, fill, require, table

PRESETS = Path(__file__).parent / "presets"


@dataclass
class ModelConfig:
    name: str
    tokenizer: str
    image_tokens: int
    vision: VisionConfig
    adapter: AdapterConfig
    llm: LLMConfig
    stages: dict = field(default_factory=dict)  # StagesSpec's fields set: one value per stage
    # recompute each ViT block's and LLM layer's activations in the backward pass instead of keeping
    # them: a 9.6B model at 448 px with 2,048-token rows does not fit its activations otherwise
    activation_checkpointing: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def architecture(self) -> dict:
        """What the weights' shapes and computation depend on (the stage table and how
        activations are kept do not)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("name", "stages", "activation_checkpointing")}


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


def _check_bounds(config: object, bounds: dict[str, tuple]) -> None:
    """Each named field unset (None) or in [low, high]; ``(low, high, "above")``: in (low, high]."""
    for key, (low, high, *above) in bounds.items():
        value = getattr(config, key)
        if value is None:
            continue
        require((low < value if above else low <= value) and value <= high, key,
                f"{value!r} is out of range ({'above' if above else 'from'} {low} to {high})")


@dataclass
class VisionConfig:
    """``[vision]``: open_clip's VisionTransformer, or the release's ``PatchViT``
    (``class_token = false``); sizes left unset come from ``open_clip_config``."""

    open_clip_config: str | None = None
    width: int | None = None
    layers: int | None = None
    heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float | None = None  # unset: open_clip_config's, else 4.0
    class_token: bool = True
    pos_table: int = 16  # PatchViT's learned table is pos_table x pos_table
    norm_eps: float = 1e-6  # PatchViT's LayerNorms

    def __post_init__(self):
        require(self.open_clip_config is None or 1 <= len(self.open_clip_config) <= 200, "open_clip_config",
                "a name of 1 to 200 characters")
        _check_bounds(self, {"width": (1, 1 << 16), "layers": (1, 1024), "heads": (1, 1024),
                             "patch_size": (1, 1024), "mlp_ratio": (0, 64, "above"), "pos_table": (1, 1024),
                             "norm_eps": (0, 1, "above")})

    def resolved(self) -> VisionConfig:
        """Every size set: open_clip_config's where this leaves them unset, ``mlp_ratio`` 4.0."""
        sizes = {}
        if self.open_clip_config is not None:
            import open_clip

            oc = open_clip.get_model_config(self.open_clip_config)["vision_cfg"]
            sizes = {"width": oc["width"], "layers": oc["layers"], "heads": oc["width"] // oc.get("head_width", 64),
                     "patch_size": oc["patch_size"], "mlp_ratio": oc.get("mlp_ratio", 4.0)}
        sizes = {"mlp_ratio": 4.0, **sizes, **{k: v for k, v in dataclasses.asdict(self).items() if v is not None}}
        return VisionConfig(**{**sizes, "open_clip_config": None})


@dataclass
class AdapterConfig:
    """``[adapter]``: the cross-attention layer's heads and options (see ``Adapter``)."""

    heads: int = 8
    window: bool = False
    slot_positions: bool = False
    stored_positions: bool = False
    norm_eps: float = 1e-5

    def __post_init__(self):
        _check_bounds(self, {"heads": (1, 1024), "norm_eps": (0, 1, "above")})


HIDDEN_ACTS = ("silu", "gelu", "relu", "gelu_new", "gelu_pytorch_tanh")


@dataclass
class LLMConfig:
    """``[llm]``: the transformers Qwen2 fields a preset may set; unset (None): transformers'
    default, or for ``vocab_size`` the tokenizer's."""

    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int | None = None
    rms_norm_eps: float | None = None
    rope_theta: float | None = None
    tie_word_embeddings: bool = True
    hidden_act: str | None = None
    initializer_range: float | None = None
    attention_dropout: float | None = None

    def __post_init__(self):
        require(self.hidden_act is None or self.hidden_act in HIDDEN_ACTS, "hidden_act",
                f"{self.hidden_act!r}: use {', '.join(HIDDEN_ACTS)}")
        _check_bounds(self, {"vocab_size": (1, 1 << 22), "hidden_size": (1, 1 << 16), "num_hidden_layers": (1, 1024),
                             "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024),
                             "head_dim": (1, 1 << 16), "intermediate_size": (1, 1 << 20),
                             "max_position_embeddings": (1, 1 << 24), "rms_norm_eps": (0, 1, "above"),
                             "rope_theta": (0, 1e12, "above"), "initializer_range": (0, 1),
                             "attention_dropout": (0, 1)})

    def qwen2_fields(self) -> dict:
        """The fields set, as ``Qwen2Config`` keywords."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


PARTS = {"vision": VisionConfig, "adapter": AdapterConfig, "llm": LLMConfig}


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
    """A preset file (``.toml``, or a checkpoint's ``preset.json``) as it may be written, less
    its ``[vision]``, ``[adapter]`` and ``[llm]`` (``PARTS``, filled by ``recipes.fill``)."""

    name: Name
    tokenizer: Name
    image_tokens: Annotated[int, msgspec.Meta(ge=1, le=4096)]
    stages: StagesSpec = msgspec.field(default_factory=StagesSpec)
    activation_checkpointing: bool = False


NAMED_TOKENIZERS = ("qwen-vl", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "bytes")  # those load_tokenizer knows by name


def _check_preset(spec: ModelConfig) -> str | None:
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
    if not isinstance(data, dict):
        raise PresetError(f"{where}: not a qvl preset (the top level must be a table, not {type(data).__name__})")
    try:
        spec = convert({k: v for k, v in data.items() if k not in PARTS}, PresetSpec)
        parts = {part: fill(cls, table(data, part, where), f"{where}: [{part}]") for part, cls in PARTS.items()}
    except RecordError as e:
        raise PresetError(f"{where}: not a qvl preset ({e})") from None
    except RecipeError as e:
        raise PresetError(str(e)) from None
    config = ModelConfig(spec.name, spec.tokenizer, spec.image_tokens, **parts,
                         stages={k: v for k, v in msgspec.structs.asdict(spec.stages).items() if v is not None},
                         activation_checkpointing=spec.activation_checkpointing)
    problem = _check_preset(config)
    if problem:
        raise PresetError(f"{where}: {problem}")
    return config


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
