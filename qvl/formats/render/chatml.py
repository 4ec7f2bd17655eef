"""Stage-3 SFT: conversations in Qwen-VL's ChatML, with the reference loss mask.

Three input formats become one conversation type: Qwen-VL's own (``conversations`` of
``{from, value}`` with ``Picture N: <img>path</img>``), LLaVA (``human``/``gpt`` with an
``image`` field and ``<image>`` placeholders) and ShareGPT/OpenAI (``messages`` of
``{role, content}`` plus ``images``). Rendering and labels follow Qwen-VL's finetune.py:
each turn is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``; ``<|im_start|>``,
``<|im_end|>`` and the newline after it are supervised in every turn; the role name, its
newline, system and user content are not; assistant content is. The role name, the
newline and the content are tokenized separately, as that code does.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Annotated

import msgspec

from qvl.boundary import MAX_ITEMS, Id, convert
from qvl.errors import AnnotationError
from qvl.formats.families import FAMILIES, Family, picture
from qvl.formats.render import markup
from qvl.formats.render.sequence import Plan
from qvl.formats.tokenizers import Tokenizer

DEFAULT_SYSTEM = "You are a helpful assistant."
PLACEHOLDER = "<image>"
ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
                "system": "system"}


@dataclass
class Conversation:
    id: str | None
    system: str | None  # None: the conversation gives none (the model's default applies)
    turns: list[tuple[str, str]]  # (user|assistant, content with <img>ref</img> spans)
    source: str


# The input formats as typed records: keys a format does not use are ignored (real ShareGPT and
# LLaVA files carry many), the ones it uses must have their type; text is valid Unicode.
Paths = Annotated[list[str], msgspec.Meta(max_length=MAX_ITEMS)]


class Part(msgspec.Struct):
    """An OpenAI content part: ``{"type": "text", "text": …}``, or an image of any type."""

    type: str
    text: str | None = None


class Message(msgspec.Struct):
    role: str
    content: str | Annotated[list[Part], msgspec.Meta(max_length=MAX_ITEMS)]


class Turn(msgspec.Struct, rename={"from_": "from"}):
    from_: str
    value: str


class Messages(msgspec.Struct):
    """ShareGPT/OpenAI: ``messages`` of ``{role, content}`` plus ``images``."""

    messages: Annotated[list[Message], msgspec.Meta(max_length=MAX_ITEMS)]
    images: Paths | None = None
    id: str | Id | None = None
    source: str | None = None


class Conversations(msgspec.Struct):
    """Qwen-VL's own and LLaVA's: ``conversations`` of ``{from, value}`` plus ``image``."""

    conversations: Annotated[list[Turn], msgspec.Meta(max_length=MAX_ITEMS)]
    image: str | Paths | None = None
    id: str | Id | None = None
    source: str | None = None


def _role(value: str, where: str) -> str:
    role = ROLE_ALIASES.get(value)
    if role is None:
        shown = repr(value) if len(value) <= 40 else repr(value[:40]) + "..."
        raise AnnotationError(f"unknown role {shown} in {where} (use user/assistant/system, human/gpt)", "unknown_role")
    return role


def _text(part: Part) -> str:
    if part.type != "text":
        return PLACEHOLDER
    if part.text is None:
        raise AnnotationError("a text part without 'text'")
    return part.text


def _with_pictures(texts: list[str], images: list[str]) -> list[str]:
    """Replace ``<image>`` placeholders, in order, by ``Picture N: <img>path</img>\\n``."""
    count = sum(t.count(PLACEHOLDER) for t in texts)
    if count != len(images):
        raise AnnotationError(f"{count} <image> placeholder(s) but {len(images)} image(s)", "placeholder_mismatch")
    n = 0
    out = []
    for text in texts:
        parts = text.split(PLACEHOLDER)
        rebuilt = parts[0]
        for part in parts[1:]:
            n += 1
            rebuilt += picture(n, images[n - 1]) + part.lstrip("\n")
        out.append(rebuilt)
    return out


def parse(record: dict) -> Conversation:
    """Any of the three formats -> a Conversation (leading system message taken as the
    system prompt; a leading non-user turn after it dropped, as finetune.py does)."""
    if not isinstance(record, dict):
        raise AnnotationError("a conversation must be a JSON object")
    if "messages" in record:
        typed = convert(record, Messages, "bad_sample")
        turns = [(_role(m.role, "messages"), m.content if isinstance(m.content, str)
                  else "".join(_text(p) for p in m.content))  # OpenAI parts: text and images
                 for m in typed.messages]
        images = typed.images or []
    elif "conversations" in record:
        typed = convert(record, Conversations, "bad_sample")
        turns = [(_role(m.from_, "conversations"), m.value) for m in typed.conversations]
        images = [typed.image] if isinstance(typed.image, str) else (typed.image or [])
    else:
        raise AnnotationError("no 'conversations' or 'messages' field")
    if images or any(PLACEHOLDER in t for _, t in turns):
        texts = _with_pictures([t for _, t in turns], images)
        turns = [(r, t) for (r, _), t in zip(turns, texts)]
    system = None
    if turns and turns[0][0] == "system":
        system = turns.pop(0)[1]
    if any(r == "system" for r, _ in turns):
        raise AnnotationError("a system message may only come first")
    if turns and turns[0][0] != "user":
        turns = turns[1:]
    if not turns:
        raise AnnotationError("no turns")
    return Conversation(None if typed.id is None else str(typed.id), system, turns,
                        "sft" if typed.source is None else typed.source)


def render(conv: Conversation, sample_id: str, tok: Tokenizer, image_tokens, model: Family = FAMILIES["qwen-vl"],
           resized_of=None) -> Plan:
    """Qwen-VL's ChatML with finetune.py's labels, or a newer family's template (see ``families``)."""
    if model.chat:
        return _render_family(conv, sample_id, tok, image_tokens, model, resized_of)
    plan = Plan(sample_id, "sft", conv.source)
    im_start, im_end = array("i", [tok.special("<|im_start|>")]), array("i", [tok.special("<|im_end|>")])
    newline = tok.fixed("\n")
    for role, content in [("system", DEFAULT_SYSTEM if conv.system is None else conv.system), *conv.turns]:
        plan.ids(im_start, True)
        plan.ids(tok.fixed(role), False)
        plan.ids(newline, False)
        if role == "system" and content == DEFAULT_SYSTEM:
            plan.ids(tok.fixed(content), False)
        else:
            markup.check_boxes(content)
            plan.content(content, role == "assistant", tok, image_tokens)
        plan.ids(im_end, True)
        plan.ids(newline, True)
    return plan


def _render_family(conv: Conversation, sample_id: str, tok: Tokenizer, image_tokens, model: Family,
                   resized_of) -> Plan:
    """A newer family's template: its default system message (none for Qwen3-VL), its image
    and box conventions; only the assistant's content, ``<|im_end|>`` and newline take the loss.
    A system or user turn is tokenized as the template's whole string is: ``{role}\\n{content}``
    as one text (a content that starts with a newline joins the role's: ``\\n\\n`` is one token);
    an assistant turn's header and answer apart, where the trainers (ms-swift, LLaMA-Factory)
    split prompt from answer."""
    plan = Plan(sample_id, "sft", conv.source)
    im_start, im_end = array("i", [tok.special("<|im_start|>")]), array("i", [tok.special("<|im_end|>")])
    newline = tok.fixed("\n")
    system = conv.system if conv.system is not None else model.default_system
    turns = ([("system", system)] if system is not None else []) + list(conv.turns)
    last_image = None
    for role, content in turns:
        answer = role == "assistant"
        plan.ids(im_start, False)
        converted = markup.convert(content, model, resized_of, last_image)
        if answer:  # the trainers split the prompt from the answer here: header and answer apart
            plan.ids(tok.fixed(role), False)
            plan.ids(newline, False)
            plan.content(converted, True, tok, image_tokens)
        else:  # one text with its header, as the template's string tokenizes ("user\n\nHi": 271 for "\n\n")
            plan.content(f"{role}\n{converted}", False, tok, image_tokens)
        last_image = plan.images[-1] if plan.images else last_image
        plan.ids(im_end, answer)
        plan.ids(newline, answer)
    return plan
