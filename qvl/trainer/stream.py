"""What streaming training data rests on: the order of an epoch (a pure function of the seed, the
epoch and the manifest) and the bounded local cache shards are fetched into.

The order. Epoch ``e`` permutes the shards (``shard_order``) and cuts that order into windows of
``window`` shards; the rows of a window (its shards' rows, in that order) are permuted
(``window_rows``); the epoch is the windows' rows one after another. A row therefore moves across
``window`` shards, while a reader only ever holds one window (plus the next, prefetched). The
sequence depends on nothing but (seed, epoch, shard list, rows per shard): not on the world size,
the number of loader workers, or when a fetch finished — so a position in it, ``Position``, is a
checkpoint any number of ranks can resume from.

The cache. A shard at a URL is copied whole into ``cache_root()/shards/<url digest>/`` before it
is memory-mapped (Arrow IPC *stream* files have no footer to read ranges by). The folder never
holds more than ``limit`` bytes: space is reserved (the file created at its full size) under a
folder lock before a download starts, and the least recently used shards not in use by this
process are deleted to make room. The processes of one machine (ranks, loader workers) share the
folder: one download per shard, a per-shard lock making the others wait for it. A shard deleted
while another process has it memory-mapped stays readable to that process (POSIX keeps the inode).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import numpy as np

from qvl.common import remote
from qvl.errors import QvlError

PART = ".part"  # a download in progress, at its final size from the start (the reservation)


class CacheError(QvlError):
    """The cache cannot hold what a step needs; the message says which setting to raise."""


class Position(msgspec.Struct, frozen=True):
    """Where a reader is in the global sequence: ``consumed`` rows of epoch ``epoch`` lie before
    its next slot. ``window``/``window_start`` say which window holds that row and where it starts
    (a pure function of the data too), so a resumed reader does not re-read earlier windows to
    count their rows."""

    epoch: int = 0
    consumed: int = 0
    window: int = 0
    window_start: int = 0


def shard_order(seed: int, epoch: int, shards: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0, 1]).permutation(shards)


def windows(seed: int, epoch: int, shards: int, window: int) -> list[list[int]]:
    """Epoch ``epoch``'s shards (indices into the manifest's list) in groups read together."""
    order = [int(i) for i in shard_order(seed, epoch, shards)]
    return [order[i:i + window] for i in range(0, shards, window)]


def window_rows(seed: int, epoch: int, window: int, rows: int) -> np.ndarray:
    """The order of a window's rows (numbered through its shards in window order). Seeded
    ``[seed, epoch, window]``: numpy's seed sequence ignores trailing zeros, so a data set of one
    window is drawn exactly as the loader before streaming drew it (``[seed, epoch]``) — runs
    and the demo's figures measured then hold."""
    return np.random.default_rng([seed, epoch, window]).permutation(rows)


class ShardCache:
    """Shards of ``url`` (name -> size and id from its committed manifest) as local files, at
    most ``limit`` bytes of them, least recently used evicted; ``prefetch`` fetches in the
    background. A cached file is named by the shard's id too: a folder committed again with a
    shard of the same name and size is fetched anew, never read stale."""

    def __init__(self, url: str, entries: dict[str, dict], limit: int, folder: Path | None = None):
        digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
        self.url, self.limit = url, limit
        self.sizes = {name: entry["size"] for name, entry in entries.items()}
        self.local = {name: re.sub(r"[^A-Za-z0-9]", "", entry["id"])[:40] + "-" + name
                      for name, entry in entries.items()}
        self.folder = folder or remote.cache_root() / "shards" / digest
        self.in_use: set[str] = set()  # this process's: never evicted by it
        self._process = -1  # the process the fields below belong to (``_own``)

    def _own(self) -> None:
        """A prefetch thread, its futures, a lock and a filesystem of this process: a loader
        worker forked from one holding them would wait on futures no thread of its own completes."""
        if self._process != os.getpid():
            self._process, self._pool, self._pending = os.getpid(), None, {}
            self._lock, self._fs = threading.Lock(), None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_process": -1, "_pool": None, "_pending": {}, "_lock": None, "_fs": None}

    def use(self, names: list[str]) -> list[Path]:
        """Local files of ``names``, fetched if missing; they stay until the next ``use``."""
        self._own()
        self.in_use = set(names)
        paths = []
        for name in names:
            with self._lock:
                pending = self._pending.pop(name, None)
            if pending is not None:
                pending.result()  # a failed prefetch is fetched (and said) again below
            paths.append(self._fetch(name, required=True))
        return paths

    def prefetch(self, names: list[str]) -> None:
        """Start fetching ``names`` in a background thread; where there is no room without
        evicting what is in use, the shard is fetched when it is used instead."""
        self._own()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="qvl-prefetch")
            for name in names:
                if name not in self._pending:
                    self._pending[name] = self._pool.submit(self._quiet_fetch, name)

    def _quiet_fetch(self, name: str) -> None:
        with contextlib.suppress(QvlError):
            self._fetch(name, required=False)

    def _fetch(self, name: str, required: bool) -> Path | None:
        target = self.folder / self.local[name]
        self.folder.mkdir(parents=True, exist_ok=True)
        with _locked(self.folder / f".{name}.lock"):
            if target.is_file() and target.stat().st_size == self.sizes[name]:
                os.utime(target)  # most recently used
                return target
            if not self._reserve(name, required):
                return None
            part = self.folder / (self.local[name] + PART)
            url = remote.join(self.url, name)
            try:
                with remote.errors(url):
                    fs = self._filesystem()
                    with fs.open(remote.join(self._root, name), "rb") as src, open(part, "r+b") as dst:
                        written = 0
                        while chunk := src.read(8 << 20):
                            dst.write(chunk)
                            written += len(chunk)
                if written != self.sizes[name]:
                    raise remote.RemoteError(f"{url}: {written:,} bytes, the committed manifest says "
                                             f"{self.sizes[name]:,} (changed after it was committed)")
                os.replace(part, target)
            finally:
                part.unlink(missing_ok=True)
        return target

    def _filesystem(self):
        if self._fs is None:
            self._fs, self._root = remote.filesystem(self.url)
        return self._fs

    def _reserve(self, name: str, required: bool) -> bool:
        """Room for ``name`` (its ``.part`` file created at full size), evicting unused shards
        oldest first; False (a prefetch) or a CacheError (a shard needed now) where there is none."""
        size = self.sizes[name]
        with _locked(self.folder / ".cache.lock"):
            files = [p for p in self.folder.iterdir() if p.is_file() and not p.name.startswith(".")]
            used = sum(_stat(p).st_size for p in files)
            in_use = {self.local[n] for n in self.in_use}
            upcoming = {self.local[n] for n in self._next_names()}
            spare = sorted((p for p in files if p.name not in in_use and not p.name.endswith(PART)),
                           key=lambda p: _stat(p).st_mtime)
            while used + size > self.limit and spare:
                victim = spare.pop(0)
                if required or victim.name not in upcoming:
                    used -= _stat(victim).st_size
                    victim.unlink(missing_ok=True)
            if used + size > self.limit:
                if not required:
                    return False
                raise CacheError(f"{remote.join(self.url, name)}: the shard cache ({self.limit / 1e9:.2f} GB, "
                                 f"{self.folder}) cannot hold it beside the {len(self.in_use)} shards in use "
                                 f"({used / 1e9:.2f} GB); raise --cache-gb or lower --shuffle-window")
            with open(self.folder / (self.local[name] + PART), "wb") as f:
                f.truncate(size)
        return True

    def _next_names(self) -> set[str]:
        with self._lock:
            return set(self._pending)


def _stat(path: Path) -> os.stat_result:
    """A cached file's stat, or zeros for one another process renamed (``.part`` -> its name)
    between the listing and now: counting it once is enough."""
    try:
        return path.stat()
    except FileNotFoundError:
        return os.stat_result((0,) * 10)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes and threads (flock, on its own open file)."""
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
