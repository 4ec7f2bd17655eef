"""The stage-2 sources of the Qwen-VL paper, read as their publishers ship them.

One module per layout; each turns the published records into qvl annotation records (the
multitask schema of ``formats/multitask.py``) and does nothing else — the renderers, shards,
packing and rejects apply unchanged. Each module's docstring says which files, splits and
fields it reads and how its boxes are given (the source convention stays explicit: COCO,
RefCOCO and Visual Genome ``xywh`` pixels, GRIT normalised ``xyxy``, TextOCR polygons).

An importer yields ``(file, index, record)``: the place of the record in the published files
(a reject names it), and the record — or an ``AnnotationError`` for a record that cannot
become one, so that one bad record is a reject and never the file. Each published record is
decoded into the importer's typed ``msgspec`` structs (``decode``) before anything reads it:
a wrong type, a non-finite or huge number, a lone surrogate or a missing key is a reject
naming the record and the field. Keys the importer does not read are ignored (published files
carry many). A file that is not JSON, or ends early, is one ``LayoutFileError`` naming it.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from qvl.boundary import convert
from qvl.errors import AnnotationError, QvlError, RecordError

T = TypeVar("T")
Yield = Iterator[tuple[str, int, "dict | AnnotationError"]]


class LayoutFileError(QvlError):
    """A whole published file cannot be read as its layout says; the message names it."""


@dataclass(frozen=True)
class Options:
    tasks: frozenset[str]  # the tasks to give, of those the layout can give
    split: str | None = None  # for layouts that hold several splits in one file (RefCOCO)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Importer:
    name: str
    tasks: tuple[str, ...]
    read: Callable[[list[Path], Options], Yield]
    files: str  # what to give it, for messages
    splits: tuple[str, ...] = ()  # the splits its files hold, for layouts that hold several


def registry() -> dict[str, Importer]:
    from qvl.formats.importers import (
        coco_captions,
        gqa,
        grit,
        llava_pretrain,
        refcoco,
        textocr,
        textvqa,
        visual_genome,
        vqav2,
    )

    return {m.IMPORTER.name: m.IMPORTER for m in (coco_captions, vqav2, gqa, textvqa, refcoco, visual_genome, grit,
                                                   textocr, llava_pretrain)}


def records(layout: str, files: list[Path], tasks: list[str] | None = None, split: str | None = None,
            limit: int | None = None, asked_by: str = "") -> Yield:
    """The importer's records for ``files`` (at most ``limit``), after checking what was asked
    (here, before the first record is read: a bad request is an error before any output).
    ``asked_by`` names where the layout was asked for (default: ``--from``)."""
    known = registry()
    split_by = f"{asked_by}: split" if asked_by else "--split"
    asked_by = asked_by or f"--from {layout}"
    if layout not in known:
        raise LayoutFileError(f"{asked_by}: unknown layout; known: {', '.join(known)}")
    importer = known[layout]
    wanted = frozenset(tasks or importer.tasks)
    bad = sorted(wanted - set(importer.tasks))
    if bad:
        raise LayoutFileError(f"{asked_by}: {layout} gives {', '.join(importer.tasks)}, not {', '.join(bad)}")
    if split is not None and split not in importer.splits:
        raise LayoutFileError(f"{split_by} {split!r:.60}: " + (
            f"not a split of {layout}; one of {', '.join(importer.splits)}" if importer.splits else
            f"{layout} has no splits to choose from (only {', '.join(n for n, i in known.items() if i.splits)})"))
    if limit is not None and limit < 1:
        raise LayoutFileError(f"--limit {limit}: must be 1 or more (leave it out for every record)")
    for path in files:
        if not Path(path).is_file():
            raise LayoutFileError(f"{path}: no such file")
    return itertools.islice(importer.read([Path(p) for p in files], Options(wanted, split)), limit)


def keyed_records(layout: str, files: list[Path], tasks: list[str] | None = None, split: str | None = None,
                  limit: int | None = None) -> Iterator[tuple[str, int, str, dict | AnnotationError]]:
    """``records`` as `qvl format` and `qvl format export` take them: each with its default id,
    ``FILENAME:INDEX`` (the request checked here, before the first record is read)."""
    found = records(layout, files, tasks, split, limit)
    return ((file, index, f"{Path(file).name}:{index}", record) for file, index, record in found)


def load_json(path: Path):
    import json

    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise LayoutFileError(f"{path}: not a readable JSON file ({str(e)[:200] or type(e).__name__})") from None


def stream_error(path, error: Exception) -> LayoutFileError:
    """A streamed file (ijson) that stops being JSON: named, with where it stopped."""
    message = " ".join(str(error).split())[:200]
    if isinstance(error, UnicodeDecodeError):
        message = f"not valid UTF-8 ({message})"
    elif "premature EOF" in message or "Incomplete JSON" in message:
        message = f"truncated: the file ends inside a JSON value ({message})"
    return LayoutFileError(f"{path}: not readable JSON ({message})")


# ijson's C backend cannot keep a lone surrogate escape: it turns ``\ud800`` into ``?`` silently
# and fails the whole file on ``\udfff``. Its Python backend keeps the text, so that the record
# holding one is a ``bad_text`` reject. A surrogate escape, alone (6 bytes) or as a pair (12):
SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}(?:\\u[dD][c-fC-F][0-9a-fA-F]{2})?")
MAX_DEPTH = 64  # JSON nesting: the published layouts go 6 deep; ijson's cost is quadratic in it
BLOCK = 1 << 20


def _backend(path: Path):
    """ijson's C backend, or its Python one where the file holds a lone surrogate escape. One
    regex pass over the bytes (a pair split across two blocks only costs the slower backend)."""
    import ijson

    tail = b""
    with open(path, "rb") as f:
        while chunk := f.read(16 * BLOCK):
            block = tail + chunk
            if any(len(m.group()) == 6 for m in SURROGATE.finditer(block)):
                return ijson.get_backend("python")
            tail = block[-11:]
    return ijson


class DepthLimited:
    """A binary file whose JSON nesting (brackets outside strings) is checked as it is read:
    past ``MAX_DEPTH`` the read fails naming the file. ijson keeps a prefix string per level
    (``item.regions.item…``), so a 100 KB file of ``[`` would cost it gigabytes. Linear: numpy
    finds the quotes, backslashes and brackets of each block it reads."""

    def __init__(self, f, path, block: int = BLOCK):
        self.f, self.path, self.block = f, path, block
        self.depth, self.in_string, self.backslashes, self.offset = 0, 0, 0, 0
        self.buffer, self.at = b"", 0

    def read(self, size: int = -1) -> bytes:
        if self.at >= len(self.buffer):
            self.buffer, self.at = self.f.read(self.block), 0
            if self.buffer:
                self._check(self.buffer)
        size = len(self.buffer) - self.at if size < 0 else size
        out = self.buffer[self.at:self.at + size]
        self.at += len(out)
        return out

    def _check(self, block: bytes) -> None:
        import numpy as np

        a = np.frombuffer(block, np.uint8)
        n = len(a)
        slashes = np.flatnonzero(a == 92)
        # for each backslash, the first of its run (a run that opens the block continues the last one's)
        opens = np.ones(slashes.size, bool)
        opens[1:] = np.diff(slashes) != 1
        first = slashes[np.maximum.accumulate(np.where(opens, np.arange(slashes.size), 0))]

        def run_before(pos):
            """The backslashes just before each of ``pos``."""
            if not slashes.size:
                return np.where(pos == 0, self.backslashes, 0)
            k = np.maximum(np.searchsorted(slashes, pos) - 1, 0)
            ends_there = (pos > 0) & (slashes[k] == pos - 1)
            run = np.where(ends_there, pos - first[k], 0)
            carried = np.where(ends_there, first[k] == 0, pos == 0)
            return run + np.where(carried, self.backslashes, 0)

        quotes = np.flatnonzero(a == 34)
        quotes = quotes[run_before(quotes) % 2 == 0]
        folded = a | 0x20  # [ and { are 0x5b, 0x7b; ] and } are 0x5d, 0x7d
        brackets = np.flatnonzero((folded == 0x7B) | (folded == 0x7D))
        outside = brackets[(np.searchsorted(quotes, brackets) + self.in_string) % 2 == 0]
        if outside.size:
            depth = self.depth + np.cumsum(np.where(folded[outside] == 0x7B, 1, -1), dtype=np.int64)
            if depth.max() > MAX_DEPTH:
                at = self.offset + int(outside[np.argmax(depth > MAX_DEPTH)])
                raise LayoutFileError(f"{self.path}: JSON nested more than {MAX_DEPTH} deep (at byte {at})")
            self.depth = int(depth[-1])
        self.in_string = (self.in_string + quotes.size) % 2
        self.backslashes = int(run_before(np.array([n]))[0])
        self.offset += n


BOM = b"\xef\xbb\xbf"
VALUE_STARTS = {b"[": "a list", b"{": "an object", b'"': "a string", b"t": "true", b"f": "false", b"n": "null",
                **{bytes([c]): "a number" for c in b"-0123456789"}}


def _open(path: Path):
    """The file in binary, past a UTF-8 byte-order mark (``json.load`` accepts one; ijson does not)."""
    f = open(path, "rb")
    if f.read(len(BOM)) != BOM:
        f.seek(0)
    return f


def _check_top(path: Path, prefix: str, pairs: bool) -> None:
    """A file whose top level is not what ``prefix`` reads (``item...``: a list; ``key...`` or
    pairs: an object) would give no records, silently: it is one error naming the file."""
    first = prefix.split(".")[0]
    expected = "a list" if first == "item" else "an object" if first or pairs else None
    if expected is None:
        return
    with _open(path) as f:
        while chunk := f.read(BLOCK):
            if head := chunk.lstrip(b" \t\r\n"):
                found = VALUE_STARTS.get(head[:1])
                if found is not None and found != expected:
                    raise LayoutFileError(f"{path}: the layout publishes {expected} at the top level, not {found}")
                return


def stream(path: Path, prefix: str, pairs: bool = False) -> Iterator:
    """The values under ``prefix`` (``(key, value)`` with ``pairs``) of a JSON file too big to
    load, read as a stream; a file that stops being JSON, or whose top level is not the one
    ``prefix`` reads, is a LayoutFileError naming it."""
    import ijson

    try:
        _check_top(path, prefix, pairs)
        backend = _backend(path)
        with _open(path) as f:
            read = backend.kvitems if pairs else backend.items
            yield from read(DepthLimited(f, path), prefix, use_float=True)
    except (ijson.JSONError, UnicodeDecodeError) as e:
        raise stream_error(path, e) from None


def events(path: Path) -> Iterator:
    """``(prefix, event, value)`` of a JSON file, streamed; errors as in ``stream``."""
    import ijson

    try:
        with _open(path) as f:
            yield from ijson.parse(DepthLimited(f, path))
    except (ijson.JSONError, UnicodeDecodeError) as e:
        raise stream_error(path, e) from None


def decode(value, type_: type[T], what: str) -> T:
    """``value`` as ``type_`` (a msgspec struct), or an AnnotationError naming ``what`` and the field."""
    try:
        return convert(value, type_)
    except RecordError as e:
        raise AnnotationError(f"{what}: {e}", e.reason) from None


def keyed(entries, type_: type[T], key: Callable[[T], object], what: str, ids: tuple[str, ...] = ("id",)) -> dict:
    """``key(entry) -> entry`` for the entries that decode as ``type_``. An entry that does not,
    but whose id (``ids``) can be read, maps to its AnnotationError: the records that point at it
    are rejected saying why, not merely "not found"."""
    found: dict = {}
    for entry in entries:
        ident = next((entry[n] for n in ids if entry.get(n) is not None), None) if isinstance(entry, dict) else None
        try:
            item = decode(entry, type_, f"{what} {ident!r:.40}")
        except AnnotationError as e:
            if isinstance(ident, (int, str)) and not isinstance(ident, bool):
                found.setdefault(ident, e)
            continue
        found.setdefault(key(item), item)
    return found
