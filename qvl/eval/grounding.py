"""Referring grounding scored as the paper's ``eval_mm/evaluate_grounding.py`` scores it.

The first ``(…),(…)`` in the answer (non-greedy, anywhere) is the box; each side must hold a
comma and split into exactly two numbers that ``float`` reads (so ``( 12, 34)`` parses and
``(1 2,3)`` does not), else the answer is the zero box. Coordinates are divided by
``box_scale`` — 999 in the script, although training normalised with 1000 (`qvl format`'s
``int(x / W * 1000)``): ``--box-scale 1000`` undoes training's convention exactly — and scaled
to the image's width and height. A hit is IoU >= 0.5 with the area of a box as
``(x2 - x1) * (y2 - y1)``, unclipped, as torchvision's ``box_area`` computes it.
"""

from __future__ import annotations

import re

BOX = re.compile(r"\((.*?)\),\((.*?)\)")
ZERO = (0.0, 0.0, 0.0, 0.0)


def parse_box(answer: str) -> tuple[float, float, float, float] | None:
    """The answer's box in the model's coordinates, or None (scored as the zero box)."""
    found = BOX.findall(answer)
    if not found:
        return None
    first, second = found[0]
    if "," not in first or "," not in second:
        return None
    try:
        x1, y1 = (float(v) for v in first.split(","))
        x2, y2 = (float(v) for v in second.split(","))
    except ValueError:  # not numbers, or not exactly two of them
        return None
    return x1, y1, x2, y2


def iou(a, b) -> float:
    """IoU of two xyxy boxes; NaN when the union is zero (which is then no hit)."""
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = area_a + area_b - inter
    return inter / union if union != 0 else float("nan")


def score(answer: str, truth: list[float], width: float, height: float, box_scale: float = 999.0) -> dict:
    """One sample: the parsed box in pixels, its IoU with the truth, and the hit (0 or 1)."""
    parsed = parse_box(answer)
    x1, y1, x2, y2 = parsed or ZERO
    box = (x1 / box_scale * width, y1 / box_scale * height, x2 / box_scale * width, y2 / box_scale * height)
    value = iou(box, truth)
    return {"parsed": list(parsed) if parsed else None, "box": [round(v, 3) for v in box],
            "iou": None if value != value else round(value, 6), "score": float(value >= 0.5)}
