"""Decoding untrusted image bytes: the size read from the header is checked against a
pixel limit *before* any pixel is decoded, so a 20000x20000 PNG of a few kilobytes (a
decompression bomb) is refused rather than expanded to gigabytes; then every pixel is
decoded, so truncated or non-image bytes are found here and not in a training step (a
JPEG at 1/8 scale, which its format allows: every byte is still read, at a tenth of the cost)."""

from __future__ import annotations

import io
import re
import warnings
from typing import BinaryIO

from PIL import Image

from qvl.errors import RecordError

# What a 448-px model can use many times over; larger images are refused, not decoded.
MAX_PIXELS = 64_000_000


class BadImage(RecordError):
    """The bytes are not a usable image; ``reason`` is ``too_many_pixels``, ``corrupt_image`` or
    ``file_too_large``."""


def max_file_bytes(max_pixels: int = MAX_PIXELS) -> int:
    """The largest image file worth reading: 4 bytes a pixel (8-bit RGBA, uncompressed) plus 16 MiB
    of metadata. 272 MB at the default limit; a 2.5 GB file is refused unread."""
    return 4 * max_pixels + (16 << 20)


def read_file(f: BinaryIO, size: int, max_pixels: int = MAX_PIXELS) -> bytes:
    """The bytes of an image file of ``size`` bytes, read only once its size and its header pass:
    neither a huge file nor one whose header claims too many pixels is ever read whole."""
    limit = max_file_bytes(max_pixels)
    if size > limit:
        raise BadImage(f"a file of {size:,} bytes, over the {limit:,} an image of at most {max_pixels / 1e6:g} Mpx "
                       "can need", "file_too_large")
    _header_size(f, max_pixels)
    f.seek(0)
    data = f.read(limit + 1)
    if len(data) > limit:  # grown since its size was taken
        raise BadImage(f"a file of more than {limit:,} bytes", "file_too_large")
    return data


def _header_size(f: BinaryIO, max_pixels: int) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as img:
                width, height = img.size
    except Image.DecompressionBombError as e:
        raise BadImage(f"over the limit of {max_pixels / 1e6:g} Mpx ({e})", "too_many_pixels") from None
    except Exception as e:  # PIL raises many types for bad bytes (OSError, SyntaxError, ValueError...)
        raise BadImage(f"not a decodable image ({_said(e)})"[:300], "corrupt_image") from None
    if width * height > max_pixels:
        raise BadImage(f"{width}x{height} = {width * height / 1e6:.0f} Mpx, over the limit of "
                       f"{max_pixels / 1e6:g} Mpx", "too_many_pixels")


def decoded_size(data: bytes, max_pixels: int = MAX_PIXELS, inspect=None):
    """(width, height) of an image that decodes fully and has at most ``max_pixels`` — and,
    with ``inspect``, what it returns for the decoded image: (width, height, result)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise BadImage(f"{width}x{height} = {width * height / 1e6:.0f} Mpx, over the limit of "
                                   f"{max_pixels / 1e6:g} Mpx", "too_many_pixels")
                img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))  # JPEG: decode at 1/8 scale
                img.load()
                return (width, height) if inspect is None else (width, height, inspect(img))
    except BadImage:
        raise
    except Image.DecompressionBombError as e:  # PIL's own guard, above twice its default limit
        raise BadImage(f"over the limit of {max_pixels / 1e6:g} Mpx ({e})", "too_many_pixels") from None
    except Exception as e:  # PIL raises many types for bad bytes (OSError, SyntaxError, ValueError...)
        raise BadImage(f"not a decodable image ({_said(e)})"[:300], "corrupt_image") from None


def _said(e: Exception) -> str:
    """An exception as a ledger may keep it: without the memory addresses PIL puts in some
    (``<_io.BytesIO object at 0x7f…>``), so the same bytes give the same words in every run."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(e).__name__}: {e}")
