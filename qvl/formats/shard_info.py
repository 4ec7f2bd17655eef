"""Show a tokenized sample as text with its supervised spans marked, so a person can
check a loss mask by eye."""

from __future__ import annotations

from itertools import groupby

from qvl.formats.tokenizers import IMG_PAD, Tokenizer
from qvl.schemas.samples import IGNORE_INDEX


def spans(input_ids: list[int], labels: list[int], tok: Tokenizer) -> list[tuple[str, bool]]:
    """(text, supervised) runs; a run of image pads shows as one ``<imgpad>×N`` (or
    ``<|image_pad|>×N`` for the newer families)."""
    pad_token = IMG_PAD if IMG_PAD in tok.specials else "<|image_pad|>"
    pad = tok.special(pad_token)
    out: list[tuple[str, bool]] = []
    pairs = list(zip(input_ids, labels))
    for (is_pad, supervised), run in groupby(pairs, key=lambda p: (p[0] == pad, p[1] != IGNORE_INDEX)):
        run = list(run)
        text = f"{pad_token}×{len(run)}" if is_pad else tok.decode([i for i, _ in run])
        if out and out[-1][1] == supervised:
            out[-1] = (out[-1][0] + text, supervised)
        else:
            out.append((text, supervised))
    return out
