"""qvl's records as the JSON datasets of ms-swift and LLaMA-Factory, for users who keep their
trainer and take qvl's data.

The text is rendered by the same code as ``qvl format`` (``families.convert`` for
conversations, the multitask renderers for annotations), so boxes are already in the
target model's convention: token boxes 0-1000 for Qwen2-VL, JSON ``bbox_2d`` in pixels of the
*resized* image for Qwen2.5-VL, JSON 0-1000 for Qwen3-VL. The resize is the one the target
tool will apply: ms-swift hands the image to the model's processor (``smart_resize`` within
``MAX_PIXELS``/``MIN_PIXELS``); LLaMA-Factory first shrinks it to ``image_max_pixels``
(768×768 by default) and grows it to ``image_min_pixels``, then the processor resizes. Set
the same bounds in the trainer as here (``export.json`` says which).

Boxes are written as text, not as ms-swift's ``<bbox>`` placeholders with ``objects``: those
are re-rendered by ms-swift's template, whose output depends on its version and its
``QWENVL_BBOX_FORMAT`` setting — the path of the coordinate bugs users report. Written as text,
what the model reads is what qvl checked against the released processors.

A text field that holds one of the model's special tokens or an ``<image>`` placeholder is
refused (``special_token_in_text``): those tools tokenize special tokens inside text as the
tokens themselves, so such a caption would forge structure. Every record is in the output or
in ``rejects.jsonl`` with its reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from qvl import storage
from qvl.boundary import MAX_SIDE, Id, convert
from qvl.errors import RecordError
from qvl.formats import chatml, families, multitask
from qvl.formats.boxes import AnnotationError
from qvl.formats.build import FormatInputError, file_records
from qvl.formats.families import Family
from qvl.formats.images import ImageStore
from qvl.formats.sequence import Plan, Tag
from qvl.formats.tokenizers import IMG_END, IMG_START, SPECIAL_TOKENS, load_tokenizer
from qvl.progress import progress_bar
from qvl.recipes import require

TARGETS = ("ms-swift", "llamafactory")
PLACEHOLDER = "<image>"
KIND = "export"
# LLaMA-Factory's own pre-resize bounds (its ProcessorArguments defaults)
LLAMAFACTORY_MAX_PIXELS, LLAMAFACTORY_MIN_PIXELS = 768 * 768, 32 * 32
MAX_SETTING_PIXELS = MAX_SIDE * MAX_SIDE  # any pixel bound beyond the largest image side squared means nothing


@dataclass
class ExportSettings:
    target: str = "ms-swift"
    model: str = "qwen2.5-vl"
    min_image_pixels: int | None = None  # the processor's bounds (None: the released processor's)
    max_image_pixels: int | None = None
    tool_max_pixels: int = LLAMAFACTORY_MAX_PIXELS  # LLaMA-Factory's image_max_pixels / image_min_pixels
    tool_min_pixels: int = LLAMAFACTORY_MIN_PIXELS
    max_pixels: int = 64_000_000  # the decode guard of #9: larger images are refused

    def __post_init__(self):
        require(self.target in TARGETS, "target", f"{self.target!r}: use {', '.join(TARGETS)} (--to)")
        require(self.model in families.MODELS, "model", f"{self.model!r}: use {', '.join(families.MODELS)}")
        for key in ("tool_max_pixels", "tool_min_pixels", "max_pixels", "min_image_pixels", "max_image_pixels"):
            value = getattr(self, key)
            require(value is None and key.endswith("image_pixels") or
                    isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_SETTING_PIXELS,
                    key, f"{value!r}: must be a whole number of pixels from 1 to {MAX_SETTING_PIXELS}")
        require(self.tool_min_pixels <= self.tool_max_pixels, "tool_min_pixels",
                f"{self.tool_min_pixels}: more than tool_max_pixels ({self.tool_max_pixels})")
        require(self.min_image_pixels is None or self.max_image_pixels is None
                or self.min_image_pixels <= self.max_image_pixels, "min_image_pixels",
                f"{self.min_image_pixels}: more than max_image_pixels ({self.max_image_pixels})")


def tool_resize(width: int, height: int, max_pixels: int, min_pixels: int) -> tuple[int, int]:
    """LLaMA-Factory's ``_preprocess_image``: shrink to ``max_pixels``, grow to ``min_pixels``
    (each side truncated), before the processor's own resize. An image the shrink leaves no
    row or column of is one the tool cannot load: a reject, never a division by zero."""
    if width * height > max_pixels:
        factor = math.sqrt(max_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
        if width < 1 or height < 1:
            raise AnnotationError(f"LLaMA-Factory's image_max_pixels {max_pixels} shrinks this image to "
                                  f"{width}x{height}", "bad_image_size")
    if width * height < min_pixels:
        factor = math.sqrt(min_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    return width, height


class _Transcript(Plan):
    """A plan that keeps text instead of tokens: what the multitask renderers say, as one
    user turn (prompt) and one assistant turn (target); framing tokens are the tool's job."""

    def __init__(self, sample_id: str, task: str, source: str, forbidden: tuple[str, ...]):
        super().__init__(sample_id, task, source)
        self.user, self.assistant = [], []
        self.forbidden = forbidden

    def ids(self, ids, supervised: bool) -> None:
        pass

    def text(self, text: str, supervised: bool) -> None:
        self._check(text)
        (self.assistant if supervised else self.user).append(text)

    def image(self, ref: str, supervised: bool, tok, image_tokens) -> None:
        self.images.append(ref)
        self.user.append(PLACEHOLDER)

    def structured(self, segments: list, supervised: bool, tok) -> None:
        for segment in segments:
            if isinstance(segment, Tag):
                (self.assistant if supervised else self.user).append(str(segment))
            else:
                self.text(segment, supervised)

    def _check(self, text: str) -> None:
        found = next((t for t in self.forbidden if t in text), None)
        if found is not None:
            raise AnnotationError(f"a text field holds {found!r}, which the trainer would read as that token",
                                  "special_token_in_text")


def _forbidden(fam: Family | None, markup: bool = False) -> tuple[str, ...]:
    """What a record's own text may not hold: the model's special tokens and the placeholder.
    In a Qwen-VL conversation (``markup``) the grounding tags and image spans are its markup."""
    if fam is not None:
        return (PLACEHOLDER, *fam.specials)
    allowed = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", IMG_START, IMG_END) if markup else ()
    return (PLACEHOLDER, *(t for t in SPECIAL_TOKENS if t not in allowed))


def _conversation(record: dict, fam: Family | None, resized_of) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """(system, [(role, text)], image refs) of a conversation in the model's conventions."""
    conv = chatml.parse(record)
    forbidden = _forbidden(fam, markup=True)
    for text in [conv.system or "", *(content for _, content in conv.turns)]:
        found = next((t for t in forbidden if t in text), None)
        if found is not None:
            raise AnnotationError(f"a turn holds {found!r}, which the trainer would read as that token",
                                  "special_token_in_text")
    turns, refs, last_image = [], [], None
    for role, content in conv.turns:
        # the tools write Qwen-VL's picture labels themselves: only the families' conversion keeps none either
        text = families.strip_picture_labels(content) if fam is None else \
            families.convert(content, fam, resized_of, last_image)
        out, pos = [], 0
        while (start := text.find(IMG_START, pos)) >= 0 and (end := text.find(IMG_END, start)) >= 0:
            out += [text[pos:start], PLACEHOLDER]
            refs.append(text[start + len(IMG_START):end].strip())
            pos = end + len(IMG_END)
        out.append(text[pos:])
        turns.append((role, "".join(out)))
        last_image = refs[-1] if refs else last_image
    return conv.system, turns, refs


def run_export(inputs: list[Path], out: Path, images: Path | None = None, downloads: Path | None = None,
               settings: ExportSettings | None = None, overwrite: bool = False, show_progress: bool = True,
               records: Iterable[tuple[str, int, str, dict | AnnotationError]] | None = None) -> dict:
    """Write ``out``/data.jsonl (+ LLaMA-Factory's dataset_info.json), rejects.jsonl and export.json."""
    settings = settings or ExportSettings()
    for folder, option in ((images, "--images"), (downloads, "--downloads")):
        if folder is not None and not Path(folder).is_dir():
            raise FormatInputError(f"{option} {folder}: no such folder")
    fam = None if settings.model == "qwen-vl" else families.family(settings.model)
    store = ImageStore(images, downloads, settings.max_pixels)
    if storage.claim(out, KIND, create=False) and not overwrite:
        raise FileExistsError(f"{out}: holds a qvl export; choose another --out or --overwrite")
    storage.remove_stale(out)  # what a killed export left beside ``out``
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "images").mkdir(parents=True)
    except OSError as e:
        raise storage.OutputError(f"{out}: cannot write beside it ({e.strerror})") from None
    lf = settings.target == "llamafactory"

    def resized_of(ref: str) -> tuple[int, int]:
        width, height = store.size(ref)
        if lf:
            width, height = tool_resize(width, height, settings.tool_max_pixels, settings.tool_min_pixels)
        return families.image_tokens(fam, width, height, settings.min_image_pixels, settings.max_image_pixels)[1]

    tok = load_tokenizer(settings.model, settings.model)  # the renderers' framing ids, never written
    ctx = multitask.Context(tok, 0, store.size, fam, resized_of)
    counts: Counter = Counter()
    rejected: Counter = Counter()
    written: dict[str, str] = {}

    def image_file(ref: str) -> str:
        """An absolute path the trainer can open: the file under --images, or the image of a
        URL taken out of the img2dataset output into ``out``/images."""
        if ref not in written:
            data, _ = store.read(ref)  # checked to decode, within the pixel guard
            if ref.startswith(("http://", "https://")):
                name = hashlib.sha1(ref.encode()).hexdigest() + ".jpg"
                storage.write_bytes(tmp / "images" / name, data)
                written[ref] = str((out / "images" / name).resolve())
            else:
                written[ref] = str(store.local_path(ref))
        return written[ref]

    records = file_records(inputs) if records is None else records
    try:
        with open(tmp / "data.jsonl", "w", encoding="utf-8") as data, \
                open(tmp / "rejects.jsonl", "w", encoding="utf-8") as rejects, \
                progress_bar(disable=not show_progress) as bar:
            task = bar.add_task(f"export {settings.target}", total=None, unit="records")
            for path, line, sample_id, record in records:
                counts["records"] += 1
                bar.advance(task)
                try:
                    if isinstance(record, AnnotationError):
                        raise record
                    _checked(record)
                    if record.get("id") is not None:
                        sample_id = str(record["id"])
                    if "task" in record:
                        if record.get("task") == "text":
                            raise AnnotationError("pure text is pre-training data, not a chat record",
                                                  "unsupported_for_export")
                        plan = _Transcript(sample_id, str(record.get("task")), "", _forbidden(fam))
                        multitask.RENDERERS.get(record.get("task"), _unknown)(plan, record, ctx)
                        system, refs = None, plan.images
                        turns = [("user", "".join(plan.user)), ("assistant", "".join(plan.assistant).strip())]
                        kind = plan.task
                    else:
                        system, turns, refs = _conversation(record, fam, resized_of)
                        kind = "sft"
                    files = [image_file(ref) for ref in refs]
                except AnnotationError as e:
                    rejects.write(json.dumps({"file": path, "line": line, "id": sample_id, "reason": e.reason,
                                              "detail": str(e)}, ensure_ascii=False) + "\n")
                    rejected[e.reason] += 1
                    continue
                messages = ([{"role": "system", "content": system}] if system is not None else []) + \
                    [{"role": role, "content": text} for role, text in turns]
                data.write(json.dumps({"id": sample_id, "messages": messages, "images": files},
                                      ensure_ascii=False) + "\n")
                counts["samples"] += 1
                counts[f"task:{kind}"] += 1
                counts["images"] += len(files)
        if not any((tmp / "images").iterdir()):
            (tmp / "images").rmdir()
        if counts["records"] != counts["samples"] + sum(rejected.values()):
            raise AssertionError("export: records lost between input and output")
        if lf:
            storage.write_json(tmp / "dataset_info.json", {"qvl": {
                "file_name": "data.jsonl", "formatting": "sharegpt",
                "columns": {"messages": "messages", "images": "images"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant", "system_tag": "system"}}})
        report = {
            "target": settings.target, "model": settings.model,
            "records": counts["records"], "samples": counts["samples"], "images": counts["images"],
            "rejected": sum(rejected.values()), "rejected_by_reason": dict(sorted(rejected.items())),
            "by_task": {k[5:]: v for k, v in sorted(counts.items()) if k.startswith("task:")},
            "inputs": [str(p) for p in inputs],
            "resize": _resize_note(settings, fam),
        }
        storage.write_json(tmp / "export.json", report)
        storage.write_json(tmp / storage.MARKER, {"kind": KIND})
        if out.exists():
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        return report
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _checked(record: dict) -> None:
    """What export itself reads of a record, typed: its text valid Unicode (a lone surrogate
    is ``bad_text``, of this record only), an ``id`` that is a string or a 64-bit integer, a
    ``task`` that is a string. The renderers check the rest."""
    convert(record, dict, "bad_field")
    for key, kind in (("id", str | Id | None), ("task", str)):
        if key in record:
            try:
                convert(record[key], kind)
            except RecordError as e:
                raise RecordError(f"$.{key}: {e}", "bad_field") from None


def _unknown(plan, record, ctx):
    raise AnnotationError(f"unknown task {record.get('task')!r} (use {', '.join(multitask.RENDERERS)})",
                          "unknown_task")


def _resize_note(settings: ExportSettings, fam: Family | None) -> dict:
    """The bounds the boxes were computed with: the trainer must use the same."""
    if fam is None:
        return {}
    low, high = settings.min_image_pixels or fam.min_pixels, settings.max_image_pixels or fam.max_pixels
    if settings.target == "llamafactory":
        return {"image_max_pixels": settings.tool_max_pixels, "image_min_pixels": settings.tool_min_pixels,
                "processor_min_pixels": low, "processor_max_pixels": high,
                "set": f"image_max_pixels: {settings.tool_max_pixels} and image_min_pixels: "
                       f"{settings.tool_min_pixels} in the LLaMA-Factory config"}
    return {"min_pixels": low, "max_pixels": high,
            "set": f"MAX_PIXELS={high} MIN_PIXELS={low} in ms-swift's environment"}
