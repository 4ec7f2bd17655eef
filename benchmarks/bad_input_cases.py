"""Adversarial inputs at n times a base size, one function per case (run by bad_input_scaling.py):
the time and peak memory must grow linearly in n, or not at all."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def _records(layout: str, files: list[Path]) -> None:
    from qvl.errors import QvlError
    from qvl.formats import importers

    try:
        for _ in importers.records(layout, files):
            pass
    except QvlError:
        pass  # refused, named: what is measured is what it cost to get there


def formats_importers_deep_json(n: int) -> None:
    """n x 100 KB of '[' in a streamed file: ijson's prefixes were quadratic (gigabytes); now refused at depth 64."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "gqa.json"
        path.write_bytes(b"[" * (100_000 * n))
        _records("gqa", [path])


def formats_importers_escaped_strings(n: int) -> None:
    """n x 20,000 LLaVA records whose text is full of escaped quotes, backslashes and brackets:
    the nesting guard stays linear."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "blip.json"
        text = '\\"[{' * 20 + "\\\\" * 20 + ']}"' * 20
        path.write_text(json.dumps([{"id": str(i), "image": "a.jpg", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": text}]} for i in range(20_000 * n)]))
        _records("llava-pretrain", [path])


def formats_importers_grit_chunks(n: int) -> None:
    """One GRIT row with n x 10,000 noun chunks: overlap resolution was quadratic; now a reject past 256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "grit.parquet"
        chunks = [[[float(i), float(i + 1), 0.1, 0.1, 0.5, 0.5, 0.9] for i in range(10_000 * n)]]
        pq.write_table(pa.table({"key": ["0"], "url": ["https://grit.example/0.jpg"], "caption": ["x" * 10_000 * n],
                                 "width": [64], "height": [48],
                                 "noun_chunks": pa.array(chunks, pa.list_(pa.list_(pa.float64())))}), path)
        _records("grit", [path])


if __name__ == "__main__":
    import time
    import tracemalloc

    for case in (formats_importers_deep_json, formats_importers_escaped_strings, formats_importers_grit_chunks):
        for n in (1, 2, 4):
            tracemalloc.start()
            t = time.perf_counter()
            case(n)
            elapsed = time.perf_counter() - t
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            print(f"{case.__name__} {n}x: {elapsed:.2f} s, peak {peak / 2 ** 20:.1f} MiB")
