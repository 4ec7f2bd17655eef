"""Boxes and quads in Qwen-VL's integer coordinate space [0, 1000).

Input boxes are pixel ``xyxy`` (default), pixel ``xywh`` (COCO) or ``norm`` (0-1 xyxy).
A box outside the image, inverted or empty is an error for its sample; an overshoot of
up to one pixel (rounding in the source annotations) is clamped instead.
"""

from __future__ import annotations

import math

from qvl.boundary import MAX_COORD
from qvl.errors import AnnotationError

BOX_FORMATS = ("xyxy", "xywh", "norm")
SCALE = 1000


def is_number(value) -> bool:
    """An int or float from the record itself within ±10^7 pixels: JSON's ``"12"`` and ``true``
    are not numbers, nor NaN, infinity or a 10^400 integer (which ``float()`` cannot take)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and -MAX_COORD <= value <= MAX_COORD


def _to_pixels_xyxy(box, width: int, height: int, box_format: str) -> list[float]:
    if box_format not in BOX_FORMATS:
        raise AnnotationError(f"unknown box_format {box_format!r} (use {', '.join(BOX_FORMATS)})")
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise AnnotationError(f"bad box {repr(box)[:200]}: expected 4 numbers", "bad_box")
    if not all(is_number(v) for v in box):
        raise AnnotationError(f"bad box {str(box)[:200]}: not numbers (strings and booleans are not "
                              "coordinates), or not finite and within ±10^7", "bad_box")
    x1, y1, a, b = (float(v) for v in box)
    if box_format == "xywh":
        return [x1, y1, x1 + a, y1 + b]
    if box_format == "norm":
        return [x1 * width, y1 * height, a * width, b * height]
    return [x1, y1, a, b]


def _scaled(v: float, size: int) -> int:
    return min(SCALE - 1, max(0, int(v / size * SCALE)))


def _check_point(x: float, y: float, width: int, height: int, what) -> tuple[float, float]:
    if not (math.isfinite(x) and math.isfinite(y)):
        raise AnnotationError(f"bad {what}: coordinates must be finite", "bad_box")
    if x < -1 or y < -1 or x > width + 1 or y > height + 1:
        raise AnnotationError(f"bad {what}: outside the {width}x{height} image", "bad_box")
    return min(max(x, 0.0), float(width)), min(max(y, 0.0), float(height))


def pixel_box(box, width: int, height: int, box_format: str = "xyxy") -> tuple[float, float, float, float]:
    """A checked box as pixel ``xyxy`` inside the image."""
    x1, y1, x2, y2 = _to_pixels_xyxy(box, width, height, box_format)
    x1, y1 = _check_point(x1, y1, width, height, f"box {list(box)}")
    x2, y2 = _check_point(x2, y2, width, height, f"box {list(box)}")
    if x2 < x1 or y2 < y1:
        raise AnnotationError(f"bad box {list(box)}: inverted (x2 < x1 or y2 < y1)", "bad_box")
    if x2 == x1 or y2 == y1:
        raise AnnotationError(f"bad box {list(box)}: empty (zero width or height)", "bad_box")
    return x1, y1, x2, y2


def scale_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel ``xyxy`` -> Qwen-VL's integers in [0, 1000)."""
    return _scaled(box[0], width), _scaled(box[1], height), _scaled(box[2], width), _scaled(box[3], height)


def pixel_quad(quad, width: int, height: int, box_format: str = "xyxy") -> list[tuple[float, float]]:
    """Four checked corner points in pixels; ``norm`` input means 0-1 coordinates, anything else pixels."""
    if not isinstance(quad, (list, tuple)) or len(quad) != 4:
        raise AnnotationError(f"bad quad {repr(quad)[:200]}: expected 4 points", "bad_box")
    points = []
    for point in quad:
        if not isinstance(point, (list, tuple)) or len(point) != 2:
            raise AnnotationError(f"bad quad {repr(quad)[:200]}: a point is not [x, y]", "bad_box")
        if not (is_number(point[0]) and is_number(point[1])):
            raise AnnotationError(f"bad quad {str(quad)[:200]}: not numbers (strings and booleans are "
                                  "not coordinates), or not finite and within ±10^7", "bad_box")
        x, y = float(point[0]), float(point[1])
        if box_format == "norm":
            x, y = x * width, y * height
        points.append(_check_point(x, y, width, height, f"quad {list(quad)}"))
    return points


def scale_quad(points: list[tuple[float, float]], width: int, height: int) -> list[tuple[int, int]]:
    return [(_scaled(x, width), _scaled(y, height)) for x, y in points]


def box_text(box: tuple[int, int, int, int]) -> str:
    return f"({box[0]},{box[1]}),({box[2]},{box[3]})"


def quad_text(points: list[tuple[int, int]]) -> str:
    return ",".join(f"({x},{y})" for x, y in points)
