"""Where the records of `qvl format` and `qvl format export` come from: qvl's annotation files
(JSONL, a JSON list, parquet — a curated one too), one ``(file, line, default id, record)`` at a
time, a record that cannot be read arriving as its error, to become a reject; and the loop both
commands run over them (``each_record``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from qvl.common.inputs import DuplicateInput, input_names
from qvl.common.progress import progress_bar
from qvl.errors import AnnotationError, QvlError

MAX_LINE_BYTES = 64 << 20  # a JSONL record: far past any real one; a longer line is skipped unread
MAX_JSON_BYTES = 2 << 30  # a .json list is parsed whole: a bigger one must be JSONL


class FormatInputError(QvlError):
    """A whole input file cannot be read; the message names it."""


def iter_records(path: Path) -> Iterator[tuple[int, dict | AnnotationError]]:
    """(line, record) for JSONL (1-based lines), a JSON list (1-based item number), or
    parquet (1-based row); a line that is not a JSON object, or longer than MAX_LINE_BYTES,
    yields an error instead (the record's own fields are typed by its renderer)."""
    if not path.is_file():
        raise FormatInputError(f"{path}: not a regular file (a device, folder or pipe)" if path.exists()
                               else f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            table = pq.ParquetFile(path)
        except Exception as e:
            raise FormatInputError(f"{path}: not a readable parquet file ({e})") from None
        n = 0
        for batch in table.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield n, _curated_pair(row)
        return
    if suffix == ".json":
        if path.stat().st_size > MAX_JSON_BYTES:
            raise FormatInputError(f"{path}: {path.stat().st_size:,} bytes, over the {MAX_JSON_BYTES:,} a .json list "
                                   "may have (it is read whole): write it as JSONL, one record a line")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: a >4300-digit number too
            raise FormatInputError(f"{path}: not valid JSON ({str(e)[:200]})") from None
        if not isinstance(data, list):
            raise FormatInputError(f"{path}: a .json input must hold a list of records")
        for i, record in enumerate(data, start=1):
            yield i, record if isinstance(record, dict) else AnnotationError("not a JSON object", "malformed_json")
        return
    with open(path, "rb") as f:
        n = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            n += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):  # skipped, never held whole
                    pass
                yield n, AnnotationError(f"a line over {MAX_LINE_BYTES:,} bytes", "line_too_long")
                continue
            if not raw.strip():
                yield n, AnnotationError("empty line", "malformed_json")
                continue
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: a >4300-digit number too
                yield n, AnnotationError(f"not valid JSON: {str(e)[:200]}", "malformed_json")
                continue
            yield n, record if isinstance(record, dict) else AnnotationError("not a JSON object", "malformed_json")


def _curated_pair(row: dict) -> dict:
    """A kept row of `qvl curate filter` (url/text/lang) is a stage-1 caption sample."""
    if "task" in row:
        return row
    return {"task": "caption", "image": row.get("url"), "caption": row.get("text"),
            "lang": row.get("lang") if row.get("lang") in ("en", "zh") else "en",
            "id": row.get("row_id"), "source": row.get("source", "curated")}


def file_records(inputs: list[Path]) -> Iterator[tuple[str, int, str, dict | AnnotationError]]:
    """(file, line, default id, record) of qvl's own annotation files, ids named as in qvl.common.inputs."""
    try:
        names = input_names(inputs)
    except DuplicateInput as e:
        raise FormatInputError(str(e)) from None
    for path, name in zip(inputs, names):
        for line, record in iter_records(path):
            yield str(path), line, f"{name}:{line}", record


def given_id(record: dict, default: str) -> str:
    """The record's own id (text, or an integer) when it has a usable one, else ``default``;
    a wrong one is the typed record's to reject — the reject needs an id it can write."""
    given = record.get("id")
    if isinstance(given, bool) or not isinstance(given, (str, int)) or given == "":
        return default
    if isinstance(given, int):
        return str(given) if abs(given) < 1 << 63 else default
    return given if given.isascii() or _encodes(given) else default


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def check_folders(images: Path | None, downloads: Path | None) -> None:
    for folder, option in ((images, "--images"), (downloads, "--downloads")):
        if folder is not None and not Path(folder).is_dir():
            raise FormatInputError(f"{option} {folder}: no such folder")


@dataclass
class Record:
    """One record on its way through a command. ``id`` starts as the default one; the command's
    step sets the record's own once it has read it, and a reject carries whichever it holds."""

    file: str
    line: int
    id: str
    data: dict | AnnotationError


def each_record(records: Iterable[tuple[str, int, str, dict | AnnotationError]], step: Callable[[Record], Any],
                sink: Callable[[Record, Any], None], reject: Callable[[Record, AnnotationError], None],
                label: str, unit: str, show_progress: bool = True) -> int:
    """The record loop of `qvl format` and `qvl format export`: each record through ``step``
    into ``sink``, or — unreadable, or refused by ``step`` (a RecordError) — to ``reject``, so
    that every record lands in one of the two; one progress bar. Returns how many were read,
    for the commands' check that none was lost."""
    n = 0
    with progress_bar(disable=not show_progress) as bar:
        task = bar.add_task(label, total=None, unit=unit)
        for file, line, sample_id, data in records:
            n += 1
            bar.advance(task)
            record = Record(file, line, sample_id, data)
            try:
                if isinstance(data, AnnotationError):
                    raise data
                out = step(record)
            except AnnotationError as e:
                reject(record, e)
                continue
            sink(record, out)
    return n
