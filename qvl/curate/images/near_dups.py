"""Near-duplicate images: groups of perceptual hashes within a few bits of each other, found
without comparing every pair (buckets split on hash bits, compared whole when small)."""

from __future__ import annotations

import numpy as np

# Pairs compared at once (one block of a bucket), and candidate pairs joined at once: memory
# stays a few tens of MB however many images share a hash or a band.
_BLOCK = 1 << 20
_LEAF = 2048  # a bucket this small (or with too few free bits to split) is compared whole, in blocks
_FULL = (1 << 64) - 1


def near_duplicates(hashes: np.ndarray, bits: int) -> dict[int, int]:
    """Groups of 64-bit hashes within ``bits`` of each other (transitively). Returns, for every
    member but the first of its group (rows come ranked), the index of that first one.

    Identical hashes are one group from the start (``np.unique``): thousands of copies of one
    popular picture cost O(n log n), not n×n. The distinct hashes are found close by multi-index
    hashing: split the bits into ``bits + 1`` bands; two hashes that close agree on one band
    whole, so only hashes sharing a band value are compared. A large bucket is split again on
    its remaining bits the same way, and compared in blocks, so memory stays bounded; the
    close pairs are joined by union-find on numpy arrays, never a dense matrix."""
    hashes = np.asarray(hashes).astype(np.uint64)
    n = len(hashes)
    if n == 0:
        return {}
    unique, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    labels = np.arange(len(unique))
    pending: list[tuple[np.ndarray, np.ndarray]] = []
    size = 0

    def flush() -> None:
        nonlocal size
        if pending:
            _join(labels, np.concatenate([a for a, _ in pending]), np.concatenate([b for _, b in pending]))
        pending.clear()
        size = 0

    def compare(ids: np.ndarray) -> None:
        nonlocal size
        h = unique[ids]
        step = max(1, _BLOCK // len(ids))
        for s in range(0, len(ids), step):
            close = np.bitwise_count(h[s:s + step, None] ^ h[None, s:]) <= bits
            x, y = np.nonzero(close)
            later = y > x  # each pair once, never a hash with itself
            pending.append((ids[s + x[later]], ids[s + y[later]]))
            size += int(later.sum())
            if size >= _BLOCK:
                flush()

    def search(ids: np.ndarray, known: int) -> None:
        free = [b for b in range(64) if not known >> b & 1] if len(ids) > _LEAF else []
        if len(free) <= bits + 1:  # small, or too few bits left to split: at most 2^(bits+1) hashes
            compare(ids)
            return
        for band in np.array_split(np.array(free), bits + 1):
            mask = np.uint64(sum(1 << int(b) for b in band))
            key = unique[ids] & mask
            order = np.argsort(key, kind="stable")
            sorted_keys = key[order]
            starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
            for a, b in zip(starts, np.r_[starts[1:], len(ids)]):
                if b - a >= 2:
                    search(ids[order[a:b]], known | int(mask))

    if bits >= 0 and len(unique) > 1:
        search(np.arange(len(unique)), 0)
        flush()
    # each group's first row: the smallest index among its hashes' first rows
    lead = np.full(len(unique), n)
    np.minimum.at(lead, labels, first)
    leader = lead[labels][inverse]
    lost = np.flatnonzero(leader != np.arange(n))
    return dict(zip(lost.tolist(), leader[lost].tolist()))


def _join(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Union-find over ``labels`` (each entry points at a smaller one or itself) for the pairs
    ``a``-``b``: hook the larger root onto the smaller, then flatten every path; O(log) rounds."""
    while a.size:
        ra, rb = labels[a], labels[b]
        apart = ra != rb
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        np.minimum.at(labels, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:
            up = labels[labels]
            if np.array_equal(up, labels):
                break
            labels[:] = up
