"""What a hostile input costs: time and peak memory of each adversarial case at 1×, 2× and 4×
its base size, each run in a fresh process (so one case's memory is not another's).

    python benchmarks/bad_input_scaling.py [--only PREFIX] [--scales 1,2,4]

The cases are the functions of ``benchmarks/bad_input_cases.py`` (one per hostile input that
once took quadratic time or unbounded memory: a 200 KB turn of ``<img>``, an eval answer of
``(``s, a billion-laughs YAML recipe, a config asking for 10^9 layers, 12,000 images with one
pHash, a 2.5 GB file posing as an image ...). Each takes a scale ``n`` and runs the qvl code on
the input of ``n`` × its base size. Linear work doubles its time with the size (the ``×4/×1``
column reads about 4); quadratic work reads about 16. Memory should stay flat or grow with the
input, never with its square. Figures, not assertions: the tests check behaviour, this prints
cost.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bad_input_cases  # noqa: E402


def cases(prefix: str | None) -> list[str]:
    names = [name for name, fn in inspect.getmembers(bad_input_cases, inspect.isfunction)
             if fn.__module__ == bad_input_cases.__name__ and not name.startswith("_")]
    return [n for n in names if prefix is None or n.startswith(prefix)]


def run_one(name: str, n: int, timeout: float) -> tuple[float, float, str]:
    """(seconds, peak RSS MiB, status) of ``bad_input_cases.name(n)`` in a fresh process."""
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import bad_input_cases as c; c.{name}({n})"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            return time.perf_counter() - start, usage.ru_maxrss / 1024, "timeout"
        time.sleep(0.01)
    seconds = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace").strip().splitlines()
    ok = os.waitstatus_to_exitcode(status) == 0
    return seconds, usage.ru_maxrss / 1024, "ok" if ok else f"failed: {err[-1] if err else status}"


def baseline(timeout: float) -> tuple[float, float]:
    """Start-up of a process that imports qvl: subtracted from nothing, printed for scale."""
    code = "import qvl.cli"
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code])
    _, _, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="run the cases whose name starts with this")
    parser.add_argument("--scales", default="1,2,4")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it is stopped")
    args = parser.parse_args()
    scales = [int(s) for s in args.scales.split(",")]
    print(f"# {' '.join(sys.argv)}")
    print(f"# {platform.node()}: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    t0, m0 = baseline(args.timeout)
    print(f"# a process importing qvl.cli: {t0:.2f} s, {m0:.0f} MiB (included in every figure below)")
    head = " | ".join(f"{s}× s | {s}× MiB" for s in scales)
    print(f"| case | {head} | ×{scales[-1]}/×{scales[0]} time (linear ≈ {scales[-1] // scales[0]}) |")
    print("|---|" + "---:|" * (2 * len(scales) + 1))
    for name in cases(args.only):
        figures, times, notes = [], [], []
        for s in scales:
            seconds, mib, status = run_one(name, s, args.timeout)
            figures += [f"{seconds:.2f}", f"{mib:.0f}"]
            times.append(max(seconds - t0, 0.05))  # start-up taken off; below 50 ms is noise
            if status != "ok":
                notes.append(f"{s}×: {status}")
        ratio = times[-1] / times[0]
        note = f" ({'; '.join(notes)})" if notes else ""
        print(f"| {name} | {' | '.join(figures)} | {ratio:.1f}{note} |", flush=True)


if __name__ == "__main__":
    main()
