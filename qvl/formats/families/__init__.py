"""What differs between Qwen-VL and the Qwen2-VL, Qwen2.5-VL and Qwen3-VL families when the
same records are rendered for them, as data — the renderers stay shared (``render/``).

| family | system message by default | image | boxes in answers |
|---|---|---|---|
| ``qwen-vl`` | "You are a helpful assistant." | ``<img>`` + 256 ``<imgpad>`` + ``</img>`` | ``<ref>…</ref><box>(x1,y1),(x2,y2)</box>``, 0–1000 of the image |
| ``qwen2-vl`` | "You are a helpful assistant." | ``<|vision_start|>`` + N ``<|image_pad|>`` + ``<|vision_end|>`` | ``<|object_ref_start|>…<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>``, 0–1000 |
| ``qwen2.5-vl`` | "You are a helpful assistant." | same | ``{"bbox_2d": [x1, y1, x2, y2], "label": …}``, pixels of the *resized* image |
| ``qwen3-vl`` | none | same | ``{"bbox_2d": […], "label": …}``, 0–1000 |

N, the image's token count, comes from its width and height alone, with the released
processors' ``smart_resize`` (both sides rounded to a multiple of ``factor`` — 28 for
Qwen2/2.5-VL's 14-px patches merged 2×2, 32 for Qwen3-VL's 16-px patches — the area brought
within ``[min_pixels, max_pixels]``; an aspect ratio over 200 is refused): N = h'w' / factor².

Labels follow the families' reference fine-tuning code: the assistant's content, its
``<|im_end|>`` and the newline after it take the loss; nothing else does. Qwen-VL's picture
labels (``Picture 1: `` and the newline after the image) are Qwen-VL's own convention and are
not rendered for the newer families (their templates add none by default).
"""

from __future__ import annotations

from dataclasses import dataclass

# Qwen-VL's tokens, in its order from id 151643: its image span and grounding markup are the
# format qvl's records are written in (the other families' renderings are converted from it)
IMG_START, IMG_END, IMG_PAD = "<img>", "</img>", "<imgpad>"
CONTROL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
TAGS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", IMG_START, IMG_END)
SPECIAL_TOKENS = (*CONTROL, *EXTRAS, *TAGS, IMG_PAD)
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
QWEN25_SPECIALS = QWEN2_SPECIALS + ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                                    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
QWEN3_SPECIALS = QWEN25_SPECIALS + ("<tool_response>", "</tool_response>", "<think>", "</think>")
SYSTEM = "You are a helpful assistant."


FAMILY_TAGS = dict(zip(TAGS[:6], ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                                  "<|quad_start|>", "<|quad_end|>")))


@dataclass(frozen=True)
class Family:
    name: str
    specials: tuple[str, ...]  # in id order from 151643
    factor: int | None  # patch size x spatial merge (None: Qwen-VL's images, 448x448 whatever their size)
    min_pixels: int | None
    max_pixels: int | None
    default_system: str | None
    boxes: str  # "tokens" (0-1000 between box tokens), "json_pixels" (resized image), "json_1000"
    tags: dict[str, str] | None  # Qwen-VL's markup tag -> this family's box token ("tokens" boxes only)
    chat: bool  # multitask samples as one user/assistant exchange of the chat template, and its SFT labels

    @property
    def sized_images(self) -> bool:
        """An image's token count (and M-RoPE grid) comes from its size: the newer families."""
        return self.factor is not None


FAMILIES = {
    "qwen-vl": Family("qwen-vl", SPECIAL_TOKENS, None, None, None, SYSTEM, "tokens", {t: t for t in TAGS[:6]},
                      False),
    "qwen2-vl": Family("qwen2-vl", QWEN2_SPECIALS, 28, 3136, 12845056, SYSTEM, "tokens", FAMILY_TAGS, True),
    "qwen2.5-vl": Family("qwen2.5-vl", QWEN25_SPECIALS, 28, 3136, 12845056, SYSTEM, "json_pixels", None, True),
    "qwen3-vl": Family("qwen3-vl", QWEN3_SPECIALS, 32, 65536, 16777216, None, "json_1000", None, True),
}
MODELS = tuple(FAMILIES)


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"--model {name!r}: use {', '.join(MODELS)}")
    return FAMILIES[name]


def picture(n: int, ref: str) -> str:
    """Qwen-VL's image in a conversation: ``Picture N: <img>ref</img>`` and a newline."""
    return f"Picture {n}: {IMG_START}{ref}{IMG_END}\n"


def check_tokenizer(tok, fam: Family) -> None:
    """A tokenizer for ``fam`` has the family's special tokens at the family's ids."""
    wrong = [t for i, t in enumerate(fam.specials) if tok.specials.get(t) != 151643 + i]
    if wrong:
        raise ValueError(f"tokenizer {tok.name}: {', '.join(wrong[:5])} not at {fam.name}'s ids (151643 + their "
                         "order); give the family's own tokenizer.json or none")

