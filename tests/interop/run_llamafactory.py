"""Runs in LLaMA-Factory's own virtualenv (tests/interop/setup_consumers.sh): LLaMA-Factory's
preprocessing of a `qvl format export --to llamafactory` folder, as `llamafactory-cli train`
(stage sft) runs it — `get_train_args`, `load_tokenizer`, `get_template_and_fix_tokenizer` and
`get_dataset` over the export's own dataset_info.json; the grids are what its plugin's
`_get_mm_inputs` (its `_preprocess_image`, then the processor) gives the model for the images.

    python run_llamafactory.py JOBS.json   (a list of [EXPORT_DIR, MODEL_DIR, TEMPLATE, OUT.json, KEY=VALUE...])

writes [{"input_ids", "labels", "image_grid_thw", "fed_sizes"}] in the export's order.
"""

import json
import sys
import tempfile


def main(export: str, model: str, template: str, out: str, *extra: str) -> None:
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    args = {"model_name_or_path": model, "stage": "sft", "do_train": True, "finetuning_type": "lora",
            "dataset": "qvl", "dataset_dir": export, "template": template, "cutoff_len": 100_000,
            "preprocessing_num_workers": None, "overwrite_cache": True, "output_dir": tempfile.mkdtemp(),
            "report_to": "none", "per_device_train_batch_size": 1}
    for item in extra:
        key, value = item.split("=", 1)
        args[key] = int(value) if value.isdigit() else value
    model_args, data_args, training_args, _, _ = get_train_args(args)
    tokenizer_module = load_tokenizer(model_args)
    template_ = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    dataset = get_dataset(template_, model_args, data_args, training_args, stage="sft",
                          **tokenizer_module)["train_dataset"]
    processor = tokenizer_module["processor"]
    patch = processor.image_processor.patch_size
    rows = []
    for row in dataset:
        images = row.get("images") or []
        grid = []
        if images:
            mm = template_.mm_plugin._get_mm_inputs(images, [], [], processor)
            grid = [[int(v) for v in g] for g in mm["image_grid_thw"]]
        rows.append({"input_ids": [int(i) for i in row["input_ids"]], "labels": [int(i) for i in row["labels"]],
                     "image_grid_thw": grid, "fed_sizes": [[w * patch, h * patch] for _, h, w in grid]})
    with open(out, "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        for job in json.load(f):  # [[EXPORT_DIR, MODEL_DIR, TEMPLATE, OUT.json, ...], ...]: one import for all
            main(*job)
