"""From rendered pieces to token ids and labels, tokenizing a whole batch at once.

A renderer describes a sample as a plan: text pieces and fixed token ids, each marked
supervised or not, plus the images in the order their spans appear. ``assemble`` encodes
every text piece of a batch in one tokenizer call (Rust threads, no per-piece Python
overhead) and lays ids and labels side by side, so a mask can never drift from its ids.
"""

from __future__ import annotations

import unicodedata
from array import array
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from qvl.formats.tokenizers import IMG_END, IMG_START, Tokenizer
from qvl.schemas.samples import IGNORE_INDEX


def image_spans(text: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, ref) of each ``<img>ref</img>`` span — the spans ``<img>(.*?)</img>`` finds —
    in one pass: that regex rescans to the end of the text from every ``<img>`` that has no
    ``</img>``, quadratic in a turn of ``<img><img>…``."""
    pos = 0
    while (start := text.find(IMG_START, pos)) >= 0:
        close = text.find(IMG_END, start + len(IMG_START))
        if close < 0:
            return
        yield start, close + len(IMG_END), text[start + len(IMG_START):close]
        pos = close + len(IMG_END)


class Tag(str):
    """A format tag (``<ref>``, ``<box>`` ...) that a renderer emits from a structured field."""


@dataclass
class Plan:
    """One sample: pieces (str to encode, or token ids) with a supervised flag each."""

    id: str
    task: str
    source: str
    pieces: list = field(default_factory=list)  # (str | list[int], supervised)
    images: list[str] = field(default_factory=list)  # image references, in span order
    chars: int = 0  # characters of text among the pieces: what the tokenizer will be given

    def text(self, text: str, supervised: bool) -> None:
        if text:
            self.pieces.append((text, supervised))
            self.chars += len(text)

    def ids(self, ids: "list[int] | array", supervised: bool) -> None:
        self.pieces.append((ids if isinstance(ids, array) else array("i", ids), supervised))

    def content(self, text: str, supervised: bool, tok: Tokenizer, image_tokens: int) -> None:
        """Dataset/user text: ``<img>ref</img>`` becomes an image span, grounding tags their
        special ids, everything else (control tokens included) plain text."""
        text = unicodedata.normalize("NFC", text)
        pos = 0
        for start, end, ref in image_spans(text):
            self._tagged(text[pos:start], supervised, tok)
            self.image(ref.strip(), supervised, tok, image_tokens)
            pos = end
        self._tagged(text[pos:], supervised, tok)

    def structured(self, segments: list, supervised: bool, tok: Tokenizer) -> None:
        """A renderer's own markup around dataset text: ``Tag`` segments become their special
        ids, every ``str`` segment is plain text whatever it holds (a caption typed with
        ``<img>x</img>`` or ``<ref>`` stays those characters). Adjacent strings are encoded
        together, as one string would be."""
        text = ""
        for segment in segments:
            if isinstance(segment, Tag):
                self.text(unicodedata.normalize("NFC", text), supervised)
                self.ids([tok.special(segment)], supervised)
                text = ""
            else:
                text += segment
        self.text(unicodedata.normalize("NFC", text), supervised)

    def image(self, ref: str, supervised: bool, tok: Tokenizer, image_tokens: "int | Callable[[str], int]") -> None:
        """An image span: a fixed count of tokens (Qwen-VL's 256), or one that depends on the
        image (``image_tokens(ref)``: the newer families' count from its size)."""
        self.images.append(ref)
        n = image_tokens(ref) if callable(image_tokens) else image_tokens
        # image tokens are inputs, never targets: the model does not predict pixels
        self.pieces.append((tok.image_span(n), False))

    def _tagged(self, text: str, supervised: bool, tok: Tokenizer) -> None:
        for i, piece in enumerate(tok.tag_split.split(text)):
            if i % 2:
                self.pieces.append((array("i", [tok.special(piece)]), supervised))
            elif piece:
                self.pieces.append((piece, supervised))
                self.chars += len(piece)


@dataclass
class Encoded:
    id: str
    task: str
    source: str
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE_INDEX where no loss is taken
    images: list[str]
    positions: np.ndarray | None = None  # (3, L) M-RoPE position ids: the newer families only

    @property
    def supervised(self) -> int:
        return int(np.count_nonzero(self.labels != IGNORE_INDEX))


def assemble(plans: list[Plan], tok: Tokenizer) -> list[Encoded]:
    """Ids and a supervised flag per token go into two flat C buffers for the whole batch;
    labels are then one numpy select, and each sample a view into them."""
    texts = [p for plan in plans for p, _ in plan.pieces if isinstance(p, str)]
    encoded = iter(tok.encode_text_buffers(texts))
    ids = bytearray()
    lengths: list[int] = []
    flags: list[bool] = []
    ends = []
    for plan in plans:
        for piece, supervised in plan.pieces:
            piece_ids = next(encoded) if isinstance(piece, str) else piece
            ids += piece_ids
            lengths.append(len(piece_ids))
            flags.append(supervised)
        ends.append(len(ids) >> 2)
    flat_ids = np.frombuffer(ids, dtype=np.int32)
    supervised_mask = np.repeat(np.array(flags, dtype=np.bool_), lengths)
    flat_labels = np.where(supervised_mask, flat_ids, np.int32(IGNORE_INDEX)).astype(np.int32)
    out, start = [], 0
    for plan, end in zip(plans, ends):
        out.append(Encoded(plan.id, plan.task, plan.source, flat_ids[start:end], flat_labels[start:end], plan.images))
        start = end
    return out
