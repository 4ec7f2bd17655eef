"""The released Qwen-VL (``Qwen/Qwen-VL``, ``Qwen/Qwen-VL-Chat``) and qvl checkpoints, both ways.

``config.json`` becomes a qvl preset whose options reproduce the release's computation
(``../shared/QWEN_VL_RELEASE.md``): a ViT without class token whose 16x16 position table is
resized to the patch grid at every forward, the adapter's stored ``pos_embed``, LayerNorm eps
1e-6, and Qwen-7B as transformers' Qwen2 (RMSNorm, q/k/v bias, SwiGLU with the release's
``w2`` as the gate, untied ``lm_head``, rotary on the whole head). The key map
(``release_keys``) moves every tensor across; two of them change layout on the way, exactly and
reversibly.

Every source tensor must be used exactly once and every model tensor filled, with the
shape the preset builds; anything else is an error naming the keys. ``config.json`` and the
index are decoded into typed, ranged structures and every shard's header is checked (inside the
file, floating-point dtypes) before anything is built; pickled ``.bin`` checkpoints are refused
unopened. Tensors stream one at a time from the safetensors shards, so the peak is about one
copy of the model; the dtype is kept unless asked.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Annotated, Iterator

import msgspec
import torch

from qvl.boundary import read_json_file
from qvl.common import remote, storage
from qvl.errors import QvlError
from qvl.trainer.checkpoint import (
    TensorEntry,
    read_meta,
    read_preset,
    weights_path,
    read_safetensors_header,
)
from qvl.trainer.model import QwenVL
from qvl.trainer.preset import (
    AdapterConfig,
    LLMConfig,
    ModelConfig,
    Resolution,
    VisionConfig,
)
from qvl.trainer.release_keys import key_map

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SHARD_BYTES = 4 << 30  # release-style shards of the exported model
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


class ConvertError(QvlError):
    pass


# ---------------------------------------------------------------- the configuration

MAX_CONFIG_BYTES = 1 << 20
Dim = Annotated[int, msgspec.Meta(ge=1, le=1 << 16)]
Layers = Annotated[int, msgspec.Meta(ge=1, le=1024)]
Heads = Annotated[int, msgspec.Meta(ge=1, le=1024)]
Positive = Annotated[float, msgspec.Meta(gt=0, le=1e12)]


class VisualConfig(msgspec.Struct):
    """``config.json``'s ``visual`` table (other keys, such as ``image_start_id``, are not used)."""

    width: Dim
    layers: Layers
    heads: Heads
    patch_size: Annotated[int, msgspec.Meta(ge=1, le=1024)]
    mlp_ratio: Annotated[float, msgspec.Meta(gt=0, le=64)]
    output_dim: Dim
    image_size: Resolution


class ReleaseConfig(msgspec.Struct):
    """The fields of a release ``config.json`` that the conversion reads, typed and ranged."""

    hidden_size: Dim
    num_attention_heads: Heads
    num_hidden_layers: Layers
    intermediate_size: Annotated[int, msgspec.Meta(ge=2, le=1 << 20)]
    layer_norm_epsilon: Annotated[float, msgspec.Meta(gt=0, le=1)]
    rotary_emb_base: Positive
    vocab_size: Annotated[int, msgspec.Meta(ge=1, le=1 << 22)]
    visual: VisualConfig
    kv_channels: Dim | None = None
    rotary_pct: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    seq_length: Annotated[int, msgspec.Meta(ge=1, le=1 << 24)] = 2048
    tie_word_embeddings: bool = False


def read_config(path: Path) -> ReleaseConfig:
    """A release ``config.json``, typed, or one error naming the file and the field."""
    return read_json_file(path, ReleaseConfig, MAX_CONFIG_BYTES, ConvertError)


def preset_from_config(config: ReleaseConfig, where: str = "config.json") -> ModelConfig:
    """The qvl preset that computes what a release ``config.json`` describes."""
    visual, hidden, heads = config.visual, config.hidden_size, config.num_attention_heads
    head_dim = config.kv_channels or hidden // heads
    checks = {
        "rotary_pct must be 1.0 (rotary on the whole head)": config.rotary_pct == 1.0,
        "kv_channels x num_attention_heads must equal hidden_size": head_dim * heads == hidden,
        "visual.output_dim must equal hidden_size": visual.output_dim == hidden,
        "visual.image_size must be a multiple of visual.patch_size": visual.image_size % visual.patch_size == 0,
        "visual.output_dim must be a multiple of 128 (the Resampler's heads)": visual.output_dim % 128 == 0,
        "visual.width must be a multiple of visual.heads": visual.width % visual.heads == 0,
        "intermediate_size must be even (the release halves it)": config.intermediate_size % 2 == 0,
    }
    bad = [what for what, ok in checks.items() if not ok]
    if bad:
        raise ConvertError(f"{where}: not a Qwen-VL configuration qvl reproduces: {'; '.join(bad)}")
    return ModelConfig(
        name="qwen-vl-release", tokenizer="qwen-vl", image_tokens=256,  # the release's 16x16 queries
        vision=VisionConfig(class_token=False, width=visual.width, layers=visual.layers, heads=visual.heads,
                            patch_size=visual.patch_size, mlp_ratio=visual.mlp_ratio, pos_table=16, norm_eps=1e-6),
        adapter=AdapterConfig(heads=visual.output_dim // 128, stored_positions=True, norm_eps=1e-6),
        llm=LLMConfig(vocab_size=config.vocab_size, hidden_size=hidden, num_hidden_layers=config.num_hidden_layers,
                      num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim,
                      intermediate_size=config.intermediate_size // 2,  # the release halves it
                      rms_norm_eps=config.layer_norm_epsilon, rope_theta=config.rotary_emb_base,
                      max_position_embeddings=config.seq_length, tie_word_embeddings=config.tie_word_embeddings),
        stages={"resolution": [visual.image_size] * 3}, activation_checkpointing=True,
    )


def config_from_preset(preset: ModelConfig, like: dict, resolution: int, where: str = "the checkpoint") -> dict:
    """``like`` (the release's config.json) with the sizes of ``preset``; a preset not in the
    release's shape (one ``convert from-qwen-vl`` writes) is one error saying what it lacks."""
    v, a, llm = preset.vision, preset.adapter, preset.llm
    lacks = [f"[{table}] {key}" for table, values, keys in (
        ("vision", v, ("width", "layers", "heads", "patch_size", "mlp_ratio")),
        ("llm", llm, ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "intermediate_size",
                      "rms_norm_eps", "rope_theta", "vocab_size", "tie_word_embeddings"))) for key in keys
             if getattr(values, key) is None]
    lacks += [need for need, ok in (("[vision] class_token = false", not v.class_token),
                                    ("[adapter] stored_positions = true", a.stored_positions)) if not ok]
    if lacks:
        raise ConvertError(f"{where} (preset {preset.name}): not in the release's shape (a checkpoint of convert "
                           f"from-qwen-vl, or trained from one); its preset lacks {', '.join(lacks)}")
    out = json.loads(json.dumps(like))
    out.update(hidden_size=llm.hidden_size, num_hidden_layers=llm.num_hidden_layers,
               num_attention_heads=llm.num_attention_heads, kv_channels=llm.head_dim,
               intermediate_size=llm.intermediate_size * 2, layer_norm_epsilon=llm.rms_norm_eps,
               rotary_emb_base=llm.rope_theta, vocab_size=llm.vocab_size, tie_word_embeddings=llm.tie_word_embeddings)
    out.setdefault("visual", {}).update(width=v.width, layers=v.layers, heads=v.heads, patch_size=v.patch_size,
                                        mlp_ratio=v.mlp_ratio, output_dim=llm.hidden_size, image_size=resolution)
    if a.heads != llm.hidden_size // 128:
        raise ConvertError(f"preset {preset.name}: the release's Resampler has hidden_size // 128 heads")
    return out


# ---------------------------------------------------------------- the model's tensors against the map


def expected_shapes(preset: ModelConfig, resolution: int) -> dict[str, torch.Size]:
    """The tensors the preset's model holds, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = QwenVL(preset, preset.llm.vocab_size, 151859, resolution)
    return {k: t.shape for k, t in model.state_dict().items()}


def _check_names(sources: set[str], found: set[str], targets: set[str], expected: set[str] | None,
                 where: str) -> None:
    """Every tensor ``found`` is one the map reads (``sources``), every one it reads is there,
    and (``expected``) the map fills exactly the model's tensors."""
    problems = []
    if found - sources:
        problems.append(f"tensors no mapping uses: {', '.join(sorted(found - sources)[:10])}")
    if sources - found:
        problems.append(f"tensors missing: {', '.join(sorted(sources - found)[:10])}")
    if expected is not None and expected - targets:
        problems.append(f"model tensors nothing fills: {', '.join(sorted(expected - targets)[:10])}")
    if expected is not None and targets - expected:
        problems.append(f"mapped to tensors the model lacks: {', '.join(sorted(targets - expected)[:10])}")
    if problems:
        raise ConvertError(f"{where}: " + "; ".join(problems))


# ---------------------------------------------------------------- reading weights


ShardName = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
FLOATING = {"F16", "BF16", "F32", "F64"}
PICKLES = ("pytorch_model.bin.index.json", "pytorch_model.bin")


class WeightIndex(msgspec.Struct):
    """``model.safetensors.index.json``: which shard (a file beside it) holds each tensor."""

    weight_map: Annotated[dict[str, ShardName], msgspec.Meta(max_length=1 << 20)]


def _weight_files(folder: Path) -> tuple[list[Path], dict[str, str], Path | None]:
    """(the shards, the index's key -> shard name, the index file) of a release folder. Pickled
    checkpoints (``pytorch_model*.bin``) are refused unopened: unpickling runs code."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        index = read_json_file(index_path, WeightIndex, MAX_CONFIG_BYTES * 64, ConvertError)
        names = sorted(set(index.weight_map.values()))
        for name in names:
            if Path(name).name != name or not name.endswith(".safetensors") or "\x00" in name:
                raise ConvertError(f"{index_path}: weight_map names {name[:200]!r}, not a .safetensors file beside it")
        return [folder / name for name in names], index.weight_map, index_path
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"], {}, None
    for name in PICKLES:
        if (folder / name).is_file():
            raise ConvertError(f"{folder / name}: a pickled PyTorch checkpoint; qvl reads only safetensors (loading a "
                               "pickle can run code). Save the model as safetensors first (transformers: "
                               "save_pretrained(..., safe_serialization=True))")
    raise ConvertError(f"{folder}: no weights (model.safetensors or model.safetensors.index.json)")


class Tensors:
    """Lazy access to the tensors of a set of safetensors files, one tensor in memory at a time.
    Every header is read and checked first (``checkpoint.read_safetensors_header``): the tensors'
    names, dtypes and shapes are known before any byte of them is read."""

    def __init__(self, files: list[Path], weight_map: dict[str, str] | None = None, index: Path | None = None,
                 floating: bool = False):
        self.files: dict[Path, object] = {}
        self.where: dict[str, Path] = {}
        self.entries: dict[str, TensorEntry] = {}
        for path in files:
            if not path.is_file():
                raise ConvertError(f"{path}: listed in {index} but missing")
            for key, entry in read_safetensors_header(path, ConvertError).items():
                if key in self.where:
                    raise ConvertError(f"{path}: tensor {key} is also in {self.where[key]}")
                if floating and entry.dtype not in FLOATING:
                    raise ConvertError(f"{path}: tensor {key} is {entry.dtype}; Qwen-VL's weights are floating point "
                                       f"({', '.join(sorted(FLOATING))}) and qvl converts nothing else")
                self.where[key], self.entries[key] = path, entry
        for key, name in (weight_map or {}).items():
            if self.where.get(key, Path()).name != name:
                raise ConvertError(f"{index}: weight_map puts {key[:200]} in {name}, whose header does not hold it")

    def keys(self) -> set[str]:
        return set(self.where)

    def get(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        path = self.where[key]
        try:
            if path not in self.files:
                self.files[path] = safe_open(str(path), "pt")
            return self.files[path].get_tensor(key)
        except (OSError, RuntimeError, ValueError, SafetensorError) as e:
            raise ConvertError(f"{path}: cannot read tensor {key} ({str(e)[:200]})") from None


def _layers(keys: set[str], prefix: str) -> int:
    """How many numbered blocks ``prefix{n}.`` the tensors hold (one past the highest number)."""
    numbers = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d{1,6})\.", k))}
    return max(numbers) + 1 if numbers else 0


def _check_layers(config: ReleaseConfig, keys: set[str], where: Path) -> None:
    """The config's layer counts against the weight files' headers, before anything is built
    from them: a config claiming 10^6 layers costs nothing."""
    for field, claimed, prefix in (("num_hidden_layers", config.num_hidden_layers, "transformer.h."),
                                   ("visual.layers", config.visual.layers, "transformer.visual.transformer.resblocks.")):
        held = _layers(keys, prefix)
        if claimed != held:
            raise ConvertError(f"{where}: {field} is {claimed}, but the weight files hold {held} ({prefix}N.*)")


def _convert(entries, tensors: Tensors, forward: bool, expected: dict[str, torch.Size] | None,
             dtype: torch.dtype | None, where: str) -> Iterator[tuple[str, torch.Tensor]]:
    for release, qvl, there, back in entries:
        sources, targets = (release, qvl) if forward else (qvl, release)
        inputs = [tensors.get(k) for k in sources]
        try:  # a fused tensor whose rows do not split into heads or q/k/v
            outputs = there(*inputs) if forward else back(*inputs)
        except RuntimeError:
            outputs = None
        outputs = outputs if isinstance(outputs, list) or outputs is None else [outputs]
        if outputs is None or len(outputs) != len(targets):
            raise ConvertError(f"{where}: {', '.join(sources)}: shape {tuple(inputs[0].shape)} does not split into "
                               f"{', '.join(targets)}")
        for key, tensor in zip(targets, outputs):
            if expected is not None and tuple(tensor.shape) != tuple(expected[key]):
                raise ConvertError(f"{where}: {key}: shape {tuple(tensor.shape)} from {', '.join(sources)}, the model "
                                   f"needs {tuple(expected[key])}")
            yield key, tensor.to(dtype) if dtype is not None else tensor


# ---------------------------------------------------------------- the two commands


def _prepare(out: Path, kind: str, dtype: str | None) -> torch.dtype | None:
    """The dtype asked for (None: as stored), once ``out`` is claimed as ``kind``'s folder."""
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype}: use bf16, fp16 or fp32")
    try:
        storage.claim(out, kind)
    except storage.OutputError as e:
        raise ConvertError(str(e)) from None
    return DTYPES.get(dtype)


def plan_from_qwen_vl(hf_dir: Path):
    """(config, preset, tensors, key map, the model's shapes) of a release folder: the config and
    every weight file's header read and checked against each other, no tensor read yet. The work
    is bounded by the files, whatever the config claims."""
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{hf_dir}: no config.json (give the Hugging Face folder of Qwen-VL or Qwen-VL-Chat)")
    config = read_config(config_path)
    preset = preset_from_config(config, str(config_path))
    tensors = Tensors(*_weight_files(hf_dir), floating=True)
    _check_layers(config, tensors.keys(), config_path)
    entries = key_map(preset)
    expected = expected_shapes(preset, config.visual.image_size)
    _check_names({k for e in entries for k in e[0]}, tensors.keys(), {k for e in entries for k in e[1]},
                 set(expected), str(hf_dir))
    return config, preset, tensors, entries, expected


def from_qwen_vl(hf_dir: str | Path, out: str | Path, dtype: str | None = None) -> dict:
    """A release folder -> a qvl checkpoint folder (model.safetensors, preset.json, meta.json),
    once ``plan_from_qwen_vl`` has checked it."""
    from safetensors.torch import save_file

    hf_dir, out = Path(hf_dir), Path(out)
    config, preset, tensors, entries, expected = plan_from_qwen_vl(hf_dir)
    resolution = config.visual.image_size
    weights = dict(_convert(entries, tensors, True, expected, _prepare(out, "checkpoint", dtype), str(hf_dir)))
    with storage.atomic_path(out / "model.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    storage.write_json(out / "preset.json", preset.to_dict())
    dtypes = sorted({str(t.dtype) for t in weights.values()})
    meta = {"stage": 0, "step": 0, "preset": preset.name, "resolution": resolution,
            "converted_from": remote.origin(hf_dir), "dtype": " and ".join(dtypes),
            "tensors": len(weights), "parameters": sum(t.numel() for t in weights.values())}
    storage.write_json(out / "meta.json", meta)
    return meta


def merge_lora(checkpoint: str | Path, out: str | Path, dtype: str | None = None, base: Path | None = None) -> dict:
    """A LoRA run's checkpoint merged into its base: a plain qvl checkpoint folder."""
    from qvl.trainer import lora

    checkpoint, out = Path(checkpoint), Path(out)
    if lora.read_record(checkpoint) is None:
        raise ConvertError(f"{checkpoint}: not a LoRA run's checkpoint (its meta.json has no lora record); "
                           "it holds whole weights already")
    return lora.write_merged(checkpoint, out, base, _prepare(out, "checkpoint", dtype))


def to_qwen_vl(checkpoint: str | Path, out: str | Path, like: str | Path, dtype: str | None = None,
               base: Path | None = None) -> dict:
    """A qvl checkpoint -> a Hugging Face folder the release's own code loads
    (``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)``): its weights in
    release names, ``like``'s config.json with this model's sizes, and every other file of
    ``like`` (the remote code, tokenizer files) copied — qvl ships none of them. A LoRA run's
    checkpoint is merged into its base (``base``, else the recorded one) in a folder beside ``out``."""
    import tempfile

    from safetensors.torch import save_file

    from qvl.trainer import lora

    checkpoint, out, like = Path(checkpoint), Path(out), Path(like)
    if lora.read_record(checkpoint) is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".merged-") as merged:
            lora.write_merged(checkpoint, Path(merged), base)
            return to_qwen_vl(merged, out, like, dtype)
    lora.refuse_base(checkpoint, base)
    if not (like / "config.json").is_file():
        raise ConvertError(f"--like {like}: no config.json (give the release's Hugging Face folder)")
    read_config(like / "config.json")  # checked; copied as it is with this model's sizes
    like_config = read_json_file(like / "config.json", dict, MAX_CONFIG_BYTES, ConvertError)
    if not (like / "modeling_qwen.py").is_file():
        raise ConvertError(f"--like {like}: no modeling_qwen.py (the release's remote code is needed to load it)")
    meta = read_meta(checkpoint)
    preset = read_preset(checkpoint)
    config = config_from_preset(preset, like_config, meta.resolution, str(checkpoint))
    entries = key_map(preset)
    tensors = Tensors([weights_path(checkpoint)], floating=True)
    _check_names({k for e in entries for k in e[1]}, tensors.keys(), {k for e in entries for k in e[0]}, None,
                 str(checkpoint))
    target = _prepare(out, "hf export", dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in _convert(entries, tensors, False, None, target, str(checkpoint)):
        nbytes = tensor.numel() * tensor.element_size()
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with storage.atomic_path(out / name) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    first = next(iter(shards[0].values()))
    config["torch_dtype"] = str(first.dtype).removeprefix("torch.")
    for item in like.iterdir():
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and not re.search(r"\.index\.json$", item.name) \
                and item.name not in ("config.json", storage.MARKER):
            shutil.copy2(item, out / item.name)
    storage.write_json(out / "config.json", config)
    storage.write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return {"tensors": len(weight_map), "shards": len(shards), "bytes": total}
