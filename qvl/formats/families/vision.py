"""The newer families' images: their resize, token count and M-RoPE positions."""

from __future__ import annotations

import math

import numpy as np

from qvl.errors import AnnotationError
from qvl.formats.families import Family
from qvl.recipes import SettingError

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

