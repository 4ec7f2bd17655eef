"""`qvl curate filter` reading its input from a bucket vs from local disk, and what committing
and mirroring a qvl output costs, in one run.

    python benchmarks/object_storage.py [--rows 1000000] [--folder-mib 256] [--repeat 2]

The bucket is moto's S3 server (a Python process on 127.0.0.1, what s3fs and pyarrow test
against): far slower per request than a real object store, so the bucket figures here are a
floor. Each filter run is the same command line, only the input and --out differ; language
id is off (`--skip-rule lang`) so the figures show reading, not fastText.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from curate_filter import generate


def start_s3(log: Path) -> tuple[subprocess.Popen, dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(env)
    return proc, env


def filter_seconds(source: str, out: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qvl.cli", "curate", "filter", source, "--out", out, "--skip-rule", "lang",
                    "--no-progress", "--overwrite"], check=True, env={**os.environ, **env},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--folder-mib", type=int, default=256, help="size of the folder committed and mirrored")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"command: python {' '.join(sys.argv)}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        proc, env = start_s3(tmp / "moto.log")
        try:
            import boto3

            from qvl.common import remote

            boto3.client("s3").create_bucket(Bucket="bench")
            raw = tmp / "raw"
            generate(raw, args.rows)
            fs, _ = remote.filesystem("s3://bench")
            fs.put(str(raw), "bench/raw", recursive=True)
            size = sum(p.stat().st_size for p in raw.rglob("*.parquet"))
            print(f"input: {args.rows:,} DataComp-shaped rows in {len(list(raw.rglob('*.parquet')))} parquet files, "
                  f"{size / 2**20:.0f} MiB")
            env["QVL_CACHE"] = str(tmp / "cache")
            best = {"local -> local": 1e9, "s3 -> local": 1e9, "s3 -> s3": 1e9}
            for _ in range(args.repeat):
                best["local -> local"] = min(best["local -> local"], filter_seconds(str(raw), str(tmp / "o1"), env))
                best["s3 -> local"] = min(best["s3 -> local"], filter_seconds("s3://bench/raw", str(tmp / "o2"), env))
                best["s3 -> s3"] = min(best["s3 -> s3"], filter_seconds("s3://bench/raw", "s3://bench/curated", env))
            for name, seconds in best.items():
                print(f"curate filter {name:15s} {seconds:6.2f} s  {args.rows / seconds / 1e3:7.1f}k rows/s "
                      f"(best of {args.repeat})")

            folder = tmp / "folder"
            folder.mkdir()
            for i in range(args.folder_mib // 16):
                (folder / f"part-{i:03d}.bin").write_bytes(os.urandom(16 << 20))
            start = time.perf_counter()
            remote.publish(folder, "s3://bench/folder", show_progress=False)
            up = time.perf_counter() - start
            start = time.perf_counter()
            remote.publish(folder, "s3://bench/folder", show_progress=False)
            again = time.perf_counter() - start
            start = time.perf_counter()
            remote.mirror("s3://bench/folder", tmp / "mirror", show_progress=False)
            down = time.perf_counter() - start
            start = time.perf_counter()
            remote.mirror("s3://bench/folder", tmp / "mirror", show_progress=False)
            unchanged = time.perf_counter() - start
            mib = args.folder_mib // 16 * 16
            print(f"commit {mib} MiB ({mib // 16} files): {up:.2f} s ({mib / up:.0f} MiB/s); again, unchanged: "
                  f"{again:.2f} s; mirror: {down:.2f} s ({mib / down:.0f} MiB/s); mirror again, unchanged: "
                  f"{unchanged:.2f} s")
        finally:
            proc.terminate()
            shutil.rmtree(tmp / "cache", ignore_errors=True)


if __name__ == "__main__":
    main()
