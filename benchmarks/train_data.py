"""Training data streamed from a bucket vs read from a local folder, in one run: the loader's
samples/s alone, and its share of a training step (time the step waits for its micro-batches /
step time) at the tiny and a mid preset. The bucket is a real S3 server (moto) on 127.0.0.1
started here; every streamed run starts from an empty shard cache.

    python benchmarks/train_data.py [--steps 10] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_step import MID_PRESET
from tests.conftest import S3Server

PRESETS = {"tiny": (64, 16, 300), "mid": (224, 64, 160)}  # image size, image tokens, scenes


def shards(work: Path, name: str) -> Path:
    """Multitask shards for the preset, 64 rows a shard (so an epoch streams many)."""
    from qvl.demo.world import write_annotations
    from qvl.formats.build import FormatSettings, run_format

    size, image_tokens, scenes = PRESETS[name]
    world = write_annotations(work / f"world-{name}", n_images=scenes, size=size)
    run_format("multitask", [world["multitask"]], work / f"shards-{name}", world["images"], show_progress=False,
               settings=FormatSettings(tokenizer="bytes", image_tokens=image_tokens, shard_rows=64, batch=64))
    return work / f"shards-{name}"


def loader_rate(data, stage, workers: int, seconds: float = 6.0) -> tuple[float, float]:
    """(samples/s over ``seconds`` after the first batch, seconds to the first batch)."""
    from qvl.trainer.data import Loader, Shards

    started = time.perf_counter()
    loader = Loader(Shards(data), stage.micro_batch, stage.resolution, 0, stage.seq_len, seed=0,
                    log=lambda m: None, workers=workers)
    loader.next()
    first = time.perf_counter() - started
    started, samples = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        samples += sum(len(ids) for ids in loader.next().sample_ids)
    return samples / (time.perf_counter() - started), first


def step_share(data, preset: str, out: Path, steps: int, workers: int) -> tuple[float, float]:
    """(ms per step, share of it waiting for data), steps after the first (which also starts
    the loader's workers and fills its first window)."""
    import torch

    from qvl.trainer.settings import TrainSettings
    from qvl.trainer.train import _optimizer_step, setup

    run = setup(TrainSettings(stage=2, data=data, out=out, preset=preset, max_steps=steps, log=False,
                              overwrite=True, data_workers=workers))
    waits: list[float] = []
    inner = run.loader.next

    def timed():
        started = time.perf_counter()
        batch = inner()
        waits.append(time.perf_counter() - started)
        return batch

    run.loader.next = timed
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.bf16)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        _optimizer_step(run, autocast)
        times.append(time.perf_counter() - started)
    per_step = run.stage.accumulation
    waited = [sum(waits[i * per_step:(i + 1) * per_step]) for i in range(steps)]
    return 1000 * sum(times[1:]) / (steps - 1), sum(waited[1:]) / sum(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2, help="loader processes (qvl train's --data-workers)")
    args = parser.parse_args()
    import torch

    from qvl.common import remote
    from qvl.trainer.preset import load_preset
    from qvl.trainer.settings import TrainSettings
    from qvl.trainer.train import stage_for

    work = Path(tempfile.mkdtemp(prefix="qvl-bench-data-"))
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}\n")
    server = S3Server(work)
    os.environ.update(server.env)
    (work / "mid.toml").write_text(MID_PRESET)
    rows = []
    try:
        for name in PRESETS:
            preset = "tiny" if name == "tiny" else str(work / "mid.toml")
            local = shards(work, name)
            url = server.bucket() + f"/shards-{name}"
            remote.publish(local, url, show_progress=False)
            stage = stage_for(TrainSettings(stage=2, data=local, out=work), load_preset(preset))
            size = sum(p.stat().st_size for p in local.glob("*.arrow"))
            count = len(list(local.glob("*.arrow")))
            for where, data in (("local", local), ("s3", url)):
                os.environ["QVL_CACHE"] = str(work / f"cache-{name}-{where}")  # a cold cache each time
                rate, first = loader_rate(data, stage, args.workers)
                os.environ["QVL_CACHE"] = str(work / f"cache-{name}-{where}-train")
                ms, share = step_share(data, preset, work / f"run-{name}-{where}", args.steps, args.workers)
                rows.append((name, where, f"{count} x {size / count / 1e6:.2f} MB", stage.micro_batch, rate,
                             first, ms, share))
    finally:
        server.stop()
    print(f"loader: {args.workers} workers, shuffle window 4 shards; step: stage 2, {args.steps} steps "
          "(the first left out)\n")
    print("| preset | data | shards | micro-batch | loader samples/s | first batch | step | waiting for data |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, where, shape, micro, rate, first, ms, share in rows:
        print(f"| {name} | {where} | {shape} | {micro} | {rate:,.0f} | {first:.2f} s | {ms:,.0f} ms | {share:.1%} |")


if __name__ == "__main__":
    main()
