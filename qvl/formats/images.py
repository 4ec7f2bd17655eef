"""Where the images of annotations come from: a folder nothing may escape, or local
img2dataset output for URLs. Nothing is ever fetched while formatting."""

from __future__ import annotations

import os
import tarfile
from collections import OrderedDict
from pathlib import Path

import pyarrow.parquet as pq

from qvl import pixels
from qvl.formats.boxes import AnnotationError


class ImageStore:
    def __init__(self, root: Path | None, downloads: Path | None = None, max_pixels: int = pixels.MAX_PIXELS):
        self.root = root.resolve() if root else None
        self.downloads = downloads
        self.max_pixels = max_pixels
        self._url_index: dict[str, tuple[Path, str]] | None = None
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
        if not ref or "\x00" in ref or any(ord(c) < 32 for c in ref):
            raise AnnotationError(f"image {_short(ref)}: not a usable path (empty, or a control character in it)",
                                  "unsafe_image_path")
        candidate = Path(ref)
        if candidate.is_absolute() or ".." in candidate.parts:
            raise AnnotationError(f"image {_short(ref)}: must be a relative path inside --images", "unsafe_image_path")
        try:
            resolved = (self.root / candidate).resolve()
            is_file = resolved.is_file()
        except OSError as e:  # a name too long, a loop of links...
            raise AnnotationError(f"image {_short(ref)}: not a usable path ({e.strerror})", "unsafe_image_path") from None
        if not resolved.is_relative_to(self.root):
            raise AnnotationError(f"image {_short(ref)}: resolves outside --images (a symlink out?)", "unsafe_image_path")
        if not is_file:
            raise AnnotationError(f"image {_short(ref)}: missing under {self.root}", "missing_image")
        return resolved

    def _index(self) -> dict[str, tuple[Path, str]]:
        """url -> (tar, member): a `qvl curate download` folder's kept pairs (only images that
        passed its checks), or plain img2dataset output (every row with status success)."""
        if self._url_index is None:
            self._url_index = {}
            if self.downloads is not None and (self.downloads / "kept").is_dir():
                for part in sorted((self.downloads / "kept").glob("*.parquet")):
                    for row in pq.read_table(part, columns=["url", "image_tar", "image_key"]).to_pylist():
                        self._url_index[row["url"]] = (self.downloads / row["image_tar"], f"{row['image_key']}.jpg")
            elif self.downloads is not None:
                for meta in sorted(self.downloads.glob("*.parquet")):
                    table = pq.read_table(meta, columns=["url", "key", "status"]).to_pylist()
                    tar = meta.with_suffix(".tar")
                    for row in table:
                        if row["status"] == "success":
                            self._url_index[row["url"]] = (tar, f"{row['key']}.jpg")
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
            tar, member = found
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


def _short(ref: str) -> str:
    """An image reference for a message: a 5000-character name is not repeated in full."""
    return repr(ref) if len(ref) <= 200 else repr(ref[:200]) + "..."
