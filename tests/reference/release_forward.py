"""For the tests: the released Qwen-VL's forward pass transcribed from its description
(shared/QWEN_VL_RELEASE.md), on a state dict in the release's own key names — independent of
qvl's modules, as ``tests/formats`` transcribe finetune.py — and a tiny random checkpoint in
the release's layout (its ``config.json`` fields, key names and shapes, 56-px images)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMG_START, IMG_END, IMG_PAD = 151857, 151858, 151859
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

TINY_CONFIG = {
    "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "auto_map": {
        "AutoConfig": "configuration_qwen.QWenConfig", "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
    "hidden_size": 128, "num_attention_heads": 2, "kv_channels": 64, "num_hidden_layers": 2,
    "intermediate_size": 512, "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0,
    "seq_length": 2048, "max_position_embeddings": 8192, "use_dynamic_ntk": True, "use_logn_attn": True,
    "tie_word_embeddings": False, "vocab_size": 151936, "no_bias": True, "torch_dtype": "bfloat16",
    "visual": {"heads": 4, "image_size": 56, "image_start_id": IMG_START, "layers": 2, "mlp_ratio": 4.9231,
               "output_dim": 128, "patch_size": 14, "width": 64},
}


def mae_sincos(dim: int, side: int) -> torch.Tensor:
    """The Resampler's stored pos_embed: MAE's table, w first (as the release builds it)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float32) / (dim / 4))
    h, w = np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32), indexing="ij")
    parts = []
    for coord in (w.reshape(-1), h.reshape(-1)):
        out = np.einsum("m,d->md", coord, omega)
        parts += [np.sin(out), np.cos(out)]
    return torch.from_numpy(np.concatenate(parts, axis=1)).float()


def random_release(config: dict = TINY_CONFIG, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of the release's state dict, random (biases and norms too, so that a
    wrong layout shows), in the release's names and shapes."""
    g = torch.Generator().manual_seed(seed)
    v = config["visual"]
    W, D, H = v["width"], v["output_dim"], config["hidden_size"]
    M, I, V = int(W * v["mlp_ratio"]), config["intermediate_size"] // 2, config["vocab_size"]

    def rnd(*shape, std=0.02, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    sd = {}
    p = "transformer.visual."
    sd[p + "conv1.weight"] = rnd(W, 3, v["patch_size"], v["patch_size"])
    sd[p + "positional_embedding"] = rnd(256, W, std=W ** -0.5)
    for name, width in (("ln_pre", W), ("ln_post", D)):
        sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"] = rnd(width, std=0.1, mean=1.0), rnd(width, std=0.1)
    for m in range(v["layers"]):
        b = f"{p}transformer.resblocks.{m}."
        for name in ("ln_1", "ln_2"):
            sd[f"{b}{name}.weight"], sd[f"{b}{name}.bias"] = rnd(W, std=0.1, mean=1.0), rnd(W, std=0.1)
        sd[b + "attn.in_proj.weight"], sd[b + "attn.in_proj.bias"] = rnd(3 * W, W, std=0.2), rnd(3 * W, std=0.2)
        sd[b + "attn.out_proj.weight"], sd[b + "attn.out_proj.bias"] = rnd(W, W, std=0.1), rnd(W, std=0.1)
        sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"] = rnd(M, W, std=0.1), rnd(M, std=0.1)
        sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"] = rnd(W, M, std=0.1), rnd(W, std=0.1)
    a = p + "attn_pool."
    sd[a + "pos_embed"] = mae_sincos(D, 16)
    sd[a + "query"] = rnd(256, D, std=0.5)
    sd[a + "kv_proj.weight"] = rnd(D, W, std=0.2)
    sd[a + "attn.in_proj_weight"], sd[a + "attn.in_proj_bias"] = rnd(3 * D, D, std=0.06), rnd(3 * D, std=0.1)
    sd[a + "attn.out_proj.weight"], sd[a + "attn.out_proj.bias"] = rnd(D, D, std=0.1), rnd(D, std=0.1)
    for name in ("ln_q", "ln_kv"):
        sd[f"{a}{name}.weight"], sd[f"{a}{name}.bias"] = rnd(D, std=0.1, mean=1.0), rnd(D, std=0.1)
    sd[p + "proj"] = rnd(D, D, std=D ** -0.5)
    sd["transformer.wte.weight"] = rnd(V, H, std=0.5)
    for n in range(config["num_hidden_layers"]):
        h = f"transformer.h.{n}."
        sd[h + "ln_1.weight"], sd[h + "ln_2.weight"] = rnd(H, std=0.1, mean=1.0), rnd(H, std=0.1, mean=1.0)
        sd[h + "attn.c_attn.weight"], sd[h + "attn.c_attn.bias"] = rnd(3 * H, H, std=0.1), rnd(3 * H, std=0.2)
        sd[h + "attn.c_proj.weight"] = rnd(H, H, std=0.1)
        sd[h + "mlp.w1.weight"], sd[h + "mlp.w2.weight"] = rnd(I, H, std=0.1), rnd(I, H, std=0.1)
        sd[h + "mlp.c_proj.weight"] = rnd(H, I, std=0.1)
    sd["transformer.ln_f.weight"] = rnd(H, std=0.1, mean=1.0)
    sd["lm_head.weight"] = rnd(V, H, std=0.1)
    return sd


def write_release(folder: Path, sd: dict[str, torch.Tensor], config: dict = TINY_CONFIG, fmt: str = "safetensors",
                  dtype: torch.dtype = torch.bfloat16) -> Path:
    """The Hugging Face folder: config.json, two weight shards and their index, and stand-ins
    for the files qvl never ships (the remote code, the tokenizer files)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    keys = sorted(sd)
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2:])
    suffix = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, part in enumerate(halves):
        name = f"{stem}-{i + 1:05d}-of-00002.{suffix}"
        tensors = {k: sd[k].to(dtype).contiguous() for k in part}
        if fmt == "safetensors":
            save_file(tensors, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(tensors, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in ("modeling_qwen.py", "visual.py", "configuration_qwen.py", "qwen_generation_utils.py",
                 "tokenization_qwen.py", "tokenizer_config.json", "generation_config.json", "qwen.tiktoken"):
        (folder / name).write_text(f"# stand-in for the release's {name}\n")
    return folder


# ---------------------------------------------------------------- the forward pass


def preprocess(data: bytes, size: int) -> torch.Tensor:
    """PIL RGB, torchvision's Resize((size, size), BICUBIC) on a PIL image (= PIL's resize),
    ToTensor, CLIP Normalize."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.array(img)).float().div(255).permute(2, 0, 1)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def _ln(x, sd, name, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def _abs_pos(table: torch.Tensor, n: int) -> torch.Tensor:
    src, tgt = int(math.sqrt(table.shape[0])), int(math.sqrt(n))
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    return F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)


def visual(sd: dict, config: dict, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] -> [B, 256, output_dim]."""
    v, p = config["visual"], "transformer.visual."
    heads, width = v["heads"], v["width"]
    hd = width // heads
    x = F.conv2d(pixels, sd[p + "conv1.weight"], stride=v["patch_size"])
    b = x.shape[0]
    x = x.reshape(b, width, -1).permute(0, 2, 1)
    n = x.shape[1]
    x = _ln(x + _abs_pos(sd[p + "positional_embedding"], n), sd, p + "ln_pre")
    for m in range(v["layers"]):
        r = f"{p}transformer.resblocks.{m}."
        h = _ln(x, sd, r + "ln_1")
        mixed = F.linear(h, sd[r + "attn.in_proj.weight"], sd[r + "attn.in_proj.bias"]).view(b, n, heads, 3 * hd)
        q, k, val = mixed.split(hd, dim=-1)  # per head: q, k, v side by side
        q, k, val = (t.permute(0, 2, 1, 3) for t in (q, k, val))
        att = ((q / math.sqrt(hd)) @ k.transpose(-2, -1)).softmax(-1)
        out = (att @ val).permute(0, 2, 1, 3).reshape(b, n, width)
        x = x + F.linear(out, sd[r + "attn.out_proj.weight"], sd[r + "attn.out_proj.bias"])
        h = _ln(x, sd, r + "ln_2")
        h = F.linear(F.gelu(F.linear(h, sd[r + "mlp.c_fc.weight"], sd[r + "mlp.c_fc.bias"])),
                     sd[r + "mlp.c_proj.weight"], sd[r + "mlp.c_proj.bias"])
        x = x + h
    a = p + "attn_pool."
    dim = v["output_dim"]
    nh = dim // 128
    kv = _ln(F.linear(x, sd[a + "kv_proj.weight"]), sd, a + "ln_kv")
    pos = sd[a + "pos_embed"]
    query = _ln(sd[a + "query"], sd, a + "ln_q") + pos
    key = kv + _abs_pos(pos, n)
    wq, wk, wv = sd[a + "attn.in_proj_weight"].chunk(3)
    bq, bk, bv = sd[a + "attn.in_proj_bias"].chunk(3)
    qh = F.linear(query, wq, bq).view(256, nh, dim // nh).permute(1, 0, 2)  # [nh, 256, hd]
    kh = F.linear(key, wk, bk).view(b, n, nh, dim // nh).permute(0, 2, 1, 3)
    vh = F.linear(kv, wv, bv).view(b, n, nh, dim // nh).permute(0, 2, 1, 3)
    att = ((qh.unsqueeze(0) / math.sqrt(dim // nh)) @ kh.transpose(-2, -1)).softmax(-1)
    out = (att @ vh).permute(0, 2, 1, 3).reshape(b, 256, dim)
    out = F.linear(out, sd[a + "attn.out_proj.weight"], sd[a + "attn.out_proj.bias"])
    return _ln(out, sd, p + "ln_post") @ sd[p + "proj"]


def _rms(x, weight, eps):
    return x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def logits(sd: dict, config: dict, input_ids: list[int], pixels: torch.Tensor | None = None) -> torch.Tensor:
    """[len(input_ids), vocab] for one sequence; the image features overwrite the positions
    strictly between each <img> and its </img>."""
    ids = torch.tensor(input_ids)
    x = sd["transformer.wte.weight"][ids].clone()
    starts = (ids == IMG_START).nonzero().flatten().tolist()
    ends = (ids == IMG_END).nonzero().flatten().tolist()
    if starts:
        feats = visual(sd, config, pixels)
        for i, (a, b) in enumerate(zip(starts, ends)):
            x[a + 1:b] = feats[i]
    s, hidden, heads = len(input_ids), config["hidden_size"], config["num_attention_heads"]
    hd = config["kv_channels"]
    eps = config["layer_norm_epsilon"]
    inv_freq = 1.0 / (config["rotary_emb_base"] ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.outer(torch.arange(s).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    mask = torch.full((s, s), torch.finfo(torch.float32).min).triu(1)
    for n in range(config["num_hidden_layers"]):
        h = f"transformer.h.{n}."
        y = _rms(x, sd[h + "ln_1.weight"], eps)
        q, k, v = F.linear(y, sd[h + "attn.c_attn.weight"], sd[h + "attn.c_attn.bias"]).split(hidden, dim=-1)
        q, k, v = (t.view(s, heads, hd) for t in (q, k, v))
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
        out = torch.einsum("hqk,khd->qhd", scores.float().softmax(-1), v).reshape(s, hidden)
        x = x + F.linear(out, sd[h + "attn.c_proj.weight"])
        y = _rms(x, sd[h + "ln_2.weight"], eps)
        mlp = F.linear(y, sd[h + "mlp.w1.weight"]) * F.silu(F.linear(y, sd[h + "mlp.w2.weight"]))
        x = x + F.linear(mlp, sd[h + "mlp.c_proj.weight"])
    return F.linear(_rms(x, sd["transformer.ln_f.weight"], eps), sd["lm_head.weight"])


def release_ids(qvl_ids: list[int], paths: list[str]) -> list[int]:
    """The release tokenizer's ids for qvl's: inside each image span, the path's bytes, then pads."""
    out, i, k = [], 0, 0
    while i < len(qvl_ids):
        out.append(qvl_ids[i])
        if qvl_ids[i] == IMG_START:
            body = list(paths[k].encode())
            j = qvl_ids.index(IMG_END, i)
            out += body + [IMG_PAD] * (j - i - 1 - len(body))
            i, k = j, k + 1
            continue
        i += 1
    return out


def greedy(sd: dict, config: dict, input_ids: list[int], pixels, steps: int, stop: set[int]) -> list[int]:
    ids, new = list(input_ids), []
    for _ in range(steps):
        nxt = int(logits(sd, config, ids, pixels)[-1].argmax())
        if nxt in stop:
            break
        new.append(nxt)
        ids.append(nxt)
    return new
