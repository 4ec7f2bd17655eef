"""The local engine beside the Ray engine on the same input, Ray's scaling from 1 to 2
CPUs, and downloads/s from a local HTTP server.

    python benchmarks/curate_ray.py [--rows 2000000] [--images 600]

Every pipeline run is a fresh process (a cold Ray start included in its time: that is
what a user pays). The download part serves generated JPEGs from 127.0.0.1 and runs
`qvl curate download` on them (img2dataset start-up included in the wall time; its own
images/s is printed beside).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from curate_filter import generate, run_pipeline  # noqa: E402


def download_rate(work: Path, n_images: int) -> dict:
    from qvl.curate.filter.pipeline import run_filter
    from qvl.curate.images.download import DownloadSettings, run_download
    from qvl.curate.settings import FilterSettings, RunSettings

    www = work / "www"
    www.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        pixels = rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=85)
        (www / f"{i}.jpg").write_bytes(buf.getvalue())
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = partial(Quiet, directory=str(www))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    raw = work / "pairs.parquet"
    pl.DataFrame({"url": [f"{base}/{i}.jpg" for i in range(n_images)],
                  "text": [f"a photo of random noise number {i}" for i in range(n_images)]}).write_parquet(raw)
    run_filter([raw], work / "curated", FilterSettings(skip_rules=("lang",), min_side=100),
               RunSettings(workers=1), overwrite=True, show_progress=False)
    t = time.perf_counter()
    report = run_download(work / "curated", work / "images",
                          DownloadSettings(allow_private=True, processes=2, threads=32, samples_per_shard=200),
                          overwrite=True, show_progress=False)
    wall = time.perf_counter() - t
    httpd.shutdown()
    stats = [json.loads(p.read_text()) for p in (work / "images" / "attempts" / "000").glob("*_stats.json")]
    busy = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return {"kept": report["kept_rows"], "wall_s": wall, "fetch_s": busy}


def ray_startup_seconds() -> float:
    """A local Ray started and stopped the way the engine does it, in a fresh process."""
    import subprocess

    code = ("import time, ray; t = time.perf_counter(); ray.init(num_cpus=2, include_dashboard=False, "
            "_node_ip_address='127.0.0.1', log_to_driver=False, configure_logging=False); "
            "ray.get(ray.remote(lambda: 1).remote()); ray.shutdown(); print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qvl-bench-ray-"))
    import ray

    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"polars {pl.__version__}, ray {ray.__version__}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    data = work / f"rows-{args.rows}"
    if not data.exists():
        generate(data, args.rows)
    runs = {
        "local engine, 2 processes": ["--workers", "2"],
        "ray engine, 1 CPU": ["--engine", "ray", "--workers", "1"],
        "ray engine, 2 CPUs": ["--engine", "ray", "--workers", "2"],
    }
    results = {}
    for lang in (False, True):
        for name, extra in runs.items():
            r = run_pipeline(data, work / "out", extra + ([] if lang else ["--skip-rule", "lang"]))
            results[(name, lang)] = r
    print(f"\n{args.rows:,} DataComp-shaped rows in {len(list(data.glob('*.parquet')))} shards; "
          f"each run a fresh process (Ray's start-up included)\n")
    startup = ray_startup_seconds()
    print("| engine | rows/s without language id | rows/s with language id | the same, less Ray's start-up |")
    print("|---|---:|---:|---:|")
    for name in runs:
        a, b = results[(name, False)], results[(name, True)]
        less = startup if "ray" in name else 0.0
        print(f"| {name} | {a['rows'] / a['seconds']:,.0f} | {b['rows'] / b['seconds']:,.0f} | "
              f"{a['rows'] / (a['seconds'] - less):,.0f} / {b['rows'] / (b['seconds'] - less):,.0f} |")
    print(f"\nRay start-up and shutdown of a local 2-CPU instance: {startup:.1f} s")
    one, two = results[("ray engine, 1 CPU", True)], results[("ray engine, 2 CPUs", True)]
    print(f"\nRay scaling 1 -> 2 CPUs (with language id): {one['seconds'] / two['seconds']:.2f}x; "
          f"kept rows identical across engines: {len({r['kept'] for (n, lang), r in results.items() if lang}) == 1}")
    d = download_rate(work / "download", args.images)
    print(f"\n| download from 127.0.0.1 ({args.images} JPEGs 320x256) | figure |\n|---|---:|")
    print(f"| images/s, whole `qvl curate download` (img2dataset start-up, pixel checks) | {d['kept'] / d['wall_s']:,.0f} |")
    print(f"| images/s, img2dataset's fetching alone (2 processes x 32 threads) | {d['kept'] / d['fetch_s']:,.0f} |")
    print(f"| pairs kept with checked images | {d['kept']:,} of {args.images:,} |")


if __name__ == "__main__":
    main()
