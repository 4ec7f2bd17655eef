"""Training speed on CPU: tokens/s and step time of the tiny and a mid-size preset, the
data loader's rate beside the model's consumption, and padding vs packing at 2048.

    python benchmarks/train_step.py [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

MID_PRESET = """
name = "mid"
tokenizer = "bytes"
image_tokens = 64
[vision]
width = 384
layers = 6
heads = 6
patch_size = 14
[adapter]
heads = 8
[llm]
hidden_size = 512
num_hidden_layers = 8
num_attention_heads = 8
num_key_value_heads = 8
intermediate_size = 1408
max_position_embeddings = 4096
[stages]
resolution = [224, 224, 224]
seq_len = [2048, 2048, 2048]
micro_batch = [4, 4, 4]
warmup_steps = [5, 5, 5]
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    import torch

    from qvl.demo.world import write_annotations
    from qvl.formats.build import FormatSettings, run_format
    from qvl.formats.tokenizers import load_tokenizer
    from qvl.trainer.data import Loader, Shards
    from qvl.trainer.settings import TrainSettings
    from qvl.trainer.train import train

    work = Path(tempfile.mkdtemp(prefix="qvl-bench-train-"))
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}\n")
    (work / "mid.toml").write_text(MID_PRESET)
    rows = []
    for preset, image_tokens, size in (("tiny", 16, 64), (str(work / "mid.toml"), 64, 224)):
        world = write_annotations(work / f"world-{size}", n_images=200, size=size)
        data = work / f"shards-{size}"
        run_format("multitask", [world["multitask"]], data, world["images"],
                   settings=FormatSettings(tokenizer="bytes", image_tokens=image_tokens), overwrite=True,
                   show_progress=False)
        out = work / f"run-{size}"
        train(TrainSettings(stage=2, data=data, out=out, preset=preset, max_steps=args.steps, log=False, overwrite=True))
        import json

        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][3:]
        tok_s = sum(m["tokens_per_s"] for m in metrics) / len(metrics)
        img_s = sum(m["images_per_s"] for m in metrics) / len(metrics)
        shards = Shards(data)
        tok = load_tokenizer("bytes")
        stage_res, micro = (64, 16) if size == 64 else (224, 4)
        loader = Loader(shards, micro, stage_res, tok.special("<|endoftext|>"), 4096, seed=0, log=lambda m: None)
        t = time.perf_counter()
        n = 0
        while time.perf_counter() - t < 3:
            loader.next()
            n += 1
        loader_rate = n / (time.perf_counter() - t)
        rows.append((Path(preset).stem, tok_s, img_s, loader_rate, micro))
    print("| preset | model tokens/s | model images/s | step time | loader batches/s | model batches/s | "
          "loader / model |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, tok_s, img_s, loader_rate, micro in rows:
        model_rate = img_s / micro if img_s else float("nan")
        print(f"| {name} | {tok_s:,.0f} | {img_s:,.1f} | {1000 / model_rate:,.0f} ms | {loader_rate:,.1f} | "
              f"{model_rate:,.2f} | "
              f"{loader_rate / model_rate:,.1f}x |")

    # padding vs packing at 2048, same samples
    world = write_annotations(work / "world-pack", n_images=300, size=64)
    for kind in ("multitask", "sft"):
        packed = run_format(kind, [world[kind]], work / f"packed-{kind}", world["images"],
                            settings=FormatSettings(tokenizer="bytes", image_tokens=16, pack_to=2048),
                            overwrite=True, show_progress=False)
        padded = packed["tokens"] / (packed["samples"] * 2048)
        print(f"\n{kind}: {packed['samples']:,} samples, {packed['tokens']:,} tokens: padding each to 2048 "
              f"uses {padded:.1%} of the tokens computed; packing into 2048 uses "
              f"{packed['packing']['efficiency']:.1%} ({packed['rows']:,} rows)")


if __name__ == "__main__":
    main()
