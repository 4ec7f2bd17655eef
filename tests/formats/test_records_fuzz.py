"""Generated hostile records through the real `qvl format multitask|sft`: wrong types, extreme and
non-finite numbers, invalid Unicode, missing and extra keys, truncated lines, tag soup. The
invariant: exit 0, every line a sample or a reject naming it, never a traceback. And the linear
scanners that replaced quadratic regexes find what those regexes found on good input."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from qvl.cli import app
from qvl.formats import families
from qvl.formats.render import markup
from qvl.formats.render.sequence import image_spans

runner = CliRunner()
FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

HOSTILE = [None, True, 0, -1, 1.5, 10 ** 400, -(10 ** 30), 1e308, float("nan"), float("inf"), "", " ", "\ud800",
           "a\udfffb", "x" * 3000, "<img>red.png</img>", "<ref>a</ref><box>(1,2),(3,4)</box>", [], ["caption"],
           [1, 2, 3, 4], [[0, 0], [1, 0], [1, 1], [0, 1]], {}, {"a": 1}, {"type": "text", "text": 5}]
# ids that are wrong whatever else the record holds: a record with one is always a reject, so every
# sample's id is its file:line and the accounting below can name each line
BAD_IDS = [True, 1.5, 10 ** 400, [], {}, "\ud800"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (64, 48), "red").save(root / "red.png")
    Image.new("RGB", (40, 30), "blue").save(root / "blue.jpg")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


MULTITASK = [
    {"task": "caption", "image": "red.png", "caption": "a red square", "lang": "en"},
    {"task": "vqa", "image": "blue.jpg", "question": "What colour?", "answer": "blue"},
    {"task": "grounding", "image": "red.png", "caption": "a dog and a cat",
     "regions": [{"span": [0, 5], "boxes": [[1, 2, 30, 40]]}, {"span": [10, 15], "boxes": [[0, 0, 64, 48]]}]},
    {"task": "ref_grounding", "image": "red.png", "ref": "the dog", "box": [1, 2, 30, 40], "width": 64, "height": 48},
    {"task": "grounded_caption", "image": "blue.jpg", "box": [0.1, 0.1, 0.5, 0.5], "box_format": "norm",
     "caption": "a thing"},
    {"task": "ocr", "image": "red.png", "lines": [{"text": "STOP", "quad": [[0, 0], [10, 0], [10, 5], [0, 5]]}]},
    {"task": "text", "text": "plain text"},
]
SFT = [
    {"conversations": [{"from": "user", "value": "Picture 1: <img>red.png</img>\nWhat is it?"},
                       {"from": "assistant", "value": "<ref>a square</ref><box>(10,10),(500,500)</box>"}]},
    {"image": "blue.jpg", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                            {"from": "gpt", "value": "Blue."}]},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                  {"role": "assistant", "content": "Red."}], "images": ["red.png"]},
]
TAG_SOUP = st.lists(st.sampled_from(["<img>", "</img>", "red.png", "<ref>", "</ref>", "<box>", "</box>", "(1,2),(3,4)",
                                     "<quad>", "Picture 1: ", "\n", "<image>", "<|im_end|>", "x"]), max_size=40).map("".join)


def _paths(value, prefix=()):
    """Every place inside a record: dict keys and list items, nested."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield prefix + (key,)
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield prefix + (i,)
            yield from _paths(item, prefix + (i,))


@st.composite
def mutated(draw, templates, extra_texts):
    """A template record with 0-3 changes: a value anywhere replaced (hostile, or tag soup where
    text is), a key deleted, an unknown key added, a bad id; or the line itself broken."""
    record = copy.deepcopy(draw(st.sampled_from(templates)))
    for _ in range(draw(st.integers(0, 3))):
        paths = list(_paths(record))
        op = draw(st.sampled_from(["set", "set", "delete", "extra", "id"]))
        if op == "extra":
            record[draw(st.sampled_from(["captoin", "\ud800", "width", "height", "lang", "box_format", "source"]))] = \
                draw(st.sampled_from(HOSTILE + ["norm", "zh", 640]))
            continue
        if op == "id":
            record["id"] = draw(st.sampled_from(BAD_IDS))
            continue
        if not paths:
            continue
        *parent_path, last = draw(st.sampled_from(paths))
        parent = record
        for step in parent_path:
            parent = parent[step]
        if op == "delete":
            del parent[last]
        else:
            parent[last] = draw(st.one_of(st.sampled_from(HOSTILE), extra_texts))
    line = json.dumps(record)  # NaN and Infinity as Python writes them; lone surrogates as \\ud800 escapes
    broken = draw(st.sampled_from([None, None, None, "truncate", "bytes", "list"]))
    if broken == "truncate":
        return line[:draw(st.integers(0, max(0, len(line) - 1)))] or "{"
    if broken == "bytes":
        return line[:-1] + ', "bad": "\xff\xfe"}' if line.endswith("}") else line
    if broken == "list":
        return f"[{line}]"
    return line


def _check_run(kind: str, lines: list[str], tmp_path: Path, images: Path, *args: str) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(line.encode("utf-8", "surrogateescape") + b"\n" for line in lines))
    out = tmp_path / "out"
    result = runner.invoke(app, ["format", kind, "-i", str(src), "--images", str(images), "--out", str(out),
                                 "--overwrite", "--no-progress", *args])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    manifest = json.loads((out / "manifest.json").read_text())
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    import datasets

    ids = [i for row in datasets.load_from_disk(str(out)).with_format(None)["sample_ids"] for i in row]
    sample_lines = {int(i.rsplit(":", 1)[1]) for i in ids}
    reject_lines = [r["line"] for r in rejects]
    assert all(r["file"] == str(src) and r["reason"] and r["detail"] for r in rejects)
    assert len(set(reject_lines)) == len(reject_lines) and not sample_lines & set(reject_lines)
    assert sample_lines | set(reject_lines) == set(range(1, len(lines) + 1))  # each line once, named
    assert manifest["records"] == len(lines) == manifest["samples"] + manifest["rejected"]


@FUZZ
@given(lines=st.lists(mutated(MULTITASK, TAG_SOUP), min_size=1, max_size=8),
       model=st.sampled_from(["qwen-vl", "qwen-vl", "qwen2.5-vl"]))
def test_multitask_survives_hostile_records(tmp_path, images, lines, model):
    args = ["--tokenizer", "bytes", "--image-tokens", "4"] if model == "qwen-vl" else ["--model", model]
    _check_run("multitask", lines, tmp_path, images, *args)


@FUZZ
@given(lines=st.lists(mutated(SFT, TAG_SOUP), min_size=1, max_size=8),
       model=st.sampled_from(["qwen-vl", "qwen-vl", "qwen2.5-vl", "qwen3-vl"]))
def test_sft_survives_hostile_records(tmp_path, images, lines, model):
    args = ["--tokenizer", "bytes", "--image-tokens", "4"] if model == "qwen-vl" else ["--model", model]
    _check_run("sft", lines, tmp_path, images, *args)


# ---------------------------------------------------------------- the scanners, against the regexes they replace

_OLD_IMAGE = re.compile(r"<img>(.*?)</img>", re.DOTALL)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(TAG_SOUP)
def test_image_spans_are_the_regexs_spans(text):
    assert list(image_spans(text)) == [(m.start(), m.end(), m.group(1)) for m in _OLD_IMAGE.finditer(text)]


_OLD_GROUNDED = re.compile(r"(?:<ref>(?P<ref>.*?)</ref>)?(?P<boxes>(?:<box>\(\s*\d+\s*,\s*\d+\s*\),\(\s*\d+\s*,\s*\d+"
                           r"\s*\)</box>)+)", re.DOTALL)


def _old_convert(text: str, fam, resized_of, previous_image=None) -> str:
    """markup.convert's JSON branch as it was (quadratic), the reference for good input."""
    text = markup.strip_picture_labels(text)
    if "<box>" not in text and "<quad>" not in text and "<ref>" not in text:
        return text

    def json_boxes(match):
        label = match.group("ref")
        found = [previous_image] * (previous_image is not None) + _OLD_IMAGE.findall(text[:match.start()])
        out = []
        for box in markup._BOX.findall(match.group("boxes")):
            coords = [int(v) for v in box]
            if fam.boxes == "json_pixels":
                w, h = resized_of(found[-1].strip())
                coords = [round(coords[0] / 1000 * w), round(coords[1] / 1000 * h), round(coords[2] / 1000 * w),
                          round(coords[3] / 1000 * h)]
            out.append(json.dumps({"bbox_2d": coords, **({"label": label} if label is not None else {})},
                                  ensure_ascii=False))
        return ", ".join(out)

    return _OLD_GROUNDED.sub(json_boxes, text)


# good content: every <ref> closed and followed by its boxes, images before boxes, no box under a pixel
GOOD = st.lists(st.sampled_from(["<img>a.png</img>", "Picture 2: <img> b.png </img>\n", "some text, < and >",
                                 "<ref>a red car</ref><box>(1,2),(300,400)</box>", "<box>(5, 6),(70,80)</box>",
                                 "<ref>x < y</ref><box>(0,0),(999,999)</box><box>(1,1),(200,200)</box>", "\n"]),
                max_size=12).map(lambda parts: "<img>first.png</img>" + "".join(parts))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(GOOD, st.sampled_from(["qwen2.5-vl", "qwen3-vl"]))
def test_family_conversion_is_unchanged_on_good_content(text, name):
    fam = families.family(name)
    sizes = {"first.png": (640, 480), "a.png": (320, 200), "b.png": (1000, 28)}
    assert markup.convert(text, fam, sizes.__getitem__) == _old_convert(text, fam, sizes.__getitem__)
