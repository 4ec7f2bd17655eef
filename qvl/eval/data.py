"""Evaluation data, in the layouts of Qwen-VL's eval data (one JSON object a line) or as the
datasets publish it.

| task | JSONL record | also read |
|---|---|---|
| grounding | ``{image, sent, bbox: [x1,y1,x2,y2] pixels, width, height}`` | — |
| caption | ``{image_id, image, captions: [refs…]}`` | COCO captions JSON (``images`` + ``annotations``) |
| vqa | ``{question_id, image, question, answers: [10 human answers]}`` (or ``answer``: one) with optional ``question_type``, ``answer_type`` | VQAv2's questions JSON with ``--annotations`` (its annotations JSON) |

A sample's id is its ``question_id`` / ``image_id`` / ``id`` when it has one, else its line. A
record that is not as its layout says is an error naming the file and line: a benchmark with
silently fewer samples is not that benchmark.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from qvl.errors import QvlError


class EvalDataError(QvlError):
    pass


@dataclass
class Sample:
    id: str
    image: str
    fields: dict = field(default_factory=dict)  # sent, bbox, width, height / question, answers, types / captions


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalDataError(f"{path}: not a readable JSON file ({e})") from None


def _lines(path: Path):
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise EvalDataError(f"{path}:{n}: not a JSON object ({e})") from None
            if not isinstance(record, dict):
                raise EvalDataError(f"{path}:{n}: not a JSON object")
            yield n, record


def _need(record: dict, name: str, kind, where: str):
    value = record.get(name)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and isinstance(value, str):
        ok = bool(value.strip())
    if not ok:
        raise EvalDataError(f"{where}: missing or bad {name!r} ({value!r})")
    return value


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def grounding(path: Path) -> list[Sample]:
    samples = []
    for n, r in _lines(path):
        where = f"{path}:{n}"
        bbox = _need(r, "bbox", list, where)
        if len(bbox) != 4 or not all(_number(v) for v in bbox):
            raise EvalDataError(f"{where}: bbox must be 4 pixel numbers [x1, y1, x2, y2], got {bbox!r}")
        width, height = r.get("width"), r.get("height")
        if not (_number(width) and _number(height) and width > 0 and height > 0):
            raise EvalDataError(f"{where}: width and height must be positive numbers (got {width!r}, {height!r})")
        samples.append(Sample(str(r.get("id", n)), _need(r, "image", str, where),
                              {"sent": _need(r, "sent", str, where), "bbox": [float(v) for v in bbox],
                               "width": float(width), "height": float(height)}))
    return samples


def caption(path: Path) -> list[Sample]:
    if path.suffix == ".json":  # COCO captions: images + annotations
        data = _load_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
                or not isinstance(data.get("annotations"), list):
            raise EvalDataError(f"{path}: a COCO captions file holds 'images' and 'annotations' lists")
        refs: dict = {}
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
                raise EvalDataError(f"{path}: annotations[{i}] needs image_id and caption")
            refs.setdefault(ann["image_id"], []).append(ann["caption"])
        samples = []
        for i, img in enumerate(data["images"]):
            if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
                raise EvalDataError(f"{path}: images[{i}] needs id and file_name")
            if img["id"] not in refs:
                raise EvalDataError(f"{path}: image {img['id']} has no reference caption")
            samples.append(Sample(str(img["id"]), img["file_name"], {"captions": refs[img["id"]]}))
        return samples
    samples = []
    for n, r in _lines(path):
        where = f"{path}:{n}"
        captions = _need(r, "captions", list, where)
        if not captions or not all(isinstance(c, str) for c in captions):
            raise EvalDataError(f"{where}: captions must be a non-empty list of strings")
        samples.append(Sample(str(r.get("image_id", n)), _need(r, "image", str, where), {"captions": captions}))
    return samples


def vqa(path: Path, annotations: Path | None = None, image_pattern: str | None = None) -> list[Sample]:
    if annotations is not None:  # VQAv2 as published: questions JSON + annotations JSON
        questions, answers = _load_json(path), _load_json(annotations)
        try:
            subtype = questions.get("data_subtype", "val2014")
            pattern = image_pattern or f"COCO_{subtype}_{{image_id:012d}}.jpg"
            by_id = {a["question_id"]: a for a in answers["annotations"]}
            samples = []
            for q in questions["questions"]:
                ann = by_id.get(q["question_id"])
                if ann is None:
                    raise EvalDataError(f"{annotations}: no annotation for question {q['question_id']}")
                samples.append(Sample(str(q["question_id"]), pattern.format(image_id=q["image_id"]), {
                    "question": q["question"], "answers": [a["answer"] for a in ann["answers"]],
                    "question_type": ann.get("question_type"), "answer_type": ann.get("answer_type")}))
            return samples
        except (KeyError, TypeError, AttributeError) as e:
            raise EvalDataError(f"{path} + {annotations}: not VQAv2's questions and annotations files ({e})") from None
    samples = []
    for n, r in _lines(path):
        where = f"{path}:{n}"
        refs = r.get("answers", r.get("answer"))
        refs = [refs] if isinstance(refs, str) else refs
        if not isinstance(refs, list) or not refs or not all(isinstance(a, str) for a in refs):
            raise EvalDataError(f"{where}: needs 'answers' (a list of strings) or 'answer'")
        samples.append(Sample(str(r.get("question_id", n)), _need(r, "image", str, where), {
            "question": _need(r, "question", str, where), "answers": refs,
            "question_type": r.get("question_type"), "answer_type": r.get("answer_type")}))
    return samples


def read(task: str, path: Path, annotations: Path | None = None, image_pattern: str | None = None) -> list[Sample]:
    samples = {"grounding": lambda: grounding(path), "caption": lambda: caption(path),
               "vqa": lambda: vqa(path, annotations, image_pattern)}[task]()
    if not samples:
        raise EvalDataError(f"{path}: no samples")
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise EvalDataError(f"{path}: id {s.id} appears twice; ids must name one sample")
        seen.add(s.id)
    return samples
