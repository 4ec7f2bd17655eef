"""`qvl format` end to end: shards that datasets opens, every record accounted for, packing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from qvl.cli import app
from qvl.formats.build import FormatSettings, run_format
from qvl.formats.tokenizers import load_tokenizer


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for name, color in (("red.png", "red"), ("blue.jpg", "blue")):
        Image.new("RGB", (640, 480), color).save(root / name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    os.symlink(outside, root / "link.png")
    return root


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records))
    return path


def test_multitask_shards_round_trip_through_datasets(tmp_path, images):
    import datasets

    records = [
        {"task": "caption", "image": "red.png", "caption": "a red square"},
        {"task": "ref_grounding", "image": "blue.jpg", "ref": "the blue", "box": [64, 48, 320, 240], "id": "rg1"},
        {"task": "text", "text": "just text"},
        "{broken json",
        {"task": "caption", "image": "missing.png", "caption": "x"},
        {"task": "caption", "image": "broken.jpg", "caption": "x"},
        {"task": "caption", "image": "../secret.png", "caption": "x"},
        {"task": "caption", "image": "link.png", "caption": "x"},
        {"task": "caption", "image": "/etc/passwd", "caption": "x"},
        {"task": "ref_grounding", "image": "red.png", "ref": "x", "box": [0, 0, 9999, 10]},
        {"task": "caption", "image": "red.png", "caption": "long " * 50},
    ]
    src = write_jsonl(tmp_path / "ann.jsonl", records)
    manifest = run_format("multitask", [src], tmp_path / "out", images,
                          settings=FormatSettings(image_tokens=8, max_len=40), show_progress=False)
    assert (manifest["records"], manifest["samples"], manifest["rejected"]) == (11, 3, 8)
    assert manifest["rejected_by_reason"] == {"bad_box": 1, "corrupt_image": 1, "malformed_json": 1,
                                              "missing_image": 1, "too_long": 1, "unsafe_image_path": 3}
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert [r["line"] for r in rejects] == [4, 5, 6, 7, 8, 9, 10, 11]
    assert all(r["file"].endswith("ann.jsonl") and r["detail"] for r in rejects)

    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert ds["id"] == ["ann.jsonl:1", "rg1", "ann.jsonl:3"]
    assert ds.features["images"].feature.__class__.__name__ == "Image"
    first = ds[0]
    assert first["images"][0].size == (640, 480)  # bytes inline decode to the real image
    assert len(first["input_ids"]) == len(first["labels"]) == first["sample_lengths"][0]
    tok = load_tokenizer("qwen-vl")
    assert first["input_ids"].count(tok.special("<imgpad>")) == 8
    arrow = sorted((tmp_path / "out").glob("data-*.arrow"))
    assert datasets.Dataset.from_file(str(arrow[0])).num_rows == 3


def test_packing_never_splits_and_reports_efficiency(tmp_path):
    records = [{"task": "text", "text": "word " * n} for n in [3, 40, 7, 22, 15, 1, 30, 9, 12, 18] * 20]
    records.append({"task": "text", "text": "word " * 200})
    src = write_jsonl(tmp_path / "t.jsonl", records)
    manifest = run_format("multitask", [src], tmp_path / "out", settings=FormatSettings(pack_to=64),
                          show_progress=False)
    assert manifest["rejected_by_reason"] == {"too_long": 1}
    table = pa.ipc.open_stream(next((tmp_path / "out").glob("data-*.arrow"))).read_all().to_pylist()
    assert sum(len(r["sample_ids"]) for r in table) == 200
    assert all(len(r["input_ids"]) == sum(r["sample_lengths"]) <= 64 for r in table)
    assert sorted(i for r in table for i in r["sample_ids"]) == sorted(f"t.jsonl:{i}" for i in range(1, 201))
    real = sum(len(r["input_ids"]) for r in table)
    assert manifest["packing"]["efficiency"] == round(real / (64 * len(table)), 4)
    assert manifest["packing"]["efficiency"] > 0.9


def img2dataset_output(folder: Path, image: Path, url: str) -> Path:
    """One shard of img2dataset's webdataset output holding ``image`` as downloaded from ``url``."""
    import tarfile

    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as t:
        t.add(image, arcname="000000000.jpg")
    pq.write_table(pa.table({"url": [url], "key": ["000000000"], "status": ["success"]}), folder / "00000.parquet")
    return folder


def test_urls_resolve_through_local_img2dataset_output(tmp_path, images):
    downloads = img2dataset_output(tmp_path / "downloads", images / "red.png", "https://x.test/red")
    src = tmp_path / "kept.parquet"  # curated pairs, as `qvl curate filter` writes them
    pq.write_table(pa.table({"row_id": ["a:0", "a:1"], "url": ["https://x.test/red", "https://x.test/gone"],
                             "text": ["a red square", "gone"], "lang": ["en", "en"], "source": ["laion"] * 2}), src)
    manifest = run_format("multitask", [src], tmp_path / "out", downloads=downloads,
                          settings=FormatSettings(tokenizer="bytes", image_tokens=4), show_progress=False)
    assert (manifest["samples"], manifest["rejected_by_reason"]) == (1, {"missing_image": 1})
    assert manifest["by_task"] == {"caption": {"samples": 1, "tokens": manifest["tokens"]}}


def test_cli_sft_inspect_and_existing_output(tmp_path, images):
    runner = CliRunner()
    src = write_jsonl(tmp_path / "c.jsonl", [{"id": "c1", "conversations": [
        {"from": "user", "value": "Picture 1: <img>red.png</img>\nColour?"}, {"from": "assistant", "value": "Red."}]}])
    args = ["format", "sft", "-i", str(src), "--images", str(images), "--out", str(tmp_path / "o"), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "holds a qvl format output" in again.output
    shown = runner.invoke(app, ["format", "inspect", str(tmp_path / "o")])
    assert shown.exit_code == 0 and "Red." in shown.output and "<imgpad>×256" in shown.output
    missing = runner.invoke(app, ["format", "sft", "-i", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")])
    assert missing.exit_code == 1 and "nope.jsonl: no such file" in missing.output
    for not_a_file in (tmp_path, Path("/dev/zero")):  # it exists: "no such file" would mislead
        refused = runner.invoke(app, ["format", "sft", "-i", str(not_a_file), "--out", str(tmp_path / "x")])
        assert refused.exit_code == 1 and f"{not_a_file}: not a regular file" in refused.output, refused.output


def test_written_features_equal_datasets_own():
    import datasets

    from qvl.formats.shards import FEATURES, FEATURES_MROPE

    own = datasets.Features({
        "id": datasets.Value("string"), "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")), "images": datasets.Sequence(datasets.Image()),
        "task": datasets.Value("string"), "source": datasets.Value("string"),
        "sample_ids": datasets.Sequence(datasets.Value("string")),
        "sample_lengths": datasets.Sequence(datasets.Value("int32"))})
    assert own.to_dict() == FEATURES
    own["position_ids"] = datasets.Sequence(datasets.Sequence(datasets.Value("int32")))
    assert own.to_dict() == FEATURES_MROPE
