"""A synthetic world of coloured shapes that teaches something checkable.

Each scene has a few non-overlapping shapes (circle, square, triangle in four colours) on
a plain background; every fact about it — what is there, where, how many — is known, so
captions, VQA answers, grounding boxes and rendered-text OCR lines come out exact.
Deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from qvl.formats.families import picture

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
ZH_COLORS = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色"}
ZH_SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
WORDS = ("SALE", "OPEN", "CAFE", "EXIT", "HOTEL", "TAXI", "STOP", "BOOK", "MILK", "PARK")


@dataclass
class Thing:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # pixels, xyxy

    @property
    def phrase(self) -> str:
        return f"a {self.color} {self.shape}"


def draw_scene(rng: random.Random, size: int, n_objects: int, grid: int = 1,
               sides: tuple[int, int] | None = None) -> tuple[Image.Image, list[Thing]]:
    """A scene with ``n_objects`` shapes of distinct (colour, shape) that do not overlap;
    positions and sizes snap to multiples of ``grid`` pixels (a coarser world is learnt faster)."""
    img = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    things: list[Thing] = []
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], n_objects)
    for color, shape in kinds:
        for _ in range(100):
            low, high = sides or (size // 6, size // 3)
            side = max(grid, rng.randint(low, high) // grid * grid)
            x = rng.randint(0, (size - side) // grid) * grid
            y = rng.randint(0, (size - side) // grid) * grid
            box = (x, y, x + side, y + side)
            if all(box[2] <= t.box[0] or t.box[2] <= box[0] or box[3] <= t.box[1] or t.box[3] <= box[1]
                   for t in things):
                break
        else:
            continue
        fill = COLORS[color]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=fill)
        things.append(Thing(shape, color, box))
    return img, things


def caption_of(things: list[Thing], lang: str = "en") -> str:
    if lang == "zh":
        return "和".join(f"一个{ZH_COLORS[t.color]}的{ZH_SHAPES[t.shape]}" for t in things)
    return " and ".join(t.phrase for t in things)


def draw_text_scene(rng: random.Random, size: int) -> tuple[Image.Image, list[dict]]:
    """Words in black on white for OCR, with their quads in pixels."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    lines = []
    for row, word in enumerate(rng.sample(WORDS, 2)):
        left, top, right, bottom = draw.textbbox((0, 0), word)
        w, h = right - left, bottom - top
        if w >= size or h * 2 >= size:
            continue  # too small a canvas for this word: no line rather than a line outside
        x = rng.randint(0, size - w - 1) - left
        y = row * (size // 2) + rng.randint(0, size // 2 - h - 1) - top
        draw.text((x, y), word, fill="black")
        left, top, right, bottom = draw.textbbox((x, y), word)
        lines.append({"text": word, "quad": [[left, top], [right, top], [right, bottom], [left, bottom]]})
    return img, lines


def write_annotations(folder: Path, n_images: int = 120, size: int = 96, seed: int = 0) -> dict[str, Path]:
    """Images, seven-task multitask annotations and SFT conversations for the demo."""
    rng = random.Random(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    multitask, conversations = [], []
    for i in range(n_images):
        name = f"scene_{i:05d}.png"
        img, things = draw_scene(rng, size, rng.randint(1, 3))
        img.save(images / name)
        lang = "zh" if i % 4 == 3 else "en"
        caption = caption_of(things, lang)
        multitask.append({"task": "caption", "image": name, "caption": caption, "lang": lang})
        multitask.append({"task": "vqa", "image": name, "question": "How many shapes are there?",
                          "answer": str(len(things))})
        target = rng.choice(things)
        multitask.append({"task": "vqa", "image": name, "question": f"What color is the {target.shape}?",
                          "answer": target.color})
        en = caption_of(things)
        regions, pos = [], 0
        for t in things:
            start = en.index(t.phrase, pos)
            regions.append({"span": [start, start + len(t.phrase)], "boxes": [list(t.box)]})
            pos = start + len(t.phrase)
        multitask.append({"task": "grounding", "image": name, "caption": en, "regions": regions})
        multitask.append({"task": "ref_grounding", "image": name, "ref": f"the {target.color} {target.shape}",
                          "box": list(target.box)})
        multitask.append({"task": "grounded_caption", "image": name, "box": list(target.box),
                          "caption": target.phrase})
        conversations.append({"id": f"conv_{i:05d}", "conversations": [
            {"from": "user", "value": picture(1, name) + "What do you see?"},
            {"from": "assistant", "value": f"I see {en}."},
            {"from": "user", "value": f"Where is the {target.color} {target.shape}?"},
            {"from": "assistant", "value": f"<ref>the {target.color} {target.shape}</ref>"
                                           f"<box>({target.box[0] * 1000 // size},{target.box[1] * 1000 // size}),"
                                           f"({target.box[2] * 1000 // size},{target.box[3] * 1000 // size})</box>"},
        ]})
        if i % 3 == 0:
            text_name = f"text_{i:05d}.png"
            text_img, lines = draw_text_scene(rng, size)
            if lines:
                text_img.save(images / text_name)
                multitask.append({"task": "ocr", "image": text_name, "lines": lines})
            multitask.append({"task": "text", "text": f"The scene shows {en}."})
    paths = {"images": images, "multitask": folder / "multitask.jsonl", "sft": folder / "conversations.jsonl"}
    for key, records in (("multitask", multitask), ("sft", conversations)):
        paths[key].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return paths
