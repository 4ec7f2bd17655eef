"""fastText supervised models (``lid.176``) read from their file and run on whole batches.

fastText's own ``predict`` takes one text at a time: for every token it hashes each
character n-gram and adds that n-gram's (product-quantised) row — ~10 µs a caption, as much
as all the cleaning rules together. Yet a caption's hidden vector is only the mean of its
tokens' rows, and a token's rows never change. Here each distinct token's row sum is
computed once (n-gram hashing vectorised over all new tokens) and kept, a batch's hidden
vectors are sums of those, and the label tree (hierarchical softmax) or the softmax is
evaluated for every text at once. Same file, same model arithmetic in float32, the same
labels (tested against fastText on real and generated captions); the probabilities agree
to within float rounding (their sums are taken in another order).

The format (fastText's ``FastText::loadModel``, version 12): ``Args``, the dictionary
(words, labels, pruned n-gram index), the input matrix (dense, or product-quantised with
quantised norms) and the output matrix. Models this does not cover (word n-grams, other
losses, older versions) raise ``Unsupported``: the caller uses fastText itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from qvl.errors import QvlError

MAGIC = 793712314
EOS = "</s>"
LABEL = "__label__"
HS, SOFTMAX = 1, 3  # fastText's loss_name values
SUPERVISED = 3
# what fastText's readWord splits tokens on besides the space
OTHER_SEPARATORS = "[\n\r\t\v\f\x00]"
MAX_BUCKETS = 1 << 25  # a pruned model's bucket table (lid.176: 2M); more is not a model this reads
LEARN_CHUNK = 20_000  # new tokens hashed at once (~20 MB of n-gram rows)
CACHE_LIMIT = 500_000  # distinct tokens kept (~100 MB with lid.176's 16-wide rows); then it starts again


class Unsupported(QvlError):
    """A fastText file this reader does not run; fastText's own predict does."""


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def array(self, dtype: str, count: int) -> np.ndarray:
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += out.nbytes
        return out


def _matrix(r: _Reader) -> np.ndarray:
    """DenseMatrix::load: rows, columns, float32 values."""
    rows, cols = r.read("2q")
    return r.array("<f4", rows * cols).reshape(rows, cols).copy()


def _quant_matrix(r: _Reader) -> np.ndarray:
    """QuantMatrix::load, decoded: each row is its sub-spaces' centroids times its norm."""
    qnorm, = r.read("?")
    rows, cols = r.read("2q")
    codesize, = r.read("i")
    codes = r.array("u1", codesize)
    dim, nsubq, dsub, lastdsub = r.read("4i")
    centroids = r.array("<f4", dim * 256)
    if dim != cols or codesize != rows * nsubq:
        raise Unsupported("product quantiser does not match its matrix")
    codes = codes.reshape(rows, nsubq)
    out = np.empty((rows, cols), dtype=np.float32)
    for m in range(nsubq):  # ProductQuantizer::get_centroids: the last sub-space may be narrower
        width = lastdsub if m == nsubq - 1 else dsub
        table = centroids[m * 256 * dsub: m * 256 * dsub + 256 * width].reshape(256, width)
        out[:, m * dsub: m * dsub + width] = table[codes[:, m]]
    if qnorm:
        norm_codes = r.array("u1", rows)
        ndim, nnsubq, _, _ = r.read("4i")
        norms = r.array("<f4", ndim * 256)
        if ndim != 1 or nnsubq != 1:
            raise Unsupported("norm quantiser is not one-dimensional")
        out *= norms[norm_codes][:, None]  # addcode adds alpha * c with alpha = the row's norm
    return out


def _tree(counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """HierarchicalSoftmaxLoss::buildTree: (left, right) child of each internal node."""
    n = len(counts)
    count = [*counts, *[10**15] * (n - 1)]
    left, right = np.full(2 * n - 1, -1), np.full(2 * n - 1, -1)
    leaf, node = n - 1, n
    for i in range(n, 2 * n - 1):
        pick = []
        for _ in range(2):
            if leaf >= 0 and count[leaf] < count[node]:
                pick.append(leaf)
                leaf -= 1
            else:
                pick.append(node)
                node += 1
        left[i], right[i] = pick
        count[i] = count[pick[0]] + count[pick[1]]
    return left, right


@dataclass
class _Args:  # what prediction needs of fastText's Args
    dim: int
    loss: int
    bucket: int
    minn: int
    maxn: int


class BatchModel:
    """A supervised fastText model; ``top1(texts)`` gives what ``predict(text, 1)`` gives."""

    def __init__(self, path: str | Path):
        r = _Reader(Path(path).read_bytes())
        magic, version = r.read("2i")
        if magic != MAGIC or version not in (11, 12):
            raise Unsupported(f"{path}: not a fastText model file of version 11/12")
        dim, _ws, _epoch, _min_count, _neg, word_ngrams, loss, model, bucket, minn, maxn, _lr = r.read("12i")
        r.read("d")
        if version == 11 and model == SUPERVISED:
            maxn = 0  # FastText::loadModel: old supervised models have no character n-grams
        self.args = _Args(dim, loss, bucket, minn, maxn)
        if model != SUPERVISED or loss not in (HS, SOFTMAX) or word_ngrams > 1:
            raise Unsupported(f"{path}: model {model}, loss {loss}, wordNgrams {word_ngrams} not run in batches")
        size, self.nwords, nlabels = r.read("3i")
        _ntokens, prune_size = r.read("2q")
        words: dict[bytes, int] = {}
        labels: list[str] = []
        counts: list[int] = []
        for i in range(size):
            end = r.data.index(b"\0", r.pos)
            word = r.data[r.pos:end]
            r.pos = end + 1
            count, kind = r.read("qb")
            if kind == 0:
                words[word] = i
            else:
                labels.append(word.decode("utf-8", "replace")[len(LABEL):])
                counts.append(count)
        if len(labels) != nlabels or EOS.encode() not in words:
            raise Unsupported(f"{path}: dictionary without its labels or end-of-line word")
        self.words, self.labels = words, np.array(labels, dtype=object)
        pairs = r.array("<i4", 2 * max(prune_size, 0)).reshape(-1, 2)
        self.prune_size = prune_size
        if prune_size >= 0:  # pruned: the row of each bucket kept, -1 for the others
            if not 0 < bucket <= MAX_BUCKETS:
                raise Unsupported(f"{path}: {bucket:,} n-gram buckets")
            self.pruned_row = np.full(bucket, -1, np.int32)
            self.pruned_row[pairs[:, 0]] = pairs[:, 1]
        quantised, = r.read("?")
        self.input = _quant_matrix(r) if quantised else _matrix(r)
        quantised_out, = r.read("?")
        self.output = _quant_matrix(r) if quantised and quantised_out else _matrix(r)
        if r.pos != len(r.data) or self.input.shape[1] != dim:
            raise Unsupported(f"{path}: unexpected layout ({len(r.data) - r.pos} bytes left)")
        if loss == HS:
            self.left, self.right = _tree(counts)
        self.eos = self.input[words[EOS.encode()]]
        self._index: dict[str, int] = {}
        self._sums = np.zeros((0, dim), np.float32)
        self._counts = np.zeros(0, np.int64)

    # ------------------------------------------------------------ tokens -> row sums

    def _ngram_rows(self, encoded: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(token index, input row) of every character n-gram of ``<token>`` that the model
        keeps (Dictionary::computeSubwords + pushHash). FNV-1a is fed one character at a time,
        so each n-gram's hash continues the one of its first n-1 characters: all n-grams of
        all the tokens are hashed in ``maxn`` vectorised rounds."""
        a = self.args
        if a.maxn <= 0 or not encoded:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        wrapped = [b"<" + e + b">" for e in encoded]
        lengths = np.fromiter((len(w) for w in wrapped), np.int64, len(wrapped))
        flat = np.frombuffer(b"".join(wrapped), np.uint8)
        byte = flat.astype(np.uint64)
        byte = np.where(byte >= 0x80, byte | np.uint64(0xFFFFFF00), byte)  # uint32(int8(c))
        starts = np.flatnonzero((flat & 0xC0) != 0x80)  # the first byte of every character
        token = np.repeat(np.arange(len(wrapped)), lengths)[starts]
        chars_of = np.bincount(token, minlength=len(wrapped))
        local = np.arange(starts.size) - np.repeat(np.cumsum(chars_of) - chars_of, chars_of)
        chars = chars_of[token]
        width = np.diff(np.append(starts, flat.size))  # bytes per character
        h = np.full(starts.size, 2166136261, np.uint64)
        tok_parts, row_parts = [], []
        for n in range(1, a.maxn + 1):
            live = np.flatnonzero(local + n <= chars)  # n-grams from these characters fit their token
            fed = live + n - 1  # the character each one takes in this round
            for b in range(4):  # its bytes (one, mostly)
                more = width[fed] > b
                at, into = (fed, live) if b == 0 else (fed[more], live[more])
                if not at.size:
                    break
                h[into] = ((h[into] ^ byte[starts[at] + b]) * np.uint64(16777619)) & np.uint64(0xFFFFFFFF)
            if n >= a.minn:
                emit = live[~((n == 1) & ((local[live] == 0) | (local[live] + n == chars[live])))]
                rows, kept = self._bucket_rows((h[emit] % np.uint64(a.bucket)).astype(np.int64))
                tok_parts.append(token[emit][kept])
                row_parts.append(rows)
        return np.concatenate(tok_parts), np.concatenate(row_parts)

    def _bucket_rows(self, buckets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Dictionary::pushHash: the input row of each n-gram bucket, and which ones have one."""
        if self.prune_size < 0:  # not pruned: every bucket has its row
            return self.nwords + buckets, np.ones(buckets.size, bool)
        rows = self.pruned_row[buckets]
        kept = rows >= 0
        return self.nwords + rows[kept], kept

    def _learn(self, tokens: list[str]) -> None:
        """Row sums and row counts of tokens not seen before."""
        encoded = [t.encode() for t in tokens]
        tok, rows = self._ngram_rows(encoded)
        wid = np.array([self.words.get(e, -1) for e in encoded], np.int64)
        known = np.flatnonzero(wid >= 0)  # in-vocabulary words add their own row first
        tok = np.concatenate([known, tok])
        rows = np.concatenate([wid[known], rows])
        sums = np.zeros((len(tokens), self.args.dim), np.float32)
        np.add.at(sums, tok, self.input[rows])
        counts = np.bincount(tok, minlength=len(tokens))
        base = len(self._index)
        self._index.update(zip(tokens, range(base, base + len(tokens))))
        self._sums = np.concatenate([self._sums, sums])
        self._counts = np.concatenate([self._counts, counts])

    # ------------------------------------------------------------ prediction

    def hidden(self, texts: pl.Series) -> np.ndarray:
        """Each text's hidden vector: the mean of all its tokens' rows and the end-of-line row."""
        if texts.str.contains(OTHER_SEPARATORS).any():
            texts = texts.str.replace_all(OTHER_SEPARATORS, " ")
        frame = (pl.DataFrame({"token": texts.str.split(" ")})
                 .with_row_index("text").explode("token").filter(pl.col("token") != ""))
        unique = frame.get_column("token").unique()
        new = [t for t in unique.to_list() if t not in self._index]
        if len(self._index) + len(new) > CACHE_LIMIT:  # start again, with this batch's tokens
            self._index, self._sums, self._counts = {}, self._sums[:0], self._counts[:0]
            new = unique.to_list()
        for start in range(0, len(new), LEARN_CHUNK):  # bounded temporaries, whatever the batch
            self._learn(new[start:start + LEARN_CHUNK])
        where = pl.DataFrame({"token": unique, "at": [self._index[t] for t in unique.to_list()]},
                             schema={"token": pl.String, "at": pl.Int64})
        frame = frame.join(where, on="token", how="left", maintain_order="left")
        text = frame.get_column("text").to_numpy()
        at = frame.get_column("at").to_numpy()
        n = texts.len()
        sums = np.tile(self.eos, (n, 1))
        if at.size:  # the tokens come grouped by text, in order: one segment sum per text
            first = np.flatnonzero(np.diff(text, prepend=-1))
            sums[text[first]] += np.add.reduceat(self._sums[at], first, axis=0)
        rows = np.bincount(text, weights=self._counts[at], minlength=n) + 1
        return sums * (1.0 / rows).astype(np.float32)[:, None]

    def top1(self, texts: pl.Series) -> tuple[list[str], np.ndarray]:
        """(label without ``__label__``, probability) per text, as ``predict(text + "\\n", 1)``."""
        if texts.len() == 0:
            return [], np.zeros(0, np.float32)
        hidden = self.hidden(texts)
        if self.args.loss == SOFTMAX:
            logits = hidden @ self.output.T
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            best = p.argmax(axis=1)
            score = np.log(p[np.arange(texts.len()), best].astype(np.float64) + 1e-5).astype(np.float32)
        else:
            best, score = self._walk(hidden)
        return self.labels[best].tolist(), np.exp(score.astype(np.float64)).astype(np.float32)

    def _walk(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """HierarchicalSoftmaxLoss::dfs for every text at once: a leaf's score is the sum of
        ``log(p + 1e-5)`` along its path from the root and the best leaf wins. Scores only fall
        along a path, so once the greedy descent has reached a leaf, no subtree scoring below
        that leaf needs to be opened (as fastText's own search prunes on its best so far)."""
        n, osz = hidden.shape[0], len(self.labels)
        if osz == 1:  # the root is the only leaf
            return np.zeros(n, np.int64), np.zeros(n, np.float32)
        root = 2 * osz - 2
        texts = np.arange(n)
        node = np.full(n, root)
        floor = np.zeros(n, np.float32)
        while (inner := node >= osz).any():  # greedy: the likelier child at every step
            at = texts[inner]
            go_left, go_right = self._steps(hidden[at], node[at])
            right = go_right > go_left
            floor[at] += np.where(right, go_right, go_left)
            node[at] = np.where(right, self.right[node[at]], self.left[node[at]])
        floor -= np.float32(1e-4)  # the greedy leaf stays reachable whatever the rounding
        best_leaf, best = np.zeros(n, np.int64), np.full(n, -np.inf, np.float32)
        open_nodes = {root: (texts, np.zeros(n, np.float32))}  # node -> (texts reaching it, their scores)
        for parent in range(root, osz - 1, -1):  # parents have higher numbers than children
            if parent not in open_nodes:
                continue
            at, score = open_nodes.pop(parent)
            keep = score >= floor[at]
            if not keep.any():
                continue
            at, score = at[keep], score[keep]
            go_left, go_right = self._steps(hidden[at], np.full(at.size, parent))
            for child, step in ((self.left[parent], go_left), (self.right[parent], go_right)):
                reached = score + step
                if child >= osz:
                    open_nodes[child] = (at, reached)
                else:
                    better = reached > best[at]
                    best[at[better]] = reached[better]
                    best_leaf[at[better]] = child
        return best_leaf, best

    def _steps(self, hidden: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``std_log(1 - f)`` and ``std_log(f)`` of internal ``nodes``, f = sigmoid(row . hidden)."""
        dot = np.einsum("ij,ij->i", self.output[nodes - len(self.labels)], hidden)
        with np.errstate(over="ignore"):
            f = np.float32(1.0) / (np.float32(1.0) + np.exp(-dot))
        return np.log((np.float32(1.0) - f) + np.float32(1e-5)), np.log(f + np.float32(1e-5))
