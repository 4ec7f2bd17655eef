"""GPU memory of training the released Qwen-VL (9.6B) per device, before the run (`qvl plan`):
activations measured on this CPU (real fp32 at real widths, reduced depth) against the meta
device (fp32 and bf16), the extrapolation checked against deeper models, the plans, and the
comparison with the release's published fine-tuning memory.

    python benchmarks/train_memory.py [--real-seq 512]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

# QwenLM/Qwen-VL README "Profiling of Memory and Speed" (commit aa00ed0): one A100-80G, batch 1,
# one image per sample, gradient checkpointing; GB of GPU memory at 384 / 512 / 1024 / 2048 tokens
PUBLISHED = {"lora-base": (37.1, 37.3, 38.7, 38.7), "lora": (23.3, 23.6, 25.1, 27.3), "q-lora": (17.0, 17.2, 18.2, 19.3)}
LENGTHS = (384, 512, 1024, 2048)


def mib(n: float) -> str:
    return f"{n / 2 ** 20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-seq", type=int, default=512, help="tokens of the real fp32 CPU runs (2048: minutes)")
    args = parser.parse_args()
    import torch

    from qvl.trainer.plan import GiB, PlanSettings, load_preset, measure, plan, step_at

    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}\n")
    cfg = load_preset("qwen-vl-chat")
    trains = ("vision", "adapter", "llm")  # stage 2: every part keeps activations
    full = PlanSettings(stage=2)

    print(f"1. saved-for-backward bytes, stage 2 (all parts train), no checkpointing, 448 px, {args.real_seq} tokens, "
          "micro-batch 1, real widths (ViT-bigG 1664, Qwen-7B 4096, vocab 151,936); depths (ViT blocks, LLM layers)")
    fits = {}
    for name, device, dtype in (("real fp32 CPU", "cpu", torch.float32), ("meta fp32", "meta", torch.float32),
                                ("meta bf16", "meta", torch.bfloat16)):
        started = time.perf_counter()
        fits[name] = a = measure(cfg, full, trains, 448, args.real_seq, dtype, False, device, depths=(1, 2),
                                 backward=False)[0]
        print(f"   {name:14} fixed {mib(a.fixed):>13}  per ViT block {mib(a.per_vit_block):>11}  per LLM layer "
              f"{mib(a.per_llm_layer):>11}  ({time.perf_counter() - started:.1f} s, forward + loss only)")
    same = fits["real fp32 CPU"].measured == fits["meta fp32"].measured
    print(f"   meta fp32 == real fp32 at every depth: {same} {sorted(fits['meta fp32'].measured.items())}\n")

    print("2. extrapolation, meta bf16 at 448 px / 2048 tokens: fitted on depths 1-3, checked on deeper models; "
          "saved for backward, and the peak of forward + loss + backward (activations, the batch, the loss's "
          "gradients; not parameters or their gradients)")
    for ckpt in (False, True):
        started = time.perf_counter()
        fitted = measure(cfg, full, trains, 448, 2048, torch.bfloat16, ckpt)
        for what, a in zip(("saved", "peak"), fitted):
            print(f"   checkpointing {'on ' if ckpt else 'off'}, {what:5}: fixed {mib(a.fixed)}, per ViT block "
                  f"{mib(a.per_vit_block)}, per LLM layer {mib(a.per_llm_layer)}; largest gap to the fit on depths "
                  f"1-3: {a.nonlinear} bytes")
        for depth in ((4, 4), (48, 32)):
            got = step_at(cfg, full, trains, 448, 2048, torch.bfloat16, ckpt, *depth)
            print(f"      {depth[0]} blocks, {depth[1]} layers: " + "; ".join(
                f"{what} predicted {a.predict(*depth) / GiB:.3f} GiB, measured {g / GiB:.3f} GiB "
                f"({100 * (a.predict(*depth) - g) / g:+.4f}%)" for what, a, g in zip(("saved", "peak"), fitted, got)))
        print(f"      ({time.perf_counter() - started:.1f} s)")
    print()

    print("3. plans for the released 9.6B (GiB per GPU; fits: cards of 24 / 40 / 80 GiB)")
    cases = [("stage 3 full, 8 GPUs", PlanSettings(stage=3, gpus=8)),
             ("stage 3 LoRA (chat), 1 GPU", PlanSettings(stage=3, mode="lora")),
             ("stage 3 LoRA (base), 1 GPU", PlanSettings(stage=3, mode="lora", lora_base=True)),
             ("stage 3 Q-LoRA, 1 GPU", PlanSettings(stage=3, mode="q-lora")),
             ("stage 2 full, 8 GPUs", PlanSettings(stage=2, gpus=8)),
             ("stage 2 full, 8 GPUs, CPU offload", PlanSettings(stage=2, gpus=8, cpu_offload=True))]
    print(f"   {'run':36} {'ckpt':4} {'weights':>7} {'grads':>6} {'optim':>6} {'FSDP':>5} {'saved':>6} {'trans.':>6} "
          f"{'CUDA':>5} {'total':>6}  fits 24/40/80")
    for name, settings in cases:
        for ckpt in (True, False):
            settings.activation_checkpointing = ckpt
            p = plan(settings)
            by = {}
            for what, value, _ in p.lines:
                key = what.split(":")[0].split(" ")[0]
                by[key] = by.get(key, 0) + value
            acts = [v for w, v, _ in p.lines if w.startswith("activations")]
            print(f"   {name:36} {'on' if ckpt else 'off':4} {by['weights'] / GiB:7.2f} {by['gradients'] / GiB:6.2f} "
                  f"{by['optimizer'] / GiB:6.2f} {by.get('FSDP', 0) / GiB:5.2f} {acts[0] / GiB:6.2f} "
                  f"{(acts[1] + by.get('Q-LoRA', 0)) / GiB:6.2f} "
                  f"{by['CUDA'] / GiB:5.2f} {p.total / GiB:6.2f}  "
                  + " ".join("yes" if ok else "no" for ok in p.fits().values()))
    print()

    print("4. against the release's published fine-tuning memory (one A100-80G, batch 1, one image, gradient "
          "checkpointing; theirs GB as printed, ours GiB)")
    print(f"   {'':10}" + "".join(f"{n:>16}" for n in LENGTHS))
    for mode, published in PUBLISHED.items():
        ours = [plan(PlanSettings(stage=3, mode="q-lora" if mode == "q-lora" else "lora", lora_base=mode == "lora-base",
                                  seq_len=n, activation_checkpointing=True)).total / GiB for n in LENGTHS]
        print(f"   {mode:10}" + "".join(f"{o:7.1f} vs {t:5.1f}" for o, t in zip(ours, published)))


if __name__ == "__main__":
    main()
