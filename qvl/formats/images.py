"""Where the images of annotations come from: a folder nothing may escape, or local
img2dataset output for URLs. Nothing is ever fetched while formatting."""

from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from qvl.common import pixels
from qvl.errors import AnnotationError, QvlError
from qvl.schemas import DOWNLOADED_LOOKUP, check_columns


class ImageStore:
    def __init__(self, root: Path | None, downloads: Path | None = None, max_pixels: int = pixels.MAX_PIXELS):
        self.root = root.resolve() if root else None
        self.downloads = downloads
        self.max_pixels = max_pixels
        self._url_index: dict[str, tuple[Path, int, str | None, str | None]] | None = None
        # a grounding sample asks for the size, then the bytes: read and verify each image once,
        # keeping the most recent ones up to CACHE_BYTES (64 images of 272 MB would be 17 GB)
        self._cache: OrderedDict[str, tuple[bytes, tuple[int, int]]] = OrderedDict()
        self._cached_bytes = 0

    CACHE_BYTES = 256 << 20

    def _load(self, ref: str) -> tuple[bytes, tuple[int, int]]:
        hit = self._cache.get(ref)
        if hit is not None:
            self._cache.move_to_end(ref)
            return hit
        loaded = self._load_uncached(ref)
        if len(loaded[0]) <= self.CACHE_BYTES:
            self._cache[ref] = loaded
            self._cached_bytes += len(loaded[0])
            while self._cached_bytes > self.CACHE_BYTES or len(self._cache) > 64:
                self._cached_bytes -= len(self._cache.popitem(last=False)[1][0])
        return loaded

    def _path(self, ref: str) -> Path:
        if self.root is None:
            raise AnnotationError(f"image {_short(ref)}: no --images folder given", "missing_image")
        resolved, is_file = _inside(self.root, ref, f"image {_short(ref)}", "--images")
        if not is_file:
            raise AnnotationError(f"image {_short(ref)}: missing under {self.root}", "missing_image")
        return resolved

    def _index(self) -> dict[str, tuple[Path, int, str | None, str | None]]:
        """url -> (table, row, tar, member): a `qvl curate download` folder's kept pairs (only
        images that passed its checks), or plain img2dataset output (every row with status
        success). A table of another shape is one error naming it; a row's tar is checked when
        its image is asked for, so a bad row is that image's reject."""
        if self._url_index is None:
            index: dict[str, tuple[Path, int, str | None, str | None]] = {}
            if self.downloads is not None and (self.downloads / "kept").is_dir():
                for part in sorted((self.downloads / "kept").glob("*.parquet")):
                    rows = _rows(part, list(DOWNLOADED_LOOKUP), "a `qvl curate download` kept table",
                                 DOWNLOADED_LOOKUP)
                    for i, row in enumerate(rows, 1):
                        member = None if row["image_key"] is None else f"{row['image_key']}.jpg"
                        index[row["url"]] = (part, i, row["image_tar"], member)
            elif self.downloads is not None:
                for meta in sorted(self.downloads.glob("*.parquet")):
                    for i, row in enumerate(_rows(meta, ["url", "key", "status"], "img2dataset output"), 1):
                        if row["status"] == "success":
                            member = None if row["key"] is None else f"{row['key']}.jpg"
                            index[row["url"]] = (meta, i, meta.with_suffix(".tar").name, member)
            self._url_index = index
        return self._url_index

    def local_path(self, ref: str) -> Path:
        """The checked file of a relative reference (inside --images, no escape)."""
        return self._path(ref)

    def read(self, ref: str) -> tuple[bytes, str]:
        """(bytes, path as recorded) of an image reference, checked to decode."""
        return self._load(ref)[0], ref

    def size(self, ref: str) -> tuple[int, int]:
        return self._load(ref)[1]

    def _load_uncached(self, ref: str) -> tuple[bytes, tuple[int, int]]:
        if ref.startswith(("http://", "https://")):
            found = self._index().get(ref)
            if found is None:
                raise AnnotationError(f"image {_short(ref)}: URL not in the local img2dataset output (--downloads)",
                                      "missing_image")
            table, row, tar_ref, member = found
            where = f"image {_short(ref)}: {table} row {row}"
            if tar_ref is None or member is None:
                raise AnnotationError(f"{where}: no {'image_tar' if tar_ref is None else 'image key'}", "missing_image")
            tar, _ = _inside(self.downloads, tar_ref, f"{where}: tar {_short(tar_ref)}", "--downloads")
            try:
                with tarfile.open(tar) as t:
                    info = t.getmember(member)
                    data = pixels.read_file(t.extractfile(info), info.size, self.max_pixels)
            except pixels.BadImage as e:
                raise AnnotationError(f"image {_short(ref)}: {e}", e.reason) from None
            except (OSError, KeyError, AttributeError, tarfile.TarError) as e:  # AttributeError: not a file member
                raise AnnotationError(f"image {_short(ref)}: cannot read {member} from {tar} ({e})",
                                      "missing_image") from None
        else:
            path = self._path(ref)
            try:
                with open(path, "rb") as f:
                    data = pixels.read_file(f, os.fstat(f.fileno()).st_size, self.max_pixels)
            except pixels.BadImage as e:
                raise AnnotationError(f"image {_short(ref)}: {e}", e.reason) from None
            except OSError as e:
                raise AnnotationError(f"image {_short(ref)}: cannot read {path} ({e.strerror})", "missing_image") from None
        try:
            return data, pixels.decoded_size(data, self.max_pixels)
        except pixels.BadImage as e:
            raise AnnotationError(f"image {_short(ref)}: {e}", e.reason) from None


def _inside(root: Path, ref: str, what: str, option: str) -> tuple[Path, bool]:
    """``ref`` resolved under ``root``, and whether it is a file; an ``unsafe_image_path`` reject
    if it is empty, holds a control character, is absolute, or climbs out (``..``, a symlink)."""
    if not ref or any(ord(c) < 32 for c in ref):
        raise AnnotationError(f"{what}: not a usable path (empty, or a control character in it)", "unsafe_image_path")
    candidate = Path(ref)
    if candidate.is_absolute() or ".." in candidate.parts:
        raise AnnotationError(f"{what}: must be a relative path inside {option}", "unsafe_image_path")
    try:
        root = root.resolve()
        resolved = (root / candidate).resolve()
        is_file = resolved.is_file()
    except OSError as e:  # a name too long, a loop of links...
        raise AnnotationError(f"{what}: not a usable path ({e.strerror})", "unsafe_image_path") from None
    if not resolved.is_relative_to(root):
        raise AnnotationError(f"{what}: resolves outside {option} (a symlink out?)", "unsafe_image_path")
    return resolved, is_file


_TEXT = (pa.string(), pa.large_string(), pa.null())


def _rows(path: Path, columns: list[str], what: str, kinds: dict[str, str] | None = None) -> list[dict]:
    """``columns`` of a parquet table, all text — checked as ``kinds`` (a qvl table's schema) says
    when there is one — or one error naming the file and what is wrong."""
    try:
        schema = pq.read_schema(path)
    except (OSError, ValueError, pa.ArrowException) as e:  # not parquet, cut short, unreadable
        raise QvlError(f"{path}: not a readable parquet file ({' '.join(str(e).split())[:200]})") from None
    if kinds is not None:
        check_columns(schema, kinds, f"{path} (not {what})")
    types = {field.name: field.type for field in schema}
    missing = [c for c in columns if c not in types]
    if missing:
        raise QvlError(f"{path}: not {what} (no {', '.join(missing)})")
    wrong = [f"{c} is {types[c]}" for c in columns if types[c] not in _TEXT]
    if wrong:
        raise QvlError(f"{path}: not {what} ({', '.join(wrong)}, not text)")
    try:
        return pq.read_table(path, columns=columns).to_pylist()
    except (OSError, ValueError, pa.ArrowException) as e:
        raise QvlError(f"{path}: not a readable parquet file ({' '.join(str(e).split())[:200]})") from None


def _short(ref: str) -> str:
    """An image reference for a message: a 5000-character name is not repeated in full."""
    return repr(ref) if len(ref) <= 200 else repr(ref[:200]) + "..."
