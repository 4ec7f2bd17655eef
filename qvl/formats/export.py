"""qvl's records as the JSON datasets of ms-swift and LLaMA-Factory, for users who keep their
trainer and take qvl's data.

The text is rendered by the same code as ``qvl format`` (``markup.convert`` for
conversations, the multitask renderers for annotations), so boxes are already in the
target model's convention: token boxes 0-1000 for Qwen2-VL, JSON ``bbox_2d`` in pixels of the
*resized* image for Qwen2.5-VL, JSON 0-1000 for Qwen3-VL. The resize is the one the target
tool applies (read from ms-swift 4.6 and LLaMA-Factory 0.9.5, and checked against them in
tests/interop):

- ms-swift does **not** hand the raw image to the model's processor. Its Qwen-VL templates
  resize it first with ``qwen_vl_utils.fetch_image`` (``qwen_vl_utils.smart_resize``: each side
  ``max(factor, round(side / factor) * factor)``, so a side under ``factor`` / 2 becomes
  ``factor`` instead of 0; the area brought within ``[min_pixels, max_pixels]``), then call the
  processor with ``do_resize=False``. The bounds come from the environment: ``MAX_PIXELS`` and
  ``MIN_PIXELS``, which ms-swift turns into whole tokens (``value // factor**2``) — the export
  floors its bounds the same way and writes the values to set (``swift.env``, ``export.json``).
  ms-swift needs ``qwen-vl-utils`` (and ``decord``) for these models and does not declare them.
- LLaMA-Factory first shrinks the image to ``image_max_pixels`` (768×768 by default) and grows
  it to ``image_min_pixels`` (each side truncated), its Qwen2-VL/Qwen3-VL plugin then stretches
  a side under 28 px to 28 and clamps an aspect ratio over 200 (the long side to 180 times the
  short), and the processor's ``smart_resize`` follows (``llamafactory.yaml``, ``export.json``).

Set the same bounds in the trainer as here: ``qvl format export --check DIR --to TOOL``
re-derives every record's size the way the tool will run and reports each record whose boxes
would move. Image paths in ``data.jsonl`` are relative to the export folder (the images are
linked or copied into ``images/``), so an export can move: LLaMA-Factory's ``media_dir``
defaults to its ``dataset_dir`` (the export), ms-swift opens a relative path from its working
directory or under ``ROOT_IMAGE_DIR`` (``swift.env`` sets it to the export).

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
import shlex
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qvl.boundary import (
    MAX_SIDE,
    Id,
    convert,
)
from qvl.common import storage
from qvl.errors import AnnotationError, RecordError
from qvl.formats import families
from qvl.formats.families import IMG_END, IMG_START, TAGS, Family, vision
from qvl.formats.images import ImageStore
from qvl.formats.records import Record, check_folders, each_record, file_records
from qvl.formats.render import chatml, markup, multitask
from qvl.formats.render.sequence import Plan, Tag
from qvl.formats.tokenizers import load_tokenizer
from qvl.recipes import require

TARGETS = ("ms-swift", "llamafactory")
PLACEHOLDER = "<image>"
KIND = "export"
# LLaMA-Factory's own pre-resize bounds (its ProcessorArguments defaults)
LLAMAFACTORY_MAX_PIXELS, LLAMAFACTORY_MIN_PIXELS = 768 * 768, 32 * 32
LLAMAFACTORY_MIN_SIDE = 28  # Qwen2VLPlugin._preprocess_image stretches a shorter side to this
# qwen_vl_utils' IMAGE_MIN_TOKEN_NUM / IMAGE_MAX_TOKEN_NUM: ms-swift's bounds with no MIN_PIXELS/MAX_PIXELS set
SWIFT_DEFAULT_TOKENS = (4, 16384)
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
    """LLaMA-Factory's ``Qwen2VLPlugin._preprocess_image`` (Qwen3-VL's plugin inherits it):
    the base plugin's shrink to ``max_pixels`` and growth to ``min_pixels`` (each side
    truncated), then a side under 28 px stretched to 28 and an aspect ratio over 200 clamped
    (the long side set to 180 times the short) — before the processor's own resize. An image
    the shrink leaves no row or column of is one the tool cannot load: a reject, never a
    division by zero."""
    if width * height > max_pixels:
        factor = math.sqrt(max_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
        if width < 1 or height < 1:
            raise AnnotationError(f"LLaMA-Factory's image_max_pixels {max_pixels} shrinks this image to "
                                  f"{width}x{height}", "bad_image_size")
    if width * height < min_pixels:
        factor = math.sqrt(min_pixels / (width * height))
        width, height = int(width * factor), int(height * factor)
    if min(width, height) < LLAMAFACTORY_MIN_SIDE:
        width, height = max(width, LLAMAFACTORY_MIN_SIDE), max(height, LLAMAFACTORY_MIN_SIDE)
    if width / height > 200:
        width = height * 180
    if height / width > 200:
        height = width * 180
    return width, height


def swift_bounds(fam: Family, min_pixels: int | None = None, max_pixels: int | None = None) -> tuple[int, int]:
    """(MIN_PIXELS, MAX_PIXELS) as ms-swift uses them: ``compat_qwen_vl_utils`` turns each into
    whole tokens (``value // factor**2``), qwen_vl_utils multiplies back — floored to a multiple
    of ``factor``². None: the released processor's bound."""
    low, high = vision.pixel_bounds(fam, min_pixels, max_pixels)
    square = fam.factor * fam.factor
    return low // square * square, high // square * square


def swift_resize(fam: Family, width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size ms-swift feeds the model: ``qwen_vl_utils.smart_resize`` (0.0.14) of the image
    within ``MIN_PIXELS``/``MAX_PIXELS`` (floored as ``swift_bounds``), which the processor then
    takes as it is (``do_resize=False``). Unlike the processor's, a side rounds to at least one
    ``factor``; a shrink may round a side to 0, which the tool cannot feed: refused."""
    factor = fam.factor
    square = factor * factor
    low, high = min_pixels // square * square, max_pixels // square * square
    if min(width, height) < 1:
        raise AnnotationError(f"image {width}x{height}: a side of no pixels", "bad_image_size")
    if max(width, height) / min(width, height) > 200:
        raise AnnotationError(f"image {width}x{height}: aspect ratio over 200 (qwen_vl_utils refuses it)",
                              "bad_image_size")
    h_bar, w_bar = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h_bar * w_bar > high:
        beta = math.sqrt(height * width / high)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < low:
        beta = math.sqrt(low / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    if h_bar < factor or w_bar < factor:
        raise AnnotationError(f"ms-swift's qwen_vl_utils resizes this {width}x{height} image to {w_bar}x{h_bar} "
                              f"within MAX_PIXELS {high}", "bad_image_size")
    return w_bar, h_bar


@dataclass(frozen=True)
class ToolBounds:
    """What decides the size a tool feeds the model: ms-swift's MIN_PIXELS/MAX_PIXELS
    (``min_pixels``/``max_pixels``); LLaMA-Factory's image_min_pixels/image_max_pixels
    (``min_pixels``/``max_pixels``) and its processor's own bounds."""

    target: str
    min_pixels: int
    max_pixels: int
    processor_min_pixels: int | None = None
    processor_max_pixels: int | None = None


def tool_bounds(settings: ExportSettings, fam: Family) -> ToolBounds:
    if settings.target == "ms-swift":
        return ToolBounds("ms-swift", *swift_bounds(fam, settings.min_image_pixels, settings.max_image_pixels))
    low, high = vision.pixel_bounds(fam, settings.min_image_pixels, settings.max_image_pixels)
    return ToolBounds("llamafactory", settings.tool_min_pixels, settings.tool_max_pixels, low, high)


def fed_size(bounds: ToolBounds, fam: Family, width: int, height: int) -> tuple[int, int]:
    """(width, height) of the image the tool feeds the model for an image of this size: what
    Qwen2.5-VL's pixel boxes must be computed for."""
    if bounds.target == "ms-swift":
        return swift_resize(fam, width, height, bounds.min_pixels, bounds.max_pixels)
    width, height = tool_resize(width, height, bounds.max_pixels, bounds.min_pixels)
    return vision.image_tokens(fam, width, height, bounds.processor_min_pixels, bounds.processor_max_pixels)[1]


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


def _forbidden(fam: Family, markup: bool = False) -> tuple[str, ...]:
    """What a record's own text may not hold: the model's special tokens and the placeholder.
    In a conversation (``markup``) Qwen-VL's grounding tags and image spans are its markup."""
    allowed = TAGS if markup else ()
    return (PLACEHOLDER, *(t for t in fam.specials if t not in allowed))


def _conversation(record: dict, fam: Family, resized_of) -> tuple[str | None, list[tuple[str, str]], list[str]]:
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
        text = markup.convert(content, fam, resized_of, last_image)  # the tools write the picture labels themselves
        out, pos = [], 0
        while (start := text.find(IMG_START, pos)) >= 0 and (end := text.find(IMG_END, start)) >= 0:
            out += [text[pos:start], PLACEHOLDER]
            refs.append(text[start + len(IMG_START):end].strip())
            pos = end + len(IMG_END)
        out.append(text[pos:])
        turns.append((role, "".join(out)))
        last_image = refs[-1] if refs else last_image
    return conv.system, turns, refs


class _Export:
    """One run's records as the tool's messages (``convert``, the loop's step), written to
    ``data.jsonl`` with their images in ``images/`` (``write``), or to ``rejects.jsonl``."""

    def __init__(self, settings: ExportSettings, store: ImageStore):
        self.fam = fam = families.family(settings.model)
        self.store = store
        self.tmp: Path | None = None  # the output's temp folder and its two files, once open: bounds and
        self.data = self.rejects = None  # tokenizer are checked before
        self.bounds = tool_bounds(settings, fam) if fam.sized_images else None
        tok = load_tokenizer(settings.model, settings.model)  # the renderers' framing ids, never written
        self.ctx = multitask.Context(tok, 0, store.size, fam, self.resized_of)
        self.counts: Counter = Counter()
        self.rejected: Counter = Counter()
        self.written: dict[str, str] = {}

    def resized_of(self, ref: str) -> tuple[int, int]:
        return fed_size(self.bounds, self.fam, *self.store.size(ref))

    def image_file(self, ref: str) -> str:
        """A path relative to the export, so that it can move: a file under --images linked
        (or, across file systems, copied) to ``images/local/`` at its path under --images, the
        image of a URL taken out of the img2dataset output into ``images/web/``."""
        if ref not in self.written:
            data, _ = self.store.read(ref)  # checked to decode, within the pixel guard
            if ref.startswith(("http://", "https://")):
                name = f"images/web/{hashlib.sha1(ref.encode()).hexdigest()}.jpg"
                (self.tmp / name).parent.mkdir(parents=True, exist_ok=True)
                storage.write_bytes(self.tmp / name, data)
            else:
                source = self.store.local_path(ref)
                name = f"images/local/{source.relative_to(self.store.root).as_posix()}"
                target = self.tmp / name
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(source, target)
                    except OSError:
                        storage.write_bytes(target, data)
            self.written[ref] = name
        return self.written[ref]

    def convert(self, item: Record) -> tuple[str | None, list[tuple[str, str]], list[str], str]:
        """(system, turns, image files, task) of a record; its own id, once typed, is the one written."""
        record = item.data
        _checked(record)
        if record.get("id") is not None:
            item.id = str(record["id"])
        if "task" in record:
            if record.get("task") == "text":
                raise AnnotationError("pure text is pre-training data, not a chat record", "unsupported_for_export")
            plan = _Transcript(item.id, str(record.get("task")), "", _forbidden(self.fam))
            multitask.RENDERERS.get(record.get("task"), _unknown)(plan, record, self.ctx)
            system, refs = None, plan.images
            turns = [("user", "".join(plan.user)), ("assistant", "".join(plan.assistant).strip())]
            kind = plan.task
        else:
            system, turns, refs = _conversation(record, self.fam, self.resized_of)
            kind = "sft"
        files = [self.image_file(ref) for ref in refs]
        if self.bounds is not None:  # an image the tool refuses fails its record, boxes or not
            for ref in refs:
                self.resized_of(ref)
        return system, turns, files, kind

    def write(self, item: Record, converted: tuple[str | None, list[tuple[str, str]], list[str], str]) -> None:
        system, turns, files, kind = converted
        messages = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": role, "content": text} for role, text in turns]
        self.data.write(json.dumps({"id": item.id, "messages": messages, "images": files}, ensure_ascii=False) + "\n")
        self.counts["samples"] += 1
        self.counts[f"task:{kind}"] += 1
        self.counts["images"] += len(files)

    def reject(self, item: Record, error: AnnotationError) -> None:
        """A reject names the record's own id once read, else its default one (file:line)."""
        self.rejects.write(json.dumps({"file": item.file, "line": item.line, "id": item.id, "reason": error.reason,
                                       "detail": str(error)}, ensure_ascii=False) + "\n")
        self.rejected[error.reason] += 1


def run_export(inputs: list[Path], out: Path, images: Path | None = None, downloads: Path | None = None,
               settings: ExportSettings | None = None, overwrite: bool = False, show_progress: bool = True,
               records: Iterable[tuple[str, int, str, dict | AnnotationError]] | None = None) -> dict:
    """Write ``out``/data.jsonl (+ LLaMA-Factory's dataset_info.json), rejects.jsonl and export.json."""
    settings = settings or ExportSettings()
    check_folders(images, downloads)
    store = ImageStore(images, downloads, settings.max_pixels)
    if storage.claim(out, KIND, create=False) and not overwrite:
        raise FileExistsError(f"{out}: holds a qvl export; choose another --out or --overwrite")
    export = _Export(settings, store)
    records = file_records(inputs) if records is None else records
    with storage.replacing(out) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "data.jsonl", "w", encoding="utf-8") as data, \
                open(tmp / "rejects.jsonl", "w", encoding="utf-8") as rejects:
            export.tmp, export.data, export.rejects = tmp, data, rejects
            read = each_record(records, export.convert, export.write, export.reject, f"export {settings.target}",
                               "records", show_progress)
        counts, rejected = export.counts, export.rejected
        if not any((tmp / "images").iterdir()):
            (tmp / "images").rmdir()
        if read != counts["samples"] + sum(rejected.values()):
            raise AssertionError("export: records lost between input and output")
        if settings.target == "llamafactory":
            storage.write_json(tmp / "dataset_info.json", {"qvl": {
                "file_name": "data.jsonl", "formatting": "sharegpt",
                "columns": {"messages": "messages", "images": "images"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant", "system_tag": "system"}}})
        resize = _resize_note(settings, export.fam)
        _write_snippet(tmp, out, settings, resize)
        report = {
            "target": settings.target, "model": settings.model,
            "records": read, "samples": counts["samples"], "images": counts["images"],
            "rejected": sum(rejected.values()), "rejected_by_reason": dict(sorted(rejected.items())),
            "by_task": {k[5:]: v for k, v in sorted(counts.items()) if k.startswith("task:")},
            "inputs": [str(p) for p in inputs],
            "images_relative_to": "the export folder (LLaMA-Factory: dataset_dir/media_dir; ms-swift: ROOT_IMAGE_DIR "
                                  "or its working directory)",
            "resize": resize,
        }
        storage.write_json(tmp / "export.json", report)
        storage.write_json(tmp / storage.MARKER, {"kind": KIND})
    return report


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


def _resize_note(settings: ExportSettings, fam: Family) -> dict:
    """The bounds the boxes were computed with: the trainer must use the same."""
    if not fam.sized_images:
        return {}
    bounds = tool_bounds(settings, fam)
    if settings.target == "llamafactory":
        return {"image_max_pixels": bounds.max_pixels, "image_min_pixels": bounds.min_pixels,
                "processor_min_pixels": bounds.processor_min_pixels,
                "processor_max_pixels": bounds.processor_max_pixels,
                "yaml": {"image_max_pixels": bounds.max_pixels, "image_min_pixels": bounds.min_pixels},
                "set": f"image_max_pixels: {bounds.max_pixels} and image_min_pixels: {bounds.min_pixels} in the "
                       "LLaMA-Factory config (llamafactory.yaml)"}
    note = {"min_pixels": bounds.min_pixels, "max_pixels": bounds.max_pixels,
            "env": {"MAX_PIXELS": bounds.max_pixels, "MIN_PIXELS": bounds.min_pixels},
            "set": f"MAX_PIXELS={bounds.max_pixels} MIN_PIXELS={bounds.min_pixels} in ms-swift's environment "
                   "(swift.env)"}
    asked = vision.pixel_bounds(fam, settings.min_image_pixels, settings.max_image_pixels)
    if asked != (bounds.min_pixels, bounds.max_pixels):
        note["floored_from"] = {"min_pixels": asked[0], "max_pixels": asked[1],
                                "why": f"ms-swift counts the bounds in whole tokens of {fam.factor}x{fam.factor} px"}
    return note


LLAMAFACTORY_TEMPLATES = {"qwen2-vl": "qwen2_vl", "qwen2.5-vl": "qwen2_vl", "qwen3-vl": "qwen3_vl_nothink"}


def _write_snippet(tmp: Path, out: Path, settings: ExportSettings, resize: dict) -> None:
    """What the tool must be set to, where it reads it: ``swift.env`` (KEY=VALUE lines, for
    ``set -a; . swift.env; set +a`` or ``--env-file``) or ``llamafactory.yaml`` (keys to merge
    into the training config)."""
    where = out.resolve()
    if settings.target == "ms-swift":
        lines = ["# ms-swift settings for this export (written by qvl format export); load them before `swift sft`:",
                 "#   set -a; . ./swift.env; set +a",
                 "# ROOT_IMAGE_DIR: data.jsonl's image paths are relative to the export folder; set it to where",
                 "# the export is now if you move it (or run ms-swift from inside the export folder).",
                 f"ROOT_IMAGE_DIR={shlex.quote(str(where))}"]
        if resize:
            lines[4:4] = [(f"# MAX_PIXELS/MIN_PIXELS: the bounds the boxes were computed for ({settings.model}); "
                           "check with qvl format export --check DIR --to ms-swift")]
            lines += [f"MAX_PIXELS={resize['max_pixels']}", f"MIN_PIXELS={resize['min_pixels']}"]
        (tmp / "swift.env").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return
    lines = ["# LLaMA-Factory settings for this export (written by qvl format export): merge into the training yaml.",
             "# dataset_dir: this export (its dataset_info.json); the images are relative to it (media_dir's default).",
             "dataset: qvl", f"dataset_dir: {json.dumps(str(where))}"]
    if settings.model in LLAMAFACTORY_TEMPLATES:
        lines.append(f"template: {LLAMAFACTORY_TEMPLATES[settings.model]}")
    if resize:
        lines += ["# the bounds the boxes were computed for; check with qvl format export --check DIR --to llamafactory",
                  f"image_max_pixels: {resize['image_max_pixels']}", f"image_min_pixels: {resize['image_min_pixels']}"]
    (tmp / "llamafactory.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
