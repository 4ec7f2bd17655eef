"""The pixel checks of a download: every stored image decoded fully (its real size and pHash,
or why it is not an image), cached per shard beside its tar so a re-derive decodes nothing."""

from __future__ import annotations

import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl

from qvl.common import pixels, storage
from qvl.common.progress import progress_bar
from qvl.curate.images.folders import Folders

CHECKS = {"key": pl.String, "image_width": pl.Int64, "image_height": pl.Int64, "image_error": pl.String,
          "phash": pl.UInt64}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def _phash(img) -> int:
    import imagehash

    return int(str(imagehash.phash(img)), 16)


def _check_tar(tar_path: Path, max_pixels: int) -> pl.DataFrame:
    """Decode every image of one shard fully: its real size and perceptual hash, or why it is
    not an image."""
    keys, widths, heights, errors, hashes = [], [], [], [], []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            stem, dot, suffix = member.name.rpartition(".")
            if not dot or f".{suffix.lower()}" not in IMAGE_SUFFIXES:
                continue
            width = height = error = phash = None
            try:
                width, height, phash = pixels.decoded_size(tar.extractfile(member).read(), max_pixels, _phash)
            except pixels.BadImage as e:
                error = f"{e.reason}: {e}"
            keys.append(stem)
            widths.append(width)
            heights.append(height)
            errors.append(error)
            hashes.append(phash)
    return pl.DataFrame({"key": keys, "image_width": widths, "image_height": heights, "image_error": errors,
                         "phash": hashes}, schema=CHECKS)


def check_shard(tar_path: Path, cache: Path, max_pixels: int) -> pl.DataFrame:
    """One shard's checks, cached; the unit of work of either engine."""
    checks = _check_tar(tar_path, max_pixels)
    storage.write_parquet(cache, checks.to_arrow())
    return checks


def check_images(f: Folders, facts: pl.DataFrame, threads: int, max_pixels: int, show_progress: bool,
                 ray=None) -> pl.DataFrame:
    """Pixel checks of every stored image, cached per shard beside its tar: in threads here,
    or one Ray task a shard on the cluster ``ray`` (a ``RayEngine``) is connected to."""
    shards = facts.filter(pl.col("status") == "success").select("attempt", "shard").unique().sort("attempt", "shard")
    todo, frames = [], []
    for attempt, shard in shards.iter_rows():
        cache = f.attempt(attempt) / "_qvl" / f"{shard}.checks.parquet"
        if cache.exists() and "phash" in pl.read_parquet_schema(cache):  # caches before pHash: checked again
            frames.append(pl.read_parquet(cache).with_columns(attempt=pl.lit(attempt), shard=pl.lit(shard)))
        else:
            todo.append((attempt, shard, cache))

    jobs = {(attempt, shard): (f.attempt(attempt) / f"{shard}.tar", cache, max_pixels)
            for attempt, shard, cache in todo}
    with progress_bar(disable=not show_progress or not todo) as bar, \
            ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:  # PIL decodes without the GIL
        task = bar.add_task("check pixels", total=len(todo), unit="shards")
        done = ray.run(check_shard, jobs) if ray is not None else \
            zip(jobs, pool.map(lambda args: check_shard(*args), jobs.values()))
        for (attempt, shard), checks in done:
            frames.append(checks.with_columns(attempt=pl.lit(attempt), shard=pl.lit(shard)))
            bar.advance(task)
    if not frames:
        return pl.DataFrame(schema={**CHECKS, "attempt": pl.Int64, "shard": pl.String})
    return pl.concat(frames, how="vertical_relaxed")
