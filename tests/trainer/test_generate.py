"""Greedy generation on the KV cache equals recomputing the whole sequence every step."""

from __future__ import annotations

import torch

from qvl.formats.tokenizers import load_tokenizer
from qvl.trainer.generate import greedy, greedy_batch, prompt_ids
from qvl.trainer.model import QwenVL
from qvl.trainer.preset import load_preset


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


def test_a_left_padded_batch_answers_as_single_prompts(micro):
    """Positions count from each prompt's first real token and pads are masked: a batch of
    prompts of three lengths gives each prompt's own continuation."""
    tok = load_tokenizer("bytes")
    torch.manual_seed(2)
    model = QwenVL(load_preset(micro["preset"]), tok.vocab_size, tok.special("<imgpad>"), 32).eval()
    prompts = [prompt_ids(tok, 4, text) for text in ("<ref>a</ref>", "<ref>the big red circle</ref>", "x")]
    pixels = torch.randn(3, 3, 32, 32)
    alone = [greedy_batch(model, tok, [p], pixels[i:i + 1], 10, min_new_tokens=3)[0] for i, p in enumerate(prompts)]
    together = greedy_batch(model, tok, prompts, pixels, 10, min_new_tokens=3)
    assert together == alone and all(len(a) >= 3 for a in alone)
