from __future__ import annotations

import pytest

from qvl.errors import AnnotationError
from qvl.formats.render.boxes import (
    box_text,
    pixel_box,
    pixel_quad,
    quad_text,
    scale_box,
    scale_quad,
)


def normalize_box(box, width: int, height: int, box_format: str = "xyxy") -> tuple[int, int, int, int]:
    """A box checked and scaled, as the renderers do it."""
    return scale_box(pixel_box(box, width, height, box_format), width, height)


def normalize_quad(quad, width: int, height: int, box_format: str = "xyxy") -> list[tuple[int, int]]:
    return scale_quad(pixel_quad(quad, width, height, box_format), width, height)


def test_pixel_boxes_scale_to_1000_and_floor():
    assert normalize_box([64, 48, 320, 240], 640, 480) == (100, 100, 500, 500)
    assert normalize_box([0, 0, 640, 480], 640, 480) == (0, 0, 999, 999)  # clamped to [0, 1000)
    assert normalize_box([0.5, 0.25, 0.75, 1.0], 200, 100, "norm") == (500, 250, 750, 999)
    assert normalize_box([64, 48, 256, 192], 640, 480, "xywh") == (100, 100, 500, 500)


def test_one_pixel_overshoot_is_clamped_not_an_error():
    assert normalize_box([-0.6, 0, 640.8, 480.5], 640, 480) == (0, 0, 999, 999)


@pytest.mark.parametrize("box, message", [
    ([10, 10, 700, 100], "outside the 640x480 image"),
    ([100, 10, 50, 100], "inverted"),
    ([10, 10, 10, 100], "empty"),
    ([1, 2, 3], "expected 4 numbers"),
    (["a", 2, 3, 4], "not numbers"),
    ([float("nan"), 2, 3, 4], "finite"),
])
def test_bad_boxes(box, message):
    with pytest.raises(AnnotationError, match=message) as e:
        normalize_box(box, 640, 480)
    assert e.value.reason == "bad_box"


def test_text_forms():
    assert box_text((1, 2, 3, 4)) == "(1,2),(3,4)"
    quad = normalize_quad([[0, 0], [320, 0], [320, 240], [0, 240]], 640, 480)
    assert quad_text(quad) == "(0,0),(500,0),(500,500),(0,500)"
