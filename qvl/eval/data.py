"""Evaluation data, in the layouts of Qwen-VL's eval data (one JSON object a line) or as the
datasets publish it.

| task | JSONL record | also read |
|---|---|---|
| grounding | ``{image, sent, bbox: [x1,y1,x2,y2] pixels, width, height}`` | — |
| caption | ``{image_id, image, captions: [refs…]}`` | COCO captions JSON (``images`` + ``annotations``) |
| vqa | ``{question_id, image, question, answers: [10 human answers]}`` (or ``answer``: one) with optional ``question_type``, ``answer_type`` | VQAv2's questions JSON with ``--annotations`` (its annotations JSON) |

A sample's id is its ``question_id`` / ``image_id`` / ``id`` when it has one, else its line. A
record that is not as its layout says is an error naming the file, the line (or the place in a
JSON file, ``$.annotations[3].image_id``) and the field: a benchmark with silently fewer samples
is not that benchmark. Records are decoded into typed structs: strings where text belongs
(valid Unicode), finite pixel numbers in range (a reference box x1 < x2, y1 < y2, on its
image), 64-bit ids; keys a layout does not name are ignored (the published files carry more
than is scored).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Iterator, TypeVar

import msgspec

from qvl.boundary import Coord, Id, Side, decode_json, read_json_file
from qvl.errors import QvlError, RecordError

T = TypeVar("T")
MAX_TEXT = 1 << 20  # characters in one question, sentence, caption or answer
MAX_FILE = 8 << 30  # bytes of one whole-JSON file (VQAv2's annotations: 0.3 GB)

Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=4096, pattern=r"\S")]  # an image path
Said = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT, pattern=r"\S")]  # a question, a sentence
Key = str | Id  # an id as the files give it: a number or a string
Refs = Annotated[list[Text], msgspec.Meta(min_length=1, max_length=10_000)]


class EvalDataError(QvlError):
    pass


@dataclass
class Sample:
    id: str
    image: str
    fields: dict = field(default_factory=dict)  # sent, bbox, width, height / question, answers, types / captions


# ---------------------------------------------------------------- records, as each layout holds them

class GroundingRecord(msgspec.Struct):
    image: Name
    sent: Said
    bbox: Annotated[list[Coord], msgspec.Meta(min_length=4, max_length=4)]  # x1, y1, x2, y2 in pixels
    width: Side
    height: Side
    id: Key | None = None


class CaptionRecord(msgspec.Struct):
    image: Name
    captions: Refs
    image_id: Key | None = None


class VqaRecord(msgspec.Struct):
    image: Name
    question: Said
    answers: Refs | Text | None = None
    answer: Text | None = None
    question_id: Key | None = None
    question_type: Text | None = None
    answer_type: Text | None = None


class CocoImage(msgspec.Struct):
    id: Key
    file_name: Name


class CocoCaption(msgspec.Struct):
    image_id: Key
    caption: Text


class CocoCaptions(msgspec.Struct):
    images: list[CocoImage]
    annotations: list[CocoCaption]


class VqaQuestion(msgspec.Struct):
    question_id: Key
    image_id: Id
    question: Said


class VqaQuestions(msgspec.Struct):
    questions: list[VqaQuestion]
    data_subtype: Annotated[str, msgspec.Meta(max_length=256)] = "val2014"


class VqaHumanAnswer(msgspec.Struct):
    answer: Text


class VqaAnnotation(msgspec.Struct):
    question_id: Key
    answers: Annotated[list[VqaHumanAnswer], msgspec.Meta(min_length=1, max_length=10_000)]
    question_type: Text | None = None
    answer_type: Text | None = None


class VqaAnnotations(msgspec.Struct):
    annotations: list[VqaAnnotation]


class Prediction(msgspec.Struct):
    """One answer made elsewhere: its text and (when the file gives ids) the sample's id."""

    answer: Text | None = None
    caption: Text | None = None
    id: Key | None = None
    question_id: Key | None = None
    image_id: Key | None = None

    def key(self) -> Key | None:
        return next((k for k in (self.id, self.question_id, self.image_id) if k is not None), None)


LAYOUT = {  # said after an error: what a record of the layout holds
    GroundingRecord: "a grounding line is {image, sent, bbox: [x1, y1, x2, y2] pixels, width, height}",
    CaptionRecord: "a caption line is {image_id, image, captions: [strings]}",
    VqaRecord: "a VQA line is {question_id, image, question, answers: [strings] or answer}",
    Prediction: "a prediction line is {id|question_id|image_id, answer|caption}",
    CocoCaptions: "COCO captions: {images: [{id, file_name}], annotations: [{image_id, caption}]}",
    VqaQuestions: "VQAv2 questions: {questions: [{question_id, image_id, question}]}",
    VqaAnnotations: "VQAv2 annotations: {annotations: [{question_id, answers: [{answer}]}]}",
}


# ---------------------------------------------------------------- files

def load_json(path: Path, type_: type[T]) -> T:
    """A whole JSON file as ``type_``, or one error naming the file and the field."""
    return read_json_file(path, type_, MAX_FILE, EvalDataError, f" ({LAYOUT[type_]})")


def records(path: Path, type_: type[T]) -> Iterator[tuple[int, T]]:
    """(line, record) of a JSONL file; a line that is not a ``type_`` is an error naming the
    file, the line and the field."""
    if not path.is_file():
        raise EvalDataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield n, decode_json(raw, type_)
            except RecordError as e:
                raise EvalDataError(f"{path}:{n}: {e} ({LAYOUT[type_]})") from None


SLACK = 1.0  # pixels a reference box may pass the image's edge by (published boxes round outward)


def _check_box(path: Path, n: int, r: GroundingRecord) -> None:
    """A reference box no answer could match (inverted, empty, or off the image) would be
    scored all the same, as a miss: it is an error naming the line, as any bad record."""
    x1, y1, x2, y2 = r.bbox
    if not (x1 < x2 and y1 < y2):
        raise EvalDataError(f"{path}:{n}: $.bbox: [{x1:g}, {y1:g}, {x2:g}, {y2:g}] is not x1 < x2, y1 < y2 "
                            f"({LAYOUT[GroundingRecord]})")
    if min(x1, y1) < -SLACK or x2 > r.width + SLACK or y2 > r.height + SLACK:
        raise EvalDataError(f"{path}:{n}: $.bbox: [{x1:g}, {y1:g}, {x2:g}, {y2:g}] lies outside the "
                            f"{r.width:g}x{r.height:g} image")


def grounding(path: Path) -> list[Sample]:
    samples = []
    for n, r in records(path, GroundingRecord):
        _check_box(path, n, r)
        samples.append(Sample(str(n if r.id is None else r.id), r.image,
                              {"sent": r.sent, "bbox": [float(v) for v in r.bbox], "width": float(r.width),
                               "height": float(r.height)}))
    return samples


def caption(path: Path) -> list[Sample]:
    if path.suffix == ".json":  # COCO captions: images + annotations
        data = load_json(path, CocoCaptions)
        refs: dict = {}
        for ann in data.annotations:
            refs.setdefault(ann.image_id, []).append(ann.caption)
        samples = []
        for img in data.images:
            if img.id not in refs:
                raise EvalDataError(f"{path}: image {img.id} has no reference caption")
            samples.append(Sample(str(img.id), img.file_name, {"captions": refs[img.id]}))
        return samples
    return [Sample(str(n if r.image_id is None else r.image_id), r.image, {"captions": r.captions})
            for n, r in records(path, CaptionRecord)]


def vqa(path: Path, annotations: Path | None = None, image_pattern: str | None = None) -> list[Sample]:
    if annotations is not None:  # VQAv2 as published: questions JSON + annotations JSON
        questions, answers = load_json(path, VqaQuestions), load_json(annotations, VqaAnnotations)
        pattern = image_pattern or f"COCO_{questions.data_subtype}_{{image_id:012d}}.jpg"
        try:
            pattern.format(image_id=0)
        except (KeyError, IndexError, ValueError) as e:
            raise EvalDataError(f"--image-pattern {pattern!r}: not a pattern of {{image_id}} ({e!r})") from None
        by_id = {a.question_id: a for a in answers.annotations}
        samples = []
        for q in questions.questions:
            ann = by_id.get(q.question_id)
            if ann is None:
                raise EvalDataError(f"{annotations}: no annotation for question {q.question_id}")
            samples.append(Sample(str(q.question_id), pattern.format(image_id=q.image_id), {
                "question": q.question, "answers": [a.answer for a in ann.answers],
                "question_type": ann.question_type, "answer_type": ann.answer_type}))
        return samples
    samples = []
    for n, r in records(path, VqaRecord):
        refs = r.answers if r.answers is not None else r.answer
        if refs is None:
            raise EvalDataError(f"{path}:{n}: needs 'answers' (a list of strings) or 'answer'")
        samples.append(Sample(str(n if r.question_id is None else r.question_id), r.image, {
            "question": r.question, "answers": [refs] if isinstance(refs, str) else refs,
            "question_type": r.question_type, "answer_type": r.answer_type}))
    return samples


def predictions(path: Path) -> list[tuple[int, Prediction]]:
    """Answers made elsewhere, one ``{id|question_id|image_id, answer|caption}`` a line."""
    rows = []
    for n, row in records(path, Prediction):
        if row.answer is None and row.caption is None:
            raise EvalDataError(f"{path}:{n}: needs an 'answer' (or 'caption') string")
        rows.append((n, row))
    return rows


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
