"""The seven multitask pre-training formats of Qwen-VL (stage 2), and stage-1 captions.

Each renderer turns one annotation into a plan: a prefix that takes no loss and a target
(ending in ``<|endoftext|>``) that does. Boxes are normalised to [0, 1000) with the image's
real size. Templates follow the Qwen-VL paper (Table 9 and §3.2).

The structure of a sample comes from its structured fields only (``image``, ``regions``,
``box``, ``lines``): text fields (caption, question, answer, ref, text, OCR line text) are
web text and stay plain text, so a caption that says ``<img>secret.png</img>`` or
``<ref>…</ref><box>(…)</box>`` can neither load a file nor forge grounding tokens.
"""

from __future__ import annotations

import math
from typing import Callable

from qvl.formats.boxes import AnnotationError, box_text, is_number, normalize_box, normalize_quad, quad_text
from qvl.formats.sequence import Plan, Tag
from qvl.formats.tokenizers import Tokenizer

EOS = "<|endoftext|>"
CAPTION_PROMPT = {"en": "Generate the caption in English:", "zh": "Generate the caption in Chinese:"}
GROUNDING_PROMPT = {"en": "Generate the caption in English with grounding:",
                    "zh": "Generate the caption in Chinese with grounding:"}
OCR_PROMPT = "OCR with grounding:"
REF, REF_END, BOX, BOX_END, QUAD, QUAD_END = (Tag(t) for t in ("<ref>", "</ref>", "<box>", "</box>", "<quad>",
                                                              "</quad>"))


class Context:
    """What a renderer needs besides the record: the tokenizer, and image sizes."""

    def __init__(self, tok: Tokenizer, image_tokens: int, image_size: Callable[[str], tuple[int, int]]):
        self.tok = tok
        self.image_tokens = image_tokens
        self.image_size = image_size


def _field(record: dict, name: str, kind=str):
    value = record.get(name)
    if value is None or (kind is str and not isinstance(value, str)) or (kind is list and not isinstance(value, list)):
        raise AnnotationError(f"missing or bad field {name!r} (expected {kind.__name__})")
    if kind is str and not value.strip():
        raise AnnotationError(f"empty field {name!r}")
    return value


def _size(record: dict, ctx: Context) -> tuple[int, int]:
    width, height = record.get("width"), record.get("height")
    if width is not None or height is not None:  # the record's own size, when it gives one: checked
        if not (is_number(width) and is_number(height) and width >= 1 and height >= 1
                and math.isfinite(width) and math.isfinite(height)):
            raise AnnotationError(f"bad image size width={width!r} height={height!r}", "bad_box")
        return width, height
    return ctx.image_size(_field(record, "image"))


def _start(plan: Plan, record: dict, ctx: Context) -> None:
    plan.image(_field(record, "image"), False, ctx.tok, ctx.image_tokens)


def _end(plan: Plan, ctx: Context) -> None:
    plan.ids([ctx.tok.special(EOS)], True)


def _lang(record: dict) -> str:
    lang = record.get("lang", "en")
    if lang not in CAPTION_PROMPT:
        raise AnnotationError(f"unknown lang {lang!r} (use en or zh)")
    return lang


def caption(plan: Plan, record: dict, ctx: Context) -> None:
    _start(plan, record, ctx)
    plan.text(CAPTION_PROMPT[_lang(record)], False)
    plan.structured([" " + _field(record, "caption").strip()], True, ctx.tok)
    _end(plan, ctx)


def vqa(plan: Plan, record: dict, ctx: Context) -> None:
    _start(plan, record, ctx)
    plan.structured([" " + _field(record, "question").strip() + " Answer:"], False, ctx.tok)
    plan.structured([" " + _field(record, "answer").strip()], True, ctx.tok)
    _end(plan, ctx)


def grounding(plan: Plan, record: dict, ctx: Context) -> None:
    """Caption with ``<ref>phrase</ref><box>…</box>`` at the character spans of its regions."""
    text = _field(record, "caption")
    regions = _field(record, "regions", list)
    width, height = _size(record, ctx)
    fmt = record.get("box_format", "xyxy")
    spans = []
    for region in regions:
        span = region.get("span") if isinstance(region, dict) else None
        boxes = region.get("boxes") if isinstance(region, dict) else None
        if not (isinstance(span, list) and len(span) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
            raise AnnotationError(f"bad region span {span!r}: expected [start, end] character offsets")
        if not (0 <= span[0] < span[1] <= len(text)):
            raise AnnotationError(f"bad region span {span!r} for a caption of {len(text)} characters")
        if not isinstance(boxes, list) or not boxes:
            raise AnnotationError(f"region {span} has no boxes")
        spans.append((span[0], span[1], [normalize_box(b, width, height, fmt) for b in boxes]))
    spans.sort()
    for (_, end, _), (start, _, _) in zip(spans, spans[1:]):
        if start < end:
            raise AnnotationError("region spans overlap")
    out, pos = [" "], 0
    for start, end, boxes in spans:
        out += [text[pos:start], REF, text[start:end], REF_END]
        for b in boxes:
            out += [BOX, box_text(b), BOX_END]
        pos = end
    out.append(text[pos:])
    out[1] = out[1].lstrip()  # the caption stripped, as the other tasks'
    out[-1] = out[-1].rstrip()
    _start(plan, record, ctx)
    plan.text(GROUNDING_PROMPT[_lang(record)], False)
    plan.structured(out, True, ctx.tok)
    _end(plan, ctx)


def ref_grounding(plan: Plan, record: dict, ctx: Context) -> None:
    width, height = _size(record, ctx)
    box = normalize_box(_field(record, "box", list), width, height, record.get("box_format", "xyxy"))
    _start(plan, record, ctx)
    plan.structured([REF, _field(record, "ref").strip(), REF_END], False, ctx.tok)
    plan.structured([BOX, box_text(box), BOX_END], True, ctx.tok)
    _end(plan, ctx)


def grounded_caption(plan: Plan, record: dict, ctx: Context) -> None:
    width, height = _size(record, ctx)
    box = normalize_box(_field(record, "box", list), width, height, record.get("box_format", "xyxy"))
    _start(plan, record, ctx)
    plan.structured([REF, "This", REF_END, BOX, box_text(box), BOX_END], False, ctx.tok)
    plan.structured([" is " + _field(record, "caption").strip()], True, ctx.tok)
    _end(plan, ctx)


def ocr(plan: Plan, record: dict, ctx: Context) -> None:
    lines = _field(record, "lines", list)
    if not lines:
        raise AnnotationError("no OCR lines")
    width, height = _size(record, ctx)
    fmt = record.get("box_format", "xyxy")
    target = []
    for line in lines:
        if not isinstance(line, dict):
            raise AnnotationError(f"bad OCR line {line!r}")
        target += [REF, _field(line, "text"), REF_END,
                   QUAD, quad_text(normalize_quad(line.get("quad"), width, height, fmt)), QUAD_END]
    _start(plan, record, ctx)
    plan.text(OCR_PROMPT, False)
    plan.structured(target, True, ctx.tok)
    _end(plan, ctx)


def text(plan: Plan, record: dict, ctx: Context) -> None:
    plan.structured([_field(record, "text")], True, ctx.tok)
    _end(plan, ctx)


RENDERERS: dict[str, Callable[[Plan, dict, Context], None]] = {
    "caption": caption,
    "vqa": vqa,
    "grounding": grounding,
    "ref_grounding": ref_grounding,
    "grounded_caption": grounded_caption,
    "ocr": ocr,
    "text": text,
}


def render(record: dict, sample_id: str, ctx: Context) -> Plan:
    task = record.get("task")
    if task not in RENDERERS:
        raise AnnotationError(f"unknown task {task!r} (use {', '.join(RENDERERS)})", "unknown_task")
    plan = Plan(sample_id, task, str(record.get("source", "multitask")))
    RENDERERS[task](plan, record, ctx)
    return plan
