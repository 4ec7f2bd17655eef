"""Importers of the published stage-2 datasets: records/s of each on a generated fixture of
--records records in its published layout, and the peak memory of the GRIT importer on a
GRIT-shaped parquet of 1M rows beside 100k (it must stay flat: batches, not the file).

    python benchmarks/format_import.py [--records 100000] [--grit-rows 100000,1000000]

Each importer runs alone (no rendering, no images): what it costs to turn published records
into qvl annotation records. Each RSS figure is a fresh subprocess's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "a man woman dog cat red blue green car bus street table chair on in under near the of with".split()


def sentence(rng: random.Random, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_fixtures(root: Path, n: int) -> dict[str, list[Path]]:
    rng = random.Random(0)
    images = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": 640, "height": 480}
              for i in range(max(1, n // 5))]
    files: dict[str, list[Path]] = {}
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": [
        {"id": i, "image_id": i % len(images), "caption": sentence(rng)} for i in range(n)]}))
    files["coco-captions"] = [root / "captions.json"]
    (root / "q.json").write_text(json.dumps({"data_subtype": "train2014", "questions": [
        {"question_id": i, "image_id": i % len(images), "question": sentence(rng) + "?"} for i in range(n)]}))
    (root / "a.json").write_text(json.dumps({"annotations": [
        {"question_id": i, "multiple_choice_answer": rng.choice(WORDS), "answers": []} for i in range(n)]}))
    files["vqav2"] = [root / "q.json", root / "a.json"]
    (root / "gqa.json").write_text(json.dumps({str(i): {"imageId": f"n{i}", "question": sentence(rng) + "?",
                                                        "answer": rng.choice(WORDS)} for i in range(n)}))
    files["gqa"] = [root / "gqa.json"]
    (root / "textvqa.json").write_text(json.dumps({"data": [
        {"question_id": i, "image_id": f"{i:016x}", "question": sentence(rng) + "?",
         "answers": [rng.choice(WORDS) for _ in range(10)]} for i in range(n)]}))
    files["textvqa"] = [root / "textvqa.json"]
    refs = [{"ref_id": i, "ann_id": i, "image_id": i % len(images), "split": "train", "file_name": "x.jpg",
             "sentences": [{"sent": sentence(rng), "sent_id": 2 * i}, {"sent": sentence(rng), "sent_id": 2 * i + 1}]}
            for i in range(n // 2)]
    (root / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": [
        {"id": i, "image_id": i % len(images), "bbox": [10, 10, 100, 80]} for i in range(n // 2)]}))
    files["refcoco"] = [root / "refs(unc).p", root / "instances.json"]
    per_image = 50
    (root / "region_descriptions.json").write_text(json.dumps([
        {"id": img, "regions": [{"region_id": img * per_image + k, "image_id": img, "phrase": sentence(rng, 4),
                                 "x": 10, "y": 10, "width": 50, "height": 40} for k in range(per_image)]}
        for img in range(n // per_image)]))
    (root / "image_data.json").write_text(json.dumps([
        {"image_id": img, "url": f"https://cs.stanford.edu/people/rak248/VG_100K/{img}.jpg", "width": 800,
         "height": 600} for img in range(n // per_image)]))
    files["visual-genome"] = [root / "region_descriptions.json", root / "image_data.json"]
    write_grit(root / "grit.parquet", n)
    files["grit"] = [root / "grit.parquet"]
    anns, img2 = {}, {}
    for i in range(n):
        image_id = f"t{i // 20}"
        anns[f"a{i}"] = {"image_id": image_id, "utf8_string": rng.choice(WORDS), "points": [1, 1, 9, 1, 9, 5, 1, 5]}
        img2.setdefault(image_id, []).append(f"a{i}")
    (root / "textocr.json").write_text(json.dumps({"imgs": {k: {"id": k, "file_name": f"train/{k}.jpg",
                                                                "width": 100, "height": 100} for k in img2},
                                                   "anns": anns, "imgToAnns": img2}))
    files["textocr"] = [root / "textocr.json"]
    (root / "llava.json").write_text(json.dumps([
        {"id": str(i), "image": f"{i // 1000:05d}/{i:09d}.jpg", "conversations": [
            {"from": "human", "value": "Describe.\n<image>"}, {"from": "gpt", "value": sentence(rng)}]}
        for i in range(n)]))
    files["llava-pretrain"] = [root / "llava.json"]
    return files


def write_grit(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    chunk = pa.list_(pa.float64())
    writer = None
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        table = pa.table({
            "key": [f"{i:09d}" for i in range(start, start + n)],
            "url": [f"https://grit.example/{i}.jpg" for i in range(start, start + n)],
            "caption": ["a dog and a cat on a sofa near the window"] * n, "width": [500] * n, "height": [400] * n,
            "noun_chunks": pa.array([[[0, 5, 0.1, 0.2, 0.4, 0.6, 0.9], [10, 15, 0.5, 0.5, 0.9, 0.9, 0.8]]] * n,
                                    pa.list_(chunk)),
            "ref_exps": pa.array([[[10, 15, 0.5, 0.5, 0.9, 0.9, 0.8]]] * n, pa.list_(chunk))})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def count_records(layout: str, files: list[Path]) -> int:
    from qvl.formats import importers

    return sum(1 for _ in importers.records(layout, files))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--grit-rows", default="100000,1000000")
    parser.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:  # a fresh process: import GRIT, print the peak
        n = count_records("grit", [Path(args.rss_child[0])])
        print(json.dumps({"records": n, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"command: python {' '.join(sys.argv)}\n")
    with tempfile.TemporaryDirectory(prefix="qvl-bench-import-") as tmp:
        root = Path(tmp)
        files = write_fixtures(root, args.records)
        print("| importer | records in | records out | records/s |")
        print("|---|---:|---:|---:|")
        for layout, paths in files.items():
            started = time.perf_counter()
            out = count_records(layout, paths)
            seconds = time.perf_counter() - started
            print(f"| {layout} | {args.records:,} | {out:,} | {out / seconds:,.0f} |")
        print("\n| GRIT parquet rows | records out | peak RSS |")
        print("|---:|---:|---:|")
        for rows in (int(r) for r in args.grit_rows.split(",")):
            path = root / f"grit-{rows}.parquet"
            write_grit(path, rows)
            done = subprocess.run([sys.executable, __file__, "--rss-child", str(path), "x"], capture_output=True,
                                  text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {rows:,} | {result['records']:,} | {result['peak_mib']:,.0f} MiB |")
            path.unlink()


if __name__ == "__main__":
    main()
