"""Conversations rendered for Qwen2-VL, Qwen2.5-VL and Qwen3-VL: token ids equal what the
Hugging Face processor of the installed transformers makes of the same conversation (its
tokenizer.json built here from qwen.tiktoken with the family's special tokens, its image
processor with the released preprocessor settings — nothing downloaded), for images of odd
sizes; labels, and boxes converted on real COCO boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvl.formats import families
from qvl.formats.families import reference_processor
from qvl.formats.build import FormatSettings, run_format
from qvl.formats.tokenizers import load_tokenizer

SIZES = [(640, 480), (17, 23), (5000, 3000), (1500, 10)]  # ordinary, tiny, huge, 1:150


def photo(path: Path, size) -> None:
    rng = np.random.default_rng(sum(size))
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    (root / "img").mkdir()
    records = []
    for i, size in enumerate(SIZES):
        photo(root / "img" / f"{i}.png", size)
        records.append({"id": f"c{i}", "conversations": [
            {"from": "user", "value": f"Picture 1: <img>{i}.png</img>\nWhat is in the picture?"},
            {"from": "assistant", "value": "A field of coloured noise, café."},
            {"from": "user", "value": "Anything else?"},
            {"from": "assistant", "value": "Nothing."}]})
    (root / "convo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root, records


def messages_of(record: dict) -> list[dict]:
    """The same conversation as the Hugging Face processors take it."""
    out = []
    for turn in record["conversations"]:
        text = turn["value"]
        if "<img>" in text:
            out.append({"role": "user", "content": [{"type": "image"},
                                                    {"type": "text", "text": text.split("\n", 1)[1]}]})
        else:
            out.append({"role": "user" if turn["from"] == "user" else "assistant",
                        "content": [{"type": "text", "text": text}]})
    return out


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_ids_and_labels_equal_the_hugging_face_processor(data, tmp_path, name):
    import datasets

    root, records = data
    processor = reference_processor(name, tmp_path / "processor")
    run_format("sft", [root / "convo.jsonl"], tmp_path / "out", root / "img", show_progress=False,
               settings=FormatSettings(model=name, max_len=100_000))
    rows = {r["id"]: r for r in datasets.load_from_disk(str(tmp_path / "out")).with_format(None)}
    tok = load_tokenizer(name)
    for i, record in enumerate(records):
        text = processor.apply_chat_template(messages_of(record), tokenize=False)
        image = Image.open(root / "img" / f"{i}.png").convert("RGB")
        expected = processor(text=[text], images=[image])["input_ids"][0]
        ids, labels = rows[record["id"]]["input_ids"], rows[record["id"]]["labels"]
        assert ids == list(expected), (name, SIZES[i])
        n = ids.count(tok.special("<|image_pad|>"))
        assert n == families.image_tokens(families.family(name), *SIZES[i])[0]
        supervised = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
        # the assistant's contents, each with its <|im_end|> and newline; nothing of the system or user turns
        assert supervised == "A field of coloured noise, café.<|im_end|>\nNothing.<|im_end|>\n"
    assert (name == "qwen3-vl") == ("You are a helpful assistant." not in tok.decode(rows["c0"]["input_ids"]))


def test_resize_bounds_are_settings(data, tmp_path):
    root, _ = data
    processor = reference_processor("qwen2-vl", tmp_path / "p", min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    manifest = run_format("sft", [root / "convo.jsonl"], tmp_path / "out", root / "img", show_progress=False,
                          settings=FormatSettings(model="qwen2-vl", min_image_pixels=28 * 28 * 4,
                                                  max_image_pixels=28 * 28 * 64))
    image = Image.open(root / "img" / "2.png").convert("RGB")
    grid = processor.image_processor(images=[image])["image_grid_thw"][0]
    assert int(grid.prod()) // 4 == families.image_tokens(families.family("qwen2-vl"), 5000, 3000, 28 * 28 * 4,
                                                              28 * 28 * 64)[0] <= 64
    assert manifest["model"] == "qwen2-vl"


COCO_39769 = {"width": 640, "height": 480, "box_xywh": [40.65, 38.8, 418.38, 333.41]}  # a cat of coco_39769


@pytest.mark.parametrize("name, answer", [
    ("qwen2-vl", "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(63,80),(717,775)<|box_end|>"),
    # pixels of the resized image: 640x480 -> 644x476 (multiples of 28)
    ("qwen2.5-vl", '{"bbox_2d": [41, 38, 462, 369], "label": "the cat"}'),
    ("qwen3-vl", '{"bbox_2d": [63, 80, 717, 775], "label": "the cat"}'),
])
def test_boxes_in_each_family_convention(tmp_path, name, answer):
    import datasets

    from qvl.formats.boxes import box_text, normalize_box

    c = COCO_39769
    box = box_text(normalize_box(c["box_xywh"], c["width"], c["height"], "xywh"))
    assert box == "(63,80),(717,775)"
    (tmp_path / "img").mkdir()
    photo(tmp_path / "img" / "cat.png", (c["width"], c["height"]))
    (tmp_path / "c.jsonl").write_text(json.dumps({"id": "x", "conversations": [
        {"from": "user", "value": "Picture 1: <img>cat.png</img>\nWhere is the cat?"},
        {"from": "assistant", "value": f"<ref>the cat</ref><box>{box}</box>"}]}) + "\n")
    run_format("sft", [tmp_path / "c.jsonl"], tmp_path / "out", tmp_path / "img", show_progress=False,
               settings=FormatSettings(model=name))
    row = datasets.load_from_disk(str(tmp_path / "out")).with_format(None)[0]
    tok = load_tokenizer(name)
    supervised = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert tok._enc.decode(supervised[:-2]) == answer  # the answer before <|im_end|> and its newline
    assert families.image_tokens(families.family("qwen2.5-vl"), 640, 480)[1] == (644, 476)


def test_a_tokenizer_file_with_other_ids_is_refused(tmp_path, data):
    root, _ = data
    processor = reference_processor("qwen2-vl", tmp_path / "p")
    processor.tokenizer.save_pretrained(tmp_path / "tok")
    ok = run_format("sft", [root / "convo.jsonl"], tmp_path / "o1", root / "img", show_progress=False,
                    settings=FormatSettings(model="qwen2-vl", tokenizer=str(tmp_path / "tok"), max_len=100_000))
    assert ok["samples"] == len(SIZES)
    with pytest.raises(ValueError, match="not at qwen3-vl's ids"):
        run_format("sft", [root / "convo.jsonl"], tmp_path / "o2", root / "img", show_progress=False,
                   settings=FormatSettings(model="qwen3-vl", tokenizer=str(tmp_path / "tok")))
