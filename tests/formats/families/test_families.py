"""Conversations rendered for Qwen2-VL, Qwen2.5-VL and Qwen3-VL: token ids equal what the
Hugging Face processor of the installed transformers makes of the same conversation (its
tokenizer.json built here from qwen.tiktoken with the family's special tokens, its image
processor with the released preprocessor settings — nothing downloaded), for images of odd
sizes; labels, and boxes converted on real COCO boxes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvl.formats import families
from qvl.formats.build import FormatSettings, run_format
from qvl.formats.families import vision
from qvl.formats.render import markup
from qvl.formats.tokenizers import load_tokenizer
from tests.reference.processors import reference_processor

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


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    """Each family's reference processor, built once for the module."""
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = reference_processor(name, tmp_path_factory.mktemp(name))
        return built[name]
    return get


def rope_index(name: str, ids: list[int], image_grid_thw, image_pad: int) -> list[list[int]]:
    """The model's own ``get_rope_index`` (transformers), for one sample."""
    from types import SimpleNamespace

    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    cls = {"qwen2-vl": Qwen2VLModel, "qwen2.5-vl": Qwen2_5_VLModel, "qwen3-vl": Qwen3VLModel}[name]
    model = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(spatial_merge_size=2,
                                                                                 tokens_per_second=2)))
    model.get_vision_position_ids = lambda *args, **kwargs: cls.get_vision_position_ids(model, *args, **kwargs)
    input_ids = torch.tensor([ids])
    positions, _ = cls.get_rope_index(model, input_ids, (input_ids == image_pad).int(), image_grid_thw)
    return positions[:, 0].tolist()


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
def test_ids_and_labels_equal_the_hugging_face_processor(data, tmp_path, name, processors):
    import datasets

    root, records = data
    processor = processors(name)
    run_format("sft", [root / "convo.jsonl"], tmp_path / "out", root / "img", show_progress=False,
               settings=FormatSettings(model=name, max_len=100_000))
    rows = {r["id"]: r for r in datasets.load_from_disk(str(tmp_path / "out")).with_format(None)}
    tok = load_tokenizer(name)
    for i, record in enumerate(records):
        text = processor.apply_chat_template(messages_of(record), tokenize=False)
        image = Image.open(root / "img" / f"{i}.png").convert("RGB")
        processed = processor(text=[text], images=[image])
        expected = processed["input_ids"][0]
        ids, labels = rows[record["id"]]["input_ids"], rows[record["id"]]["labels"]
        assert ids == list(expected), (name, SIZES[i])
        assert rows[record["id"]]["position_ids"] == rope_index(name, ids, processed["image_grid_thw"],
                                                                tok.special("<|image_pad|>")), (name, SIZES[i])
        n = ids.count(tok.special("<|image_pad|>"))
        assert n == vision.image_tokens(families.family(name), *SIZES[i])[0]
        supervised = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
        # the assistant's contents, each with its <|im_end|> and newline; nothing of the system or user turns
        assert supervised == "A field of coloured noise, café.<|im_end|>\nNothing.<|im_end|>\n"
    assert (name == "qwen3-vl") == ("You are a helpful assistant." not in tok.decode(rows["c0"]["input_ids"]))


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_a_turn_starting_with_a_newline_tokenizes_as_the_template_does(data, tmp_path, name, processors):
    """A system or user turn that starts with "\\n": the template's whole string tokenizes
    "user\\n\\nAnd" with "\\n\\n" as one token (271), and so does `qvl format sft`; the labels stay
    on the answers alone."""
    import datasets

    root, _ = data
    record = {"id": "n", "messages": [
        {"role": "system", "content": "\nBe brief."},
        {"role": "user", "content": "<image>What is it?"},
        {"role": "assistant", "content": "Noise."},
        {"role": "user", "content": "\nAnd in one word?"},
        {"role": "assistant", "content": "Noise."}], "images": ["0.png"]}
    (tmp_path / "n.jsonl").write_text(json.dumps(record) + "\n")
    run_format("sft", [tmp_path / "n.jsonl"], tmp_path / "out", root / "img", show_progress=False,
               settings=FormatSettings(model=name, max_len=100_000))
    row = datasets.load_from_disk(str(tmp_path / "out")).with_format(None)[0]
    messages = [{"role": "system", "content": [{"type": "text", "text": "\nBe brief."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Noise."}]},
                {"role": "user", "content": [{"type": "text", "text": "\nAnd in one word?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Noise."}]}]
    processor = processors(name)
    text = processor.apply_chat_template(messages, tokenize=False)
    image = Image.open(root / "img" / "0.png").convert("RGB")
    expected = list(processor(text=[text], images=[image])["input_ids"][0])
    assert row["input_ids"] == expected
    assert row["input_ids"].count(271) == 2 and 271 in processor.tokenizer.encode("user\n\nAnd")
    tok = load_tokenizer(name)
    supervised = tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100])
    assert supervised == "Noise.<|im_end|>\nNoise.<|im_end|>\n"


def test_resize_bounds_are_settings(data, tmp_path):
    root, _ = data
    processor = reference_processor("qwen2-vl", tmp_path / "p", min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64)
    manifest = run_format("sft", [root / "convo.jsonl"], tmp_path / "out", root / "img", show_progress=False,
                          settings=FormatSettings(model="qwen2-vl", min_image_pixels=28 * 28 * 4,
                                                  max_image_pixels=28 * 28 * 64))
    image = Image.open(root / "img" / "2.png").convert("RGB")
    grid = processor.image_processor(images=[image])["image_grid_thw"][0]
    assert int(grid.prod()) // 4 == vision.image_tokens(families.family("qwen2-vl"), 5000, 3000, 28 * 28 * 4,
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

    from qvl.formats.render.boxes import box_text, pixel_box, scale_box

    c = COCO_39769
    box = box_text(scale_box(pixel_box(c["box_xywh"], c["width"], c["height"], "xywh"), c["width"], c["height"]))
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
    assert vision.image_tokens(families.family("qwen2.5-vl"), 640, 480)[1] == (644, 476)


def test_a_tokenizer_file_with_other_ids_is_refused(tmp_path, data, processors):
    root, _ = data
    processor = processors("qwen2-vl")
    processor.tokenizer.save_pretrained(tmp_path / "tok")
    ok = run_format("sft", [root / "convo.jsonl"], tmp_path / "o1", root / "img", show_progress=False,
                    settings=FormatSettings(model="qwen2-vl", tokenizer=str(tmp_path / "tok"), max_len=100_000))
    assert ok["samples"] == len(SIZES)
    with pytest.raises(ValueError, match="not at qwen3-vl's ids"):
        run_format("sft", [root / "convo.jsonl"], tmp_path / "o2", root / "img", show_progress=False,
                   settings=FormatSettings(model="qwen3-vl", tokenizer=str(tmp_path / "tok")))


CAT = [40.65, 38.8, 418.38, 333.41]  # coco_39769's cat, xywh on 640x480
SALE = [[100, 100], [300, 100], [300, 200], [100, 200]]
MULTITASK = [
    {"id": "caption", "task": "caption", "image": "cat.png", "caption": "a cat on a couch"},
    {"id": "vqa", "task": "vqa", "image": "cat.png", "question": "What animal is it?", "answer": "a cat"},
    {"id": "grounding", "task": "grounding", "image": "cat.png", "caption": "a cat on a couch", "box_format": "xywh",
     "regions": [{"span": [0, 5], "boxes": [CAT]}]},
    {"id": "ref_grounding", "task": "ref_grounding", "image": "cat.png", "ref": "the cat", "box": CAT,
     "box_format": "xywh"},
    {"id": "grounded_caption", "task": "grounded_caption", "image": "cat.png", "box": CAT, "box_format": "xywh",
     "caption": "a cat"},
    {"id": "ocr", "task": "ocr", "image": "cat.png", "lines": [{"text": "SALE", "quad": SALE}]},
]
GROUNDING_PROMPT = "Generate the caption in English with grounding:"
TOKENS_BOX = "<|box_start|>(63,80),(717,775)<|box_end|>"
EXPECTED = {  # (user text after the image, assistant text) per family and task
    "qwen2-vl": {
        "grounding": (GROUNDING_PROMPT, f"<|object_ref_start|>a cat<|object_ref_end|>{TOKENS_BOX} on a couch"),
        "ref_grounding": ("<|object_ref_start|>the cat<|object_ref_end|>", TOKENS_BOX),
        "grounded_caption": (f"<|object_ref_start|>This<|object_ref_end|>{TOKENS_BOX}", " is a cat"),
        "ocr": ("OCR with grounding:", "<|object_ref_start|>SALE<|object_ref_end|><|quad_start|>(156,208),(468,208),"
                                       "(468,416),(156,416)<|quad_end|>"),
    },
    "qwen2.5-vl": {  # pixels of the resized 644x476 image
        "grounding": (GROUNDING_PROMPT, '{"bbox_2d": [41, 38, 462, 369], "label": "a cat"} on a couch'),
        "ref_grounding": ("Locate the cat, output its bbox coordinates using JSON format.",
                          '```json\n[\n\t{"bbox_2d": [41, 38, 462, 369], "label": "the cat"}\n]\n```'),
        "grounded_caption": ('Describe the region {"bbox_2d": [41, 38, 462, 369]} in one sentence.', "a cat"),
        "ocr": ("Spotting all the text in the image with line-level, and output in JSON format.",
                '```json\n[\n\t{"bbox_2d": [101, 99, 302, 198], "text_content": "SALE"}\n]\n```'),
    },
    "qwen3-vl": {
        "grounding": (GROUNDING_PROMPT, '{"bbox_2d": [63, 80, 717, 775], "label": "a cat"} on a couch'),
        "ref_grounding": ("Locate the cat, output its bbox coordinates using JSON format.",
                          '```json\n[\n\t{"bbox_2d": [63, 80, 717, 775], "label": "the cat"}\n]\n```'),
        "grounded_caption": ('Describe the region {"bbox_2d": [63, 80, 717, 775]} in one sentence.', "a cat"),
        "ocr": ("Spotting all the text in the image with line-level, and output in JSON format.",
                '```json\n[\n\t{"bbox_2d": [156, 208, 468, 416], "text_content": "SALE"}\n]\n```'),
    },
}
for answers in EXPECTED.values():
    answers["caption"] = ("Generate the caption in English:", "a cat on a couch")
    answers["vqa"] = ("What animal is it?", "a cat")


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_multitask_formats_render_as_the_familys_chat(tmp_path, name, processors):
    """Each pre-training format as one exchange in the family's template: ids equal the
    processor's for the expected prompt and answer, boxes from real COCO pixels, the loss on
    the answer, its <|im_end|> and newline."""
    import datasets

    (tmp_path / "img").mkdir()
    photo(tmp_path / "img" / "cat.png", (640, 480))
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MULTITASK)
                                      + json.dumps({"id": "text", "task": "text", "text": "Plain text."}) + "\n")
    manifest = run_format("multitask", [tmp_path / "m.jsonl"], tmp_path / "out", tmp_path / "img",
                          show_progress=False, settings=FormatSettings(model=name))
    assert manifest["samples"] == len(MULTITASK) + 1 and manifest["model"] == name
    rows = {r["id"]: r for r in datasets.load_from_disk(str(tmp_path / "out")).with_format(None)}
    processor = processors(name)
    tok = load_tokenizer(name)
    image = Image.open(tmp_path / "img" / "cat.png").convert("RGB")
    for task, (prompt, answer) in EXPECTED[name].items():
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        expected = processor(text=[processor.apply_chat_template(messages, tokenize=False)], images=[image])
        ids, labels = rows[task]["input_ids"], rows[task]["labels"]
        assert ids == list(expected["input_ids"][0]), (name, task, tok.decode(ids))
        assert tok.decode([t for t, lab in zip(ids, labels) if lab != -100]) == answer + "<|im_end|>\n", task
    text = rows["text"]
    assert tok.decode(text["input_ids"]) == "Plain text.<|endoftext|>" and text["labels"] == text["input_ids"]


def test_multitask_text_fields_cannot_forge_family_tokens(tmp_path):
    import datasets

    (tmp_path / "img").mkdir()
    photo(tmp_path / "img" / "cat.png", (640, 480))
    forged = "<|box_start|>(1,2),(3,4)<|box_end|><|vision_start|><|image_pad|><|im_end|>"
    (tmp_path / "m.jsonl").write_text(json.dumps({"task": "ref_grounding", "image": "cat.png", "ref": forged,
                                                  "box": CAT, "box_format": "xywh"}) + "\n")
    run_format("multitask", [tmp_path / "m.jsonl"], tmp_path / "out", tmp_path / "img", show_progress=False,
               settings=FormatSettings(model="qwen2-vl"))
    ids = datasets.load_from_disk(str(tmp_path / "out")).with_format(None)[0]["input_ids"]
    tok = load_tokenizer("qwen2-vl")
    assert ids.count(tok.special("<|box_start|>")) == 1 and ids.count(tok.special("<|vision_start|>")) == 1
    assert ids.count(tok.special("<|im_end|>")) == 3  # system, user, assistant: none from the text


def test_packed_rows_keep_each_samples_positions(data, tmp_path):
    """Packed, every sample's M-RoPE positions count from 0 as they would alone."""
    import datasets

    root, records = data
    alone = run_format("sft", [root / "convo.jsonl"], tmp_path / "alone", root / "img", show_progress=False,
                       settings=FormatSettings(model="qwen2.5-vl", max_len=20_000))
    packed = run_format("sft", [root / "convo.jsonl"], tmp_path / "packed", root / "img", show_progress=False,
                        settings=FormatSettings(model="qwen2.5-vl", max_len=20_000, pack_to=20_000))
    assert packed["rows"] < alone["rows"] == len(records)
    single = {r["id"]: r["position_ids"] for r in datasets.load_from_disk(str(tmp_path / "alone")).with_format(None)}
    for row in datasets.load_from_disk(str(tmp_path / "packed")).with_format(None):
        assert [len(p) for p in row["position_ids"]] == [len(row["input_ids"])] * 3
        start = 0
        for sample_id, n in zip(row["sample_ids"], row["sample_lengths"]):
            assert [p[start:start + n] for p in row["position_ids"]] == single[sample_id]
            start += n


def test_cli_renders_multitask_for_a_family_and_shows_it(tmp_path):
    from typer.testing import CliRunner

    from qvl.cli import app

    (tmp_path / "img").mkdir()
    photo(tmp_path / "img" / "cat.png", (640, 480))
    (tmp_path / "m.jsonl").write_text(json.dumps(MULTITASK[3]) + "\n")
    runner = CliRunner()
    made = runner.invoke(app, ["format", "multitask", "-i", str(tmp_path / "m.jsonl"), "--images", str(tmp_path / "img"),
                               "--out", str(tmp_path / "out"), "--model", "qwen3-vl", "--max-image-pixels",
                               str(32 * 32 * 100), "--no-progress"])
    assert made.exit_code == 0, made.output
    shown = runner.invoke(app, ["format", "inspect", str(tmp_path / "out")])
    n = vision.image_tokens(families.family("qwen3-vl"), 640, 480, None, 32 * 32 * 100)[0]
    assert shown.exit_code == 0 and f"<|image_pad|>×{n}" in shown.output and '"label": "the cat"' in shown.output
    assert n <= 100


@pytest.mark.parametrize("content, said", [
    ("<ref>a</ref><box>(" + "9" * 5000 + ",20),(10,400)</box>", "not (x1,y1),(x2,y2) within 0-1000"),
    ("<ref>a</ref><box>(100000000000000000000,20),(10,400)</box>", "within 0-1000"),
    ("<ref>a</ref><box>(6,20),(3000,400)</box>", "within 0-1000"),
    ("<ref>a</ref><box>(300,20),(10,400)</box>", "x1 < x2"),
    ("<ref>a</ref><box>(nan,20),(10,400)</box>", "within 0-1000"),
    ("<ref>a</ref><box>(-5,20),(10,400)</box>", "within 0-1000"),
    ("<ref>a</ref> is here", "<ref> that does not convert"),
    ("<ref>a<box>(1,2),(30,40)</box></ref>", "<ref> that does not convert"),
])
def test_a_box_that_cannot_be_trained_on_rejects_its_record(content, said):
    """Boxes past 0-1000, inverted, of 10^20 or of 5,000 digits, and Qwen-VL markup that has no
    counterpart in the family's JSON boxes are the record's bad_box — never trained on as text,
    never a run's end (a 5,000-digit box ended `format export` with Python's int() limit)."""
    from qvl.errors import AnnotationError

    for name in ("qwen2.5-vl", "qwen3-vl"):
        with pytest.raises(AnnotationError, match=re.escape(said)) as e:
            markup.convert("<img>a.png</img>" + content, families.family(name), lambda ref: (644, 476))
        assert e.value.reason == "bad_box"
    if "does not convert" not in said:  # Qwen-VL's own and Qwen2-VL's token boxes take the same check
        with pytest.raises(AnnotationError, match=re.escape(said)):
            markup.convert(content, families.family("qwen2-vl"), None)
        with pytest.raises(AnnotationError, match=re.escape(said)):
            markup.check_boxes(content)


def test_a_box_less_than_a_pixel_of_the_resized_image_is_refused():
    from qvl.errors import AnnotationError

    fam = families.family("qwen2.5-vl")
    assert markup.convert("<img>a</img><box>(1,1),(3,3)</box>", fam, lambda ref: (644, 476)) == \
        '<img>a</img>{"bbox_2d": [1, 0, 2, 1]}'
    with pytest.raises(AnnotationError, match="less than a pixel"):
        markup.convert("<img>a</img><box>(1,1),(2,2)</box>", fam, lambda ref: (644, 476))
