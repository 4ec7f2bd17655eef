"""Greedy generation with images inserted, and the grounding evaluation built on it."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from qvl.formats.sequence import Plan, assemble
from qvl.formats.tokenizers import Tokenizer
from qvl.trainer.data import load_image
from qvl.trainer.model import QwenVL

BOX = re.compile(r"<box>\((\d+),(\d+)\),\((\d+),(\d+)\)</box>")


@torch.no_grad()
def greedy(model: QwenVL, tok: Tokenizer, prompt_ids: list[int], pixels: torch.Tensor | None,
           max_new_tokens: int = 32) -> list[int]:
    """Continue ``prompt_ids`` until ``<|endoftext|>`` or ``<|im_end|>`` (not returned) or the
    limit; the prompt (image included) is encoded once, then one token at a time on the KV cache."""
    model.eval()
    stop = {tok.special("<|endoftext|>"), tok.special("<|im_end|>")}
    out = model.llm(inputs_embeds=model.embed(torch.tensor([prompt_ids]), pixels), use_cache=True)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        if nxt in stop:
            break
        generated.append(nxt)
        out = model.llm(input_ids=torch.tensor([[nxt]]), cache=out.cache, use_cache=True)
    return generated


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
    from qvl.formats.chatml import DEFAULT_SYSTEM, Conversation, render

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
    return render_prompt(tok, image_tokens, f"Picture 1: <img>x</img>\n{question}", chat=True)[0]


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_accuracy(model: QwenVL, tok: Tokenizer, cases: list[dict], resolution: int,
                       chat: bool = False) -> dict:
    """Share of ``cases`` ({image bytes, ref, box in [0,1000)}) whose predicted box has IoU >= 0.5;
    asked as Qwen-VL's referring-grounding prompt, or (``chat``) as an SFT question."""
    hits, parsed = 0, 0
    examples = []
    for case in cases:
        pixels = load_image(case["image"], resolution).unsqueeze(0)
        if chat:
            ids = chat_prompt_ids(tok, model.config.image_tokens, f"Where is {case['ref']}?")
        else:
            ids = prompt_ids(tok, model.config.image_tokens, f"<ref>{case['ref']}</ref>")
        text = tok.decode(greedy(model, tok, ids, pixels, max_new_tokens=40))
        match = BOX.search(text)
        ok = False
        if match:
            parsed += 1
            ok = iou(tuple(int(v) for v in match.groups()), case["box"]) >= 0.5
            hits += ok
        if len(examples) < 5:
            examples.append({"ref": case["ref"], "truth": case["box"], "predicted": text, "hit": ok})
    n = max(1, len(cases))
    return {"accuracy": hits / n, "parsed": parsed / n, "n": len(cases), "examples": examples}


def generate_text(model: QwenVL, tok: Tokenizer, resolution: int, prompt: str, images: Path | None = None,
                  chat: bool = False, system: str | None = None, max_new_tokens: int = 64) -> dict:
    """``{"ids": new token ids, "text": their text}`` for a prompt with ``<img>PATH</img>``
    spans; the paths are read under ``images`` as `qvl format` reads them (never outside)."""
    from qvl.formats.boxes import AnnotationError
    from qvl.formats.images import ImageStore

    ids, refs = render_prompt(tok, model.config.image_tokens, prompt, chat, system)
    store = ImageStore(images)
    try:
        pixels = torch.stack([load_image(store.read(ref)[0], resolution) for ref in refs]) if refs else None
    except AnnotationError as e:
        raise ValueError(str(e)) from None
    new = greedy(model, tok, ids, pixels, max_new_tokens)
    return {"ids": new, "text": tok.decode(new)}
