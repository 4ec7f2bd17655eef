"""Greedy generation with images inserted: one prompt (`qvl generate`) or a left-padded batch
(`qvl eval`), on the KV cache."""

from __future__ import annotations

from pathlib import Path

import torch

from qvl.errors import QvlError
from qvl.formats.families import picture
from qvl.formats.render.sequence import Plan, assemble
from qvl.formats.tokenizers import Tokenizer
from qvl.trainer.data import load_image
from qvl.trainer.model import QwenVL


def stop_ids(tok: Tokenizer) -> set[int]:
    return {tok.special("<|endoftext|>"), tok.special("<|im_end|>")}


@torch.no_grad()
def greedy_batch(model: QwenVL, tok: Tokenizer, prompts: list[list[int]], pixels: torch.Tensor | None,
                 max_new_tokens: int = 32, min_new_tokens: int = 0) -> list[list[int]]:
    """Greedy continuations of several prompts at once: left-padded (positions count from each
    prompt's first real token, so a padded row computes what it would alone), the prompts
    encoded once with their images (``pixels``: every image of every prompt, in order), then
    one token at a time on the KV cache. A row ends at ``<|endoftext|>`` or ``<|im_end|>`` (not
    returned), which cannot come before ``min_new_tokens`` (the eval scripts' setting)."""
    model.eval()
    device = next(model.parameters()).device
    stop = sorted(stop_ids(tok))
    pad = tok.special("<|endoftext|>")
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model.llm(inputs_embeds=model.embed(ids, None if pixels is None else pixels.to(device)),
                    attention_mask=mask, position_ids=positions, use_cache=True)
    next_position = positions[:, -1:] + 1
    done = [False] * len(prompts)
    generated: list[list[int]] = [[] for _ in prompts]
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        if step < min_new_tokens:
            logits[:, stop] = float("-inf")
        chosen = logits.argmax(-1)
        for row, token in enumerate(chosen.tolist()):
            if not done[row]:
                if token in stop:
                    done[row] = True
                else:
                    generated[row].append(token)
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model.llm(input_ids=chosen[:, None], attention_mask=mask, position_ids=next_position, cache=out.cache,
                        use_cache=True)
        next_position = next_position + 1
    return generated


def greedy(model: QwenVL, tok: Tokenizer, prompt_ids: list[int], pixels: torch.Tensor | None,
           max_new_tokens: int = 32) -> list[int]:
    """One prompt's greedy continuation (see ``greedy_batch``)."""
    return greedy_batch(model, tok, [prompt_ids], pixels, max_new_tokens)[0]


def prompt_ids(tok: Tokenizer, image_tokens: int, text: str) -> list[int]:
    """``<img>`` + pads + ``</img>`` then ``text`` (grounding tags special), as the renderers do."""
    plan = Plan("prompt", "eval", "eval")
    plan.image("x", False, tok, image_tokens)
    plan.content(text, False, tok, image_tokens)
    return assemble([plan], tok)[0].input_ids.tolist()


def render_prompt(tok: Tokenizer, image_tokens: int, text: str, chat: bool = False,
                  system: str | None = None) -> tuple[list[int], list[str]]:
    """(ids, image references in order) of a prompt whose ``<img>PATH</img>`` spans are
    images where they stand: as it is (a base model's prompt), or (``chat``) one ChatML user
    turn after the system message, ending where the assistant speaks — what the release's
    ``make_context`` builds."""
    from qvl.formats.render.chatml import DEFAULT_SYSTEM, Conversation, render

    if chat:
        plan = render(Conversation(None, system or DEFAULT_SYSTEM, [("user", text)], "prompt"), "prompt", tok,
                      image_tokens)
        plan.ids([tok.special("<|im_start|>")], False)
        plan.text("assistant\n", False)
    else:
        plan = Plan("prompt", "generate", "generate")
        plan.content(text, False, tok, image_tokens)
    return assemble([plan], tok)[0].input_ids.tolist(), plan.images


def chat_prompt_ids(tok: Tokenizer, image_tokens: int, question: str) -> list[int]:
    """A one-turn ChatML conversation about one picture, ending where the assistant speaks."""
    return render_prompt(tok, image_tokens, picture(1, "x") + question, chat=True)[0]


def generate_text(model: QwenVL, tok: Tokenizer, resolution: int, prompt: str, images: Path | None = None,
                  chat: bool = False, system: str | None = None, max_new_tokens: int = 64) -> dict:
    """``{"ids": new token ids, "text": their text}`` for a prompt with ``<img>PATH</img>``
    spans; the paths are read under ``images`` as `qvl format` reads them (never outside).
    Generation stops at the model's context length (``max_new_tokens`` is capped to what is left
    after the prompt): past it the work only grows, and the positions were never trained."""
    from qvl.errors import AnnotationError
    from qvl.formats.images import ImageStore

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise QvlError(f"--max-new-tokens {max_new_tokens!r}: at least 1")
    for option, text in (("--prompt", prompt), ("--system", system)):
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate: bytes the shell passed that are not UTF-8
            raise QvlError(f"{option}: not valid Unicode (a lone surrogate at character {e.start})") from None
    ids, refs = render_prompt(tok, model.config.image_tokens, prompt, chat, system)
    if not ids:
        raise QvlError("--prompt is empty: there is nothing to continue")
    context = model.llm.config.max_position_embeddings
    if len(ids) >= context:
        raise QvlError(f"--prompt: {len(ids):,} tokens fill the model's context of {context:,}; "
                       "nothing can be generated after it")
    max_new_tokens = min(max_new_tokens, context - len(ids))
    store = ImageStore(images)
    try:
        pixels = torch.stack([load_image(store.read(ref)[0], resolution) for ref in refs]) if refs else None
    except AnnotationError as e:
        raise QvlError(str(e)) from None
    new = greedy(model, tok, ids, pixels, max_new_tokens)
    return {"ids": new, "text": tok.decode(new)}
