"""Peak memory (VmHWM) of each rank of a sharded run: the meta-device build filled from --init
one tensor at a time, against the whole model's size and a one-process build.

    python benchmarks/sharded_memory.py [WORK_FOLDER]

A ~0.4B-parameter preset (tiny's layout, wider and deeper; ~1.6 GB in fp32) is saved as an
--init checkpoint, then stage 2 starts from it under torchrun with 2 gloo CPU processes
(--fsdp) and, for comparison, in one process. Each prints its resident set after the imports
(torch, transformers, open_clip, pyarrow: ~0.9 GB that any process pays), and its high-water
mark after setup (model built and loaded, optimiser made) and after one optimiser step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

PRESET = """
name = "mid"
tokenizer = "bytes"
image_tokens = 16
[vision]
width = 768
layers = 8
heads = 12
patch_size = 8
[adapter]
heads = 8
[llm]
hidden_size = 1536
num_hidden_layers = 12
num_attention_heads = 12
num_key_value_heads = 12
intermediate_size = 4096
max_position_embeddings = 1024
[stages]
resolution = [64, 64, 64]
seq_len = [512, 512, 512]
micro_batch = [1, 1, 1]
warmup_steps = [1, 1, 1]
"""

RANK = """
import json, sys
from pathlib import Path
from qvl.trainer.settings import TrainSettings
from qvl.trainer import train as T

def hwm(key="VmHWM"):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) / 2**20

import torch.distributed, transformers, open_clip, pyarrow  # what setup imports: counted in the baseline
baseline = hwm("VmRSS")
kwargs = json.loads(sys.argv[1])
run = T.setup(TrainSettings(**{**kwargs, "out": Path(kwargs["out"]), "data": Path(kwargs["data"])}))
after_setup = hwm()
T.loop(run)
print(json.dumps({"rank": run.rank, "baseline_gib": round(baseline, 2), "setup_gib": round(after_setup, 2),
                  "step_gib": round(hwm(), 2)}), flush=True)
"""


def main(work: Path) -> None:
    from qvl.demo.world import write_annotations
    from qvl.formats.build import FormatSettings, run_format
    from qvl.trainer.settings import TrainSettings
    from qvl.trainer.train import train

    (work / "mid.toml").write_text(PRESET)
    world = write_annotations(work / "world", n_images=8, size=64)
    run_format("multitask", [world["multitask"]], work / "data", world["images"], show_progress=False,
               settings=FormatSettings(tokenizer="bytes", image_tokens=16))
    train(TrainSettings(stage=1, data=work / "data", out=work / "init", preset=str(work / "mid.toml"), max_steps=0,
                        log=False, data_workers=0, overwrite=True))
    size = (work / "init" / "checkpoint" / "model.safetensors").stat().st_size / 2**30
    print(f"whole model (fp32 model.safetensors): {size:.2f} GiB")
    (work / "rank.py").write_text(RANK)
    common = {"stage": 2, "data": str(work / "data"), "init": str(work / "init" / "checkpoint"), "max_steps": 1,
              "log": False, "data_workers": 0, "precision": "fp32", "overwrite": True}
    for label, launcher, extra in (
            ("2 ranks, --fsdp (meta build)", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                              "--master_addr", "127.0.0.1", "--master_port", "29591"],
             {"fsdp": True, "out": str(work / "fsdp")}),
            ("1 process", [sys.executable], {"out": str(work / "one")})):
        done = subprocess.run(launcher + [str(work / "rank.py"), json.dumps({**common, **extra})],
                              capture_output=True, text=True, check=True)
        for line in done.stdout.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                print(f"{label}: rank {r['rank']} RSS after imports {r['baseline_gib']:.2f} GiB; peak after setup "
                      f"{r['setup_gib']:.2f} GiB (+{r['setup_gib'] - r['baseline_gib']:.2f}), after 1 step "
                      f"{r['step_gib']:.2f} GiB (+{r['step_gib'] - r['baseline_gib']:.2f})")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="qvl-sharded-memory-")))
