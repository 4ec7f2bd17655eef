"""Decoding at the boundary: every input record becomes a typed structure here, or a
``RecordError`` naming the field and what is wrong with it.

Records are ``msgspec`` structs: strict types (``"12"`` is not a number, ``true`` is not a
count, a list is not a string), bounded numbers (no NaN, no infinity, no 10^400), text that
is valid Unicode (a lone surrogate is ``bad_text``), and lists of bounded length. Nothing
downstream of a boundary sees raw JSON.
"""

from __future__ import annotations

import os
import stat
from typing import Annotated, Any, BinaryIO, TypeVar

import msgspec

from qvl.errors import QvlError, RecordError

T = TypeVar("T")

# Limits that no real record comes near; each keeps a hostile one from costing time or memory.
MAX_COORD = 1e7  # pixels: 10M px is beyond any real image side
MAX_SIDE = 1 << 20  # an image side in pixels
MAX_ID = (1 << 63) - 1  # integer ids (COCO, VQAv2 question ids) fit in 64 bits
MAX_ITEMS = 100_000  # boxes, regions, turns, lines in one record

Coord = Annotated[float, msgspec.Meta(ge=-MAX_COORD, le=MAX_COORD)]
Side = Annotated[float, msgspec.Meta(gt=0, le=MAX_SIDE)]
IntSide = Annotated[int, msgspec.Meta(ge=1, le=MAX_SIDE)]
Id = Annotated[int, msgspec.Meta(ge=-MAX_ID, le=MAX_ID)]
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]


def _check_text(value: Any, where: str) -> None:
    """Every string inside ``value`` is valid Unicode (no lone surrogate from a ``\\ud800`` escape)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RecordError(f"{where}: text is not valid Unicode (a lone surrogate at character {e.start})",
                              "bad_text") from None
    elif isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            _check_text(getattr(value, name), f"{where}.{name}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where)
            _check_text(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_text(item, f"{where}[{i}]")


def convert(obj: Any, type_: type[T], reason: str = "bad_field") -> T:
    """``obj`` (decoded JSON, a parquet row, a TOML table) as ``type_``, or a RecordError whose
    message names the field (``$.boxes[2]``) and what was expected."""
    try:
        value = msgspec.convert(obj, type_, strict=True)
    except msgspec.ValidationError as e:
        raise RecordError(str(e), reason) from None
    except UnicodeEncodeError as e:  # msgspec meets a lone surrogate in a key, or in a string where no str belongs
        raise RecordError(f"$: text is not valid Unicode (a lone surrogate at character {e.start})",
                          "bad_text") from None
    try:
        msgspec.json.encode(value)  # C speed; fails on a lone surrogate (or a value JSON cannot hold)
    except Exception:
        _check_text(value, "$")  # the walk (10x slower) only to name the field, or to find nothing
    return value


def decode_json(data: bytes | str, type_: Any = Any, reason: str = "malformed_json") -> Any:
    """One JSON document (a JSONL line) as ``type_``. Invalid JSON, NaN/Infinity literals,
    lone surrogates and arrays or objects nested past the interpreter's recursion limit (100k
    ``[`` in a few hundred KB) are ``reason``; a value of the wrong type is ``bad_field``; a
    string that is not valid UTF-8 is ``bad_text``."""
    try:
        return msgspec.json.decode(data, type=type_, strict=True)
    except RecursionError:  # msgspec recurses per nesting level: a line of 100k '[' is malformed, not a crash
        raise RecordError("not valid JSON: arrays or objects nested too deeply", reason) from None
    except msgspec.ValidationError as e:
        raise RecordError(str(e), "bad_field") from None
    except UnicodeDecodeError as e:  # msgspec < 0.23 checks UTF-8 inside strings only as it builds them
        raise RecordError(f"text is not valid UTF-8 (byte {e.start} of a string)", "bad_text") from None
    except msgspec.DecodeError as e:
        message = str(e)
        if "UTF-8" in message:  # msgspec >= 0.23: "Invalid UTF-8 encoded string"
            raise RecordError("text is not valid UTF-8", "bad_text") from None
        if "truncated" in message or "surrogate" in message:
            if _has_lone_surrogate_escape(data):
                raise RecordError("text is not valid Unicode (a lone surrogate escape such as \\ud800)",
                                  "bad_text") from None
        raise RecordError(f"not valid JSON: {message}", reason) from None


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n:,} bytes"


def open_regular(path: Any, error: type[Exception] = QvlError, what: str = "") -> BinaryIO:
    """``path`` opened for binary reading if it is a regular file, or one ``error`` naming it. A
    FIFO, device or folder is refused unread: opening a FIFO waits for a writer forever, and
    ``/dev/zero`` never ends. (O_NONBLOCK lets a FIFO open at once, to be refused; the check is
    on the opened file, so nothing can swap it in between.)"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e}){what}") from None
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        regular = False
    if not regular:
        os.close(fd)
        raise error(f"{path}: not a regular file (a device, folder or pipe){what}")
    return os.fdopen(fd, "rb")


def read_bounded(path: Any, max_bytes: int, error: type[Exception] = QvlError, what: str = "") -> bytes:
    """A regular file of at most ``max_bytes``, never read further — or one ``error`` naming it
    (``what`` says what such a file is; see ``open_regular``)."""
    with open_regular(path, error, what) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise error(f"{path}: cannot read ({e.strerror or e}){what}") from None
    if len(data) > max_bytes:
        raise error(f"{path}: larger than {_size(max_bytes)}{what}")
    return data


def read_text(path: Any, max_bytes: int, error: type[Exception] = QvlError, what: str = "") -> str:
    """A UTF-8 text file of at most ``max_bytes``, or one ``error`` naming it (and the line of the
    first byte that is not UTF-8)."""
    raw = read_bounded(path, max_bytes, error, what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text{what}") from None


def read_json_file(path: Any, type_: Any, max_bytes: int, error: type[Exception] = QvlError, hint: str = "") -> Any:
    """A whole JSON file, at most ``max_bytes``, as ``type_`` — or one ``error`` naming the file, and
    the field with what was expected (``hint`` says what such a file is)."""
    data = read_bounded(path, max_bytes, error, hint).removeprefix(b"\xef\xbb\xbf")  # a BOM is read past
    try:
        return decode_json(data, type_)
    except RecordError as e:
        raise error(f"{path}: {e}{hint}") from None


def _has_lone_surrogate_escape(data: bytes | str) -> bool:
    import json

    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return False
    try:
        _check_text(value, "$")
    except RecordError:
        return True
    return False
