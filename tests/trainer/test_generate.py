"""Greedy generation on the KV cache equals recomputing the whole sequence every step."""

from __future__ import annotations

import torch

from qvl.formats.tokenizers import load_tokenizer
from qvl.trainer.generate import greedy, iou, prompt_ids
from qvl.trainer.model import QwenVL, load_preset


def test_cached_generation_equals_full_recompute(micro):
    tok = load_tokenizer("bytes")
    torch.manual_seed(1)
    model = QwenVL(load_preset(micro["preset"]), tok.vocab_size, tok.special("<imgpad>"), 32).eval()
    ids = prompt_ids(tok, 4, "<ref>the red circle</ref>")
    pixels = torch.randn(1, 3, 32, 32)
    cached = greedy(model, tok, ids, pixels, max_new_tokens=12)
    full, seq = [], list(ids)
    with torch.no_grad():
        for _ in range(12):
            nxt = int(model(torch.tensor([seq]), pixels)[0, -1].argmax())
            if nxt in (tok.special("<|endoftext|>"), tok.special("<|im_end|>")):
                break
            full.append(nxt)
            seq.append(nxt)
    assert cached == full and len(cached) > 0


def test_iou():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == 1 / 3
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
