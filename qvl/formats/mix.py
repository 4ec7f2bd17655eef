"""`qvl format mix RECIPE.toml --out SHARDS`: the stage-2 mixture, drawn from its sources.

A recipe lists sources — a layout (an importer, or ``qvl`` for qvl's own annotation files),
its files, its images, the tasks to take — each with a sample ``count`` or a ``fraction`` of
what the source holds. A first pass counts each source's records; the draw then keeps a
record when a hash of (seed, source, record place) falls under its share, and repeats it
``floor(share)`` times when a source is asked for more than it holds — deterministic in the
seed, one record in memory at a time. Counts are met in expectation (binomial), not exactly.
Everything drawn goes through the same renderers, rejects and packing as `qvl format
multitask` (the paper packs same-task samples together: ``pack_to`` packs each task apart),
and the manifest reports samples and tokens per source and task. A ``qvl`` source's records of
tasks other than its ``tasks`` are passed over and counted (``skipped_by_task``); a source
with no record of its tasks is an error, not an empty share. A recipe is checked before
any sample is drawn: known keys of their types, text that is valid Unicode, a ``fraction``
from 0 to 1000 and a ``count`` of at most 1000 copies of each record its source holds (more is
a typo, and output without bound).

Relative paths in a recipe (``files``, ``images``, ``downloads``) are relative to the recipe's
own folder, as in a Makefile or a pyproject: a recipe means the same data from any working
directory. A source's files must exist, each listed once (twice would double-count it); an
error in a source names the recipe and the source.

    [mix]
    seed = 0
    pack_to = 2048

    [[source]]
    name = "coco"
    layout = "coco-captions"
    files = ["annotations/captions_train2014.json"]
    images = "coco/train2014"
    count = 500000
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from qvl.boundary import MAX_ID, convert
from qvl.common import remote
from qvl.errors import AnnotationError, RecordError
from qvl.recipes import RecipeError, SettingError, fill, load_recipe, require, table

MAX_REPEAT = 1000  # copies of one record a source may ask for: more is a typo, and unbounded output
MAX_COUNT = 1 << 40  # samples one source may ask for


@dataclass
class Source:
    name: str
    layout: str  # an importer's name, or "qvl" (qvl's own annotation JSONL/parquet)
    files: tuple[str, ...]
    images: str | None = None
    downloads: str | None = None
    tasks: tuple[str, ...] = ()  # of those the layout gives (default: all)
    split: str | None = None
    count: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        require(bool(self.name.strip()), "name", "a source needs a name")
        require(bool(self.files), "files", "a source needs its files")
        for key in ("files", "images", "downloads"):
            value = getattr(self, key)
            require(not any("\0" in p for p in (value if isinstance(value, tuple) else [value or ""])), key,
                    "a path cannot hold a NUL character")
        require((self.count is None) != (self.fraction is None), "count",
                f"source {self.name}: give count or fraction, one of them")
        require(self.count is None or 0 <= self.count <= MAX_COUNT, "count",
                f"{self.count}: must be from 0 to {MAX_COUNT:,}")
        require(self.fraction is None or (math.isfinite(self.fraction) and 0 <= self.fraction <= MAX_REPEAT),
                "fraction", f"{self.fraction}: must be a number from 0 to {MAX_REPEAT}")


@dataclass
class MixSettings:
    seed: int = 0
    tokenizer: str = "qwen-vl"
    image_tokens: int = 256
    max_len: int = 2048
    pack_to: int | None = 2048
    sources: list[Source] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(-MAX_ID <= self.seed <= MAX_ID, "seed", f"{self.seed}: must be a 64-bit integer")


def load_mix(path: str | Path) -> MixSettings:
    """The recipe as typed settings: every key known, every value of its field's type, numbers
    finite and in range, text valid Unicode — or one error naming the file, the table and the key."""
    data = load_recipe(remote.input_file(path))
    try:
        convert(data, dict)
    except RecordError as e:
        raise RecipeError(f"{path}: {e}") from None
    unknown = set(data) - {"mix", "source"}
    if unknown:
        raise RecipeError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}; use [mix] and [[source]]")
    raw = data.get("source")
    if not isinstance(raw, list) or not raw:
        raise RecipeError(f"{path}: no [[source]] tables")
    sources = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise RecipeError(f"{path}: [[source]] {i + 1} is not a table")
        sources.append(fill(Source, entry, f"{path} [[source]] {i + 1} ({entry.get('name', '?')})"))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise RecipeError(f"{path}: source names repeat ({', '.join(names)})")
    mix = fill(MixSettings, table(data, "mix", str(path)), f"{path} [mix]")
    for source in sources:
        _check_files(source, path)
    mix.sources = sources
    return mix


def _at(recipe: str | Path, path: str) -> Path:
    """A path of the recipe, relative to the recipe's folder (an absolute one stays as it is);
    a URL, or a relative path in a recipe read from a bucket, is fetched (once) into the cache."""
    if remote.is_remote(path):
        return _fetched(path)
    if remote.is_remote(recipe) and not Path(path).is_absolute():
        return _fetched(remote.relative(str(recipe).rsplit("/", 1)[0], path))
    return Path(recipe).parent / path


@functools.lru_cache(maxsize=256)
def _fetched(url: str) -> Path:
    return remote.input_any(url)


def _check_files(source: Source, recipe: str | Path) -> None:
    """Each file of the source is a file, listed once (twice, its records would count twice)."""
    where = f"{recipe} [[source]] {source.name}"
    seen: dict[Path, Path] = {}
    for file in (_at(recipe, f) for f in source.files):
        if not file.is_file():
            raise RecipeError(f"{where}: files: {file}: " + (
                "not a regular file (a device, folder or pipe)" if file.exists() else "no such file"))
        real = file.resolve()
        if real in seen:
            raise RecipeError(f"{where}: files: {file} is listed twice (also as {seen[real]})")
        seen[real] = file
    if source.layout == "qvl" and source.split is not None:
        raise RecipeError(f"{where}: split: a qvl source has no splits (a layout's files may)")


def _records(source: Source, recipe: str | Path, skipped: dict[str, int] | None = None) \
        -> Iterator[tuple[str, int, str, dict | AnnotationError]]:
    """The source's records of its ``tasks``; those of other tasks in a ``qvl`` file are passed
    over and counted in ``skipped`` (an importer gives only the tasks asked of it). A file that
    cannot be read is an error naming the recipe and the source as well as the file."""
    from qvl.formats import importers
    from qvl.formats.records import FormatInputError, file_records

    files = [_at(recipe, f) for f in source.files]
    where = f"{recipe} [[source]] {source.name}"
    if source.layout == "qvl":
        try:
            for file, index, sample_id, record in file_records(files):
                if source.tasks and isinstance(record, dict) and record.get("task") not in source.tasks:
                    if skipped is not None:
                        skipped[source.name] = skipped.get(source.name, 0) + 1
                    continue
                yield file, index, sample_id, record
        except FormatInputError as e:
            raise RecipeError(f"{where}: {e}") from None
        return
    found = importers.records(source.layout, files, list(source.tasks) or None, source.split,
                              asked_by=f"{where} (layout = {source.layout!r})")
    try:
        for file, index, record in found:
            yield file, index, f"{Path(file).name}:{index}", record
    except importers.LayoutFileError as e:
        raise RecipeError(f"{where}: {e}") from None


def _uniform(seed: int, source: str, place: str) -> float:
    digest = hashlib.blake2b(f"{seed}\0{source}\0{place}".encode(), digest_size=8).digest()
    return struct.unpack("<Q", digest)[0] / 2 ** 64


def drawn(mix: MixSettings, recipe: str | Path, totals: dict[str, int], prefixes: dict[str, str]) \
        -> Iterator[tuple[str, int, str, dict | AnnotationError]]:
    """Every source's records, each kept ``share`` times in expectation (a deterministic draw),
    its image path made relative to the mixture's common images folder."""
    for source in mix.sources:
        total = totals[source.name]
        share = source.fraction if source.fraction is not None else (source.count / total if total else 0.0)
        whole, part = math.floor(share), share - math.floor(share)
        prefix = prefixes.get(source.name, "")
        written = {str(_at(recipe, f)): str(Path(f)) for f in source.files}  # the draw is the recipe's, run from anywhere
        for file, index, sample_id, record in _records(source, recipe):
            place = f"{written.get(str(file), file)}:{index}:{sample_id}"
            copies = whole + (_uniform(mix.seed, source.name, place) < part)
            for copy in range(copies):
                if isinstance(record, dict):
                    image = record.get("image")
                    moved = {"image": f"{prefix}{image}"} if isinstance(image, str) and prefix \
                        and not image.startswith(("http://", "https://")) else {}
                    out = {**record, **moved, "source": source.name,
                           **({"id": f"{record.get('id', sample_id)}#{copy}"} if copy else {})}
                    yield file, index, sample_id, out
                else:
                    yield file, index, sample_id, record


def run_mix(recipe: str | Path, out: Path, overwrite: bool = False, show_progress: bool = True) -> dict:
    from qvl.formats.build import FormatSettings, run_format

    mix = load_mix(recipe)
    try:  # the format settings are checked before any source is read
        settings = FormatSettings(tokenizer=mix.tokenizer, image_tokens=mix.image_tokens, max_len=mix.max_len,
                                  pack_to=mix.pack_to)
    except SettingError as e:
        raise RecipeError(f"{recipe} [mix]: {e}") from None
    from qvl.formats.render.multitask import RENDERERS

    for source in mix.sources:
        unknown = [t for t in source.tasks if t not in RENDERERS]
        if source.layout == "qvl" and unknown:
            raise RecipeError(f"{recipe} [[source]] {source.name}: tasks: unknown {', '.join(map(repr, unknown))} "
                              f"(use {', '.join(RENDERERS)})")
    skipped: dict[str, int] = {}
    totals = {source.name: sum(1 for _ in _records(source, recipe, skipped)) for source in mix.sources}
    for source in mix.sources:
        if not totals[source.name]:
            others = f" ({skipped[source.name]:,} of other tasks skipped)" if skipped.get(source.name) else ""
            of_tasks = f" of tasks {', '.join(source.tasks)}" if source.tasks else ""
            raise RecipeError(f"{recipe} [[source]] {source.name}: no records{of_tasks} in its files{others}")
        if source.count is not None and source.count > MAX_REPEAT * totals[source.name]:
            raise RecipeError(f"{recipe} [[source]] {source.name}: count {source.count:,} asks for more than "
                              f"{MAX_REPEAT} copies of each of its {totals[source.name]:,} records")
    downloads = {s.downloads for s in mix.sources if s.downloads}
    if len(downloads) > 1:
        raise RecipeError(f"{recipe}: sources name different downloads folders; one `qvl curate download` folder "
                          "serves the mixture")
    roots = {s.name: _at(recipe, s.images).resolve() for s in mix.sources if s.images}
    common = Path(os.path.commonpath(list(roots.values()))) if roots else None
    prefixes = {name: f"{root.relative_to(common).as_posix()}/" if root != common else ""
                for name, root in roots.items()}
    asked = {s.name: s.count if s.count is not None else round(s.fraction * totals[s.name]) for s in mix.sources}
    return run_format("multitask", [_at(recipe, f) for s in mix.sources for f in s.files], out, common,
                      _at(recipe, next(iter(downloads))) if downloads else None, settings, overwrite, show_progress,
                      records=drawn(mix, recipe, totals, prefixes),
                      extra={"mix": {"recipe": str(recipe), "seed": mix.seed, "available": totals, "asked": asked,
                                     "skipped_by_task": skipped}})
