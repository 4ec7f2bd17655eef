"""Language id on real text: what `qvl curate filter` keeps, fastText alone and with lingua.

What the whole filter keeps with fastText and the script alone and with lingua's second opinion,
and what it costs.

    python benchmarks/curate_langid.py [--shared ../shared/data] [--rows 300000] [--repeat 2]
        [--compare-with OLD_CHECKOUT]

In one run, each figure from the whole filter (`run_filter`, every rule) with the second opinion
off (fastText and the script alone) and on:

1. CC3M validation (15,833 English alt-texts): rows dropped by `lang`.
2. Other languages (`benchmarks/data/other_languages`: 14 Latin-script languages, 100 sentences
   each and 100 more cut to their first 3-8 words, as alt-text is): rows kept (as en or zh).
3. Chinese sentences (the same source): rows kept — the script cross-check must not move.
4. 10,000 real LAION rows: dropped by `lang`, and how many captions lingua was asked about.
5. Throughput: the whole filter with language id on real captions (CC3M alone, then CC3M + LAION,
   each repeated to --rows, every copy with another ending so no two rows share a text, distinct
   URLs, in two shards), second opinion off and on, best of
   --repeat, with each run's peak RSS; --compare-with runs other checkouts on the same rows with
   their defaults (e.g. `git worktree add /tmp/old f35bec4`: the code before the second opinion;
   7f81bd9: the second opinion with qvl's own fastText batch reader, deleted since).
6. The calls themselves on those captions: fastText per caption (what the filter calls) and its batch
   call (`multilinePredict`, labels only in the installed fasttext-predict); lingua per doubtful
   caption, over all 49 Latin-script languages and over the filter's choice.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
OTHER = ROOT / "benchmarks" / "data" / "other_languages"
LATIN = ("af", "ca", "da", "de", "es", "fi", "fr", "id", "it", "nb", "nl", "pt", "sv", "tl")


def other_language_rows() -> dict[str, list[str]]:
    """Sentences (lines 1-100) and alt-text-long fragments (lines 101-200, first 3-8 words)."""
    rng = random.Random(0)
    sets: dict[str, list[str]] = {"sentences": [], "fragments": [], "chinese": []}
    for code in (*LATIN, "zh"):
        lines = [x.strip() for x in (OTHER / f"{code}.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
        if code == "zh":
            sets["chinese"] = lines
            continue
        sets["sentences"] += lines[:100]
        sets["fragments"] += [" ".join(x.split()[:rng.randint(3, 8)]) for x in lines[100:200]]
    return sets


# endings that keep a caption's language and make each copy of it a text of its own, so that the
# filter judges every copy (it judges a text once a batch) and fastText meets new tokens
ENDINGS = ["", ".", " .", "!", " !", "?", ":", " :", ";", ",", " -", " --", ")", " )", "'", '"', " ...", " *", " ~",
           " /"]


def variants(captions: list[str], rows: int) -> list[str]:
    """``rows`` captions: the real ones, then copies with another ending (then the first letter's
    case swapped)."""
    out: list[str] = []
    for copy in range(-(-rows // len(captions))):
        ending = ENDINGS[copy % len(ENDINGS)]
        for text in captions:
            text = text.strip() + ending
            out.append(text[:1].swapcase() + text[1:] if copy // len(ENDINGS) % 2 else text)
            if len(out) == rows:
                return out
    return out


def filtered(texts: list[str], work: Path, second_opinion: bool) -> dict:
    """The whole filter on these captions (one row each, a distinct URL): its report."""
    from qvl.curate.filter.pipeline import run_filter
    from qvl.curate.settings import FilterSettings, RunSettings

    folder = work / "in"
    folder.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"url": [f"https://img.example/{i}.jpg" for i in range(len(texts))], "text": texts}) \
        .write_parquet(folder / "rows.parquet")
    return run_filter([folder / "rows.parquet"], work / "out", FilterSettings(second_opinion=second_opinion),
                      RunSettings(workers=1), overwrite=True, show_progress=False)


def dropped_by_lang(report: dict) -> int:
    return {r["step"]: r["dropped"] for r in report["funnel"]}["lang"]


def run_cli(folder: Path, out: Path, extra: list[str], checkout: Path | None) -> tuple[float, float]:
    """`qvl curate filter` in a fresh process (this tree's or ``checkout``'s qvl): wall seconds and
    the largest peak RSS (MiB) of the process and its workers."""
    code = ("import resource, sys, time, json; from qvl.cli import app; t = time.perf_counter()\n"
            "try: app(sys.argv[1:])\nexcept SystemExit as e: assert not e.code, e.code\n"
            "rss = max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))\n"
            "print(json.dumps([time.perf_counter() - t, rss / 1024]))")
    env = {**os.environ, "PYTHONPATH": str(checkout or ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, "curate", "filter", str(folder), "--out", str(out),
                           "--overwrite", "--no-progress", *extra], capture_output=True, text=True, env=env,
                          cwd=out.parent, check=False)
    if proc.returncode:
        sys.exit(f"filter run failed:\n{proc.stderr[-3000:]}")
    seconds, rss = json.loads(proc.stdout.strip().splitlines()[-1])
    return seconds, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--compare-with", type=Path, action="append", default=[],
                        help="another qvl source tree, run on the same rows beside this one (repeatable)")
    args = parser.parse_args()
    cc3m_file = args.shared / "cc3m" / "Validation_GCC-1.1.0-Validation.tsv"
    laion_file = args.shared / "external" / "laion_img2dataset" / "test_10000.parquet"
    if not (cc3m_file.is_file() and laion_file.is_file()):
        sys.exit(f"needs CC3M's validation TSV and the LAION rows under {args.shared}")
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"polars {pl.__version__}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    work = Path(tempfile.mkdtemp(prefix="qvl-langid-"))
    cc3m = [line.split("\t")[0] for line in cc3m_file.read_text(encoding="utf-8").splitlines()]
    laion = pl.read_parquet(laion_file).get_column("TEXT").fill_null("").to_list()
    sets = other_language_rows()

    print("\n| data (rows) | fastText + script alone | with lingua's second opinion | target |")
    print("|---|---:|---:|---:|")
    for name, texts, measure, target in (
        ("CC3M validation, English: dropped by `lang`", cc3m, dropped_by_lang, "<= 0.3%"),
        ("other languages, sentences: kept", sets["sentences"], lambda r: r["kept_rows"], "<= 2%"),
        ("other languages, first 3-8 words: kept", sets["fragments"], lambda r: r["kept_rows"], ""),
        ("Chinese sentences: kept", sets["chinese"], lambda r: r["kept_rows"], "no change"),
        ("LAION, real alt-text: dropped by `lang`", laion, dropped_by_lang, ""),
    ):
        off, on = (filtered(texts, work / f"{name[:5]}-{flag}", flag) for flag in (False, True))
        a, b = measure(off), measure(on)
        asked = sum(sum(v.values()) for v in on["lang_second_opinion"].values())
        print(f"| {name} ({len(texts):,}) | {a:,} ({a / len(texts):.2%}) | {b:,} ({b / len(texts):.2%}); "
              f"lingua asked {asked:,} | {target} |")

    # throughput on real captions, repeated to --rows with distinct URLs
    runs = {"this, second opinion off": (["--no-second-opinion"], None), "this, second opinion on": ([], None)}
    runs.update({f"{checkout} (its defaults)": ([], checkout) for checkout in args.compare_with})
    for name, base in (("CC3M (English)", cc3m), ("CC3M + LAION", cc3m + laion)):
        folder = work / f"real-{len(base)}"
        folder.mkdir()
        frame = pl.DataFrame({"text": variants(base, args.rows)}).with_row_index("i") \
            .with_columns(url=pl.lit("https://img.example/") + pl.col("i").cast(pl.String) + ".jpg").drop("i")
        for k in range(2):
            frame.gather_every(2, offset=k).write_parquet(folder / f"part-{k}.parquet")
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeat):
            for label, (extra, checkout) in runs.items():
                seconds, rss = run_cli(folder, work / "out-real", ["--workers", "2", *extra], checkout)
                if label not in best or seconds < best[label][0]:
                    best[label] = (seconds, rss)
        print(f"\n| whole filter with language id, {args.rows:,} rows of {name} captions repeated, 2 workers, "
              f"best of {args.repeat} | rows/s | peak RSS of a process |")
        print("|---|---:|---:|")
        for label, (seconds, rss) in best.items():
            print(f"| {label} | {args.rows / seconds:,.0f} | {rss:,.0f} MiB |")

    # the calls themselves
    import fasttext
    from lingua import LanguageDetectorBuilder

    from qvl.curate.lang import langid, second_opinion
    from qvl.curate.settings import FilterSettings

    ident = langid.identifier(None)
    model = fasttext.load_model(str(ident.path))
    base = cc3m + laion
    lines = [t.replace("\n", " ") for t in base]
    t = time.perf_counter()
    ident.predict(lines, k=1)
    per_caption = len(lines) / (time.perf_counter() - t)
    t = time.perf_counter()
    model.f.multilinePredict([x + "\n" for x in lines], 1, 0.0, "replace")
    batch_call = len(lines) / (time.perf_counter() - t)
    tagged = langid.first_opinion(pl.DataFrame({"text": base}), FilterSettings())
    doubtful = tagged.filter(langid.doubtful(tagged, FilterSettings())).get_column("text").unique().to_list()
    theirs = ident.top_labels(doubtful, second_opinion.FASTTEXT_CANDIDATES)
    second_opinion.judge(doubtful, theirs, ("en", "zh"))  # models loaded before timing
    t = time.perf_counter()
    second_opinion.judge(doubtful, theirs, ("en", "zh"))
    chosen = len(doubtful) / (time.perf_counter() - t)
    latin, _ = second_opinion._languages()
    every = LanguageDetectorBuilder.from_languages(*latin).with_preloaded_language_models().build()
    t = time.perf_counter()
    for text in doubtful:
        every.compute_language_confidence_values(text)
    all_latin = len(doubtful) / (time.perf_counter() - t)
    print(f"\n| call, on the {len(lines):,} real captions (1 core) | texts/s |")
    print("|---|---:|")
    print(f"| fastText lid.176, one caption at a time (the filter's call) | {per_caption:,.0f} |")
    print(f"| fastText's batch call, multilinePredict (labels only) | {batch_call:,.0f} |")
    print(f"| lingua, accurate, over the filter's choice of languages ({len(doubtful):,} doubtful captions) "
          f"| {chosen:,.0f} |")
    print(f"| lingua, accurate, over all {len(latin)} Latin-script languages | {all_latin:,.0f} |")


if __name__ == "__main__":
    main()
