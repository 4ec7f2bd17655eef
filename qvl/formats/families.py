"""What differs between Qwen-VL and the Qwen2-VL, Qwen2.5-VL and Qwen3-VL families when the
same conversations are rendered for them — the renderers stay shared (`chatml.py`).

| family | system message by default | image | boxes in answers |
|---|---|---|---|
| ``qwen-vl`` | "You are a helpful assistant." | ``<img>`` + 256 ``<imgpad>`` + ``</img>`` | ``<ref>…</ref><box>(x1,y1),(x2,y2)</box>``, 0–1000 of the image |
| ``qwen2-vl`` | "You are a helpful assistant." | ``<|vision_start|>`` + N ``<|image_pad|>`` + ``<|vision_end|>`` | ``<|object_ref_start|>…<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``, 0–1000 |
| ``qwen2.5-vl`` | "You are a helpful assistant." | same | ``{"bbox_2d": [x1, y1, x2, y2], "label": …}``, pixels of the *resized* image |
| ``qwen3-vl`` | none | same | ``{"bbox_2d": […], "label": …}``, 0–1000 |

N, the image's token count, comes from its width and height alone, with the released
processors' ``smart_resize`` (both sides rounded to a multiple of ``factor`` — 28 for
Qwen2/2.5-VL's 14-px patches merged 2×2, 32 for Qwen3-VL's 16-px patches — the area brought
within ``[min_pixels, max_pixels]``; an aspect ratio over 200 is refused): N = h'w' / factor².

Labels follow the families' reference fine-tuning code: the assistant's content, its
``<|im_end|>`` and the newline after it take the loss; nothing else does. Qwen-VL's picture
labels (``Picture 1: `` and the newline after the image) are Qwen-VL's own convention and are
not rendered for the newer families (their templates add none by default).
"""

from __future__ import annotations

import json
import math
import re
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qvl.formats.boxes import AnnotationError
from qvl.formats.sequence import image_spans
from qvl.recipes import SettingError

QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
QWEN25_SPECIALS = QWEN2_SPECIALS + ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                                    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
QWEN3_SPECIALS = QWEN25_SPECIALS + ("<tool_response>", "</tool_response>", "<think>", "</think>")
SYSTEM = "You are a helpful assistant."


@dataclass(frozen=True)
class Family:
    name: str
    specials: tuple[str, ...]  # in id order from 151643
    factor: int  # patch size x spatial merge
    min_pixels: int
    max_pixels: int
    default_system: str | None
    boxes: str  # "tokens" (0-1000 between box tokens), "json_pixels" (resized image), "json_1000"


FAMILIES = {
    "qwen2-vl": Family("qwen2-vl", QWEN2_SPECIALS, 28, 3136, 12845056, SYSTEM, "tokens"),
    "qwen2.5-vl": Family("qwen2.5-vl", QWEN25_SPECIALS, 28, 3136, 12845056, SYSTEM, "json_pixels"),
    "qwen3-vl": Family("qwen3-vl", QWEN3_SPECIALS, 32, 65536, 16777216, None, "json_1000"),
}
MODELS = ("qwen-vl", *FAMILIES)


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"--model {name!r}: use {', '.join(MODELS)}")
    return FAMILIES[name]


# Qwen2-VL's (and Qwen2.5-VL's) chat template as released, images only
QWEN2_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] "
    "!= 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>"
    "{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>"
    "assistant\n{% endif %}")
# Qwen3-VL's, for conversations without tools or thinking: no default system message
QWEN3_TEMPLATE = QWEN2_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}", "")
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def reference_processor(name: str, folder: Path, min_pixels: int | None = None, max_pixels: int | None = None):
    """The transformers processor of a family, built from local files only (no download): its
    tokenizer.json from qwen.tiktoken with the family's special tokens and NFC, its image
    processor with the released settings, its chat template (images; no tools or thinking).
    What qvl's renderings are checked and benchmarked against."""
    from tokenizers import normalizers
    from transformers import (
        AutoProcessor,
        PreTrainedTokenizerFast,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from qvl.formats.tokenizers import QWEN_PATTERN, _qwen_ranks_path

    fam = family(name)
    hf = TikTokenConverter(vocab_file=str(_qwen_ranks_path()), pattern=QWEN_PATTERN,
                           extra_special_tokens=list(fam.specials)).converted()
    hf.normalizer = normalizers.NFC()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.image_token = "<|image_pad|>"
    patch = 16 if name == "qwen3-vl" else 14
    low, high = pixel_bounds(fam, min_pixels, max_pixels)
    images = Qwen2VLImageProcessor(
        patch_size=patch, merge_size=2, temporal_patch_size=2, image_mean=MEAN, std=STD, image_std=STD,
        size={"shortest_edge": low, "longest_edge": high})
    cls, video = (Qwen3VLProcessor, Qwen3VLVideoProcessor) if name == "qwen3-vl" else \
        (Qwen2VLProcessor, Qwen2VLVideoProcessor)
    template = QWEN3_TEMPLATE if name == "qwen3-vl" else QWEN2_TEMPLATE
    cls(image_processor=images, tokenizer=tokenizer, video_processor=video(), chat_template=template) \
        .save_pretrained(folder)
    return AutoProcessor.from_pretrained(folder)


def check_tokenizer(tok, fam: Family) -> None:
    """A tokenizer for ``fam`` has the family's special tokens at the family's ids."""
    wrong = [t for i, t in enumerate(fam.specials) if tok.specials.get(t) != 151643 + i]
    if wrong:
        raise ValueError(f"tokenizer {tok.name}: {', '.join(wrong[:5])} not at {fam.name}'s ids (151643 + their "
                         "order); give the family's own tokenizer.json or none")


MAX_RESIZED_PIXELS = 1 << 30  # --max-image-pixels: far past any family's released bound (16.8 Mpx)


def pixel_bounds(fam: Family, min_pixels: int | None = None, max_pixels: int | None = None) -> tuple[int, int]:
    """(min, max) resized area: the given bounds (None: the released processor's), checked —
    at least one merged patch (``factor``²), at most 2^30 pixels, min not above max."""
    low = fam.factor * fam.factor
    for key, value in (("min_image_pixels", min_pixels), ("max_image_pixels", max_pixels)):
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                      and low <= value <= MAX_RESIZED_PIXELS):
            raise SettingError(key, f"{value}: must be an integer from {low} (one {fam.factor}x{fam.factor} patch of "
                                    f"{fam.name}) to {MAX_RESIZED_PIXELS}")
    lo = fam.min_pixels if min_pixels is None else min_pixels
    hi = fam.max_pixels if max_pixels is None else max_pixels
    if lo > hi:
        raise SettingError("min_image_pixels", f"{lo} is above max_image_pixels {hi}")
    return lo, hi


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The processors' resize: sides multiples of ``factor``, area within the bounds."""
    if min(height, width) < 1:
        raise AnnotationError(f"image {width}x{height}: a side of no pixels", "bad_image_size")
    if max(height, width) / min(height, width) > 200:
        raise AnnotationError(f"image {width}x{height}: aspect ratio over 200", "bad_image_size")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_tokens(fam: Family, width: int, height: int, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> tuple[int, tuple[int, int]]:
    """(N, (resized width, resized height)) for an image of this size."""
    h, w = smart_resize(height, width, fam.factor, *pixel_bounds(fam, min_pixels, max_pixels))
    return (h // fam.factor) * (w // fam.factor), (w, h)


def mrope_positions(ids: np.ndarray, image_pad: int, grids: list[tuple[int, int]]) -> np.ndarray:
    """The (3, L) M-RoPE position ids (temporal, height, width) of one sample, as the models'
    ``get_rope_index`` computes them for images: text tokens count on in all three; an image's
    tokens, in rows of its merged grid (``grids``: (rows, columns) per image, in order), take
    the position reached plus (0, row, column); the text after it starts past the larger side."""
    out = np.empty((3, len(ids)), dtype=np.int32)
    padded = np.concatenate(([False], ids == image_pad, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[::2], edges[1::2]
    if len(starts) != len(grids):
        raise AnnotationError(f"{len(starts)} image spans for {len(grids)} images", "bad_sample")
    pos = done = 0
    for start, end, (rows, cols) in zip(starts, ends, grids):
        out[:, done:start] = np.arange(pos, pos + start - done, dtype=np.int32)
        pos += start - done
        if end - start != rows * cols:
            raise AnnotationError(f"an image span of {end - start} tokens for a {rows}x{cols} grid", "bad_sample")
        out[0, start:end] = pos
        out[1, start:end] = pos + np.repeat(np.arange(rows, dtype=np.int32), cols)
        out[2, start:end] = pos + np.tile(np.arange(cols, dtype=np.int32), rows)
        pos += max(rows, cols)
        done = end
    out[:, done:] = np.arange(pos, pos + len(ids) - done, dtype=np.int32)
    return out


# ---------------------------------------------------------------- content

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
        for old, new in (("<ref>", "<|object_ref_start|>"), ("</ref>", "<|object_ref_end|>"), ("<box>", "<|box_start|>"),
                         ("</box>", "<|box_end|>"), ("<quad>", "<|quad_start|>"), ("</quad>", "<|quad_end|>")):
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
