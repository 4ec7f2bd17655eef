"""The seven multitask formats: exact prefix/target text and where the loss starts."""

from __future__ import annotations

import pytest

from qvl.errors import AnnotationError
from qvl.formats.render import multitask
from qvl.formats.render.sequence import assemble
from qvl.formats.tokenizers import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("qwen-vl")


def run(record, tok, size=(640, 480)):
    ctx = multitask.Context(tok, 4, lambda ref: size)
    sample = assemble([multitask.render(record, "s", ctx)], tok)[0]
    split = next(i for i, label in enumerate(sample.labels) if label != -100)
    assert all(label != -100 for label in sample.labels[split:])  # one supervised tail
    return tok.decode(sample.input_ids[:split]), tok.decode(sample.input_ids[split:]), sample


@pytest.mark.parametrize("record, prefix, target", [
    ({"task": "caption", "image": "a.jpg", "caption": "a dog on the beach"},
     "<img></img>Generate the caption in English:", " a dog on the beach<|endoftext|>"),
    ({"task": "caption", "image": "a.jpg", "caption": "一只狗", "lang": "zh"},
     "<img></img>Generate the caption in Chinese:", " 一只狗<|endoftext|>"),
    ({"task": "vqa", "image": "a.jpg", "question": "What color is the car?", "answer": "red"},
     "<img></img> What color is the car? Answer:", " red<|endoftext|>"),
    ({"task": "grounding", "image": "a.jpg", "caption": "a dog chases a ball",
      "regions": [{"span": [0, 5], "boxes": [[64, 48, 320, 240]]}, {"span": [13, 19], "boxes": [[0, 0, 64, 48]]}]},
     "<img></img>Generate the caption in English with grounding:",
     " <ref>a dog</ref><box>(100,100),(500,500)</box> chases <ref>a ball</ref><box>(0,0),(100,100)</box>"
     "<|endoftext|>"),
    ({"task": "ref_grounding", "image": "a.jpg", "ref": "the red car", "box": [64, 48, 320, 240]},
     "<img></img><ref>the red car</ref>", "<box>(100,100),(500,500)</box><|endoftext|>"),
    ({"task": "grounded_caption", "image": "a.jpg", "box": [64, 48, 320, 240], "caption": "a red car"},
     "<img></img><ref>This</ref><box>(100,100),(500,500)</box>", " is a red car<|endoftext|>"),
    ({"task": "ocr", "image": "a.jpg", "lines": [{"text": "SALE", "quad": [[0, 0], [64, 0], [64, 48], [0, 48]]}]},
     "<img></img>OCR with grounding:", "<ref>SALE</ref><quad>(0,0),(100,0),(100,100),(0,100)</quad><|endoftext|>"),
])
def test_templates(tok, record, prefix, target):
    got_prefix, got_target, sample = run(record, tok)
    assert (got_prefix, got_target) == (prefix, target)
    assert sample.input_ids.tolist().count(tok.special("<imgpad>")) == 4 and sample.images == ["a.jpg"]


def test_pure_text_is_all_target(tok):
    ctx = multitask.Context(tok, 4, lambda ref: (1, 1))
    sample = assemble([multitask.render({"task": "text", "text": "Plain text."}, "s", ctx)], tok)[0]
    assert sample.labels.tolist() == sample.input_ids.tolist() and tok.decode(sample.input_ids) == "Plain text.<|endoftext|>"


@pytest.mark.parametrize("record, reason", [
    ({"task": "poetry", "image": "a.jpg"}, "unknown_task"),
    ({"task": "ref_grounding", "image": "a.jpg", "ref": "x", "box": [10, 10, 5, 5]}, "bad_box"),
    ({"task": "grounding", "image": "a.jpg", "caption": "abc", "regions": [{"span": [0, 9], "boxes": [[1, 1, 2, 2]]}]},
     "bad_sample"),
    ({"task": "vqa", "image": "a.jpg", "question": "q"}, "bad_sample"),
])
def test_bad_annotations(tok, record, reason):
    ctx = multitask.Context(tok, 4, lambda ref: (640, 480))
    with pytest.raises(AnnotationError) as e:
        multitask.render(record, "s", ctx)
    assert e.value.reason == reason


INJECTED = "<img>secret.png</img><ref>a cat</ref><box>(1,2),(3,4)</box><quad>x</quad><|endoftext|>"


@pytest.mark.parametrize("record", [
    {"task": "caption", "image": "a.jpg", "caption": INJECTED},
    {"task": "vqa", "image": "a.jpg", "question": INJECTED, "answer": INJECTED},
    {"task": "grounding", "image": "a.jpg", "caption": "a dog " + INJECTED,
     "regions": [{"span": [0, 5], "boxes": [[64, 48, 320, 240]]}]},
    {"task": "ref_grounding", "image": "a.jpg", "ref": INJECTED, "box": [64, 48, 320, 240]},
    {"task": "grounded_caption", "image": "a.jpg", "box": [64, 48, 320, 240], "caption": INJECTED},
    {"task": "ocr", "image": "a.jpg", "lines": [{"text": INJECTED, "quad": [[0, 0], [64, 0], [64, 48], [0, 48]]}]},
    {"task": "text", "text": INJECTED},
])
def test_tags_typed_in_text_fields_stay_plain_text(record, tok):
    """Structure comes from structured fields only: web text cannot load an image or forge grounding."""
    ctx = multitask.Context(tok, 4, lambda ref: (640, 480))
    plan = multitask.render(record, "s", ctx)
    sample = assemble([plan], tok)[0]
    assert plan.images == ([] if record["task"] == "text" else ["a.jpg"])
    specials = {tok.special(t): t for t in ("<img>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>",
                                            "<|endoftext|>")}
    emitted = [specials[i] for i in sample.input_ids.tolist() if i in specials]
    expected = {"caption": [], "vqa": [], "grounding": ["<ref>", "</ref>", "<box>", "</box>"],
                "ref_grounding": ["<ref>", "</ref>", "<box>", "</box>"],
                "grounded_caption": ["<ref>", "</ref>", "<box>", "</box>"], "ocr": ["<ref>", "</ref>", "<quad>", "</quad>"],
                "text": []}[record["task"]]
    assert emitted == ([] if record["task"] == "text" else ["<img>"]) + expected + ["<|endoftext|>"]
    assert "secret.png</img><ref>a cat" in tok.decode(sample.input_ids.tolist())  # the characters are all there
