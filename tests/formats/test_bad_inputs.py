"""`qvl format` against broken and hostile inputs: one bad record is a reject with its file,
line and reason; a bad setting or folder is a one-line error; nothing is lost, no traceback."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from qvl.cli import app
from qvl.formats.build import FormatSettings, run_format

runner = CliRunner()


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (64, 48), "red").save(root / "red.png")
    Image.new("RGB", (600, 500), "blue").save(root / "big.png")  # 0.3 Mpx
    (root / "bomb.png").write_bytes(_png_header_only(20_000, 20_000))
    good = (root / "red.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims 20000x20000 pixels: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    rows = zlib.compress(b"\x00" * (width + 1) * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def cli(*args: str):
    return runner.invoke(app, ["format", *args, "--no-progress"])


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.startswith("error:"), result.output
    return " ".join(result.output.split())


REC = {"task": "caption", "image": "red.png", "caption": "a red square"}
CASES = [
    # record, reason
    ({**REC, "image": "bomb.png"}, "too_many_pixels"),
    ({**REC, "image": "big.png"}, "too_many_pixels"),  # over --max-pixels 100000 below
    ({**REC, "image": "truncated.png"}, "corrupt_image"),
    ({**REC, "image": "red\x00.png"}, "unsafe_image_path"),
    ({**REC, "image": "x" * 5000 + ".png"}, "unsafe_image_path"),  # a name too long for the file system
    ({**REC, "image": ""}, "bad_sample"),
    ({**REC, "image": 7}, "bad_sample"),
    ({"task": "ref_grounding", "image": "red.png", "ref": "it", "box": ["1", "2", "30", "40"]}, "bad_box"),
    ({"task": "ref_grounding", "image": "red.png", "ref": "it", "box": [True, 2, 30, 40]}, "bad_box"),
    ({"task": "ref_grounding", "image": "red.png", "ref": "it", "box": [1, 2, 30, None]}, "bad_box"),
    ({"task": "ocr", "image": "red.png", "lines": [{"text": "x", "quad": [[0, 0], ["1", 0], [1, 1], [0, 1]]}]}, "bad_box"),
    ({"task": "grounding", "image": "red.png", "caption": "a dog", "regions": [{"span": [False, 3], "boxes": [[1, 1, 5, 5]]}]},
     "bad_sample"),
    ({"task": "ref_grounding", "image": "red.png", "ref": "it", "box": [1, 2, 30, 40], "width": "64", "height": 48},
     "bad_box"),
    ({"task": "ref_grounding", "image": "red.png", "ref": "it", "box": [1, 2, 30, 40], "width": float("nan"),
      "height": 48}, "bad_box"),
    ({"task": "nope"}, "unknown_task"),
    ("[1, 2]", "malformed_json"),
]


def test_each_bad_record_is_a_reject_and_the_run_goes_on(tmp_path, images):
    src = write_jsonl(tmp_path / "ann.jsonl", [REC] + [r for r, _ in CASES] + [REC])
    manifest = run_format("multitask", [src], tmp_path / "out", images, show_progress=False,
                          settings=FormatSettings(tokenizer="bytes", image_tokens=4, max_pixels=100_000))
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert [(r["line"], r["reason"]) for r in rejects] == [(i + 2, reason) for i, (_, reason) in enumerate(CASES)]
    assert all(r["file"] == str(src) and r["detail"] for r in rejects)
    assert manifest["samples"] == 2 and manifest["records"] == len(CASES) + 2
    bomb = next(r for r in rejects if r["line"] == 2)
    assert "400000000 pixels" in bomb["detail"]  # refused from its header, never decoded


def test_an_output_with_no_sample_opens_and_inspect_says_so(tmp_path, images):
    import datasets

    src = write_jsonl(tmp_path / "ann.jsonl", [{**REC, "image": "missing.png"}])
    result = cli("multitask", "-i", str(src), "--images", str(images), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert len(datasets.load_from_disk(str(tmp_path / "out"))) == 0
    message = one_line_error(runner.invoke(app, ["format", "inspect", str(tmp_path / "out")]))
    assert "holds no rows (1 of 1 records rejected" in message


@pytest.mark.parametrize("args, message", [
    (["--images", "{tmp}/nowhere"], "--images {tmp}/nowhere: no such folder"),
    (["--image-tokens", "0"], "image_tokens: 0: an image needs at least one token"),
    (["--max-len", "0"], "max_len: 0: must be >= 1"),
    (["--pack-to", "-5"], "pack_to: -5: must be >= 1"),
    (["--max-pixels", "0"], "max_pixels: 0: must be >= 1"),
    (["--tokenizer", "{tmp}/no-tokenizer"], "--tokenizer"),
    (["-i", "{tmp}/ann.jsonl"], "given twice"),
])
def test_bad_settings_and_folders_are_one_line_errors(tmp_path, images, args, message):
    src = write_jsonl(tmp_path / "ann.jsonl", [REC])
    args = [a.format(tmp=tmp_path) for a in args]
    result = cli("multitask", "-i", str(src), "--out", str(tmp_path / "out"),
                 *(["--images", str(images)] if "--images" not in args else []), *args)
    assert message.format(tmp=tmp_path) in one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_duplicate_ids_are_counted_and_warned(tmp_path, images):
    src = write_jsonl(tmp_path / "ann.jsonl", [{**REC, "id": "a"}, {**REC, "id": "a"}, {**REC, "id": "b"}])
    result = cli("multitask", "-i", str(src), "--images", str(images), "--out", str(tmp_path / "out"),
                 "--tokenizer", "bytes", "--image-tokens", "4")
    assert result.exit_code == 0 and "1 sample(s) repeat an earlier id" in result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["duplicate_ids"] == {"samples": 1, "examples": ["a"]} and manifest["samples"] == 3


def test_same_file_names_in_two_folders_get_distinct_ids(tmp_path, images):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_jsonl(tmp_path / folder / "ann.jsonl", [REC])
    manifest = run_format("multitask", [tmp_path / "a" / "ann.jsonl", tmp_path / "b" / "ann.jsonl"], tmp_path / "out",
                          images, settings=FormatSettings(tokenizer="bytes", image_tokens=4), show_progress=False)
    import datasets

    assert sorted(datasets.load_from_disk(str(tmp_path / "out"))["id"]) == ["a/ann.jsonl:1", "b/ann.jsonl:1"]
    assert manifest["duplicate_ids"]["samples"] == 0


def test_overwrite_only_replaces_a_qvl_output_and_stale_temp_folders_go(tmp_path, images):
    src = write_jsonl(tmp_path / "ann.jsonl", [REC])
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    message = one_line_error(cli("multitask", "-i", str(src), "--images", str(images), "--out", str(precious),
                                 "--overwrite"))
    assert "not a qvl output" in message and (precious / "todo.txt").read_text() == "keep me"
    stale = tmp_path / f"out.tmp-{2 ** 22 + 12345}"  # a pid above Linux's limit: that process is gone
    stale.mkdir()
    (stale / "data-00000.arrow").write_bytes(b"half")
    mine = tmp_path / f"out.tmp-{os.getpid()}x"  # not a pid: left alone
    mine.mkdir()
    result = cli("multitask", "-i", str(src), "--images", str(images), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0 and not stale.exists() and mine.exists()
    again = cli("multitask", "-i", str(src), "--images", str(images), "--out", str(tmp_path / "out"), "--overwrite")
    assert again.exit_code == 0, again.output


# --- published layouts (`--from`): one bad record is a reject naming the file and the record ---

GOOD_COCO = {"id": 1, "file_name": "red.png"}


def _grit(tmp_path: Path, start: float) -> Path:
    import pyarrow as pa

    chunk = pa.list_(pa.float64())
    path = tmp_path / "grit-00000.parquet"
    pq.write_table(pa.table({
        "key": ["0", "1"], "url": ["https://grit.example/0.jpg"] * 2, "caption": ["a dog"] * 2, "width": [64] * 2,
        "height": [48] * 2,
        "noun_chunks": pa.array([[[0, 5, 0.1, 0.1, 0.5, 0.5, 0.9]], [[start, 5, 0.1, 0.1, 0.5, 0.5, 0.9]]],
                                pa.list_(chunk))}), path)
    return path


def _refs(refs: list) -> bytes:
    import pickle

    return pickle.dumps(refs, protocol=2)


REF = {"ref_id": 0, "ann_id": 7, "image_id": 1, "split": "train", "sentences": [{"sent": "the red square", "sent_id": 0}]}
INSTANCES = {"images": [{"id": 1, "file_name": "red.png", "width": 64, "height": 48}],
             "annotations": [{"id": 7, "image_id": 1, "bbox": [1, 2, 30, 40]}]}
VG_IMAGES = [{"image_id": 1, "url": "https://vg.example/VG_100K/1.jpg", "width": 64, "height": 48}]
VG_REGION = {"region_id": 1, "image_id": 1, "phrase": "a red square", "x": 1, "y": 2, "width": 30, "height": 40}
TEXTOCR_IMGS = {"a": {"id": "a", "file_name": "red.png", "width": 64, "height": 48},
                "b": {"id": "b", "file_name": "red.png", "width": 64, "height": 48}}
WORD = {"image_id": "a", "utf8_string": "STOP", "points": [1, 1, 30, 1, 30, 20, 1, 20]}
LLAVA_GOOD = {"id": "0", "image": "red.png", "conversations": [{"from": "human", "value": "<image>"},
                                                                {"from": "gpt", "value": "a red square"}]}

# layout, {file name: content}, the reject expected: (file name, index, reason, words in its detail)
IMPORTER_CASES = {
    "coco list id": ("coco-captions", {"captions.json": {
        "images": [GOOD_COCO, {"id": [2], "file_name": "red.png"}],
        "annotations": [{"id": 1, "image_id": 1, "caption": "a red square"},
                        {"id": [5], "image_id": 1, "caption": "x"}]}}, ("captions.json", 1, "bad_field", "$.id")),
    "coco list image_id": ("coco-captions", {"captions.json": {
        "images": [GOOD_COCO], "annotations": [{"id": 1, "image_id": 1, "caption": "a red square"},
                                               {"id": 2, "image_id": [1], "caption": "x"}]}},
                           ("captions.json", 1, "bad_field", "$.image_id")),
    "coco no id pairs with no image_id": ("coco-captions", {"captions.json": {
        "images": [GOOD_COCO, {"file_name": "red.png"}],
        "annotations": [{"id": 1, "image_id": 1, "caption": "a red square"}, {"id": 2, "caption": "unpaired"}]}},
                                          ("captions.json", 1, "bad_field", "image_id")),
    "vqav2 list question_id": ("vqav2", {
        "q.json": {"data_subtype": "val2014", "questions": [
            {"question_id": 1, "image_id": 1, "question": "What colour?"},
            {"question_id": [2], "image_id": 1, "question": "What?"}]},
        "a.json": {"annotations": [{"question_id": 1, "multiple_choice_answer": "red"}]}},
                               ("q.json", 1, "bad_field", "$.question_id")),
    "vqav2 missing question_id": ("vqav2", {
        "q.json": {"data_subtype": "val2014", "questions": [
            {"question_id": 1, "image_id": 1, "question": "What colour?"}, {"image_id": 1, "question": "What?"}]},
        "a.json": {"annotations": [{"question_id": 1, "multiple_choice_answer": "red"},
                                   {"multiple_choice_answer": "blue"}]}},
                                  ("q.json", 1, "bad_field", "question_id")),
    "refcoco list image_id": ("refcoco", {"refs(unc).p": _refs([REF, {**REF, "ref_id": 1, "image_id": [1]}]),
                                          "instances.json": INSTANCES},
                              ("refs(unc).p", 1, "bad_field", "$.image_id")),
    "refcoco ref without split": ("refcoco", {"refs(unc).p": _refs([REF, {k: v for k, v in REF.items() if k != "split"}]),
                                              "instances.json": INSTANCES}, ("refs(unc).p", 1, "bad_field", "split")),
    "refcoco image without file_name": ("refcoco", {
        "refs(unc).p": _refs([REF, {**REF, "ref_id": 1, "image_id": 2}]),
        "instances.json": {**INSTANCES, "images": INSTANCES["images"] + [{"id": 2, "width": 64, "height": 48}]}},
                                        ("refs(unc).p", 1, "bad_field", "file_name")),
    "vg list image_id": ("visual-genome", {
        "region_descriptions.json": [{"id": 1, "regions": [VG_REGION, {**VG_REGION, "image_id": [1]}]}],
        "image_data.json": VG_IMAGES}, ("region_descriptions.json", 2, "bad_field", "$.image_id")),
    "vg regions 5": ("visual-genome", {
        "region_descriptions.json": [{"id": 1, "regions": [VG_REGION]}, {"id": 1, "regions": 5}],
        "image_data.json": VG_IMAGES}, ("region_descriptions.json", 2, "bad_field", "$.regions")),
    "vg url without slash": ("visual-genome", {
        "region_descriptions.json": [{"id": 1, "regions": [VG_REGION]}, {"id": 2, "regions": [
            {**VG_REGION, "image_id": 2}]}],
        "image_data.json": VG_IMAGES + [{"image_id": 2, "url": "nourl", "width": 64, "height": 48}]},
                             ("region_descriptions.json", 2, "bad_field", "url")),
    "textocr string in a polygon": ("textocr", {"TextOCR_0.1_train.json": {
        "imgs": TEXTOCR_IMGS, "anns": {"a_1": WORD, "b_1": {**WORD, "points": [1, 1, "30", 1, 30, 20, 1, 20]}},
        "imgToAnns": {"a": ["a_1"], "b": ["b_1"]}}}, ("TextOCR_0.1_train.json", 1, "bad_field", "points")),
    "textocr int for the annotation list": ("textocr", {"TextOCR_0.1_train.json": {
        "imgs": TEXTOCR_IMGS, "anns": {"a_1": WORD}, "imgToAnns": {"a": ["a_1"], "b": 5}}},
                                            ("TextOCR_0.1_train.json", 1, "bad_field", "imgToAnns")),
    "coco image_id 10^400": ("coco-captions", {"captions.json": {
        "images": [GOOD_COCO], "annotations": [{"id": 1, "image_id": 1, "caption": "a red square"},
                                               {"id": 2, "image_id": 10 ** 400, "caption": "x"}]}},
                             ("captions.json", 1, "bad_field", "$.image_id")),
    "coco caption lone surrogate": ("coco-captions", {"captions.json": {
        "images": [GOOD_COCO], "annotations": [{"id": 1, "image_id": 1, "caption": "a red square"},
                                               {"id": 2, "image_id": 1, "caption": "x\ud800"}]}},
                                    ("captions.json", 1, "bad_text", "$.caption")),
    "refcoco bbox inf": ("refcoco", {
        "refs(unc).p": _refs([REF, {**REF, "ref_id": 1, "ann_id": 8}]),
        "instances.json": {**INSTANCES, "annotations": INSTANCES["annotations"] + [
            {"id": 8, "image_id": 1, "bbox": [float("inf"), 2, 30, 40]}]}},
                         ("refs(unc).p", 1, "bad_field", "bbox")),
    "gqa lone high surrogate (streamed)": ("gqa", {"gqa.json": {
        "1": {"question": "Is it red?", "answer": "yes", "imageId": "red"},
        "2": {"question": "Is it \ud800?", "answer": "yes", "imageId": "red"}}}, ("gqa.json", 1, "bad_text", "$.question")),
    "llava lone low surrogate (streamed)": ("llava-pretrain", {"blip.json": [LLAVA_GOOD, {
        "id": "1", "image": "red.png", "conversations": [{"from": "gpt", "value": "a\udfffb"}]}]},
                                            ("blip.json", 1, "bad_text", "$.conversations[0].value")),
    "llava conversations 5": ("llava-pretrain", {"blip.json": [LLAVA_GOOD, {"id": "1", "image": "red.png",
                                                                           "conversations": 5}]},
                              ("blip.json", 1, "bad_field", "$.conversations")),
}


def _write_published(tmp_path: Path, files: dict) -> list[Path]:
    paths = []
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
        paths.append(path)
    return paths


def _from(layout: str, paths: list[Path], images: Path, out: Path):
    return cli("multitask", "--from", layout, *map(str, paths), "--images", str(images), "--out", str(out),
               "--tokenizer", "bytes", "--image-tokens", "4")


def _kept_and_rejected(out: Path, expected: tuple) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert manifest["samples"] >= 1 and manifest["records"] == manifest["samples"] + manifest["rejected"]
    name, index, reason, words = expected
    bad = [r for r in rejects if Path(r["file"]).name == name and r["line"] == index]
    assert bad and bad[0]["reason"] == reason and words in bad[0]["detail"], rejects


@pytest.mark.parametrize("case", list(IMPORTER_CASES))
def test_a_bad_published_record_is_a_reject_naming_it(tmp_path, images, case):
    layout, files, expected = IMPORTER_CASES[case]
    for name in ("COCO_val2014_000000000001.jpg", "VG_100K/1.jpg", "red.jpg"):  # the images vqav2, VG, gqa name
        (images / name).parent.mkdir(exist_ok=True)
        (images / name).write_bytes((images / "red.png").read_bytes())
    result = _from(layout, _write_published(tmp_path, files), images, tmp_path / "out")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    _kept_and_rejected(tmp_path / "out", expected)


def test_grit_chunk_start_inf_is_a_reject(tmp_path, images):
    result = _from("grit", [_grit(tmp_path, float("inf"))], images, tmp_path / "out")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert [(r["line"], r["reason"]) for r in rejects if "noun_chunks" in r["detail"]] == [(1, "bad_field")], rejects


def test_vqav2_truncated_annotations_is_one_error_naming_the_file(tmp_path, images):
    q, a = _write_published(tmp_path, {
        "q.json": {"data_subtype": "val2014", "questions": [{"question_id": 1, "image_id": 1, "question": "What?"}]},
        "a.json": {"annotations": [{"question_id": 1, "multiple_choice_answer": "red"}] * 50}})
    a.write_bytes(a.read_bytes()[:-300])
    message = one_line_error(_from("vqav2", [q, a], images, tmp_path / "out"))
    assert f"{a}: " in message and "truncated" in message


@pytest.mark.parametrize("layout, name", [("gqa", "gqa.json"), ("llava-pretrain", "blip.json"),
                                          ("visual-genome", "region_descriptions.json")])
def test_deeply_nested_streamed_json_is_one_error_not_the_machine(tmp_path, images, layout, name):
    """ijson keeps a prefix per level: 200 KB of '[' asked it for ~100 GB."""
    opening = b'{"q": ' if layout == "gqa" else b""  # GQA's top level is an object
    (tmp_path / name).write_bytes(opening + b"[" * 200_000)


    (tmp_path / name).write_bytes(b'{"a":' * 40_000 if layout == "gqa" else b"[" * 200_000)  # gqa's is an object
    files = [tmp_path / name] + ([_write_published(tmp_path, {"image_data.json": VG_IMAGES})[0]]
                                 if layout == "visual-genome" else [])
    message = one_line_error(_from(layout, files, images, tmp_path / "out"))
    assert f"{tmp_path / name}: JSON nested more than 64 deep" in message


# ---------------------------------------------------------------- issue #19: typed records, bounded work

def rejects_of(out: Path) -> dict[int, dict]:
    return {r["line"]: r for r in pq.read_table(out / "rejects.parquet").to_pylist()}


def run_cli(kind: str, src: Path, out: Path, *args: str) -> dict:
    """`qvl format KIND` in process: exit 0, no traceback, every input line a sample or a reject."""
    result = cli(kind, "-i", str(src), "--out", str(out), *args)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    lines = len(src.read_bytes().splitlines())
    assert manifest["records"] == lines and manifest["samples"] + manifest["rejected"] == lines
    return manifest


def test_wrong_types_huge_numbers_and_lone_surrogates_are_rejects_naming_record_and_field(tmp_path, images):
    src = write_jsonl(tmp_path / "ann.jsonl", [
        REC,
        {**REC, "task": ["caption"]},
        {**REC, "lang": ["en"]},
        {"task": "ref_grounding", "image": "red.png", "ref": "it", "box": [0, 0, 10 ** 400, 10]},
        {"task": "ref_grounding", "image": "red.png", "ref": "it", "box": [0, 0, 10, 10], "width": 10 ** 400,
         "height": 48},
        {**REC, "caption": "a red \ud800 square"},  # json.dumps writes the escape \ud800
        {**REC, "id": ["x"]},
        {**REC, "captoin": "a misspelt key"},
        REC,
    ])
    manifest = run_cli("multitask", src, tmp_path / "out", "--images", str(images), "--tokenizer", "bytes",
                       "--image-tokens", "4")
    rejects = rejects_of(tmp_path / "out")
    assert {line: r["reason"] for line, r in rejects.items()} == {
        2: "unknown_task", 3: "bad_sample", 4: "bad_box", 5: "bad_box", 6: "bad_text", 7: "bad_sample", 8: "bad_sample"}
    assert manifest["samples"] == 2 and all(r["file"] == str(src) for r in rejects.values())
    for line, field in ((3, "$.lang"), (4, "$.box[2]"), (5, "$.width"), (6, "$.caption"), (7, "$.id"), (8, "captoin")):
        assert field in rejects[line]["detail"], rejects[line]


def test_sft_wrong_types_are_rejects_naming_the_field(tmp_path):
    good = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                        {"role": "assistant", "content": "hello"}]}
    src = write_jsonl(tmp_path / "chat.jsonl", [
        good,
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": ["just a string part"]}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": 7, "content": "hi"}]},
        {"conversations": [{"from": "human", "value": "hi \ud800"}, {"from": "gpt", "value": "x"}]},
        {"conversations": [{"from": "human", "value": ["hi"]}]},
        {"image": 5, "conversations": [{"from": "human", "value": "<image>"}]},
        {**good, "id": 10 ** 400},
        good,
    ])
    manifest = run_cli("sft", src, tmp_path / "out", "--tokenizer", "bytes")
    rejects = rejects_of(tmp_path / "out")
    assert {line: r["reason"] for line, r in rejects.items()} == {
        2: "bad_sample", 3: "bad_sample", 4: "bad_sample", 5: "bad_text", 6: "bad_sample", 7: "bad_sample",
        8: "bad_sample"}
    for line, field in ((2, "$.messages[0].content[0].text"), (3, "$.messages[0].content[0]"), (4, "$.messages[0].role"),
                        (5, "$.conversations[0].value"), (6, "$.conversations[0].value"), (7, "$.image"), (8, "$.id")):
        assert field in rejects[line]["detail"], rejects[line]
    assert manifest["samples"] == 2


def test_a_record_size_that_disagrees_with_the_image_is_rejected(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (640, 480), "red").save(root / "photo.png")
    ref = {"task": "ref_grounding", "image": "photo.png", "ref": "the left half", "box": [0, 0, 320, 480]}
    src = write_jsonl(tmp_path / "ann.jsonl", [
        {**ref, "width": 6400, "height": 4800},  # boxes for which size? refused rather than guessed
        {**ref, "width": 640, "height": 480, "id": "given"},  # the real size: fine
        {**ref, "id": "none"},  # no size: the image's
        {**ref, "box": [0, 0, 0.5, 1], "box_format": "norm", "width": 6400, "height": 4800, "id": "norm"},
        {**ref, "width": 640},  # half a size
    ])
    run_cli("multitask", src, tmp_path / "out", "--images", str(root), "--tokenizer", "bytes", "--image-tokens", "1")
    rejects = rejects_of(tmp_path / "out")
    assert {line: r["reason"] for line, r in rejects.items()} == {1: "size_mismatch", 5: "bad_box"}
    assert "6400x4800" in rejects[1]["detail"] and "640x480" in rejects[1]["detail"]
    import datasets

    from qvl.formats.tokenizers import load_tokenizer

    tok = load_tokenizer("bytes")
    rows = {r["id"]: tok.decode(r["input_ids"]) for r in datasets.load_from_disk(str(tmp_path / "out")).with_format(None)}
    assert set(rows) == {"given", "none", "norm"}
    assert all(text.endswith("<box>(0,0),(500,999)</box><|endoftext|>") for text in rows.values()), rows


@pytest.mark.parametrize("args, message", [
    (["--model", "qwen2-vl", "--max-image-pixels", "0"], "max_image_pixels: 0: must be an integer from 784"),
    (["--model", "qwen2-vl", "--max-image-pixels", "-1"], "max_image_pixels: -1: must be an integer from 784"),
    (["--model", "qwen3-vl", "--min-image-pixels", "0"], "min_image_pixels: 0: must be an integer from 1024"),
    (["--model", "qwen2.5-vl", "--min-image-pixels", "100000", "--max-image-pixels", "50000"],
     "min_image_pixels: 100000 is above max_image_pixels 50000"),
    (["--model", "qwen2-vl", "--max-image-pixels", str(1 << 40)], "max_image_pixels"),
    (["--max-image-pixels", "50000"], "max_image_pixels: only for --model"),
    (["--max-len", str(1 << 40)], "max_len: 1099511627776: must be <= 1,048,576"),
])
def test_resize_bounds_and_huge_settings_are_one_line_errors(tmp_path, images, args, message):
    src = write_jsonl(tmp_path / "ann.jsonl", [REC])
    result = cli("multitask", "-i", str(src), "--out", str(tmp_path / "out"), "--images", str(images), *args)
    assert message in one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_a_huge_image_file_is_refused_unread(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    from qvl.common.pixels import max_file_bytes

    limit = max_file_bytes(100_000)  # --max-pixels 100000 below
    with open(root / "huge.png", "wb") as f:  # a valid small PNG's bytes, then a sparse hole up to past the limit
        Image.new("RGB", (8, 8)).save(f, "PNG")
        f.truncate(limit + 1)
    (root / "claims.png").write_bytes(_png_header_only(20_000, 20_000) + b"\0" * 1000)
    src = write_jsonl(tmp_path / "ann.jsonl", [{**REC, "image": "huge.png"}, {**REC, "image": "claims.png"}, REC])
    Image.new("RGB", (8, 8)).save(root / "red.png")
    run_cli("multitask", src, tmp_path / "out", "--images", str(root), "--tokenizer", "bytes", "--image-tokens", "1",
            "--max-pixels", "100000")
    rejects = rejects_of(tmp_path / "out")
    assert {line: r["reason"] for line, r in rejects.items()} == {1: "file_too_large", 2: "too_many_pixels"}
    assert f"{limit + 1:,} bytes" in rejects[1]["detail"]


def test_malformed_lines_numbers_and_nesting_are_rejects_of_their_line(tmp_path, images, monkeypatch):
    from qvl.formats import records

    monkeypatch.setattr(records, "MAX_LINE_BYTES", 8192)  # the same code as at 64 MiB, with a small file
    src = write_jsonl(tmp_path / "ann.jsonl", [
        REC,
        '{"task": "caption", "image": "red.png", "caption": "x", "width": 1' + "0" * 5000 + "}",  # int() refuses it
        "[" * 8000,  # nesting past the recursion limit
        json.dumps({**REC, "caption": "long " * 2000}),  # over the line limit
        json.dumps({**REC, "caption": "x" * 1000}),  # under it
    ])
    run_cli("multitask", src, tmp_path / "out", "--images", str(images), "--tokenizer", "bytes", "--image-tokens", "4")
    assert {line: r["reason"] for line, r in rejects_of(tmp_path / "out").items()} == {
        2: "malformed_json", 3: "malformed_json", 4: "line_too_long"}


def test_a_json_list_with_a_huge_number_is_one_line_error(tmp_path, images):
    src = tmp_path / "ann.json"
    src.write_text('[{"task": "caption", "width": 1' + "0" * 5000 + "}]")
    message = one_line_error(cli("multitask", "-i", str(src), "--out", str(tmp_path / "out")))
    assert f"{src}: not valid JSON" in message


def test_text_longer_than_max_len_can_hold_is_rejected_before_tokenizing(tmp_path):
    """A turn of 1M spaces makes tiktoken give up (its regex's backtracking limit); with the
    default --max-len it is too long by its length alone and never reaches the tokenizer; with a
    --max-len that could hold it, the tokenizer's refusal rejects that conversation alone."""
    spaces = {"conversations": [{"from": "user", "value": " " * 1_000_000}, {"from": "assistant", "value": "ok"}]}
    good = {"conversations": [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "ok"}]}
    src = write_jsonl(tmp_path / "chat.jsonl", [good, spaces, good])
    run_cli("sft", src, tmp_path / "a")
    assert {line: r["reason"] for line, r in rejects_of(tmp_path / "a").items()} == {2: "too_long"}
    run_cli("sft", src, tmp_path / "b", "--max-len", "20000")
    assert {line: r["reason"] for line, r in rejects_of(tmp_path / "b").items()} == {2: "untokenizable"}


def test_a_lone_surrogate_in_a_key_or_where_no_text_belongs_is_bad_text(tmp_path, images):
    src = write_jsonl(tmp_path / "ann.jsonl", [{**REC, "\ud800": 1}, {**REC, "width": "\ud800", "height": 48}, REC])
    run_cli("multitask", src, tmp_path / "out", "--images", str(images), "--tokenizer", "bytes", "--image-tokens", "4")
    assert {line: r["reason"] for line, r in rejects_of(tmp_path / "out").items()} == {1: "bad_text", 2: "bad_text"}
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "user", "content": "hi", "\udfff": 0}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "images": ["\ud800"]},
        {"conversations": [{"from": "\ud800", "value": "hi"}]}])
    run_cli("sft", chat, tmp_path / "sft", "--tokenizer", "bytes")
    assert {line: r["reason"] for line, r in rejects_of(tmp_path / "sft").items()} == {
        1: "bad_text", 2: "bad_text", 3: "bad_text"}


# ---------------------------------------------------------------- issue #19, second probe

@pytest.mark.parametrize("pickled, words", [
    (b"\x80\x02]r\xff\xff\xff\xff.", "memo index 4294967295"),  # LONG_BINPUT 2^32-1: CPython sized its memo to 32 GB
    (b"\x80\x04\x8e" + b"\xff" * 8 + b".", "bytes8 byte count"),  # BINBYTES8 of 2^64-1 bytes: OverflowError
    (b"\x80\x04\x95" + (2**63 - 1).to_bytes(8, "little") + b"].", "frame of"),
    (b"\x80\x02](}q\x00b.", "refuses opcode BUILD"),
])
def test_a_refs_pickle_that_asks_for_memory_or_objects_is_one_error_naming_it(tmp_path, images, pickled, words):
    refs, instances = _write_published(tmp_path, {"refs(unc).p": pickled, "instances.json": INSTANCES})
    for command in (_from("refcoco", [refs, instances], images, tmp_path / "out"),
                    cli("export", "--from", "refcoco", str(refs), str(instances), "--out", str(tmp_path / "x"), "--to", "ms-swift")):
        message = one_line_error(command)
        assert f"{refs}: not a plain refs pickle" in message and words in message, message


GQA_GOOD = {"1": {"question": "What colour?", "answer": "red", "imageId": "red"}}
VQA_QUESTIONS = {"data_subtype": "val2014", "questions": [{"question_id": 1, "image_id": 1, "question": "What?"}]}
VQA_ANSWERS = {"annotations": [{"question_id": 1, "multiple_choice_answer": "red"}]}


@pytest.mark.parametrize("layout, files, words", [
    ("gqa", {"gqa.json": [1, 2]}, "gqa.json: the layout publishes an object at the top level, not a list"),
    ("llava-pretrain", {"blip.json": {"a": LLAVA_GOOD}},
     "blip.json: the layout publishes a list at the top level, not an object"),
    ("visual-genome", {"region_descriptions.json": {"regions": []}, "image_data.json": VG_IMAGES},
     "region_descriptions.json: the layout publishes a list at the top level, not an object"),
    ("vqav2", {"q.json": [VQA_QUESTIONS], "a.json": VQA_ANSWERS}, "need a file with 'questions'"),
    ("vqav2", {"q.json": {**VQA_QUESTIONS, "questions": {"1": VQA_QUESTIONS["questions"][0]}}, "a.json": VQA_ANSWERS},
     "q.json: 'questions' must be a list of questions, not an object"),
    ("vqav2", {"q.json": VQA_QUESTIONS, "a.json": {"annotations": "none"}},
     "a.json: 'annotations' must be a list of annotations, not a string"),
])
def test_a_published_file_of_the_wrong_shape_is_one_error_naming_it(tmp_path, images, layout, files, words):
    message = one_line_error(_from(layout, _write_published(tmp_path, files), images, tmp_path / "out"))
    assert words in message, message


@pytest.mark.parametrize("layout, name, content", [("gqa", "gqa.json", GQA_GOOD),
                                                   ("llava-pretrain", "blip.json", [LLAVA_GOOD])])
def test_a_streamed_file_may_start_with_a_utf8_bom_as_a_loaded_one_may(tmp_path, images, layout, name, content):
    (images / "red.jpg").write_bytes((images / "red.png").read_bytes())
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(content).encode())
    result = _from(layout, [path], images, tmp_path / "out")
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["samples"] == 1


@pytest.mark.parametrize("command", ["multitask", "export"])
@pytest.mark.parametrize("limit", ["-3", "0"])
def test_a_limit_below_one_is_one_error_not_an_empty_output(tmp_path, images, command, limit):
    gqa = _write_published(tmp_path, {"gqa.json": GQA_GOOD})[0]
    tail = ["--images", str(images), "--tokenizer", "bytes"] if command == "multitask" else ["--to", "ms-swift"]
    message = one_line_error(cli(command, "--from", "gqa", str(gqa), "--limit", limit, "--out", str(tmp_path / "out"),
                                 *tail))
    assert f"--limit {limit}: must be 1 or more" in message
    assert not (tmp_path / "out").exists()


# --- --downloads: img2dataset output, or a `qvl curate download` folder ---

def _downloads(tmp_path: Path, tables: dict[str, dict], tars: dict[str, bytes]) -> Path:
    """A --downloads folder of parquet ``tables`` and tars (name -> one image, member 0.jpg)."""
    import io
    import tarfile

    import pyarrow as pa

    folder = tmp_path / "downloads"
    for name, columns in tables.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(columns), folder / name)
    for name, data in tars.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tmp_path / name, "w") as tar:
            info = tarfile.TarInfo("0.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return folder


def _grit_with(downloads: Path, tmp_path: Path):
    return cli("multitask", "--from", "grit", str(_grit(tmp_path, 0)), "--downloads", str(downloads),
               "--out", str(tmp_path / "out"), "--tokenizer", "bytes", "--image-tokens", "4")


URL = "https://grit.example/0.jpg"


@pytest.mark.parametrize("tables, words", [
    ({"meta.parquet": {"url": [URL], "caption": ["a dog"]}}, "meta.parquet: not img2dataset output (no key, status)"),
    ({"00000.parquet": {"url": [URL], "key": [0], "status": [1]}},
     "00000.parquet: not img2dataset output (key is int64, status is int64, not text)"),
    ({"kept/part-00000.parquet": {"url": [URL], "image_key": ["0"]}},
     "part-00000.parquet (not a `qvl curate download` kept table): missing column(s) image_tar"),
    ({"kept/part-00000.parquet": {"url": [URL], "image_tar": [3], "image_key": ["0"]}},
     "part-00000.parquet (not a `qvl curate download` kept table): column 'image_tar' is int64, expected a string"),
    ({"00000.parquet": {"x": [b"\x00"]}}, "00000.parquet: not img2dataset output (no url, key, status)"),
])
def test_a_downloads_table_of_another_shape_is_one_error_naming_it(tmp_path, tables, words):
    message = one_line_error(_grit_with(_downloads(tmp_path, tables, {}), tmp_path))
    assert words in message, message


def test_a_downloads_file_that_is_not_parquet_is_one_error_naming_it(tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "00000.parquet").write_text("url,key,status\n")
    message = one_line_error(_grit_with(folder, tmp_path))
    assert f"{folder / '00000.parquet'}: not a readable parquet file" in message, message


@pytest.mark.parametrize("tar, reason, words", [
    (None, "missing_image", "part-00000.parquet row 1: no image_tar"),
    ("../outside.tar", "unsafe_image_path", "tar '../outside.tar': must be a relative path inside --downloads"),
    ("/abs/outside.tar", "unsafe_image_path", "must be a relative path inside --downloads"),
    ("link.tar", "unsafe_image_path", "tar 'link.tar': resolves outside --downloads"),
    ("attempts/001/00000.tar", None, ""),
])
def test_a_kept_row_with_no_tar_or_one_outside_downloads_is_that_images_reject(tmp_path, images, tar, reason, words):
    red = (images / "red.png").read_bytes()
    folder = _downloads(tmp_path, {"kept/part-00000.parquet": {"url": [URL], "image_tar": [tar], "image_key": ["0"]}},
                        {"outside.tar": red, "downloads/attempts/001/00000.tar": red})
    (folder / "link.tar").symlink_to(tmp_path / "outside.tar")
    result = _grit_with(folder, tmp_path)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    if reason is None:
        assert rejects == [] and json.loads((tmp_path / "out" / "manifest.json").read_text())["samples"] == 2
    else:
        assert rejects and all(r["reason"] == reason and words in r["detail"] for r in rejects), rejects
