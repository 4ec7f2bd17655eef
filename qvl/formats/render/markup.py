"""Qwen-VL's markup in conversations (``Picture N: <img>…</img>``, ``<ref>``, ``<box>``, ``<quad>``),
checked and converted to a family's conventions."""

from __future__ import annotations

import json
import re
from bisect import bisect_right

from qvl.errors import AnnotationError
from qvl.formats.families import Family
from qvl.formats.render.sequence import image_spans

_PICTURE = re.compile(r"Picture \d+: (?=<img>)")
_AFTER_IMAGE = re.compile(r"(</img>)\n")
# A label is what lies between <ref> and </ref> holding neither (``[^<]*(?:<(?!/?ref>)[^<]*)*``
# cannot backtrack): a lazy ``.*?`` would run on past a </ref> without a box, to the end of the
# text from every <ref> — quadratic in a turn of ``<ref><ref>…``.
_GROUNDED = re.compile(r"(?:<ref>(?P<ref>[^<]*(?:<(?!/?ref>)[^<]*)*)</ref>)?"
                       r"(?P<boxes>(?:<box>\(\s*\d+\s*,\s*\d+\s*\),\(\s*\d+\s*,\s*\d+\s*\)</box>)+)")
_BOX = re.compile(r"<box>\(\s*(\d+)\s*,\s*(\d+)\s*\),\(\s*(\d+)\s*,\s*(\d+)\s*\)</box>")


def strip_picture_labels(text: str) -> str:
    """``Picture N: <img>…</img>\n`` -> ``<img>…</img>``: the label and newline are Qwen-VL's template's."""
    return _AFTER_IMAGE.sub(r"\1", _PICTURE.sub("", text)) if "<img>" in text else text


_BOX_TEXT = re.compile(r"<box>([^<]*)</box>")
_BOX_COORDS = re.compile(r"\(\s*(\d{1,4})\s*,\s*(\d{1,4})\s*\),\(\s*(\d{1,4})\s*,\s*(\d{1,4})\s*\)")
_MARKUP = ("<ref>", "</ref>", "<box>", "</box>")


def check_boxes(text: str) -> None:
    """Every ``<box>`` of Qwen-VL's markup is ``(x1,y1),(x2,y2)`` within 0-1000 with x1 < x2 and
    y1 < y2, or the record is ``bad_box``: a converted box past the image, inverted or of 10^20
    would be trained on as it stands."""
    for match in _BOX_TEXT.finditer(text):
        coords = _BOX_COORDS.fullmatch(match.group(1))
        values = [int(v) for v in coords.groups()] if coords else None
        if values is None or max(values) > 1000 or values[0] >= values[2] or values[1] >= values[3]:
            shown = match.group(0) if len(match.group(0)) <= 60 else match.group(0)[:57] + "…"
            raise AnnotationError(f"box {shown}: not (x1,y1),(x2,y2) within 0-1000 with x1 < x2 and y1 < y2",
                                  "bad_box")


def convert(text: str, fam: Family, resized_of, previous_image: str | None = None) -> str:
    """Qwen-VL-format content (``<img>`` spans stay qvl's image markers) in the family's
    conventions. ``resized_of(ref)`` gives an image's resized (width, height): a box refers to
    the last image before it in the conversation (``previous_image``, or one earlier in ``text``).
    Markup that cannot be converted (a ``<ref>`` with no box, a box inside a ``<ref>``) is a
    ``bad_box`` reject: Qwen-VL's tags would be trained on as text."""
    text = strip_picture_labels(text)  # the cheap tests first: most turns hold no image and no box
    if "<box>" not in text and "<quad>" not in text and "<ref>" not in text:
        return text
    check_boxes(text)
    if "<quad>" in text and fam.boxes != "tokens":
        raise AnnotationError(f"{fam.name} has no quad format (OCR with quads renders for qwen-vl and qwen2-vl)",
                              "unsupported_for_model")
    if fam.boxes == "tokens":
        for old, new in fam.tags.items():
            text = text.replace(old, new)
        return text

    spans = list(image_spans(text))  # a box's image: the last span that ends before it
    ends = [end for _, end, _ in spans]

    def json_boxes(match: re.Match) -> str:
        label = match.group("ref")
        before = bisect_right(ends, match.start())
        image = spans[before - 1][2] if before else previous_image
        out = []
        for box in _BOX.findall(match.group("boxes")):
            coords = [int(v) for v in box]  # at most 4 digits each: check_boxes
            if fam.boxes == "json_pixels":
                if image is None:
                    raise AnnotationError("a box before any image: no pixels to give it", "bad_box")
                w, h = resized_of(image.strip())
                coords = [round(coords[0] / 1000 * w), round(coords[1] / 1000 * h), round(coords[2] / 1000 * w),
                          round(coords[3] / 1000 * h)]
                if coords[0] >= coords[2] or coords[1] >= coords[3]:
                    raise AnnotationError(f"box {box}: less than a pixel of the {w}x{h} image the model sees",
                                          "bad_box")
            out.append(json.dumps({"bbox_2d": coords, **({"label": label} if label is not None else {})},
                                  ensure_ascii=False))
        return ", ".join(out)

    converted = _GROUNDED.sub(json_boxes, text)
    if left := next((tag for tag in _MARKUP if tag in converted), None):
        raise AnnotationError(f"{left} that does not convert to {fam.name}'s boxes (a <ref> without its box, or a box "
                              "inside one)", "bad_box")
    return converted
