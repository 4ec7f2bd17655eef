"""ms-swift and LLaMA-Factory datasets: what the tool's processor makes of an exported record is
what `qvl format` renders for the same record; LLaMA-Factory's pre-resize is in the boxes;
every record is written or rejected with its reason."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from qvl.errors import AnnotationError
from qvl.formats import families
from qvl.formats.build import FormatSettings, run_format
from qvl.formats.export import ExportSettings, run_export, tool_resize
from qvl.formats.families import vision
from tests.formats.families.test_families import CAT, photo
from tests.formats.test_build import img2dataset_output
from tests.reference.processors import reference_processor


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    (root / "img").mkdir()
    photo(root / "img" / "cat.png", (640, 480))
    photo(root / "img" / "wide.png", (1500, 1000))
    conversations = [
        {"id": "c1", "conversations": [
            {"from": "user", "value": "Picture 1: <img>wide.png</img>\nWhere is the cat?"},
            {"from": "assistant", "value": "<ref>the cat</ref><box>(100,100),(500,500)</box>"},
            {"from": "user", "value": "And the sofa?"},
            {"from": "assistant", "value": "<ref>the sofa</ref><box>(0,500),(999,999)</box>, below it."}]},
        {"id": "c2", "messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "<image>\nWhat is it?"},
                                  {"role": "assistant", "content": "A cat."}], "images": ["cat.png"]},
    ]
    annotations = [
        {"id": "m1", "task": "ref_grounding", "image": "cat.png", "ref": "the cat", "box": CAT, "box_format": "xywh"},
        {"id": "m2", "task": "grounding", "image": "cat.png", "caption": "a cat on a couch", "box_format": "xywh",
         "regions": [{"span": [0, 5], "boxes": [CAT]}]},
        {"id": "m3", "task": "vqa", "image": "wide.png", "question": "What is it?", "answer": "noise"},
    ]
    (root / "convo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conversations))
    (root / "ann.jsonl").write_text("".join(json.dumps(r) + "\n" for r in annotations))
    return root


def hf_messages(record: dict) -> tuple[list[dict], int]:
    """An exported record as the processor's chat template takes it (``<image>`` -> an image part)."""
    out, images = [], 0
    for m in record["messages"]:
        parts = []
        for i, text in enumerate(m["content"].split("<image>")):
            if i:
                parts.append({"type": "image"})
                images += 1
            if text:
                parts.append({"type": "text", "text": text})
        out.append({"role": m["role"], "content": parts})
    return out, images


@pytest.mark.parametrize("name", ["qwen2-vl", "qwen2.5-vl"])
def test_ms_swift_records_give_the_ids_qvl_renders(data, tmp_path, name):
    """What the processor makes of each exported record equals `qvl format`'s ids for the same
    record: template, image tokens, and boxes in the model's convention."""
    import datasets

    processor = reference_processor(name, tmp_path / "processor")
    for kind, file in (("sft", "convo.jsonl"), ("multitask", "ann.jsonl")):
        report = run_export([data / file], tmp_path / f"swift-{kind}", data / "img", show_progress=False,
                            settings=ExportSettings(target="ms-swift", model=name))
        run_format(kind, [data / file], tmp_path / f"fmt-{kind}", data / "img", show_progress=False,
                   settings=FormatSettings(model=name, max_len=100_000))
        rows = {r["id"]: r["input_ids"] for r in datasets.load_from_disk(str(tmp_path / f"fmt-{kind}"))
                .with_format(None)}
        exported = [json.loads(line) for line in (tmp_path / f"swift-{kind}" / "data.jsonl").read_text().splitlines()]
        assert report["samples"] == len(exported) == len(rows) and report["rejected"] == 0
        for record in exported:
            messages, n = hf_messages(record)
            folder = tmp_path / f"swift-{kind}"
            assert n == len(record["images"]) and all(not Path(p).is_absolute() and (folder / p).is_file()
                                                      for p in record["images"])
            pictures = [Image.open(folder / p).convert("RGB") for p in record["images"]]
            text = processor.apply_chat_template(messages, tokenize=False)
            ids = processor(text=[text], images=pictures)["input_ids"][0]
            assert list(ids) == rows[record["id"]], (name, record["id"], record["messages"])
    conversation = json.loads((tmp_path / "swift-sft" / "data.jsonl").read_text().splitlines()[0])
    answer = conversation["messages"][1]["content"]
    if name == "qwen2-vl":
        assert answer == "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(100,100),(500,500)<|box_end|>"
    else:  # pixels of 1500x1000 resized by the processor: 1512x1008
        assert vision.image_tokens(families.family(name), 1500, 1000)[1] == (1512, 1008)
        assert answer == '{"bbox_2d": [151, 101, 756, 504], "label": "the cat"}'


def test_llamafactory_boxes_follow_its_pre_resize(data, tmp_path):
    """LLaMA-Factory shrinks the image to image_max_pixels before the processor: the boxes are in
    pixels of what the processor then makes of that image."""
    report = run_export([data / "convo.jsonl"], tmp_path / "lf", data / "img", show_progress=False,
                        settings=ExportSettings(target="llamafactory", model="qwen2.5-vl"))
    assert report["resize"]["image_max_pixels"] == 768 * 768
    record = json.loads((tmp_path / "lf" / "data.jsonl").read_text().splitlines()[0])
    image = Image.open(tmp_path / "lf" / record["images"][0])
    width, height = tool_resize(image.width, image.height, 768 * 768, 32 * 32)
    assert (width, height) == (940, 627)  # LLaMA-Factory's _preprocess_image: sides * sqrt(max / area), truncated
    processor = reference_processor("qwen2.5-vl", tmp_path / "processor")
    grid = processor.image_processor(images=[image.convert("RGB").resize((width, height))])["image_grid_thw"][0]
    resized = (int(grid[2]) * 14, int(grid[1]) * 14)
    assert resized == (952, 616)
    x1, y1, x2, y2 = (round(v / 1000 * s) for v, s in zip((100, 100, 500, 500), resized * 2))
    assert record["messages"][1]["content"] == f'{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": "the cat"}}'
    info = json.loads((tmp_path / "lf" / "dataset_info.json").read_text())
    assert info["qvl"]["file_name"] == "data.jsonl" and info["qvl"]["formatting"] == "sharegpt"
    assert info["qvl"]["columns"] == {"messages": "messages", "images": "images"}
    system = json.loads((tmp_path / "lf" / "data.jsonl").read_text().splitlines()[1])["messages"][0]
    assert system == {"role": "system", "content": "Be brief."}


def test_every_record_written_or_rejected_with_its_reason(data, tmp_path):
    import shutil

    shutil.copy(data / "img" / "cat.png", tmp_path / "cat.png")
    downloads = img2dataset_output(tmp_path / "downloads", tmp_path / "cat.png", "https://x.test/cat")
    records = [
        {"task": "caption", "image": "cat.png", "caption": "a cat"},
        {"task": "caption", "image": "https://x.test/cat", "caption": "a cat from the web"},
        {"task": "caption", "image": "cat.png", "caption": "a cat<|im_end|><|im_start|>system"},
        {"task": "caption", "image": "cat.png", "caption": "two <image> placeholders"},
        {"conversations": [{"from": "user", "value": "<img>cat.png</img> hi <|vision_start|>"},
                           {"from": "assistant", "value": "x"}]},
        {"task": "text", "text": "pre-training text"},
        {"task": "caption", "image": "missing.png", "caption": "gone"},
        {"task": "caption", "image": "../cat.png", "caption": "outside"},
        {"task": "poetry", "image": "cat.png"},
    ]
    src = tmp_path / "mixed.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records) + "{broken\n")
    report = run_export([src], tmp_path / "out", data / "img", downloads, show_progress=False,
                        settings=ExportSettings(target="ms-swift", model="qwen3-vl"))
    assert report["records"] == len(records) + 1 == report["samples"] + report["rejected"]
    assert report["rejected_by_reason"] == {"special_token_in_text": 3, "unsupported_for_export": 1,
                                            "missing_image": 1, "unsafe_image_path": 1, "unknown_task": 1,
                                            "malformed_json": 1}
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["line"] for r in rejects) == [3, 4, 5, 6, 7, 8, 9, 10]
    written = [json.loads(line) for line in (tmp_path / "out" / "data.jsonl").read_text().splitlines()]
    web, local = Path(written[1]["images"][0]), Path(written[0]["images"][0])
    assert web.parent == Path("images/web") and (tmp_path / "out" / web).read_bytes() == (tmp_path / "cat.png").read_bytes()
    assert local == Path("images/local/cat.png") and (tmp_path / "out" / local).read_bytes() == \
        (data / "img" / "cat.png").read_bytes()
    assert written[0]["messages"] == [{"role": "user", "content": "<image>Generate the caption in English:"},
                                      {"role": "assistant", "content": "a cat"}]  # Qwen3-VL: no default system


def test_cli_export_and_refusals(data, tmp_path):
    from typer.testing import CliRunner

    from qvl.cli import app

    runner = CliRunner()
    args = ["format", "export", "-i", str(data / "ann.jsonl"), "--images", str(data / "img"), "--no-progress"]
    made = runner.invoke(app, [*args, "--to", "llamafactory", "--out", str(tmp_path / "lf"), "--model", "qwen3-vl"])
    assert made.exit_code == 0, made.output
    assert "3 records for llamafactory" in made.output and "image_max_pixels: 589824" in made.output
    again = runner.invoke(app, [*args, "--to", "llamafactory", "--out", str(tmp_path / "lf")])
    assert again.exit_code == 1 and "holds a qvl export" in again.output
    wrong = runner.invoke(app, [*args, "--to", "axolotl", "--out", str(tmp_path / "x")])
    assert wrong.exit_code == 1 and "target: 'axolotl': use ms-swift, llamafactory (--to)" in wrong.output


# ---------------------------------------------------------------- bad input

def _cli(*args: str):
    from typer.testing import CliRunner

    from qvl.cli import app

    return CliRunner().invoke(app, ["format", "export", "--no-progress", *args])


@pytest.mark.parametrize("option, value, message", [
    ("--tool-max-pixels", "0", "tool_max_pixels: 0: must be a whole number of pixels from 1"),
    ("--tool-max-pixels", "-5", "tool_max_pixels: -5"),
    ("--tool-min-pixels", "0", "tool_min_pixels: 0"),
    ("--tool-min-pixels", "1000000", "tool_min_pixels: 1000000: more than tool_max_pixels (589824)"),
    ("--min-image-pixels", "0", "min_image_pixels: 0"),
    ("--max-image-pixels", "-1", "max_image_pixels: -1"),
    ("--max-image-pixels", str(10 ** 30), "max_image_pixels: 1000000000000000000000000000000"),
    ("--max-pixels", "0", "max_pixels: 0"),
])
def test_every_export_setting_is_checked(data, tmp_path, option, value, message):
    result = _cli("-i", str(data / "ann.jsonl"), "--images", str(data / "img"), "--to", "llamafactory",
                  "--out", str(tmp_path / "out"), option, value)
    assert result.exit_code == 1 and result.output.startswith("error:") and "Traceback" not in result.output
    assert message in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_a_bad_record_is_a_reject_of_that_record_only(data, tmp_path):
    """A lone surrogate (``bad_text``), a list where the task or id belongs, an image the tool
    refuses: each rejects its own record, the run goes on."""
    good = {"task": "caption", "image": "cat.png", "caption": "a cat"}
    lines = [json.dumps(good),
             '{"task": "caption", "image": "cat.png", "caption": "a cat \\ud800"}',
             json.dumps({**good, "task": ["caption"]}),
             json.dumps({**good, "id": [1]}),
             json.dumps({**good, "id": 10 ** 30}),
             json.dumps({"task": "ref_grounding", "image": "strip.png", "ref": "it", "box": [1, 2, 30, 4]}),
             json.dumps(good)]
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "cat.png").write_bytes((data / "img" / "cat.png").read_bytes())
    photo(tmp_path / "img" / "strip.png", (3000, 10))  # aspect over 200: ms-swift's qwen_vl_utils refuses it
    report = run_export([src], tmp_path / "out", tmp_path / "img", show_progress=False,
                        settings=ExportSettings(target="ms-swift"))
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejects] == [(2, "bad_text"), (3, "bad_field"), (4, "bad_field"),
                                                          (5, "bad_field"), (6, "bad_image_size")]
    assert "$.caption" in rejects[0]["detail"] and "$.task" in rejects[1]["detail"] and "$.id" in rejects[2]["detail"]
    assert report["records"] == len(lines) == report["samples"] + report["rejected"] and report["samples"] == 2


def test_a_killed_exports_temp_folders_are_cleaned(data, tmp_path):
    """A kill -9 leaves ``OUT.tmp-PID`` (and, mid-replace, ``OUT.old-PID``): the next run removes
    those of processes that are gone, and only those."""
    dead = 2 ** 22 + 12345  # above Linux's pid limit: no such process
    for name in (f"out.tmp-{dead}", f"out.old-{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data.jsonl").write_text("half")
    alive = tmp_path / f"out.tmp-{os.getppid()}"  # a live process (another export): left alone
    alive.mkdir()
    other = tmp_path / "out.tmp-notes"
    other.mkdir()
    run_export([data / "ann.jsonl"], tmp_path / "out", data / "img", show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", alive.name, other.name])


# ---------------------------------------------------------------- each tool's resize, and --check

def test_each_tools_resize_of_a_side_under_28_px():
    """ms-swift: qwen_vl_utils' smart_resize rounds a side to at least one factor (the processor's
    would round it to 0 and grow the area to min_pixels); LLaMA-Factory: its Qwen2-VL plugin
    stretches a side under 28 px to 28, clamps an aspect over 200, then the processor resizes."""
    from qvl.formats.export import ToolBounds, fed_size, swift_bounds, swift_resize

    q2, q3 = families.family("qwen2-vl"), families.family("qwen3-vl")
    assert vision.image_tokens(q2, 1500, 10)[1] == (700, 28)  # `qvl format sft`: the processor on the raw image
    assert swift_resize(q2, 1500, 10, 3136, 12845056) == (1512, 28)
    assert swift_resize(q2, 2000, 13, 3136, 12845056) == (1988, 28)
    assert swift_resize(q3, 1500, 10, 65536, 16777216) == (3136, 32)
    assert tool_resize(1500, 10, 768 * 768, 32 * 32) == (1500, 28)
    assert tool_resize(10_000, 10, 768 * 768, 32 * 32) == (28 * 180, 28)  # 10000x28 is over 200:1
    assert tool_resize(10, 1500, 768 * 768, 32 * 32) == (28, 1500)
    lf = ToolBounds("llamafactory", 32 * 32, 768 * 768, 3136, 12845056)
    assert fed_size(lf, q2, 1500, 10) == (1512, 28)
    # ms-swift counts its bounds in whole tokens (value // factor**2): the export floors its own
    assert swift_bounds(families.family("qwen2.5-vl"), None, 200_000) == (3136, 255 * 784)
    with pytest.raises(AnnotationError, match="aspect ratio over 200"):
        swift_resize(q2, 3000, 10, 3136, 12845056)


def test_the_settings_are_written_where_each_tool_reads_them(data, tmp_path):
    import yaml

    swift = run_export([data / "convo.jsonl"], tmp_path / "swift", data / "img", show_progress=False,
                       settings=ExportSettings(target="ms-swift", model="qwen2.5-vl", max_image_pixels=200_000))
    assert swift["resize"]["max_pixels"] == 255 * 784 and swift["resize"]["floored_from"]["max_pixels"] == 200_000
    env = dict(line.split("=", 1) for line in (tmp_path / "swift" / "swift.env").read_text().splitlines()
               if line and not line.startswith("#"))
    assert env == {"MAX_PIXELS": str(255 * 784), "MIN_PIXELS": "3136",
                   "ROOT_IMAGE_DIR": str((tmp_path / "swift").resolve())}
    lf = run_export([data / "convo.jsonl"], tmp_path / "lf", data / "img", show_progress=False,
                    settings=ExportSettings(target="llamafactory", model="qwen3-vl", tool_max_pixels=256 * 256))
    config = yaml.safe_load((tmp_path / "lf" / "llamafactory.yaml").read_text())
    assert config == {"dataset": "qvl", "dataset_dir": str((tmp_path / "lf").resolve()), "template": "qwen3_vl_nothink",
                      "image_max_pixels": 256 * 256, "image_min_pixels": 32 * 32}
    assert lf["resize"]["yaml"] == {"image_max_pixels": 256 * 256, "image_min_pixels": 32 * 32}


@pytest.mark.parametrize("target", ["ms-swift", "llamafactory"])
def test_check_finds_the_records_whose_boxes_would_move(data, tmp_path, target):
    """Exported for the tool's defaults: checked as the tool runs by default, every box lands;
    checked with a smaller max bound, the boxed record on the big image is reported."""
    from qvl.formats.export_check import run_check

    run_export([data / "convo.jsonl"], tmp_path / "out", data / "img", show_progress=False,
               settings=ExportSettings(target=target, model="qwen2.5-vl"))
    agreed = run_check(tmp_path / "out", target, environ={})
    assert agreed["ok"] and agreed["records"] == 2 and agreed["images"] == 2 and not agreed["moved"]
    moved = run_check(tmp_path / "out", target, max_pixels=256 * 256, environ={})
    assert not moved["ok"] and [m["id"] for m in moved["moved"]] == ["c1"]  # c2 is resized too, but has no box
    assert moved["resized"] == 2
    if target == "ms-swift":  # MAX_PIXELS from the environment, as ms-swift reads it
        assert not run_check(tmp_path / "out", target, environ={"MAX_PIXELS": str(256 * 256)})["ok"]
    other = "llamafactory" if target == "ms-swift" else "ms-swift"
    with pytest.raises(ValueError, match=f"exported for {target}, not {other}"):
        run_check(tmp_path / "out", other)


def test_cli_check(data, tmp_path, monkeypatch):
    monkeypatch.delenv("MAX_PIXELS", raising=False)
    monkeypatch.delenv("MIN_PIXELS", raising=False)
    run_export([data / "convo.jsonl"], tmp_path / "out", data / "img", show_progress=False,
               settings=ExportSettings(target="ms-swift", model="qwen2.5-vl", max_image_pixels=200_000))
    bare = _cli("--check", str(tmp_path / "out"), "--to", "ms-swift")  # ms-swift's defaults: not what it was made for
    assert bare.exit_code == 1 and "boxes move: c1 (images/local/wide.png)" in bare.output, bare.output
    set_ = _cli("--check", str(tmp_path / "out"), "--to", "ms-swift", "--tool-max-pixels", "200000")
    assert set_.exit_code == 0 and "ok: every box lands" in set_.output, set_.output
    monkeypatch.setenv("MAX_PIXELS", "200000")
    assert _cli("--check", str(tmp_path / "out"), "--to", "ms-swift").exit_code == 0
    missing = _cli("--check", str(tmp_path / "nowhere"), "--to", "ms-swift")
    assert missing.exit_code == 1 and "export.json: cannot read" in missing.output


# ---------------------------------------------------------------- --check on a folder it cannot trust

@pytest.fixture(scope="module")
def exported(data, tmp_path_factory):
    """One export per tool, Qwen2.5-VL (pixel boxes: sizes matter)."""
    root = tmp_path_factory.mktemp("checked")
    for target in ("ms-swift", "llamafactory"):
        run_export([data / "convo.jsonl"], root / target, data / "img", show_progress=False,
                   settings=ExportSettings(target=target, model="qwen2.5-vl"))
    return root


def _copy(exported, tmp_path, target):
    import shutil

    folder = tmp_path / target
    shutil.copytree(exported / target, folder, symlinks=True)
    return folder


def _edit_report(folder, **changes):
    report = json.loads((folder / "export.json").read_text())
    (folder / "export.json").write_text(json.dumps({**report, **changes}))


@pytest.mark.parametrize("target, report, message", [
    ("ms-swift", "[]", "export.json: Expected `object`, got `array`"),
    ("ms-swift", {"resize": "x"}, "Expected `object`, got `str` - at `$.resize`"),
    ("ms-swift", {"resize": {"min_pixels": "3136", "max_pixels": 12845056}}, "resize: Expected `int`, got `str`"),
    ("ms-swift", {"resize": {"min_pixels": -1, "max_pixels": 12845056}}, "resize: Expected `int` >= 1"),
    ("ms-swift", {"resize": {}}, "resize: Object missing required field `min_pixels`"),
    ("llamafactory", {"resize": {"image_min_pixels": 1024}}, "resize: Object missing required field"),
    ("ms-swift", {"model": "qwen9-vl"}, "model 'qwen9-vl' is none of qwen-vl, qwen2-vl"),
    ("ms-swift", {"resize": {"min_pixels": 4000, "max_pixels": 3136}}, "min_pixels 4000 is more than max_pixels 3136"),
    ("ms-swift", {"model": None}, "Expected `str`, got `null` - at `$.model`"),
    ("ms-swift", "{not json", "export.json: not valid JSON"),
])
def test_check_refuses_an_export_json_it_cannot_trust(exported, tmp_path, target, report, message):
    from qvl.formats.export_check import CheckError, run_check

    folder = _copy(exported, tmp_path, target)
    if isinstance(report, dict):
        _edit_report(folder, **report)
    else:
        (folder / "export.json").write_text(report)
    with pytest.raises(CheckError) as e:
        run_check(folder, target, environ={})
    assert message in str(e.value) and str(folder) in str(e.value)


@pytest.mark.parametrize("line, message", [
    ("[1, 2]", ":4: Expected `object`, got `array`"),
    ('{"messages": "oops", "images": []}', ":4: Expected `array`, got `str` - at `$.messages`"),
    ('{"messages": [], "images": null}', ":4: Expected `array`, got `null` - at `$.images`"),
    ('{"messages": [], "images": [5]}', ":4: Expected `str`, got `int` - at `$.images[0]`"),
    ('{"messages": [], "images": "notalist"}', ":4: Expected `array`, got `str` - at `$.images`"),
    ('{"messages": [{"role": "user"}]}', ":4: Object missing required field `content` - at `$.messages[0]`"),
    ('{"messages": [], "images": ["a.png"', ":4: not valid JSON"),
    (b'{"messages": [], "id": "\xff"}', ":4: text is not valid UTF-8"),
])
def test_check_names_the_line_of_data_jsonl_it_cannot_read(exported, tmp_path, line, message):
    from qvl.formats.export_check import CheckError, run_check

    folder = _copy(exported, tmp_path, "ms-swift")
    data = (folder / "data.jsonl").read_bytes()
    line = line if isinstance(line, bytes) else line.encode()
    (folder / "data.jsonl").write_bytes(data + b"\n" + line + b"\n")  # line 3 blank: skipped; line 4 the bad one
    with pytest.raises(CheckError) as e:
        run_check(folder, "ms-swift", environ={})
    assert str(folder / "data.jsonl") + message in str(e.value), str(e.value)


def test_check_refuses_images_the_tool_cannot_open(exported, tmp_path):
    """A missing file, a device (never read: /dev/zero has no end), a file that is not an image:
    each ``refused`` with why, the check goes on over the other records."""
    folder = _copy(exported, tmp_path, "ms-swift")
    (folder / "notes.png").write_text("not an image")
    rows = [json.loads(line) for line in (folder / "data.jsonl").read_text().splitlines()]
    rows += [{"id": name, "messages": [{"role": "user", "content": "<image>"}], "images": [path]}
             for name, path in (("gone", "images/none.png"), ("device", "/dev/zero"), ("text", "notes.png"))]
    rows.append({"id": "two", "messages": [{"role": "user", "content": "<image>"}], "images": rows[0]["images"] * 2})
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from qvl.formats.export_check import run_check

    result = run_check(folder, "ms-swift", environ={"MAX_PIXELS": "12845056", "MIN_PIXELS": "3136"})
    assert [(r["id"], r["reason"].split(" (")[0]) for r in result["refused"]] == [
        ("gone", "no such image file"), ("device", "no such image file"), ("text", "not an image the tool can open"),
        ("two", "1 <image> placeholders for 2 images")]
    assert result["records"] == 6 and not result["ok"] and not result["moved"]


@pytest.mark.parametrize("environ, args, message", [
    ({"MAX_PIXELS": "abc"}, {}, "MAX_PIXELS (environment)='abc': not a whole number of pixels"),
    ({"MIN_PIXELS": "-3"}, {}, "MIN_PIXELS (environment)='-3': must be a whole number of pixels from 1"),
    ({}, {"max_pixels": -1}, "--tool-max-pixels=-1: must be a whole number of pixels from 1"),
    ({}, {"min_pixels": 10 ** 30}, "--tool-min-pixels=an integer of 100 bits: must be"),
    ({}, {"min_pixels": 10 ** 6, "max_pixels": 10 ** 5}, "which qwen_vl_utils refuses"),
])
def test_check_names_the_bound_it_cannot_use(exported, environ, args, message):
    from qvl.formats.export_check import CheckError, run_check

    with pytest.raises(CheckError) as e:
        run_check(exported / "ms-swift", "ms-swift", environ=environ, **args)
    assert message in str(e.value)


def test_check_reads_llamafactory_yaml_as_the_user_edited_it(exported, tmp_path):
    """The bounds the user merges into LLaMA-Factory's config are the ones checked (an option
    overrides them); an edit that would move the boxes is found, an unusable one named."""
    from qvl.formats.export_check import CheckError, run_check

    folder = _copy(exported, tmp_path, "llamafactory")
    config = folder / "llamafactory.yaml"
    assert run_check(folder, "llamafactory")["ok"]
    config.write_text(config.read_text().replace("image_max_pixels: 589824", "image_max_pixels: 65536"))
    edited = run_check(folder, "llamafactory")
    assert edited["run_with"]["image_max_pixels"] == 65536 and [m["id"] for m in edited["moved"]] == ["c1"]
    assert run_check(folder, "llamafactory", max_pixels=589824)["ok"]
    edited = config.read_text()
    for value, message in (("lots", "Expected `int | null`, got `str` - at `$.image_max_pixels`"),
                           ("'100000'", "got `str`"), ("589824.9", "got `float`"), ("true", "got `bool`"),
                           ("[1]", "got `array`"), (".inf", "got `float`"), ("0", "Expected `int` >= 1"),
                           ("9" * 5000, "Exceeds the limit"), ("[" * 100_000 + "]" * 100_000, "nested too deeply")):
        config.write_text(edited.replace("image_max_pixels: 65536", f"image_max_pixels: {value}"))
        with pytest.raises(CheckError) as e:
            run_check(folder, "llamafactory")
        assert str(e.value).startswith(f"{config}: ") and message in str(e.value) and len(str(e.value)) < 600
    config.write_text("dataset: [qvl\n")
    with pytest.raises(CheckError, match="llamafactory.yaml: not valid YAML"):
        run_check(folder, "llamafactory")


@pytest.mark.parametrize("name", ["data.jsonl", "export.json", "llamafactory.yaml"])
def test_check_refuses_a_fifo_for_its_files(exported, tmp_path, name):
    """A FIFO where a file belongs would block --check forever (reading it never ends)."""
    from qvl.formats.export_check import CheckError, run_check

    folder = _copy(exported, tmp_path, "llamafactory")
    (folder / name).unlink()
    os.mkfifo(folder / name)
    with pytest.raises(CheckError, match=f"{name}: not a regular file"):
        run_check(folder, "llamafactory")


def test_check_reads_past_a_bom_and_sees_boxes_only_in_answers(exported, tmp_path):
    """A BOM as editors write it is read past; a question that mentions "bbox_2d" is no box."""
    from qvl.formats.export_check import run_check

    folder = _copy(exported, tmp_path, "ms-swift")
    rows = [json.loads(line) for line in (folder / "data.jsonl").read_text().splitlines()]
    rows = [{**r, "messages": [m for m in r["messages"] if m["role"] != "assistant"]} for r in rows]
    rows[0]["messages"][-1]["content"] += ' What does "bbox_2d" mean?'
    (folder / "data.jsonl").write_text("\ufeff" + "".join(json.dumps(r) + "\n" for r in rows))
    (folder / "export.json").write_text("\ufeff" + (folder / "export.json").read_text())
    result = run_check(folder, "ms-swift", max_pixels=256 * 256, environ={})
    assert result["records"] == 2 and result["resized"] == 2 and not result["moved"] and result["ok"]


def test_swift_env_quotes_the_folder_for_the_shell(data, tmp_path):
    """`. swift.env` runs in a shell: a folder named with `$(...)`, a space or a quote is one
    value, never a command."""
    import subprocess

    out = tmp_path / "a b$(touch PWNED)'c" / "out"
    out.parent.mkdir()
    run_export([data / "ann.jsonl"], out, data / "img", show_progress=False,
               settings=ExportSettings(target="ms-swift", model="qwen2.5-vl"))
    shown = subprocess.run(["bash", "-c", 'set -a; . "$1"; printf %s "$ROOT_IMAGE_DIR"', "-", str(out / "swift.env")],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert shown == str(out.resolve()) and not (tmp_path / "PWNED").exists()


def test_cli_check_and_tool_bounds_say_one_line(exported, data, tmp_path):
    folder = _copy(exported, tmp_path, "ms-swift")
    (folder / "data.jsonl").write_text("[1, 2]\n")
    bad = _cli("--check", str(folder), "--to", "ms-swift", "--tool-max-pixels", "12845056")
    assert bad.exit_code == 1 and bad.output.startswith("error:") and ":1: Expected `object`" in bad.output
    assert "Traceback" not in bad.output and len(bad.output.strip().splitlines()) <= 3
    ignored = _cli("-i", str(data / "ann.jsonl"), "--images", str(data / "img"), "--to", "ms-swift",
                   "--out", str(tmp_path / "x"), "--tool-max-pixels", "65536")
    assert ignored.exit_code == 1 and "--max-image-pixels" in ignored.output and not (tmp_path / "x").exists()


def test_check_never_crashes_on_generated_records(exported, tmp_path_factory):
    """Any JSON value where a record, a message or an image list belongs: a result, or one
    CheckError naming the file — never another exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from qvl.formats.export_check import CheckError, run_check

    folder = _copy(exported, tmp_path_factory.mktemp("fuzz"), "ms-swift")
    good = (folder / "data.jsonl").read_text()
    leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                           max_size=3), max_leaves=8)
    record = st.fixed_dictionaries({}, optional={"id": value, "messages": value | st.lists(
        st.fixed_dictionaries({"role": value, "content": value}), max_size=2), "images": value})

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(record, min_size=1, max_size=3))
    def check(records):
        (folder / "data.jsonl").write_text(good + "".join(json.dumps(r) + "\n" for r in records))
        try:
            result = run_check(folder, "ms-swift", environ={})
        except CheckError as e:
            assert str(folder / "data.jsonl") in str(e)
        else:
            assert result["records"] >= 2

    check()


def test_a_record_whose_image_the_tool_refuses_is_rejected_boxes_or_not(data, tmp_path):
    """ms-swift refuses an aspect ratio over 200: a record without boxes on such an image is a
    reject too, not a line --check then reports as refused."""
    from qvl.formats.export_check import run_check

    (tmp_path / "img").mkdir()
    photo(tmp_path / "img" / "strip.png", (3000, 10))
    src = tmp_path / "convo.jsonl"
    src.write_text(json.dumps({"id": "s", "messages": [{"role": "user", "content": "<image>What is it?"},
                                                      {"role": "assistant", "content": "A strip."}],
                               "images": ["strip.png"]}) + "\n")
    report = run_export([src], tmp_path / "out", tmp_path / "img", show_progress=False,
                        settings=ExportSettings(target="ms-swift", model="qwen2.5-vl"))
    assert report["samples"] == 0 and report["rejected_by_reason"] == {"bad_image_size": 1}
    assert run_check(tmp_path / "out", "ms-swift", environ={})["ok"]
