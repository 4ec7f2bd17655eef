"""``refcoco``: RefCOCO / RefCOCO+ / RefCOCOg as published — ``refs(unc).p``, ``refs(umd).p`` or
``refs(google).p`` (a pickle) beside the dataset's ``instances.json``.

Each sentence of each ref of the chosen split (``--split``, default ``train``; chosen as the refer
API's ``getRefIds(split=...)`` chooses: ``test`` is ``testA`` and ``testB`` together) gives a
``ref_grounding`` sample (the sentence -> the box) and a ``grounded_caption`` sample (the
box -> the sentence); several sentences of one ref are several samples. The box is the ref's
annotation's COCO ``bbox``: ``xywh`` pixels, checked against the image's width and height from
``instances.json``. A ref's ``file_name`` carries an annotation suffix
(``COCO_train2014_000000581857_16.jpg`` is image 581857): the image is ``instances.json``'s own
``file_name`` for the ref's ``image_id`` under ``--images``.

The pickle is read by a restricted unpickler that admits only plain containers, strings and
numbers: a pickle that asks for any class or function is an error naming the file — a
downloaded pickle is never ``pickle.load``-ed. Its opcodes are read first (``pickletools``
executes and allocates nothing): one outside plain values, or a memo index or frame size the
file cannot account for (CPython sizes its memo by the largest index: 9 bytes could ask for
32 GB), is refused before anything is unpickled. Refs of other splits are passed over; every ref
of the split (or whose split cannot be read) is a sample or a reject.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from pathlib import Path
from typing import Annotated

import msgspec

from qvl.boundary import MAX_ITEMS, Coord, Id, IntSide
from qvl.errors import AnnotationError
from qvl.formats.importers import (
    Importer,
    LayoutFileError,
    Options,
    Yield,
    decode,
    keyed,
    load_json,
)


class Sentence(msgspec.Struct):
    sent: str
    sent_id: Id | None = None


class Ref(msgspec.Struct):
    image_id: Id
    ann_id: Id
    split: str  # a ref whose split cannot be read belongs to none: a reject
    sentences: Annotated[list[Sentence], msgspec.Meta(min_length=1, max_length=MAX_ITEMS)]
    ref_id: Id | None = None


class Image(msgspec.Struct):
    id: Id
    file_name: str
    width: IntSide
    height: IntSide


class Instance(msgspec.Struct):
    id: Id
    bbox: Annotated[list[Coord], msgspec.Meta(min_length=4, max_length=4)]


class PlainUnpickler(pickle.Unpickler):
    """Containers, strings and numbers only; anything that names a global is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refuses {module}.{name}: only plain containers, strings and numbers")


# The opcodes of plain containers, strings, numbers and the memo: all that a refs file holds.
PLAIN_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP",
    "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
    "EMPTY_LIST", "APPEND", "APPENDS", "LIST", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_SET", "ADDITEMS", "FROZENSET",
    "PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET", "MEMOIZE",
})
MEMO_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"})


def check_opcodes(data: bytes) -> None:
    """Refuse (``UnpicklingError``) a pickle with an opcode outside ``PLAIN_OPCODES``, a memo
    index beyond the opcodes read so far (a pickler numbers its memo 0, 1, 2, ...) or a frame
    longer than the file. Linear: ``genops`` only reads, and a length past the end of the
    data is its ``ValueError``."""
    for count, (op, arg, pos) in enumerate(pickletools.genops(io.BytesIO(data))):
        if op.name not in PLAIN_OPCODES:
            raise pickle.UnpicklingError(f"refuses opcode {op.name} at byte {pos}: only plain containers, "
                                         "strings and numbers")
        if op.name in MEMO_OPCODES and (not isinstance(arg, int) or not 0 <= arg <= count):
            raise pickle.UnpicklingError(f"memo index {arg} at byte {pos} is beyond the {count} opcodes before it")
        if op.name == "FRAME" and arg > len(data):
            raise pickle.UnpicklingError(f"frame of {arg} bytes at byte {pos} in a file of {len(data)}")


# The splits ``REFER.getRefIds`` takes (lichengunc/refer, refer.py): ``test`` is every test split,
# ``testA`` every split naming A (RefClef's ``testAB`` too); any other name it refuses.
SPLITS = ("train", "val", "test", "testA", "testB", "testC", "testAB", "testBC", "testAC")


def in_split(ref_split: str, asked: str) -> bool:
    if asked in ("testA", "testB", "testC"):
        return asked[-1] in ref_split
    if asked == "test":
        return "test" in ref_split
    return ref_split == asked


def load_refs(path: Path) -> list:
    try:
        data = path.read_bytes()
        check_opcodes(data)
        data = PlainUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            OverflowError, MemoryError, RecursionError) as e:
        raise LayoutFileError(f"{path}: not a plain refs pickle ({str(e)[:200] or type(e).__name__})") from None
    except OSError as e:
        raise LayoutFileError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, list):
        raise LayoutFileError(f"{path}: a refs file holds a list of refs")
    return data


def read(files: list[Path], opts: Options) -> Yield:
    pickles = [p for p in files if p.suffix == ".p"]
    instances = [p for p in files if p.suffix == ".json"]
    if len(pickles) != 1 or len(instances) != 1:
        raise LayoutFileError("refcoco takes one refs(*).p and one instances.json")
    refs = load_refs(pickles[0])
    coco = load_json(instances[0])
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list) \
            or not isinstance(coco.get("annotations"), list):
        raise LayoutFileError(f"{instances[0]}: not a COCO instances file (no 'images' and 'annotations' lists)")
    images = keyed(coco["images"], Image, lambda img: img.id, f"image in {instances[0].name}")
    boxes = keyed(coco["annotations"], Instance, lambda ann: ann.id, f"annotation in {instances[0].name}")
    split = opts.split or "train"  # one of SPLITS: records() checked it
    where = str(pickles[0])
    for i, raw in enumerate(refs):
        if isinstance(raw, dict) and isinstance(raw.get("split"), str) and not in_split(raw["split"], split):
            continue  # another split's
        try:
            ref = decode(raw, Ref, f"ref {i}")
            image, box = images.get(ref.image_id), boxes.get(ref.ann_id)
            for found in (image, box):
                if isinstance(found, AnnotationError):
                    raise AnnotationError(f"ref {ref.ref_id}: {found}", found.reason)
            if image is None or box is None:
                raise AnnotationError(f"ref {ref.ref_id}: image {ref.image_id} or annotation {ref.ann_id} not in "
                                      f"{instances[0].name}", "missing_image")
        except AnnotationError as e:
            yield where, i, e
            continue
        common = {"image": image.file_name, "width": image.width, "height": image.height, "box": box.bbox,
                  "box_format": "xywh", "source": "refcoco"}
        for k, sentence in enumerate(ref.sentences):
            if not sentence.sent.strip():
                yield where, i, AnnotationError(f"ref {ref.ref_id} sentence {k}: no text")
                continue
            sid = sentence.sent_id if sentence.sent_id is not None else k
            if "ref_grounding" in opts.tasks:
                yield where, i, {"task": "ref_grounding", "id": f"refcoco:{ref.ref_id}:{sid}", "ref": sentence.sent,
                                 **common}
            if "grounded_caption" in opts.tasks:
                yield where, i, {"task": "grounded_caption", "id": f"refcoco:{ref.ref_id}:{sid}:caption",
                                 "caption": sentence.sent, **common}


IMPORTER = Importer("refcoco", ("ref_grounding", "grounded_caption"), read, "refs(*).p + instances.json", SPLITS)
