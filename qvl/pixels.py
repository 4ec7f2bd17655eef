"""Decoding untrusted image bytes: the size read from the header is checked against a
pixel limit *before* any pixel is decoded, so a 20000x20000 PNG of a few kilobytes (a
decompression bomb) is refused rather than expanded to gigabytes; then every pixel is
decoded, so truncated or non-image bytes are found here and not in a training step (a
JPEG at 1/8 scale, which its format allows: every byte is still read, at a tenth of the cost)."""

from __future__ import annotations

import io
import warnings

from PIL import Image

from qvl.errors import RecordError

# What a 448-px model can use many times over; larger images are refused, not decoded.
MAX_PIXELS = 64_000_000


class BadImage(RecordError):
    """The bytes are not a usable image; ``reason`` is ``too_many_pixels`` or ``corrupt_image``."""


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
        raise BadImage(f"not a decodable image ({type(e).__name__}: {e})"[:300], "corrupt_image") from None

