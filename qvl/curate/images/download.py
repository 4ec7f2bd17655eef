"""`qvl curate download CURATED --out IMAGES`: the kept pairs' images, fetched and checked.

Only the survivors of `qvl curate filter` are fetched. Each attempt is one img2dataset run
(webdataset shards under ``IMAGES/attempts/N/``, resumed shard by shard when killed);
``--retry-failed`` starts a new attempt with only the rows whose latest attempt failed.
img2dataset's per-row status is folded back, the real pixels of every stored image are
decoded (a file that is not an image, or is truncated, is ``image_corrupt``), and the
image rules of the filter (``too_small``, ``aspect_ratio``) run again on the real size.
Rows whose URL is not http(s) or points at a private address are never fetched.

On Ray (``engine=EngineSettings("ray")``) the same img2dataset run hands each of its shards
to a Ray task (img2dataset's own Ray distributor; every worker of the job installs the address
screen and the decode check first, ``fetch.guard``) and the pixel checks run as one Ray task a
shard. The queue, its sharding, the shard names and keys are the local engine's, so the
outputs, the resume and the near-duplicate grouping (over the whole run, here) are too.

Outputs continue the filter's contract: ``IMAGES/kept/`` (the curated columns plus the
image's tar, key, sha256 and size), ``IMAGES/rejected/`` (with ``drop_reason`` and
``download_error``), ``IMAGES/report.*`` (the filter's funnel continued, so input ==
kept + rejected across both stages) and ``IMAGES/ledger/download.parquet`` (one row per
pair with every fact found here, for `qvl curate why`). Thresholds apply to stored facts:
changing them (or adding CLIP scores) re-derives the outputs without fetching again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from qvl.common import pixels, remote, storage
from qvl.common.engines import EngineSettings, RayEngine
from qvl.common.lifeline import PARENT_ENV
from qvl.common.progress import progress_bar
from qvl.curate.filter import report as report_mod
from qvl.curate.filter import rules
from qvl.curate.images import fetch, netcheck
from qvl.curate.images.folders import DownloadError, Folders
from qvl.curate.images.near_dups import near_duplicates
from qvl.curate.images.pixel_checks import check_images
from qvl.curate.settings import FilterSettings
from qvl.recipes import require
from qvl.schemas import DOWNLOADED_PAIR, conform

# drop steps of this stage, in funnel order
STEPS = ("bad_url", "private_address", "download_failed", "image_corrupt", "image_too_large", "image_too_small",
         "image_aspect_ratio", "clip_score_computed", "duplicate_image", "near_duplicate_image")
TEXT_COLUMNS = ["row_id", "url", "text", "source", "lang"]  # what a filter output's kept rows hold, as text


@dataclass
class DownloadSettings:
    processes: int = 0  # img2dataset processes; 0 = one per core
    threads: int = 64  # fetching threads per process
    timeout: int = 10  # seconds per request
    retries: int = 0  # img2dataset's own retries within an attempt
    samples_per_shard: int = 10_000
    image_size: int | None = None  # None: store the bytes as served (no resize, no re-encode)
    resize_mode: str = "keep_ratio"  # img2dataset's, when image_size is set
    allow_private: bool = False  # fetch private/loopback/link-local addresses too (tests, intranets)
    resolve_hosts: bool = True  # refuse names that resolve to private addresses
    min_side: int | None = None  # image rules on real pixels; None: the filter run's setting
    max_aspect_ratio: float | None = None
    check_threads: int = 0  # decoding threads for the pixel checks; 0 = one per core
    max_pixels: int = pixels.MAX_PIXELS  # larger images are refused before decoding (bombs)
    near_dup_bits: int = 4  # pHashes this many bits apart or closer are one image; -1: off

    def __post_init__(self) -> None:
        require(self.processes >= 0, "processes", f"{self.processes}: >= 0 (0 = one per core)")
        for key in ("threads", "timeout", "samples_per_shard", "max_pixels"):
            require(getattr(self, key) >= 1, key, f"{getattr(self, key)}: must be >= 1")
        require(self.image_size is None or self.image_size >= 1, "image_size", f"{self.image_size}: must be >= 1")
        require(-1 <= self.near_dup_bits <= 16, "near_dup_bits", f"{self.near_dup_bits}: -1 (off) to 16")


# ---------------------------------------------------------------- inputs


def read_curated(curated: Path) -> tuple[pl.DataFrame, dict]:
    """The kept rows of a filter run (input order) and its report."""
    report_path = curated / "report.json"
    if not report_path.is_file():
        raise DownloadError(f"{curated}: no report.json (is this the --out of a finished `qvl curate filter`?)")
    files = sorted((curated / "kept").glob("*.parquet"))
    if not files:
        raise DownloadError(f"{curated}/kept: no parquet files")
    frames = []
    for path in files:
        try:
            frame = pl.read_parquet(path)
        except (pl.exceptions.PolarsError, OSError) as e:
            raise DownloadError(f"{path}: not a readable parquet file ({str(e)[:300]})") from None
        missing = [c for c in TEXT_COLUMNS if c not in frame.columns]
        if missing:
            raise DownloadError(f"{path}: missing column(s) {', '.join(missing)} (not a qvl filter output)")
        wrong = [f"{c} ({frame.schema[c]})" for c in TEXT_COLUMNS if frame.schema[c] not in (pl.String, pl.Null)]
        if wrong:
            raise DownloadError(f"{path}: column(s) {', '.join(wrong)} must be text (not a qvl filter output)")
        frames.append(frame.with_columns(pl.col(TEXT_COLUMNS).cast(pl.String)))
    kept = pl.concat(frames, how="diagonal_relaxed")
    repeated = kept.filter(pl.col("row_id").is_duplicated() | pl.col("row_id").is_null()).get_column("row_id")
    if repeated.len():  # one row id, one pair: kept + rejected == input holds only then
        raise DownloadError(f"{curated}/kept: row_id {repeated[0]!r} is missing or repeats (not one filter run's output)")
    try:
        report = report_mod.read(report_path)
        report["settings"]["min_side"], report["settings"]["max_aspect_ratio"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DownloadError(f"{report_path}: not a qvl filter report ({type(e).__name__}: {str(e)[:200]})") from None
    return kept.with_row_index("_order"), report


# ---------------------------------------------------------------- fetching


def _fetch(queue: pl.DataFrame, folder: Path, s: DownloadSettings, show_progress: bool,
           ray: RayEngine | None = None) -> None:
    """One img2dataset run over ``queue`` (row_id, url, text) into ``folder``; resumable. With
    ``ray``, its shards are fetched by Ray tasks of the cluster ``ray`` is connected to."""
    own = folder / "_qvl"  # img2dataset reads every *.json of its output folder as a shard's stats
    own.mkdir(parents=True, exist_ok=True)
    queue_path = own / "queue.parquet"
    if not queue_path.exists():
        storage.write_parquet(queue_path, queue.select("url", "text", "row_id").to_arrow())
    rows = pl.scan_parquet(queue_path).select(pl.len()).collect().item()
    config = {
        "url_list": str(queue_path), "input_format": "parquet", "url_col": "url", "caption_col": "text",
        "save_additional_columns": ["row_id"], "output_format": "webdataset", "output_folder": str(folder),
        "processes_count": s.processes or os.cpu_count() or 1, "thread_count": s.threads,
        "number_sample_per_shard": s.samples_per_shard, "timeout": s.timeout, "retries": s.retries,
        "incremental_mode": "incremental", "enable_wandb": False, "compute_hash": "sha256",
        "user_agent_token": "qvl", "disallowed_header_directives": [], "max_image_area": s.max_pixels,
        "distributor": "ray" if ray else "multiprocessing",
    }
    if s.image_size:
        config.update(image_size=s.image_size, resize_mode=s.resize_mode, resize_only_if_bigger=True)
    else:
        config.update(disable_all_reencoding=True)
    storage.write_json(own / "img2dataset.json", config)
    shards = -(-rows // s.samples_per_shard)
    log = open(own / "img2dataset.log", "ab")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "qvl.curate.images.fetch", str(own / "img2dataset.json")],
                                stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", fetch.MAX_PIXELS: str(s.max_pixels),
                                     fetch.ALLOW_PRIVATE: "1" if s.allow_private else "0",
                                     PARENT_ENV: str(os.getpid()),
                                     **({fetch.RAY_ADDRESS: ray.gcs_address} if ray else {})})
        with progress_bar(disable=not show_progress) as bar:
            task = bar.add_task(f"download {folder.name}", total=rows, unit="images")
            while proc.poll() is None:
                time.sleep(0.5)
                bar.update(task, completed=_rows_done(folder))
            bar.update(task, completed=_rows_done(folder))
    except BaseException:
        proc.kill()
        raise
    finally:
        log.close()
    if proc.returncode:
        tail = (own / "img2dataset.log").read_text(errors="replace")[-2000:]
        raise DownloadError(f"img2dataset failed (exit {proc.returncode}); its log {own / 'img2dataset.log'} ends:\n{tail}")
    done = len(list(folder.glob("*_stats.json")))
    if done < shards:
        raise DownloadError(f"{folder}: img2dataset finished {done} of {shards} shards; run the command again to resume")
    storage.write_json(own / "done.json", {"rows": rows, "shards": shards})


def _rows_done(folder: Path) -> int:
    total = 0
    for stats in folder.glob("*_stats.json"):
        try:
            total += json.loads(stats.read_text())["count"]
        except (OSError, ValueError, KeyError):
            pass
    return total


def fold(f: Folders) -> pl.DataFrame:
    """Per row, the outcome of its latest attempt: attempt, shard, key, status, error, sha256."""
    frames = []
    for folder in sorted(f.attempts.glob("[0-9]*")):
        for meta in sorted(folder.glob("[0-9]*.parquet")):
            table = pl.read_parquet(meta, columns=["row_id", "key", "status", "error_message", "sha256"])
            frames.append(table.with_columns(attempt=pl.lit(int(folder.name)), shard=pl.lit(meta.stem)))
    if not frames:
        return pl.DataFrame(schema={"row_id": pl.String, "key": pl.String, "status": pl.String,
                                    "error_message": pl.String, "sha256": pl.String, "attempt": pl.Int64,
                                    "shard": pl.String})
    facts = pl.concat(frames, how="diagonal_relaxed")
    return facts.sort("attempt").unique("row_id", keep="last", maintain_order=True)


# ---------------------------------------------------------------- decisions


def clip_facts(f: Folders) -> pl.DataFrame | None:
    path = f.ledger / "clip.parquet"
    return pl.read_parquet(path) if path.exists() else None


def _join_facts(f: Folders, kept: pl.DataFrame, s: DownloadSettings, show_progress: bool,
                screened: pl.DataFrame | None, ray: RayEngine | None = None) -> pl.DataFrame:
    """The kept rows with everything found about them: the URL screen, img2dataset's latest
    outcome and the pixel checks of the stored image."""
    facts = fold(f)
    checks = check_images(f, facts, s.check_threads, s.max_pixels, show_progress, ray)
    if screened is None:
        screened = netcheck.screen(kept.select("row_id", "url"), s.allow_private, s.resolve_hosts)
    return (kept.join(screened.select("row_id", "_refused", "_refused_why"), on="row_id", how="left")
            .join(facts, on="row_id", how="left")
            .join(checks, on=["attempt", "shard", "key"], how="left"))


def _with_clip(f: Folders, frame: pl.DataFrame, clip: pl.DataFrame | None, settings: dict,
               clip_thresholds: dict[str, float] | None, clip_default: float | None) -> tuple[pl.DataFrame, pl.Expr]:
    """The computed CLIP scores joined, and whether each row fails its source's threshold: the
    caller's, else clip-score's choice, else the filter run's."""
    if clip is None:
        return frame, pl.lit(False)
    frame = frame.join(clip.select("row_id", "clip_score_computed", "clip_model",
                                   *[c for c in ("aesthetic_computed",) if c in clip.columns]),
                       on="row_id", how="left")
    chosen = f.read_state().get("clip", {}) if f.state.exists() else {}  # clip-score's thresholds
    thresholds = next(t for t in (clip_thresholds, chosen.get("thresholds"), settings["clip_thresholds"])
                      if t is not None)
    default = next((t for t in (clip_default, chosen.get("default"), settings["clip_threshold_default"])
                    if t is not None), None)
    limit = pl.col("source").replace_strict(thresholds, default=default, return_dtype=pl.Float64)
    return frame, (pl.col("clip_score_computed") < limit).fill_null(False)


def _drop_reasons(frame: pl.DataFrame, min_side: int, max_ratio: float, clip_fail: pl.Expr) -> pl.DataFrame:
    """Each row's first failed step (``drop_reason``) and the error behind it, in funnel order."""
    # rules 8-9 of the filter (the same expressions) on the real pixels; the limits as given, unchecked, as ever
    limits = FilterSettings()
    limits.min_side, limits.max_aspect_ratio = min_side, max_ratio
    real = frame.select(width="image_width", height="image_height").select(
        **{r.name: r.build(limits) for r in rules.RULES if r.name in ("too_small", "aspect_ratio")})
    # what the fetching processes refused: a connection or redirect to a private address,
    # bytes that are no image or have too many pixels (never stored)
    error = pl.coalesce("error_message", "image_error").fill_null("")
    return frame.with_columns(drop_reason=pl.coalesce(
        pl.col("_refused"),
        pl.when(error.str.contains(netcheck.REFUSED, literal=True)).then(pl.lit("private_address")),
        pl.when(error.str.starts_with("too_many_pixels") | (error == "image area too large"))
        .then(pl.lit("image_too_large")),
        pl.when((pl.col("status") == "failed_to_resize") | pl.col("image_error").is_not_null())
        .then(pl.lit("image_corrupt")),
        pl.when(pl.col("status").ne_missing("success")).then(pl.lit("download_failed")),
        pl.when(real.get_column("too_small")).then(pl.lit("image_too_small")),
        pl.when(real.get_column("aspect_ratio")).then(pl.lit("image_aspect_ratio")),
        pl.when(clip_fail).then(pl.lit("clip_score_computed")),
    ), download_error=pl.coalesce("_refused_why", "error_message", "image_error"))


def _drop_duplicates(frame: pl.DataFrame, near_dup_bits: int) -> pl.DataFrame:
    """Among the survivors, one row per image: the same bytes (sha256), then the same photo
    re-encoded, resized or lightly cropped (pHash); the longest text wins, then the first."""
    # rule 12 on the image hash: one image, several texts -> keep the longest (then the first)
    ranked = frame.with_columns(_len=pl.col("text").str.len_chars())
    survivors = ranked.filter(pl.col("drop_reason").is_null()).sort(
        ["sha256", "_len", "_order"], descending=[False, True, False])
    dup_ids = survivors.filter(~pl.col("sha256").is_first_distinct() & pl.col("sha256").is_not_null())
    frame = frame.with_columns(drop_reason=pl.when(pl.col("row_id").is_in(dup_ids.get_column("row_id").implode()))
                               .then(pl.lit("duplicate_image")).otherwise(pl.col("drop_reason")))
    # a flat picture has no structure for pHash to see (its hash is one bit or none): never grouped
    informative = pl.col("phash").is_not_null() & pl.col("phash").bitwise_count_ones().is_between(2, 62)
    survivors = frame.filter(pl.col("drop_reason").is_null() & informative).with_columns(
        _len=pl.col("text").str.len_chars()).sort(["_len", "_order"], descending=[True, False])
    winner_of = near_duplicates(survivors.get_column("phash").to_numpy(), near_dup_bits) \
        if near_dup_bits >= 0 else {}
    ids = survivors.get_column("row_id").to_list()
    lost = {ids[i]: ids[w] for i, w in winner_of.items()}
    return frame.with_columns(
        near_duplicate_of=pl.col("row_id").replace_strict(lost, default=None, return_dtype=pl.String)).with_columns(
        drop_reason=pl.when(pl.col("near_duplicate_of").is_not_null()).then(pl.lit("near_duplicate_image"))
        .otherwise(pl.col("drop_reason")))


def _write_outputs(f: Folders, frame: pl.DataFrame, clip: pl.DataFrame | None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """kept/, rejected/ and ``ledger/download.parquet`` written; (kept, rejected) as written."""
    frame = frame.sort("_order").with_columns(
        image_tar=pl.when(pl.col("status") == "success")
        .then(pl.format("attempts/{}/{}.tar", pl.col("attempt").cast(pl.String).str.zfill(3), pl.col("shard"))),
    )
    if clip is not None:
        frame = frame.with_columns(clip_score_dataset=pl.col("clip_score"), clip_score=pl.col("clip_score_computed"))
    internal = ["_order", "_refused", "_refused_why", "error_message", "attempt", "shard", "image_error",
                "clip_score_computed"]
    public = frame.with_columns(download_status=pl.col("status").fill_null("not fetched")).rename(
        {"key": "image_key"}).drop([c for c in [*internal, "status"] if c in frame.columns])
    kept_out = public.filter(pl.col("drop_reason").is_null()).drop("drop_reason", "download_error")
    rejected = public.filter(pl.col("drop_reason").is_not_null()).with_columns(
        failed_rules=pl.concat_list(pl.col("drop_reason")))
    for folder in ("kept", "rejected"):
        shutil.rmtree(f.out / folder, ignore_errors=True)
    storage.write_parquet(f.out / "kept" / "part-00000.parquet",
                          conform(kept_out.to_arrow(), DOWNLOADED_PAIR, f"{f.out}/kept"))
    storage.write_parquet(f.out / "rejected" / "download-00000.parquet", rejected.to_arrow())
    ledger = frame.select(
        "row_id", "source", "url", pl.col("_refused").alias("refused"), "attempt",
        pl.col("status").alias("download_status"), "download_error", pl.col("key").alias("image_key"),
        "image_tar", "sha256", "phash", "near_duplicate_of", "image_width", "image_height", "image_error",
        *([pl.col("clip_score_computed"), "clip_model"] if clip is not None else []), "drop_reason")
    storage.write_parquet(f.ledger / "download.parquet", ledger.to_arrow())
    return kept_out, rejected


def _report(f: Folders, base_report: dict, s: DownloadSettings, frame: pl.DataFrame, kept_out: pl.DataFrame,
            rejected: pl.DataFrame, clip: pl.DataFrame | None, min_side: int, max_ratio: float) -> dict:
    """The filter's funnel continued by this stage's steps, written beside the outputs."""
    dropped: dict[str, dict[str, int]] = {}
    for reason, source, n in rejected.group_by("drop_reason", "source").len().iter_rows():
        dropped.setdefault(reason, {})[source] = n
    kept_counts: dict[str, dict[str, int]] = {}
    for source, lang, n in kept_out.group_by("source", "lang").len().iter_rows():
        kept_counts.setdefault(source, {})[lang] = n
    attempts = len(list(f.attempts.glob("[0-9]*")))
    step_settings = {
        "bad_url": "not an http(s) URL", "private_address": "private, loopback or link-local host"
        + (" (allowed)" if s.allow_private else ""),
        "download_failed": f"img2dataset status, timeout {s.timeout}s, {attempts} attempt(s)",
        "image_corrupt": "the bytes do not decode as an image (never stored)",
        "image_too_large": f"over {s.max_pixels / 1e6:g} Mpx (refused before decoding)",
        "image_too_small": f"real short side < {min_side} px",
        "image_aspect_ratio": f"real long/short side > {max_ratio}",
        "clip_score_computed": (f"{clip['clip_model'][0]} below the source's threshold" if clip is not None and clip.height
                                else "no CLIP scores computed"),
        "duplicate_image": "same sha256: keep the longest text",
        "near_duplicate_image": f"pHash within {s.near_dup_bits} bits: keep the longest text"
        if s.near_dup_bits >= 0 else "off"}
    stats = {"attempts": attempts, "fetched": int((frame["status"] == "success").sum()),
             "settings": dataclasses.asdict(s)}
    step_settings = {name: step_settings[name] for name in STEPS}  # the funnel's order
    report = report_mod.extend(base_report, "download", step_settings, dropped, kept_counts, stats)
    report_mod.write(f.out, report)
    return report


def derive(f: Folders, kept: pl.DataFrame, base_report: dict, s: DownloadSettings,
           clip_thresholds: dict[str, float] | None = None, clip_default: float | None = None,
           show_progress: bool = False, screened: pl.DataFrame | None = None, ray: RayEngine | None = None) -> dict:
    """kept/, rejected/, the ledger and the report from the stored facts and thresholds (all
    of them here: duplicates and near-duplicates are grouped across the whole run)."""
    settings = base_report["settings"]
    min_side = s.min_side if s.min_side is not None else settings["min_side"]
    max_ratio = s.max_aspect_ratio if s.max_aspect_ratio is not None else settings["max_aspect_ratio"]
    clip = clip_facts(f)
    frame, clip_fail = _with_clip(f, _join_facts(f, kept, s, show_progress, screened, ray), clip, settings,
                                  clip_thresholds, clip_default)
    frame = _drop_duplicates(_drop_reasons(frame, min_side, max_ratio, clip_fail), s.near_dup_bits)
    kept_out, rejected = _write_outputs(f, frame, clip)
    return _report(f, base_report, s, frame, kept_out, rejected, clip, min_side, max_ratio)


# ---------------------------------------------------------------- the command


def open_ray(engine: EngineSettings | None):
    """A connected ``RayEngine`` for the Ray engine (yielded by ``with``), else None."""
    return RayEngine(engine.address, engine.workers) if engine and engine.on_ray else nullcontext()


def run_download(curated: str | Path, out: str | Path, s: DownloadSettings | None = None, retry_failed: bool = False,
                 overwrite: bool = False, show_progress: bool = True, engine: EngineSettings | None = None) -> dict:
    s = s or DownloadSettings()
    curated, out = Path(curated), Path(out)
    f = Folders(out)
    kept, base_report = read_curated(curated)
    state = {"kind": "download", "from": remote.origin(curated), "kept_rows": kept.height}
    try:
        existing = storage.claim(out, "curate download", legacy=("_qvl.json",))
    except storage.OutputError as e:
        raise DownloadError(str(e)) from None
    if existing and overwrite:  # a qvl download (the marker says so): replace it whole
        shutil.rmtree(out)
        storage.claim(out, "curate download")
    elif f.state.exists():
        previous = f.read_state()
        if {k: previous.get(k) for k in state} != state:
            raise DownloadError(f"{out}: holds a download of another curated run; use another --out or --overwrite")
    clip = f.read_state().get("clip") if f.state.exists() else None
    storage.write_json(f.state, {**state, "settings": dataclasses.asdict(s), **({"clip": clip} if clip else {})})

    with open_ray(engine) as ray:
        return _download(f, kept, base_report, s, retry_failed, show_progress, ray)


def _download(f: Folders, kept: pl.DataFrame, base_report: dict, s: DownloadSettings, retry_failed: bool,
              show_progress: bool, ray: RayEngine | None) -> dict:
    """The attempt to make (a new one, a killed one resumed, or none), then the outputs derived."""
    attempts = sorted(int(p.name) for p in f.attempts.glob("[0-9]*")) if f.attempts.exists() else []
    screened = netcheck.screen(kept.select("row_id", "url"), s.allow_private, s.resolve_hosts)
    unfinished = [n for n in attempts if not (f.attempt(n) / "_qvl" / "done.json").exists()]
    if unfinished:  # a killed run: img2dataset resumes the same attempt shard by shard
        _fetch(pl.DataFrame(), f.attempt(unfinished[0]), s, show_progress, ray)
    elif not attempts or retry_failed:
        allowed = screened.filter(pl.col("_refused").is_null()).get_column("row_id")
        queue = kept.filter(pl.col("row_id").is_in(allowed.implode()))  # input order
        if attempts:
            # a network failure may pass next time; bytes that were no image, or a refusal, will not
            failed = fold(f).filter((pl.col("status") == "failed_to_download") & ~pl.col("error_message").fill_null("")
                                    .str.contains(netcheck.REFUSED, literal=True)).get_column("row_id")
            queue = queue.filter(pl.col("row_id").is_in(failed.implode()))
        if queue.height:
            _fetch(queue, f.attempt(attempts[-1] + 1 if attempts else 0), s, show_progress, ray)
    return derive(f, kept, base_report, s, show_progress=show_progress, screened=screened, ray=ray)
