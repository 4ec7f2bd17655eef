"""The image stages and `format` on the local engine beside the Ray engine (a local Ray on
this machine, started once and timed on its own), on the same input:

- `curate download` of generated photos served from 127.0.0.1 (img2dataset start-up included);
- `curate clip-score` with a tiny open_clip built from a config, random weights in a temp file;
- `format multitask` of the demo's shape world.

    python benchmarks/image_stages_ray.py [--images 400] [--scenes 1000] [--cpus 2]

On one machine Ray can only spread the same cores: what this shows is its overhead beside the
local engine, and that the results agree (each line says so); the gain is on a cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the local Ray on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import polars as pl
from PIL import Image, ImageFilter

from qvl.common.engines import EngineSettings, RayEngine

TINY_CLIP = {"embed_dim": 64,
             "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "patch_size": 16, "head_width": 32},
             "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def serve_photos(www: Path, n: int) -> ThreadingHTTPServer:
    """n distinct smooth photos (blurred random blocks, 320x240 JPEG) on 127.0.0.1."""
    www.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        blocks = (np.kron(rng.random((12, 16, 3)), np.ones((20, 20, 1))) * 255).astype("uint8")
        img = Image.fromarray(blocks).filter(ImageFilter.GaussianBlur(4))
        img.save(www / f"{i}.jpg", "JPEG", quality=85)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def curated_pairs(work: Path, base: str, n: int) -> Path:
    from qvl.curate.filter.pipeline import run_filter
    from qvl.curate.settings import FilterSettings, RunSettings

    raw = work / "pairs.parquet"
    pl.DataFrame({"url": [f"{base}/{i}.jpg" for i in range(n)],
                  "text": [f"a blurred photo of coloured blocks, number {i}" for i in range(n)]}).write_parquet(raw)
    run_filter([raw], work / "curated", FilterSettings(skip_rules=("lang",), min_side=100), RunSettings(workers=1),
               show_progress=False)
    return work / "curated"


def timed(fn):
    t = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t


def bench_download(work: Path, curated: Path, n: int, cpus: int) -> tuple[dict, Path]:
    from qvl.curate.images.download import DownloadSettings, run_download

    settings = DownloadSettings(allow_private=True, processes=cpus, threads=16, samples_per_shard=max(1, n // 8))
    out, seconds = {}, {}
    for engine in ("local", "ray"):
        out[engine] = work / f"images-{engine}"
        _, seconds[engine] = timed(partial(run_download, curated, out[engine], settings, show_progress=False,
                                           engine=EngineSettings(engine)))
    same = all(pl.read_parquet(out["ray"] / p).sort("row_id").equals(pl.read_parquet(out["local"] / p).sort("row_id"))
               for p in ("kept/*.parquet", "rejected/*.parquet", "ledger/download.parquet"))
    kept = pl.read_parquet(out["local"] / "kept" / "*.parquet").height
    return {"stage": "curate download", "items": kept, "unit": "images", "seconds": seconds, "same": same}, out["local"]


def bench_clip(work: Path, images: Path, cpus: int) -> dict:
    import open_clip
    import torch
    from safetensors.torch import save_file

    from qvl.curate.images.clipscore import ClipSettings, run_clip_score

    config = work / "qvl-bench-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    weights = work / "bench-clip.safetensors"
    save_file(open_clip.create_model("qvl-bench-clip").state_dict(), str(weights))
    settings = ClipSettings(model=str(config), pretrained=weights, batch_size=32, device="cpu")
    seconds, scores = {}, {}
    for engine in ("local", "ray"):
        copy = work / f"clip-{engine}"
        shutil.copytree(images, copy)
        _, seconds[engine] = timed(partial(run_clip_score, copy, settings, show_progress=False,
                                           engine=EngineSettings(engine, workers=cpus)))
        scores[engine] = pl.read_parquet(copy / "ledger" / "clip.parquet")
    diff = (scores["ray"]["clip_score_computed"] - scores["local"]["clip_score_computed"]).abs().max()
    return {"stage": "curate clip-score", "items": scores["local"].height, "unit": "images", "seconds": seconds,
            "same": scores["ray"]["row_id"].equals(scores["local"]["row_id"]) and diff <= 1e-5}


def bench_format(work: Path, scenes: int) -> dict:
    from qvl.demo.world import write_annotations
    from qvl.formats.build import FormatSettings, run_format
    from qvl.formats.on_ray import run_format_on_ray

    world = write_annotations(work / "world", n_images=scenes, size=64)
    settings = FormatSettings(tokenizer="qwen-vl", image_tokens=256)
    args = ("multitask", [world["multitask"]])
    local, t_local = timed(lambda: run_format(*args, work / "fmt-local", world["images"], settings=settings,
                                              show_progress=False))
    ray, t_ray = timed(lambda: run_format_on_ray(*args, work / "fmt-ray", world["images"], settings=settings,
                                                 show_progress=False, part_records=512))
    return {"stage": "format multitask", "items": local["samples"], "unit": "samples",
            "seconds": {"local": t_local, "ray": t_ray}, "same": local == ray}


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    import ray

    return (f"{platform.node()}: {model}, {os.cpu_count()} CPUs visible, Python {platform.python_version()}, "
            f"Ray {ray.__version__}, {platform.platform()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--scenes", type=int, default=1000)
    parser.add_argument("--cpus", type=int, default=2, help="processes of the local engine, CPUs of the local Ray")
    a = parser.parse_args()
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    with tempfile.TemporaryDirectory(prefix="qvl-bench-") as d:
        work = Path(d)
        httpd = serve_photos(work / "www", a.images)
        curated = curated_pairs(work, f"http://127.0.0.1:{httpd.server_address[1]}", a.images)
        engine, start = timed(lambda: RayEngine(None, a.cpus).__enter__())
        print("machine:", machine())
        print(f"local Ray started in {start:.1f} s ({a.cpus} CPUs), once for every stage below")
        try:
            rows = []
            download, images = bench_download(work, curated, a.images, a.cpus)
            rows.append(download)
            httpd.shutdown()
            rows.append(bench_clip(work, images, a.cpus))
            rows.append(bench_format(work, a.scenes))
        finally:
            engine.__exit__(None, None, None)
    print(f"{'stage':<20}{'items':>8}  {'local /s':>10}{'ray /s':>10}  {'local s':>8}{'ray s':>8}  same output")
    for r in rows:
        s = r["seconds"]
        print(f"{r['stage']:<20}{r['items']:>8}  {r['items'] / s['local']:>10.1f}{r['items'] / s['ray']:>10.1f}  "
              f"{s['local']:>8.1f}{s['ray']:>8.1f}  {'yes' if r['same'] else 'NO'}")


if __name__ == "__main__":
    main()
