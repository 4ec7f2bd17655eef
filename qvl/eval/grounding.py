"""Referring grounding scored as the paper's ``eval_mm/evaluate_grounding.py`` scores it.

The first ``(…),(…)`` in the answer (non-greedy, anywhere) is the box; each side must hold a
comma and split into exactly two numbers that ``float`` reads (so ``( 12, 34)`` parses and
``(1 2,3)`` does not) and are finite (``nan``, ``inf`` are no box), else the answer is the
zero box. Coordinates are divided by ``box_scale`` — 999 in the script, although training
normalised with 1000 (`qvl format`'s ``int(x / W * 1000)``): ``--box-scale 1000`` undoes
training's convention exactly — and scaled to the image's width and height. A hit is IoU >=
0.5 with the area of a box as ``(x2 - x1) * (y2 - y1)``, unclipped, as torchvision's
``box_area`` computes it.
"""

from __future__ import annotations

import math

from qvl.boundary import MAX_COORD  # a coordinate beyond it, or NaN/infinity, is no box

ZERO = (0.0, 0.0, 0.0, 0.0)


def first_box(answer: str) -> tuple[str, str] | None:
    r"""The two sides of the first ``(…),(…)`` in ``answer``: what ``re.search(r"\((.*?)\),\((.*?)\)")``
    finds, in linear time (the regex tries every ``(`` against the rest of its line: quadratic).

    ``.`` does not cross a newline, so a box lies within one line. On a line, the first ``(``
    starts the match whenever any does (a later start only has fewer ``),(`` after it); the
    first side ends at the first ``),(`` after it that still has a ``)`` further on, the second
    side at the first ``)`` after that."""
    for line in answer.split("\n"):
        start = line.find("(")
        last = line.rfind(")")
        if start < 0 or last < 0:
            continue
        middle = line.find("),(", start + 1)
        if middle < 0 or middle + 3 > last:
            continue
        return line[start + 1:middle], line[middle + 3:line.find(")", middle + 3)]
    return None


def _coordinate(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and abs(value) <= MAX_COORD):
        raise ValueError(text)
    return value


def parse_box(answer: str) -> tuple[float, float, float, float] | None:
    """The answer's box in the model's coordinates, or None (scored as the zero box). A side
    that is not two finite numbers (``nan``, ``inf``, ``1e400``) is no box."""
    found = first_box(answer)
    if found is None:
        return None
    first, second = found
    if "," not in first or "," not in second:
        return None
    try:
        x1, y1 = (_coordinate(v) for v in first.split(","))
        x2, y2 = (_coordinate(v) for v in second.split(","))
    except ValueError:  # not numbers, not exactly two of them, or not finite
        return None
    return x1, y1, x2, y2


def iou(a, b) -> float:
    """IoU of two xyxy boxes; NaN when the union is zero or the ratio not finite (which is then no hit)."""
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = area_a + area_b - inter
    value = inter / union if union != 0 else float("nan")
    return value if math.isfinite(value) else float("nan")


def score(answer: str, truth: list[float], width: float, height: float, box_scale: float = 999.0) -> dict:
    """One sample: the parsed box in pixels, its IoU with the truth, and the hit (0 or 1)."""
    parsed = parse_box(answer)
    x1, y1, x2, y2 = parsed or ZERO
    box = (x1 / box_scale * width, y1 / box_scale * height, x2 / box_scale * width, y2 / box_scale * height)
    value = iou(box, truth)
    return {"parsed": list(parsed) if parsed else None, "box": [round(v, 3) for v in box],
            "iou": None if value != value else round(value, 6), "score": float(value >= 0.5)}
