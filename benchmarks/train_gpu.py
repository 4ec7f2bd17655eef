"""Training throughput of the released Qwen-VL's architecture on one GPU: stage-2, stage-3 and
stage-3 LoRA step loops through `qvl train` itself (random weights; LoRA on the stage-3 run's),
on packed 2,048-token rows of 448-px images, bf16 — tokens/s, images/s, step time, peak memory
(for LoRA beside `qvl plan`'s prediction of it, the CUDA context left out) and MFU.

    python benchmarks/train_gpu.py [--steps 12] [--llm-layers N] [--peak-tflops 989]

At real widths: ViT-bigG/14 (1.84B), the 256-query adapter, and Qwen-7B's layer shape (hidden
4096, 32 heads, MLP 11008, vocabulary 151,936). One process keeps fp32 weights (16 bytes per trained
parameter with gradients and AdamW), so the whole 9.66B model does not fit one 141 GB GPU:
the LLM gets as many of its 32 layers as the device's memory allows (``--llm-layers`` to set
it), and the figure says how many. MFU counts model FLOPs only (matrix products of ViT,
adapter and LLM, attention included; forward, plus backward through what the stage trains or
what lies below a trained part) over the device's bf16 dense peak (``--peak-tflops``; H100/H200 989).
Without a GPU the same loop runs at tiny widths on the CPU, and says its figure is not a GPU figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

RELEASE = {"hidden_size": 4096, "num_attention_heads": 32, "kv_channels": 128, "num_hidden_layers": 32,
           "intermediate_size": 22016, "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "rotary_pct": 1.0,
           "seq_length": 2048, "vocab_size": 151936, "tie_word_embeddings": False,
           "visual": {"heads": 16, "image_size": 448, "layers": 48, "mlp_ratio": 4.9231, "output_dim": 4096,
                      "patch_size": 14, "width": 1664}}
TINY = {**RELEASE, "hidden_size": 256, "num_attention_heads": 2, "kv_channels": 128, "num_hidden_layers": 2,
        "intermediate_size": 1024, "visual": {**RELEASE["visual"], "image_size": 112, "layers": 2, "width": 64,
                                              "heads": 4, "output_dim": 256}}


def parameters(preset) -> dict[str, int]:
    import torch

    from qvl.trainer.model import QwenVL

    with torch.device("meta"):
        model = QwenVL(preset, preset.llm.vocab_size, 151859, 448)
    return {part: sum(p.numel() for p in getattr(model, part).parameters()) for part in ("vision", "adapter", "llm")}


def layers_that_fit(memory_bytes: int, config: dict) -> int:
    """LLM layers such that weights, gradients and AdamW (16 B per parameter, stage 2 trains all)
    leave a quarter of the device for activations."""
    from qvl.boundary import convert
    from qvl.trainer.release import ReleaseConfig, preset_from_config

    full = parameters(preset_from_config(convert(config, ReleaseConfig)))
    per_layer = (full["llm"] - 2 * config["vocab_size"] * config["hidden_size"]) / config["num_hidden_layers"]
    fixed = full["vision"] + full["adapter"] + 2 * config["vocab_size"] * config["hidden_size"]
    return max(1, min(config["num_hidden_layers"], int((0.75 * memory_bytes / 16 - fixed) // per_layer)))


def step_flops(preset, counts: dict, trains: tuple[str, ...], tokens: int, images: int, resolution: int) -> float:
    """Model FLOPs of one optimiser step: 2 per multiply-add forward, 4 backward where gradients
    flow (a trained part, or anything feeding one)."""
    v, llm = preset.vision, preset.llm
    patches = (resolution // v.patch_size) ** 2
    vit = 2 * counts["vision"] * patches + 4 * v.layers * patches ** 2 * v.width
    adapter = 2 * counts["adapter"] * preset.image_tokens
    seq = 2048
    lm = 2 * counts["llm"] * tokens + 4 * llm.num_hidden_layers * tokens * seq / 2 * llm.hidden_size
    vision_back = 2 if "vision" in trains else 0
    adapter_back = 2 if ("adapter" in trains or "vision" in trains) else 0
    return images * (vit * (1 + vision_back) + adapter * (1 + adapter_back)) + lm * 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--llm-layers", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    import numpy as np
    import torch
    from PIL import Image

    from qvl.formats.build import FormatSettings, run_format
    from qvl.formats.families import picture
    from qvl.trainer.lora import LoraSettings
    from qvl.trainer.plan import CUDA_OVERHEAD, PlanSettings, plan
    from qvl.boundary import convert
    from qvl.trainer.release import ReleaseConfig, preset_from_config
    from qvl.trainer.settings import TrainSettings
    from qvl.trainer.stages import STAGES
    from qvl.trainer.train import train

    gpu = torch.cuda.is_available()
    config = json.loads(json.dumps(RELEASE if gpu else TINY))
    device = torch.cuda.get_device_name() if gpu else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    memory = torch.cuda.get_device_properties(0).total_memory if gpu else 0
    if gpu:
        config["num_hidden_layers"] = args.llm_layers or layers_that_fit(memory, config)
    print(f"machine: {device}, torch {torch.__version__}" + (f", {memory / 2**30:.0f} GiB" if gpu else ""))
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    if not gpu:
        print("NOTE: no GPU here — the loop runs at tiny widths on the CPU; these are not GPU figures.")
    preset = preset_from_config(convert(config, ReleaseConfig))
    size = config["visual"]["image_size"]
    work = Path(tempfile.mkdtemp(prefix="qvl-bench-gpu-"))
    (work / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(work / "images" / f"{i}.jpg")
    words = "a photo of a red bus parked beside the old station under a grey winter sky".split()
    caption = lambda i: " ".join(words[(i + j) % len(words)] for j in range(40))  # noqa: E731
    (work / "s2.jsonl").write_text("".join(json.dumps({"task": "caption", "image": f"{i % 16}.jpg",
                                                       "caption": caption(i)}) + "\n" for i in range(400)))
    (work / "s3.jsonl").write_text("".join(json.dumps({"id": str(i), "conversations": [
        {"from": "user", "value": picture(1, f"{i % 16}.jpg") + "Describe the picture."},
        {"from": "assistant", "value": caption(i)}]}) + "\n" for i in range(400)))
    (work / "preset.json").write_text(json.dumps(preset.to_dict()))
    counts = parameters(preset)
    shape = f"{config['num_hidden_layers']} of Qwen-7B's 32 layers" if gpu else "tiny widths"
    print(f"model: ViT {counts['vision'] / 1e9:.2f}B, adapter {counts['adapter'] / 1e9:.3f}B, LLM "
          f"{counts['llm'] / 1e9:.2f}B ({shape}) at {size} px, 256 image tokens\n")
    print("| stage | trains | tokens/s | images/s | s/step | peak memory | `qvl plan` | MFU |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for stage, kind, source in ((2, "multitask", "s2.jsonl"), (3, "sft", "s3.jsonl"), (3, "lora", "s3.jsonl")):
        shards = work / f"shards-{kind}"
        run_format("multitask" if stage == 2 else "sft", [work / source], shards, work / "images",
                   show_progress=False, overwrite=True, settings=FormatSettings(pack_to=2048, max_len=2048))
        lora = LoraSettings(chat=True) if kind == "lora" else None  # on the full stage-3 run's weights
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        train(TrainSettings(stage=stage, data=shards, out=work / f"run-{kind}", preset=str(work / "preset.json"),
                            max_steps=args.steps, log=False, overwrite=True, precision="auto", lora=lora,
                            init=work / "run-sft" / "checkpoint" if lora else None,
                            overrides={"resolution": size, "micro_batch": 1, "warmup_steps": 2},
                            checkpoint_every=10 ** 9))
        wall = time.perf_counter() - started
        # the plan counts the trainer's precision for LoRA (bf16 base, fp32 adapters); full training on one
        # process keeps fp32 weights under autocast, which the plan (FSDP's precision) does not describe
        planned = plan(PlanSettings(preset=str(work / "preset.json"), stage=3, mode="lora", seq_len=2048,
                                    resolution=size)).total - CUDA_OVERHEAD if lora else None
        metrics = [json.loads(line) for line in (work / f"run-{kind}" / "metrics.jsonl").read_text().splitlines()]
        steady = metrics[2:] or metrics  # the first steps pay for kernels and allocation
        tok_s = sum(m["tokens_per_s"] for m in steady) / len(steady)
        img_s = sum(m["images_per_s"] for m in steady) / len(steady)
        images_per_row = img_s / tok_s * 2048 if tok_s else 0
        seconds = 2048 / tok_s if tok_s else float("nan")
        flops = step_flops(preset, counts, () if lora else STAGES[stage].trains, 2048, images_per_row, size)
        mfu = flops / seconds / (args.peak_tflops * 1e12) if gpu else None
        peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else None
        trains = "LoRA (chat): adapters" if lora else ", ".join(STAGES[stage].trains)
        print(f"| {stage} | {trains} | {tok_s:,.0f} | {img_s:,.1f} | {seconds:.3f} | "
              + (f"{peak:.1f} GiB" if peak is not None else "n/a (CPU)") + " | "
              + (f"{planned / 2**30:.1f} GiB" if planned is not None else "–") + " | "
              + (f"{mfu:.1%}" if mfu is not None else "n/a (CPU)") + f" |   ({wall:.0f} s for {args.steps} steps)")


if __name__ == "__main__":
    main()
