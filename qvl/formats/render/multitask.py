"""The seven multitask pre-training formats of Qwen-VL (stage 2), and stage-1 captions.

Each renderer turns one annotation into a plan: a prefix that takes no loss and a target
(ending in ``<|endoftext|>``) that does. Boxes are normalised to [0, 1000) with the image's
real size. Templates follow the Qwen-VL paper (Table 9 and §3.2).

The structure of a sample comes from its structured fields only (``image``, ``regions``,
``box``, ``lines``): text fields (caption, question, answer, ref, text, OCR line text) are
web text and stay plain text, so a caption that says ``<img>secret.png</img>`` or
``<ref>…</ref><box>(…)</box>`` can neither load a file nor forge grounding tokens.

For a newer family (``--model qwen2-vl|qwen2.5-vl|qwen3-vl``) the same prompt and target
become one user/assistant exchange in the family's chat template (``families.py``): the
image in the family's vision tokens, boxes in its convention (``Boxes`` segments, converted
from the pixel boxes and the image's real and resized sizes), the loss on the answer, its
``<|im_end|>`` and newline. Pure text stays pre-training text ending in ``<|endoftext|>``.
"""

from __future__ import annotations

import functools
import json
import re
from array import array
from dataclasses import dataclass
from typing import Annotated, Any, Callable

import msgspec

from qvl.boundary import MAX_ITEMS, Coord, Count, Id, Side, convert
from qvl.errors import AnnotationError, RecordError
from qvl.formats.families import FAMILIES, Family
from qvl.formats.render.boxes import (
    box_text,
    pixel_box,
    pixel_quad,
    quad_text,
    scale_box,
    scale_quad,
)
from qvl.formats.render.sequence import Plan, Tag
from qvl.formats.tokenizers import Tokenizer

EOS = "<|endoftext|>"
CAPTION_PROMPT = {"en": "Generate the caption in English:", "zh": "Generate the caption in Chinese:"}
GROUNDING_PROMPT = {"en": "Generate the caption in English with grounding:",
                    "zh": "Generate the caption in Chinese with grounding:"}
OCR_PROMPT = "OCR with grounding:"


# the newer families' prompts where Qwen-VL's do not read as a request (their cookbooks' wording)
FAMILY_PROMPTS = {
    "ref_grounding": "Locate {ref}, output its bbox coordinates using JSON format.",
    "grounded_caption": "Describe the region {box} in one sentence.",
    "ocr": "Spotting all the text in the image with line-level, and output in JSON format.",
}


@dataclass(frozen=True)
class Boxes:
    """A segment: ``label``'s boxes (checked pixel xyxy) on an image of ``size``, written in
    the model's convention when the plan is built (``Context.segments``)."""

    label: str | None
    boxes: tuple
    size: tuple[int, int]
    image: str
    quad: bool = False  # OCR: boxes hold one quad's four points


class Context:
    """What a renderer needs besides the record: the tokenizer, image sizes, and the model
    family with its resized sizes (``resized_of(ref)``)."""

    def __init__(self, tok: Tokenizer, image_tokens, image_size: Callable[[str], tuple[int, int]],
                 model: Family = FAMILIES["qwen-vl"], resized_of: Callable[[str], tuple[int, int]] | None = None):
        self.tok = tok
        self.image_tokens = image_tokens
        self.image_size = image_size
        self.model = model
        self.resized_of = resized_of
        self.lead = "" if model.chat else " "  # Qwen-VL's targets continue the prompt after a space

    def segments(self, parts: list) -> list:
        """``Boxes`` segments expanded into tags and text for the model."""
        out = []
        for part in parts:
            out += self._boxes(part) if isinstance(part, Boxes) else [part]
        return out

    def _boxes(self, part: Boxes) -> list:
        width, height = part.size
        model = self.model
        if part.quad:
            points = scale_quad(part.boxes, width, height)
            if model.boxes == "tokens":
                ref, end, quad, quad_end = _tags(model, "<ref>", "</ref>", "<quad>", "</quad>")
                return [ref, part.label, end, quad, quad_text(points), quad_end]
            xs, ys = [x for x, _ in part.boxes], [y for _, y in part.boxes]  # JSON families: the enclosing box
            return [self._json_box((min(xs), min(ys), max(xs), max(ys)), part, "text_content")]
        if model.boxes == "tokens":
            ref, end, box, box_end = _tags(model, "<ref>", "</ref>", "<box>", "</box>")
            out = [ref, part.label, end] if part.label is not None else []
            for b in part.boxes:
                out += [box, box_text(scale_box(b, width, height)), box_end]
            return out
        return [", ".join(self._json_box(b, part, "label") for b in part.boxes)]

    def _json_box(self, box, part: Boxes, key: str) -> str:
        width, height = part.size
        if self.model.boxes == "json_pixels":  # pixels of the image as the model sees it, resized
            w, h = self.resized_of(part.image)
            coords = [round(box[0] / width * w), round(box[1] / height * h), round(box[2] / width * w),
                      round(box[3] / height * h)]
        else:
            coords = list(scale_box(box, width, height))
        return json.dumps({"bbox_2d": coords, **({key: part.label} if part.label is not None else {})},
                          ensure_ascii=False)


def _tags(model: Family, *names: str) -> tuple[Tag, ...]:
    """Qwen-VL's grounding tags as ``model``'s box tokens."""
    return tuple(Tag(model.tags[name]) for name in names)


Box = Annotated[list[Coord], msgspec.Meta(min_length=4, max_length=4)]
Point = Annotated[list[Coord], msgspec.Meta(min_length=2, max_length=2)]


class Region(msgspec.Struct, forbid_unknown_fields=True):
    span: Annotated[list[Count], msgspec.Meta(min_length=2, max_length=2)]
    boxes: Annotated[list[Box], msgspec.Meta(max_length=MAX_ITEMS)]


class Line(msgspec.Struct, forbid_unknown_fields=True):
    text: str
    quad: Annotated[list[Point], msgspec.Meta(min_length=4, max_length=4)]


class Record(msgspec.Struct, forbid_unknown_fields=True):
    """One multitask record, every task's fields: which ones a task needs its renderer checks.
    An unknown key is refused (a misspelt ``box_format`` or ``lang`` would silently change the
    sample); numbers are bounded, so no 10^400 or NaN reaches the box arithmetic."""

    task: str
    id: str | Id | None = None
    source: str | None = None
    image: str | None = None
    lang: str | None = None
    caption: str | None = None
    question: str | None = None
    answer: str | None = None
    ref: str | None = None
    text: str | None = None
    regions: Annotated[list[Region], msgspec.Meta(max_length=MAX_ITEMS)] | None = None
    box: Box | None = None
    lines: Annotated[list[Line], msgspec.Meta(max_length=MAX_ITEMS)] | None = None
    box_format: str | None = None
    width: Side | None = None
    height: Side | None = None


# a type error in these fields is a bad box, as the box checks of boxes.py call theirs
_BOX_FIELD = re.compile(r"- at `\$\.(box|width|height|regions\[\d+\]\.boxes|lines\[\d+\]\.quad)\b")


def decode(record: dict | Record) -> Record:
    """A record (decoded JSON, a parquet row, an importer's dict) as a typed ``Record``, or the
    reject that names the field: ``unknown_task``, ``bad_box`` (a coordinate or size),
    ``bad_text`` (invalid Unicode) or ``bad_sample``."""
    if isinstance(record, Record):
        return record
    task = record.get("task") if isinstance(record, dict) else None
    if not isinstance(task, str) or task not in RENDERERS:
        raise AnnotationError(f"unknown task {_short(task)} (use {', '.join(RENDERERS)})", "unknown_task")
    try:
        return convert(record, Record, "bad_sample")
    except RecordError as e:
        if e.reason == "bad_sample" and _BOX_FIELD.search(str(e)):
            raise AnnotationError(str(e), "bad_box") from None
        raise


def _short(value: Any) -> str:
    """A value for a message, never longer than a line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def json_list(objects: list[str]) -> str:
    """The newer families' detection answer: a fenced JSON list, one object a line."""
    return "```json\n[\n\t" + ",\n\t".join(objects) + "\n]\n```"


def _field(record, name: str, kind=str):
    """A field the task needs (its type is the Record's): present, and text not blank."""
    value = getattr(record, name)
    if value is None:
        raise AnnotationError(f"missing field {name!r} (expected {kind.__name__})")
    if kind is str and not value.strip():
        raise AnnotationError(f"empty field {name!r}")
    return value


def _size(record: Record, ctx: Context) -> tuple[int, int]:
    """The image's real size, which the boxes are normalised with. A record that gives its own
    size must give the real one: boxes given for another size (a resized copy, another image)
    would come out wrong, so a disagreement is ``size_mismatch`` rather than a guess at which
    size the boxes meant. Normalised (``norm``) boxes do not depend on it."""
    width, height = ctx.image_size(_field(record, "image"))
    if record.width is None and record.height is None:
        return width, height
    if record.width is None or record.height is None:
        raise AnnotationError(f"bad image size width={record.width!r} height={record.height!r}: give both or "
                              "neither", "bad_box")
    if record.box_format != "norm" and (record.width, record.height) != (width, height):
        raise AnnotationError(f"the record says the image is {record.width:g}x{record.height:g}, but "
                              f"{_short(record.image)} is {width}x{height}", "size_mismatch")
    return width, height


def _start(plan: Plan, record: Record, ctx: Context) -> None:
    """Qwen-VL: the image first. A newer family: its system turn (if it has a default), then the
    user's turn opening with the image."""
    if ctx.model.chat:
        _open(plan, ctx, ctx.model.default_system)
        plan.ids([ctx.tok.special("<|im_start|>")], False)
        plan.ids(ctx.tok.fixed("user"), False)
        plan.ids(ctx.tok.fixed("\n"), False)
    plan.image(_field(record, "image"), False, ctx.tok, ctx.image_tokens)


def _open(plan: Plan, ctx: Context, system: str | None) -> None:
    if system is not None:
        plan.ids([ctx.tok.special("<|im_start|>")], False)
        plan.ids(ctx.tok.fixed("system"), False)
        plan.ids(ctx.tok.fixed("\n"), False)
        plan.ids(ctx.tok.fixed(system), False)
        plan.ids([ctx.tok.special("<|im_end|>")], False)
        plan.ids(ctx.tok.fixed("\n"), False)


def _prompt(plan: Plan, ctx: Context, parts: list) -> None:
    plan.structured(ctx.segments(parts), False, ctx.tok)


def _target(plan: Plan, ctx: Context, parts: list) -> None:
    """The answer: for a newer family the user's turn closes and the assistant's opens first."""
    if ctx.model.chat:
        plan.ids([ctx.tok.special("<|im_end|>")], False)
        plan.ids(ctx.tok.fixed("\n"), False)
        plan.ids([ctx.tok.special("<|im_start|>")], False)
        plan.ids(ctx.tok.fixed("assistant"), False)
        plan.ids(ctx.tok.fixed("\n"), False)
    plan.structured(ctx.segments(parts), True, ctx.tok)


def _end(plan: Plan, ctx: Context) -> None:
    if ctx.model.chat:
        plan.ids(array("i", [ctx.tok.special("<|im_end|>")]) + array("i", ctx.tok.fixed("\n")), True)
    else:
        plan.ids([ctx.tok.special(EOS)], True)


def _lang(record: Record) -> str:
    lang = "en" if record.lang is None else record.lang
    if lang not in CAPTION_PROMPT:
        raise AnnotationError(f"unknown lang {_short(lang)} (use en or zh)")
    return lang


def caption(plan: Plan, record: Record, ctx: Context) -> None:
    _start(plan, record, ctx)
    _prompt(plan, ctx, [CAPTION_PROMPT[_lang(record)]])
    _target(plan, ctx, [ctx.lead + _field(record, "caption").strip()])
    _end(plan, ctx)


def vqa(plan: Plan, record: Record, ctx: Context) -> None:
    question = _field(record, "question").strip()
    _start(plan, record, ctx)
    _prompt(plan, ctx, [question if ctx.model.chat else " " + question + " Answer:"])
    _target(plan, ctx, [ctx.lead + _field(record, "answer").strip()])
    _end(plan, ctx)


def grounding(plan: Plan, record: Record, ctx: Context) -> None:
    """Caption with ``<ref>phrase</ref><box>…</box>`` at the character spans of its regions."""
    text = _field(record, "caption")
    regions = _field(record, "regions", list)
    image = _field(record, "image")
    width, height = _size(record, ctx)
    fmt = _box_format(record)
    spans = []
    for region in regions:
        span, boxes = region.span, region.boxes
        if not (0 <= span[0] < span[1] <= len(text)):
            raise AnnotationError(f"bad region span {span!r} for a caption of {len(text)} characters")
        if not boxes:
            raise AnnotationError(f"region {span} has no boxes")
        spans.append((span[0], span[1], tuple(pixel_box(b, width, height, fmt) for b in boxes)))
    spans.sort()
    for (_, end, _), (start, _, _) in zip(spans, spans[1:]):
        if start < end:
            raise AnnotationError("region spans overlap")
    out, pos = [ctx.lead], 0
    for start, end, boxes in spans:
        out += [text[pos:start], Boxes(text[start:end], boxes, (width, height), image)]
        pos = end
    out.append(text[pos:])
    out[1] = out[1].lstrip()  # the caption stripped, as the other tasks'
    out[-1] = out[-1].rstrip()
    _start(plan, record, ctx)
    _prompt(plan, ctx, [GROUNDING_PROMPT[_lang(record)]])
    _target(plan, ctx, out)
    _end(plan, ctx)


def ref_grounding(plan: Plan, record: Record, ctx: Context) -> None:
    width, height = _size(record, ctx)
    image = _field(record, "image")
    box = pixel_box(_field(record, "box", list), width, height, _box_format(record))
    ref = _field(record, "ref").strip()
    _start(plan, record, ctx)
    if ctx.model.boxes == "tokens":
        ref_start, ref_end = _tags(ctx.model, "<ref>", "</ref>")
        _prompt(plan, ctx, [ref_start, ref, ref_end])
        _target(plan, ctx, [Boxes(None, (box,), (width, height), image)])
    else:
        _prompt(plan, ctx, [FAMILY_PROMPTS["ref_grounding"].format(ref=ref)])
        _target(plan, ctx, [json_list(ctx.segments([Boxes(ref, (box,), (width, height), image)]))])
    _end(plan, ctx)


def grounded_caption(plan: Plan, record: Record, ctx: Context) -> None:
    width, height = _size(record, ctx)
    image = _field(record, "image")
    box = pixel_box(_field(record, "box", list), width, height, _box_format(record))
    caption_text = _field(record, "caption").strip()
    _start(plan, record, ctx)
    if ctx.model.boxes == "tokens":
        ref_start, ref_end = _tags(ctx.model, "<ref>", "</ref>")
        _prompt(plan, ctx, [ref_start, "This", ref_end, Boxes(None, (box,), (width, height), image)])
        _target(plan, ctx, [" is " + caption_text])
    else:
        region = ctx.segments([Boxes(None, (box,), (width, height), image)])[0]
        _prompt(plan, ctx, [FAMILY_PROMPTS["grounded_caption"].format(box=region)])
        _target(plan, ctx, [caption_text])
    _end(plan, ctx)


def ocr(plan: Plan, record: Record, ctx: Context) -> None:
    lines = _field(record, "lines", list)
    if not lines:
        raise AnnotationError("no OCR lines")
    image = _field(record, "image")
    width, height = _size(record, ctx)
    fmt = _box_format(record)
    target = []
    for line in lines:
        target.append(Boxes(_field(line, "text"), tuple(pixel_quad(line.quad, width, height, fmt)),
                            (width, height), image, quad=True))
    _start(plan, record, ctx)
    if ctx.model.boxes == "tokens":
        _prompt(plan, ctx, [OCR_PROMPT])
        _target(plan, ctx, target)
    else:
        _prompt(plan, ctx, [FAMILY_PROMPTS["ocr"]])
        _target(plan, ctx, [json_list(ctx.segments(target))])
    _end(plan, ctx)


def _box_format(record: Record) -> str:
    return "xyxy" if record.box_format is None else record.box_format


def text(plan: Plan, record: Record, ctx: Context) -> None:
    """Pure text, for every model: language-model pre-training text ending in ``<|endoftext|>``."""
    plan.structured([_field(record, "text")], True, ctx.tok)
    plan.ids([ctx.tok.special(EOS)], True)


def _typed(renderer: Callable[[Plan, Record, Context], None]) -> Callable[[Plan, dict | Record, Context], None]:
    """A renderer that takes a raw record too (``qvl format export`` calls them), decoded first."""
    @functools.wraps(renderer)
    def typed(plan: Plan, record: dict | Record, ctx: Context) -> None:
        renderer(plan, decode(record), ctx)
    return typed


RENDERERS: dict[str, Callable[[Plan, dict | Record, Context], None]] = {
    "caption": _typed(caption),
    "vqa": _typed(vqa),
    "grounding": _typed(grounding),
    "ref_grounding": _typed(ref_grounding),
    "grounded_caption": _typed(grounded_caption),
    "ocr": _typed(ocr),
    "text": _typed(text),
}


def render(record: dict | Record, sample_id: str, ctx: Context) -> Plan:
    record = decode(record)
    plan = Plan(sample_id, record.task, "multitask" if record.source is None else record.source)
    RENDERERS[record.task](plan, record, ctx)
    return plan
