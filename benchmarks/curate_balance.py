"""MetaCLIP balancing at scale: `qvl curate filter --balance` on --rows generated captions
against an entry list of --entries entries (Aho-Corasick), beside the same run without it.

    python benchmarks/curate_balance.py [--rows 1000000] [--entries 500000] [--t 20000]

Prints the machine, the command, rows/s with and without balancing, the automaton's build
time, peak RSS of each run (fresh subprocesses), and the entry distribution's head before and
after (the largest count must fall to about t, the tail must stay).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def words(n: int, rng: random.Random) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = set()
    while len(out) < n:
        out.add("".join(rng.choice(letters) for _ in range(rng.randint(5, 9))))
    return sorted(out)


def generate(folder: Path, rows: int, entries: int) -> Path:
    import numpy as np
    import polars as pl

    rng = random.Random(0)
    vocab = words(entries, rng)
    (folder / "entries.txt").write_text("\n".join(vocab) + "\n")
    np_rng = np.random.default_rng(0)
    # one entry a caption, Zipf-distributed: a heavy head and a long tail, as web concepts are
    ranks = np.minimum(np_rng.zipf(1.3, size=rows), entries) - 1
    vocab_arr = np.array(vocab)
    fill = np.array(["photo", "of", "the", "near", "with", "a"])
    text = [" ".join([vocab_arr[r], *fill[np_rng.integers(0, 6, 3)], str(i)]) for i, r in enumerate(ranks)]
    data = folder / "pairs.parquet"
    pl.DataFrame({"url": [f"http://x.test/{i}.jpg" for i in range(rows)], "text": text}).write_parquet(data)
    return data


def run(data: Path, out: Path, extra: list[str]) -> dict:
    code = ("import resource, sys, time, json; from qvl.cli import app; t=time.perf_counter()\n"
            "try: app(sys.argv[1:])\nexcept SystemExit as e: assert not e.code, e.code\n"
            "print(json.dumps({'seconds': time.perf_counter()-t, 'rss_mib': max(resource.getrusage(r).ru_maxrss "
            "for r in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))/1024}))")
    args = [sys.executable, "-c", code, "curate", "filter", str(data), "--out", str(out), "--overwrite", "--no-progress",
            "--skip-rule", "lang", *extra]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--entries", type=int, default=500_000)
    parser.add_argument("--t", type=int, default=20_000)
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"command: python {' '.join(sys.argv)}\n")
    with tempfile.TemporaryDirectory(prefix="qvl-bench-balance-") as tmp:
        folder = Path(tmp)
        data = generate(folder, args.rows, args.entries)
        from qvl.curate.filter import balance

        started = time.perf_counter()
        balance.automaton(str(folder / "entries.txt"))
        build = time.perf_counter() - started
        plain = run(data, folder / "plain", [])
        balanced = run(data, folder / "balanced", ["--balance", str(folder / "entries.txt"), "--balance-t",
                                                   str(args.t)])
        report = json.loads((folder / "balanced" / "report.json").read_text())
        entries = report["balance"]["entries"]
        steps = {r["step"]: r["dropped"] for r in report["funnel"]}
        print("| measure | figure |")
        print("|---|---:|")
        print(f"| filter without balancing | {args.rows / plain['seconds']:,.0f} rows/s, peak RSS "
              f"{plain['rss_mib']:,.0f} MiB |")
        print(f"| filter with balancing ({args.entries:,} entries, t = {args.t:,}) | "
              f"{args.rows / balanced['seconds']:,.0f} rows/s, peak RSS {balanced['rss_mib']:,.0f} MiB |")
        print(f"| Aho-Corasick automaton build, {args.entries:,} entries | {build:.2f} s |")
        print(f"| entries matched | {entries['matched_entries']:,} |")
        print(f"| largest entry count, before / after | {entries['largest_before']:,} / {entries['largest_after']:,} |")
        print(f"| matches before / after | {entries['matches_before']:,} / {entries['matches_after']:,} |")
        print(f"| dropped by balance / no_entry | {steps['balance']:,} / {steps['no_entry']:,} |")


if __name__ == "__main__":
    main()
