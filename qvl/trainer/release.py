"""The released Qwen-VL (``Qwen/Qwen-VL``, ``Qwen/Qwen-VL-Chat``) and qvl checkpoints, both ways.

``config.json`` becomes a qvl preset whose options reproduce the release's computation
(``../shared/QWEN_VL_RELEASE.md``): a ViT without class token whose 16x16 position table is
resized to the patch grid at every forward, the adapter's stored ``pos_embed``, LayerNorm eps
1e-6, and Qwen-7B as transformers' Qwen2 (RMSNorm, q/k/v bias, SwiGLU with the release's
``w2`` as the gate, untied ``lm_head``, rotary on the whole head). The key map moves every
tensor across; two of them change layout on the way, exactly and reversibly:

- the ViT's fused ``in_proj`` is interleaved per head (h0 q, h0 k, h0 v, h1 q …) in the
  release and [all q; all k; all v] in ``nn.MultiheadAttention``: rows are permuted;
- the LLM's fused ``c_attn`` (q | k | v) is split into Qwen2's ``q_proj``, ``k_proj``, ``v_proj``.

Every source tensor must be used exactly once and every model tensor filled, with the
shape the preset builds; anything else is an error naming the keys. Tensors stream one at a
time from the source shards (safetensors, or ``.bin`` read with ``weights_only=True`` and
memory-mapped), so the peak is about one copy of the model; the dtype is kept unless asked.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch

from qvl import storage
from qvl.errors import QvlError
from qvl.trainer.model import ModelConfig, QwenVL

SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SHARD_BYTES = 4 << 30  # release-style shards of the exported model
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


class ConvertError(QvlError):
    pass


# ---------------------------------------------------------------- the configuration


def preset_from_config(config: dict, where: str = "config.json") -> ModelConfig:
    """The qvl preset that computes what a release ``config.json`` describes."""
    try:
        visual = config["visual"]
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        head_dim = int(config.get("kv_channels", hidden // heads))
        checks = {
            "rotary_pct must be 1.0 (rotary on the whole head)": float(config.get("rotary_pct", 1.0)) == 1.0,
            "kv_channels x num_attention_heads must equal hidden_size": head_dim * heads == hidden,
            "visual.output_dim must equal hidden_size": int(visual["output_dim"]) == hidden,
            "visual.image_size must be a multiple of visual.patch_size":
                int(visual["image_size"]) % int(visual["patch_size"]) == 0,
            "visual.output_dim must be a multiple of 128 (the Resampler's heads)": int(visual["output_dim"]) % 128 == 0,
        }
        bad = [what for what, ok in checks.items() if not ok]
        if bad:
            raise ConvertError(f"{where}: not a Qwen-VL configuration qvl reproduces: {'; '.join(bad)}")
        size = int(visual["image_size"])
        return ModelConfig(
            name="qwen-vl-release", tokenizer="qwen-vl", image_tokens=256,  # the release's 16x16 queries
            vision={"class_token": False, "width": int(visual["width"]), "layers": int(visual["layers"]),
                    "heads": int(visual["heads"]), "patch_size": int(visual["patch_size"]),
                    "mlp_ratio": float(visual["mlp_ratio"]), "pos_table": 16, "norm_eps": 1e-6},
            adapter={"heads": int(visual["output_dim"]) // 128, "stored_positions": True, "norm_eps": 1e-6},
            llm={"vocab_size": int(config["vocab_size"]), "hidden_size": hidden,
                 "num_hidden_layers": int(config["num_hidden_layers"]), "num_attention_heads": heads,
                 "num_key_value_heads": heads, "head_dim": head_dim,
                 "intermediate_size": int(config["intermediate_size"]) // 2,  # the release halves it
                 "rms_norm_eps": float(config["layer_norm_epsilon"]), "rope_theta": float(config["rotary_emb_base"]),
                 "max_position_embeddings": int(config.get("seq_length", 2048)),
                 "tie_word_embeddings": bool(config.get("tie_word_embeddings", False))},
            stages={"resolution": [size, size, size]},
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ConvertError):
            raise
        raise ConvertError(f"{where}: missing or bad field {e} (is this a Qwen-VL config.json?)") from None


def config_from_preset(preset: ModelConfig, like: dict, resolution: int) -> dict:
    """``like`` (the release's config.json) with the sizes of ``preset``."""
    v, a, llm = preset.vision, preset.adapter, preset.llm
    out = json.loads(json.dumps(like))
    out.update(hidden_size=llm["hidden_size"], num_hidden_layers=llm["num_hidden_layers"],
               num_attention_heads=llm["num_attention_heads"], kv_channels=llm["head_dim"],
               intermediate_size=llm["intermediate_size"] * 2, layer_norm_epsilon=llm["rms_norm_eps"],
               rotary_emb_base=llm["rope_theta"], vocab_size=llm["vocab_size"],
               tie_word_embeddings=llm["tie_word_embeddings"])
    out.setdefault("visual", {}).update(width=v["width"], layers=v["layers"], heads=v["heads"],
                                        patch_size=v["patch_size"], mlp_ratio=v["mlp_ratio"],
                                        output_dim=llm["hidden_size"], image_size=resolution)
    if a.get("heads") != llm["hidden_size"] // 128:
        raise ConvertError(f"preset {preset.name}: the release's Resampler has hidden_size // 128 heads")
    return out


# ---------------------------------------------------------------- the key map


def _per_head_to_mha(heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def convert(t: torch.Tensor) -> torch.Tensor:
        width = t.shape[0] // 3
        return t.reshape(heads, 3, width // heads, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()
    return convert


def _mha_to_per_head(heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
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
    heads = preset.vision["heads"]
    for m in range(preset.vision["layers"]):
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
    for n in range(preset.llm["num_hidden_layers"]):
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


def expected_shapes(preset: ModelConfig, resolution: int) -> dict[str, torch.Size]:
    """The tensors the preset's model holds, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = QwenVL(preset, preset.llm["vocab_size"], 151859, resolution)
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


def _weight_files(folder: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            weight_map = storage.read_json(folder / index)["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
    for name in SINGLE_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise ConvertError(f"{folder}: no weights (model.safetensors[.index.json] or pytorch_model*.bin[.index.json])")


class Tensors:
    """Lazy access to the tensors of a set of weight files, one tensor in memory at a time."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.where: dict[str, tuple] = {}
        for path in files:
            if not path.is_file():
                raise ConvertError(f"{path}: listed in the index but missing")
            try:
                if path.suffix == ".safetensors":
                    handle = safe_open(str(path), "pt")
                    for key in handle.keys():
                        self.where[key] = (handle, key)
                else:  # never unpickled freely: tensors only, memory-mapped
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                    for key in state:
                        self.where[key] = (state, key)
            except (OSError, RuntimeError, ValueError) as e:
                raise ConvertError(f"{path}: cannot read weights ({str(e)[:200]})") from None

    def keys(self) -> set[str]:
        return set(self.where)

    def get(self, key: str) -> torch.Tensor:
        source, name = self.where[key]
        return source.get_tensor(name) if hasattr(source, "get_tensor") else source[name]


def _convert(entries, tensors: Tensors, forward: bool, expected: dict[str, torch.Size] | None,
             dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    for release, qvl, there, back in entries:
        sources, targets = (release, qvl) if forward else (qvl, release)
        inputs = [tensors.get(k) for k in sources]
        outputs = there(*inputs) if forward else back(*inputs)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        for key, tensor in zip(targets, outputs):
            if expected is not None and tuple(tensor.shape) != tuple(expected[key]):
                raise ConvertError(f"{key}: shape {tuple(tensor.shape)} from {', '.join(sources)}, the model needs "
                                   f"{tuple(expected[key])}")
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


def from_qwen_vl(hf_dir: str | Path, out: str | Path, dtype: str | None = None) -> dict:
    """A release folder -> a qvl checkpoint folder (model.safetensors, preset.json, meta.json)."""
    from safetensors.torch import save_file

    hf_dir, out = Path(hf_dir), Path(out)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{hf_dir}: no config.json (give the Hugging Face folder of Qwen-VL or Qwen-VL-Chat)")
    preset = preset_from_config(storage.read_json(config_path), str(config_path))
    resolution = int(storage.read_json(config_path)["visual"]["image_size"])
    entries = key_map(preset)
    tensors = Tensors(_weight_files(hf_dir))
    expected = expected_shapes(preset, resolution)
    _check_names({k for e in entries for k in e[0]}, tensors.keys(), {k for e in entries for k in e[1]},
                 set(expected), str(hf_dir))
    weights = dict(_convert(entries, tensors, True, expected, _prepare(out, "checkpoint", dtype)))
    with storage.atomic_path(out / "model.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    storage.write_json(out / "preset.json", preset.to_dict())
    meta = {"stage": 0, "step": 0, "preset": preset.name, "resolution": resolution,
            "converted_from": str(hf_dir.resolve()), "dtype": str(next(iter(weights.values())).dtype),
            "tensors": len(weights), "parameters": sum(t.numel() for t in weights.values())}
    storage.write_json(out / "meta.json", meta)
    return meta


def to_qwen_vl(checkpoint: str | Path, out: str | Path, like: str | Path, dtype: str | None = None) -> dict:
    """A qvl checkpoint -> a Hugging Face folder the release's own code loads
    (``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)``): its weights in
    release names, ``like``'s config.json with this model's sizes, and every other file of
    ``like`` (the remote code, tokenizer files) copied — qvl ships none of them."""
    from safetensors.torch import save_file

    from qvl.trainer.checkpoint import read_preset

    checkpoint, out, like = Path(checkpoint), Path(out), Path(like)
    if not (like / "config.json").is_file():
        raise ConvertError(f"--like {like}: no config.json (give the release's Hugging Face folder)")
    like_config = storage.read_json(like / "config.json")
    if not (like / "modeling_qwen.py").is_file():
        raise ConvertError(f"--like {like}: no modeling_qwen.py (the release's remote code is needed to load it)")
    preset = read_preset(checkpoint)
    meta = storage.read_json(checkpoint / "meta.json")
    config = config_from_preset(preset, like_config, int(meta["resolution"]))
    entries = key_map(preset)
    tensors = Tensors([checkpoint / "model.safetensors"])
    _check_names({k for e in entries for k in e[1]}, tensors.keys(), {k for e in entries for k in e[0]}, None,
                 str(checkpoint))
    target = _prepare(out, "hf export", dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in _convert(entries, tensors, False, None, target):
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
