"""Runs in ms-swift's own virtualenv (tests/interop/setup_consumers.sh): ms-swift's preprocessing
of a `qvl format export --to ms-swift` folder, as `swift export --to_cached_dataset` and training
run it — its argument parsing, dataset loading (`--dataset_shuffle false` keeps rows in order) and
`template.encode` (qwen_vl_utils' `fetch_image`, then the processor with `do_resize=False`), with
ROOT_IMAGE_DIR set to the export folder as its swift.env says.

    python run_swift.py JOBS.json   (a list of [EXPORT_DIR, MODEL_DIR, TEMPLATE, OUT.json])

writes [{"input_ids", "labels", "image_grid_thw", "fed_sizes"} | {"error"}] in the export's order.
"""

import json
import os
import sys
import tempfile


def main(export: str, model: str, template: str, out: str) -> None:
    os.environ.setdefault("MODELSCOPE_CACHE", tempfile.mkdtemp())
    # data.jsonl's image paths are relative to the export: ms-swift resolves them under ROOT_IMAGE_DIR,
    # which swift.env sets (read at each image, so one process serves several exports)
    os.environ["ROOT_IMAGE_DIR"] = os.path.abspath(export)
    from swift.pipelines.export.cached_dataset import ExportCachedDataset

    work = os.path.join(tempfile.mkdtemp(), "cached")
    pipeline = ExportCachedDataset([
        "--model", model, "--model_type", template, "--template", template,
        "--dataset", os.path.join(export, "data.jsonl"), "--dataset_shuffle", "false", "--split_dataset_ratio", "0",
        "--to_cached_dataset", "true", "--output_dir", work, "--dataset_num_proc", "1",
        "--load_from_cache_file", "false", "--max_length", "100000", "--truncation_strategy", "delete"])
    train, _ = pipeline._prepare_dataset()
    template_ = pipeline.template
    rows = []
    for row in train:
        row = {k: v for k, v in row.items() if k != "lengths"}
        try:
            encoded = template_.encode(row)
        except Exception as e:  # noqa: BLE001 - reported per sample
            rows.append({"error": f"{type(e).__name__}: {e}"[:500]})
            continue
        grid = encoded.get("image_grid_thw")
        grid = [] if grid is None else [[int(v) for v in g] for g in grid]
        patch = template_.processor.image_processor.patch_size
        rows.append({"input_ids": [int(i) for i in encoded["input_ids"]],
                     "labels": [int(i) for i in encoded["labels"]],
                     "image_grid_thw": grid,
                     "fed_sizes": [[w * patch, h * patch] for _, h, w in grid]})
    with open(out, "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        for job in json.load(f):  # [[EXPORT_DIR, MODEL_DIR, TEMPLATE, OUT.json, ...], ...]: one import for all
            main(*job)
