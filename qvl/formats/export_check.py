"""`qvl format export --check DIR --to TOOL`: re-derive every exported record's image sizes the
way ms-swift or LLaMA-Factory will run, against the sizes the export computed its boxes for."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import msgspec

from qvl.boundary import (
    MAX_ITEMS,
    Id,
    convert,
    decode_json,
    open_regular,
    read_json_file,
)
from qvl.errors import AnnotationError, QvlError, RecordError
from qvl.formats import families
from qvl.formats.export import (
    LLAMAFACTORY_MAX_PIXELS,
    LLAMAFACTORY_MIN_PIXELS,
    MAX_SETTING_PIXELS,
    PLACEHOLDER,
    SWIFT_DEFAULT_TOKENS,
    TARGETS,
    ToolBounds,
    fed_size,
)
from qvl.recipes import require, short


class CheckError(QvlError):
    """An export folder --check cannot read, or bounds it cannot check with."""


PixelBound = Annotated[int, msgspec.Meta(ge=1, le=MAX_SETTING_PIXELS)]
MAX_EXPORT_JSON = 1 << 20
MAX_CHECK_LINE = 64 << 20  # one data.jsonl record; an export writes a few KB


class _SwiftResize(msgspec.Struct):
    min_pixels: PixelBound
    max_pixels: PixelBound


class _LlamaFactoryResize(msgspec.Struct):
    image_min_pixels: PixelBound
    image_max_pixels: PixelBound
    processor_min_pixels: PixelBound
    processor_max_pixels: PixelBound


class _ExportReport(msgspec.Struct):
    """What --check reads of export.json: the target, the model and the bounds the boxes were
    computed for (``{}`` for a model whose boxes do not depend on the size)."""

    target: str
    model: str
    resize: dict[str, Any] = {}


class _Message(msgspec.Struct):
    role: str
    content: str


class _ExportedRecord(msgspec.Struct):
    messages: Annotated[list[_Message], msgspec.Meta(max_length=MAX_ITEMS)]
    images: Annotated[list[str], msgspec.Meta(max_length=MAX_ITEMS)] = []
    id: str | Id | None = None


def _bound(value: int | str | None, name: str, default: int) -> int:
    """A pixel bound from an option or the environment (``name`` says which), in range."""
    if value is None or value == "":
        return default
    shown = short(value)
    try:
        number = int(value) if isinstance(value, int) or len(value) <= 20 else None
    except ValueError:
        number = None
    if number is None:
        raise CheckError(f"{name}={shown}: not a whole number of pixels")
    if not 1 <= number <= MAX_SETTING_PIXELS:
        raise CheckError(f"{name}={shown}: must be a whole number of pixels from 1 to {MAX_SETTING_PIXELS}")
    return number


class _LlamaFactoryBounds(msgspec.Struct):
    """What --check reads of llamafactory.yaml: LLaMA-Factory takes whole numbers here (a
    string or a float would fail in its training run, not be read as one)."""

    image_min_pixels: PixelBound | None = None
    image_max_pixels: PixelBound | None = None


def _llamafactory_yaml(folder: Path) -> _LlamaFactoryBounds:
    """image_min_pixels / image_max_pixels as the export's llamafactory.yaml says (edited or
    not): the bounds the user merges into LLaMA-Factory's config."""
    from qvl.recipes import load_recipe

    path = folder / "llamafactory.yaml"
    if not path.exists():
        return _LlamaFactoryBounds()
    try:
        config = load_recipe(path)  # bounded, no aliases, nesting and 5000-digit integers refused
    except QvlError as e:  # its message names the file
        raise CheckError(str(e)) from None
    try:
        return convert({k: config[k] for k in ("image_min_pixels", "image_max_pixels") if k in config},
                       _LlamaFactoryBounds)
    except RecordError as e:
        raise CheckError(f"{path}: {e}") from None


def _exported_records(path: Path):
    """(line number, record) of an export's data.jsonl, each line decoded and typed, or one
    CheckError naming the file and line."""
    with open_regular(path, CheckError) as data:
        number = 0
        while True:
            line = data.readline(MAX_CHECK_LINE + 1)
            if not line:
                return
            number += 1
            if len(line) > MAX_CHECK_LINE:
                raise CheckError(f"{path}:{number}: a line longer than {MAX_CHECK_LINE >> 20} MiB")
            if number == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            if not line.strip():
                continue
            try:
                yield number, decode_json(line, _ExportedRecord)
            except RecordError as e:
                raise CheckError(f"{path}:{number}: {e}") from None


def _image_size(folder: Path, path: str) -> tuple[int, int] | str:
    """(width, height) from the image's header, or why the tool cannot open it. A relative path
    is the export's (as both tools resolve it from the export folder)."""
    from PIL import Image, UnidentifiedImageError

    full = Path(path) if Path(path).is_absolute() else folder / path
    try:
        if not full.is_file():  # never open a device or a FIFO: /dev/zero would never end
            return "no such image file"
    except OSError as e:  # a name too long for the file system
        return f"cannot open ({e.strerror})"
    try:
        with Image.open(full) as image:
            return image.size
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as e:
        return f"not an image the tool can open ({' '.join(str(e).split())[:200]})"


def run_check(folder: Path, target: str, min_pixels: int | None = None, max_pixels: int | None = None,
              environ: dict | None = None) -> dict:
    """Re-derive every record's image sizes the way ``target`` will run on export ``folder``
    (ms-swift: ``min_pixels``/``max_pixels`` as its MIN_PIXELS/MAX_PIXELS — default: the
    environment's, else qwen_vl_utils' own; LLaMA-Factory: as its image_min_pixels /
    image_max_pixels — default: the export's llamafactory.yaml, else LLaMA-Factory's own),
    against the sizes the export computed its boxes for. A record whose boxes are pixels
    (Qwen2.5-VL) and whose image the tool feeds at another size is ``moved``; one whose image
    the tool would refuse or cannot open is ``refused``; the others agree."""
    folder = Path(folder)
    environ = os.environ if environ is None else environ
    require(target in TARGETS, "target", f"{target!r}: use {', '.join(TARGETS)} (--to)")
    report = read_json_file(folder / "export.json", _ExportReport, MAX_EXPORT_JSON, CheckError,
                            " (export.json as qvl format export writes it)")
    if report.target != target:
        raise CheckError(f"{folder} was exported for {report.target}, not {target}")
    if report.model not in families.MODELS:
        raise CheckError(f"{folder / 'export.json'}: model {report.model!r} is none of {', '.join(families.MODELS)}")
    model = report.model
    out = {"folder": str(folder), "target": target, "model": model, "records": 0, "images": 0, "moved": [],
           "resized": 0, "refused": [], "ok": True}
    if not families.family(model).sized_images:
        return {**out, "note": f"{model}: sizes do not enter its boxes (nothing to check)"}
    fam = families.family(model)
    resize_type = _SwiftResize if target == "ms-swift" else _LlamaFactoryResize
    try:
        resize = convert(report.resize, resize_type)
    except RecordError as e:
        raise CheckError(f"{folder / 'export.json'}: resize: {e}") from None
    low_key, high_key = ("min_pixels", "max_pixels") if target == "ms-swift" else ("image_min_pixels", "image_max_pixels")
    if getattr(resize, low_key) > getattr(resize, high_key):
        raise CheckError(f"{folder / 'export.json'}: resize: {low_key} {getattr(resize, low_key)} is more than "
                         f"{high_key} {getattr(resize, high_key)}")
    if target == "ms-swift":
        exported = ToolBounds(target, resize.min_pixels, resize.max_pixels)
        square = fam.factor * fam.factor
        low = _bound(min_pixels, "--tool-min-pixels", 0) or \
            _bound(environ.get("MIN_PIXELS"), "MIN_PIXELS (environment)", SWIFT_DEFAULT_TOKENS[0] * square)
        high = _bound(max_pixels, "--tool-max-pixels", 0) or \
            _bound(environ.get("MAX_PIXELS"), "MAX_PIXELS (environment)", SWIFT_DEFAULT_TOKENS[1] * square)
        run = ToolBounds(target, low // square * square, high // square * square)
        if not square <= run.min_pixels <= run.max_pixels:
            raise CheckError(f"MIN_PIXELS {low} / MAX_PIXELS {high}: ms-swift takes {run.min_pixels // square} to "
                             f"{run.max_pixels // square} tokens of {fam.factor}x{fam.factor} px, which qwen_vl_utils "
                             "refuses (at least one token, min not above max)")
        out["run_with"] = {"MIN_PIXELS": run.min_pixels, "MAX_PIXELS": run.max_pixels}
    else:
        exported = ToolBounds(target, resize.image_min_pixels, resize.image_max_pixels,
                              resize.processor_min_pixels, resize.processor_max_pixels)
        config = _llamafactory_yaml(folder)
        low = _bound(min_pixels, "--tool-min-pixels", 0) or config.image_min_pixels or LLAMAFACTORY_MIN_PIXELS
        high = _bound(max_pixels, "--tool-max-pixels", 0) or config.image_max_pixels or LLAMAFACTORY_MAX_PIXELS
        if low > high:
            raise CheckError(f"image_min_pixels {low} is more than image_max_pixels {high}")
        run = ToolBounds(target, low, high, exported.processor_min_pixels, exported.processor_max_pixels)
        out["run_with"] = {"image_min_pixels": run.min_pixels, "image_max_pixels": run.max_pixels}
    out["exported_for"] = {k: v for k, v in vars(exported).items() if v is not None and k != "target"}
    pixel_boxes = fam.boxes == "json_pixels"
    sizes: dict[str, tuple[int, int] | str] = {}
    for _, record in _exported_records(folder / "data.jsonl"):
        out["records"] += 1
        boxed = pixel_boxes and any('"bbox_2d"' in m.content for m in record.messages if m.role == "assistant")
        placeholders = sum(m.content.count(PLACEHOLDER) for m in record.messages)
        if placeholders != len(record.images):  # both tools refuse such a record when they load it
            out["refused"].append({"id": record.id, "image": ", ".join(record.images)[:200],
                                   "reason": f"{placeholders} {PLACEHOLDER} placeholders for {len(record.images)} images"})
            continue
        for path in record.images:
            out["images"] += 1
            if path not in sizes:
                sizes[path] = _image_size(folder, path)
            size = sizes[path]
            if isinstance(size, str):
                out["refused"].append({"id": record.id, "image": path, "reason": size})
                continue
            try:
                assumed = fed_size(exported, fam, *size)
            except AnnotationError:
                assumed = None
            try:
                fed = fed_size(run, fam, *size)
            except AnnotationError as e:
                out["refused"].append({"id": record.id, "image": path, "reason": str(e)})
                continue
            if fed != assumed:
                out["resized"] += 1
                if boxed:
                    out["moved"].append({"id": record.id, "image": path, "boxes_for": assumed, "fed": fed})
    out["ok"] = not out["moved"] and not out["refused"]
    return out
