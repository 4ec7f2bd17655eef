"""Throughput and memory of `qvl curate filter`, beside a per-row Python baseline.

    python benchmarks/curate_filter.py [--rows 3000000] [--rss-sizes 1000000,10000000]
        [--compare-with OLD_CHECKOUT] [--repeat 1]

Generates DataComp-shaped parquet shards (vectorised, seeded; ~30% of rows carry noise
the rules remove), then in one run prints: rows/s of the whole pipeline, rows/s without
language id, the same rules as a per-row Python loop (the
way per-sample curation tools run them), and peak RSS at each size in --rss-sizes.
Each pipeline run is a fresh subprocess so its peak RSS is its own. --compare-with runs
another checkout's qvl (e.g. `git worktree add /tmp/old <commit>`) on the same rows in the
same run, alternating with this one; --repeat N keeps each one's best of N runs.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

ROWS_PER_SHARD = 500_000

EN = ("a small red dog playing on the beach at sunset with a view of the hills near the old wooden "
      "house in the park under a blue sky with children and flowers during the summer festival").split()
ZH = list("一只小狗在海滩上玩耍红色的汽车停在街道旁边古老房子公园里有很多人")
NOISE = ["", "", "", "", "", "", " <b>sale</b> &amp; more", " https://example.com/p/123", " IMG_4821.JPG",
         " 😀", " Красивый", " !!!!!!", " <PERSON>"]


def generate(final: Path, rows: int, seed: int = 0) -> None:
    """Write the shards into a temporary folder renamed into place: a reused --workdir
    never holds half a data set."""
    folder = final.with_name(final.name + ".partial")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for start in range(0, rows, ROWS_PER_SHARD):
        n = min(ROWS_PER_SHARD, rows - start)
        length = rng.integers(3, 14, n)
        words = rng.integers(0, len(EN), (n, 13))
        # vectorised caption assembly: join word columns, then cut to each row's length
        cols = [pl.Series(np.array(EN)[words[:, j]]) for j in range(13)]
        frame = pl.DataFrame({f"w{j}": c for j, c in enumerate(cols)})
        text = frame.select(pl.concat_list(pl.all()).list.head(pl.lit(pl.Series(length))).list.join(" ")).to_series()
        zh_chars = rng.integers(0, len(ZH), (n, 12))
        zh = pl.DataFrame({f"c{j}": np.array(ZH)[zh_chars[:, j]] for j in range(12)}).select(
            pl.concat_list(pl.all()).list.head(pl.lit(pl.Series(length))).list.join("")).to_series()
        is_zh = rng.random(n) < 0.25
        text = pl.select(pl.when(pl.Series(is_zh)).then(zh).otherwise(text)).to_series()
        noise = pl.Series(np.array(NOISE)[rng.integers(0, len(NOISE), n)])
        text = text + noise
        ids = np.arange(start, start + n)
        dup = rng.random(n) < 0.03
        url_ids = np.where(dup, rng.integers(start, start + n, n), ids)
        width = rng.integers(120, 1600, n)
        height = rng.integers(120, 1600, n)
        table = pl.DataFrame({
            "uid": pl.Series(ids).cast(pl.String),
            "url": "https://img.example.com/" + pl.Series(url_ids).cast(pl.String) + ".jpg",
            "text": text,
            "original_width": width, "original_height": height,
            "clip_b32_similarity_score": rng.uniform(0.15, 0.4, n),
            "clip_l14_similarity_score": rng.uniform(0.15, 0.4, n),
        })
        path = folder / f"datacomp-{start // ROWS_PER_SHARD:05d}.parquet"
        table.write_parquet(path)
    folder.rename(final)


def run_pipeline(folder: Path, out: Path, extra: list[str], checkout: Path | None = None) -> dict:
    """One `qvl curate filter` in a fresh process: wall time and that process tree's peak RSS;
    ``checkout``: the qvl of that source tree instead of this one."""
    code = (
        "import resource, sys, time, json;"
        "from qvl.cli import app;"
        "t=time.perf_counter();"
        "\ntry: app(sys.argv[1:])\nexcept SystemExit as e: assert not e.code, e.code\n"
        "s=time.perf_counter()-t;"
        "own=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        "kids=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss;"
        "print(json.dumps({'seconds': s, 'rss_mib': max(own, kids)/1024}))"
    )
    args = [sys.executable, "-c", code, "curate", "filter", str(folder), "--out", str(out), "--overwrite",
            "--no-progress", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout or ""),
                                                                      os.environ.get("PYTHONPATH")]))}
    # run from the output's folder: `python -c` puts the working directory first on sys.path,
    # which would shadow --compare-with's checkout when started from a source tree
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=out.parent)
    if proc.returncode:
        sys.exit(f"pipeline run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    result["rows"] = report["input_rows"]
    result["kept"] = report["kept_rows"]
    return result


# ---------------------------------------------------------------- per-row baseline

TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>")
IRREGULAR = re.compile(r"(?i:\b(?:https?|ftp)://\S+)|(?i:\bwww\.\S+)|[\w.+-]+@[\w-]+(?:\.[\w-]+)+"
                       r"|(?i:\b[\w-]+\.(?:jpe?g|png|gif|bmp|webp|tiff?|heic|svg|mp4|mov|pdf)\b)"
                       r"|\b(?:IMG|DSC|DSCN|DSCF|DCIM|PXL|MVIMG)[_-]?\d{3,}\w*\b")
PUNCT = re.compile(r"([!?.,;:*~#=_+|/\\-])[!?.,;:*~#=_+|/\\-]{3,}")
SPACE = re.compile(r"\s+")
DATASET_TAG = re.compile(r"<(?:PERSON|ORGANIZATION|LOCATION|NAME)>")
EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\uFE0F\u200D\u20E3\U000E0020-\U000E007F]")
NOT_EN_ZH = re.compile("[^\u0000-\u00FF\u2000-\u206F\u3000-\u303F\u3400-\u4DBF\u4E00-\u9FFF\uF900-\uFAFF"
                       "\uFF00-\uFFEF\U00020000-\U0002A6DF\\s]")
HAN = re.compile("[\u3400-\u4DBF\u4E00-\u9FFF\uF900-\uFAFF]")
WORD = re.compile("[^\\s\u3400-\u4DBF\u4E00-\u9FFF\uF900-\uFAFF\u3000-\u303F\uFF00-\uFFEF]+")


def per_row_baseline(rows: list[dict]) -> list[str | None]:
    """The same rules, one row at a time, as a per-sample tool runs its operators: each
    rule evaluated on each row (so every failed rule is known, as qvl records), then
    duplicates among the survivors. Returns each row's drop reason (None: kept)."""
    reasons: list[str | None] = []
    best: dict[str, tuple[int, int]] = {}
    for i, row in enumerate(rows):
        text_raw = row["text"]
        url = row["url"]
        text = None if text_raw is None else html.unescape(TAG.sub(" ", text_raw))
        if text is not None:
            text = SPACE.sub(" ", PUNCT.sub(r"\1", IRREGULAR.sub(" ", text))).strip()
        w, h = row["original_width"], row["original_height"]
        units = 0 if not text else len(HAN.findall(text)) + len(WORD.findall(text))
        failed = [name for name, fails in (
            ("missing_url", not url or not url.strip()),
            ("dataset_tag", text_raw is not None and DATASET_TAG.search(text_raw) is not None),
            ("empty_text", not text),
            ("aspect_ratio", min(w, h) <= 0 or max(w, h) / min(w, h) > 3.0),
            ("too_small", min(w, h) < 200),
            ("clip_score", row["clip_l14_similarity_score"] < 0.243),
            ("emoji", bool(text) and EMOJI.search(text) is not None),
            ("non_en_zh_chars", bool(text) and NOT_EN_ZH.search(text) is not None),
            ("length", bool(text) and (units < 3 or units > 256)),
        ) if fails]
        reasons.append(failed[0] if failed else None)
        if not failed:
            previous = best.get(url)
            if previous is None or len(text) > previous[0]:
                if previous is not None:
                    reasons[previous[1]] = "duplicate"
                best[url] = (len(text), i)
            else:
                reasons[i] = "duplicate"
    return reasons


def rule_engine(path: Path, rows: int) -> tuple[float, list[str | None]]:
    """qvl's rules 1-10 and dedup over in-memory batches: what the per-row loop does, vectorised."""
    from qvl.curate.filter import dedup, rules
    from qvl.curate.settings import FilterSettings
    from qvl.curate.sources import readers, shards

    settings = FilterSettings()
    batches = [b for b in readers.read_batches(shards.open_shard(path, 0), 65_536)]
    frame = pl.concat(batches).head(rows)
    batches = [frame.slice(i, 65_536) for i in range(0, frame.height, 65_536)]
    t = time.perf_counter()
    evaluated = pl.concat([rules.apply(b, settings) for b in batches])
    kept, _ = dedup.split_duplicates(evaluated.filter(pl.col("drop_reason").is_null()))
    rate = frame.height / (time.perf_counter() - t)
    kept_seq = set(kept.get_column("_seq").to_list())
    reasons = [r if r is not None or seq in kept_seq else "duplicate"
               for r, seq in zip(evaluated.get_column("drop_reason").to_list(), evaluated.get_column("_seq"))]
    return rate, reasons


def io_floor(folder: Path, out: Path, tuned: bool = False, part: int = 0, parts: int = 1) -> tuple[int, float]:
    """(rows, seconds) of only what every run must do with every row: read it and write it once
    (text twice, cleaned and raw, as kept/rejected hold it) — no rules at all — over shards
    ``part::parts``, on one thread (pyarrow's pools at one thread too).
    ``tuned``: with qvl's writer settings (dictionaries and statistics only where they pay),
    not pyarrow's defaults — the floor qvl's own writes are measured against."""
    import pyarrow.parquet as pq

    from qvl.common.storage import writer_options

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    out.mkdir(parents=True, exist_ok=True)
    rows = 0
    t = time.perf_counter()
    for path in sorted(folder.glob("*.parquet"))[part::parts]:
        for i, batch in enumerate(pq.ParquetFile(path).iter_batches(batch_size=262_144)):
            table = pa.Table.from_batches([batch])
            table = table.append_column("text_raw", table.column("text"))
            options = writer_options(table.schema) if tuned else {}
            pq.write_table(table, out / f"{path.stem}-{i}.parquet", compression="zstd", **options)
            rows += table.num_rows
    return rows, time.perf_counter() - t


def design_floor(folder: Path, run: Path, out: Path, part: int = 0, parts: int = 1) -> tuple[int, float]:
    """(input rows, seconds) of the I/O this pipeline's design must do, no rules at all: read the
    input, write the run's own rejected and ledger tables, stage its kept rows (snappy), read them
    back and write them as kept — the tables of ``run`` (a finished run on ``folder``), loaded
    before the clock starts; shards and partitions ``part::parts``, on one thread."""
    import pyarrow.parquet as pq

    from qvl.common.storage import writer_options

    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    out.mkdir(parents=True, exist_ok=True)
    inputs = sorted(folder.glob("*.parquet"))[part::parts]
    shard_keys = {f"{i:05d}-" for i, p in enumerate(sorted(folder.glob("*.parquet"))) if p in inputs}
    tables = {kind: [pq.read_table(f) for f in sorted((run / kind).rglob("*.parquet"))
                     if f.name[:6] in shard_keys] for kind in ("rejected", "ledger")}
    kept = [pq.read_table(f) for f in sorted((run / "kept").glob("*.parquet"))[part::parts]]
    rows = 0
    t = time.perf_counter()
    for path in inputs:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=262_144):
            rows += batch.num_rows
    for kind, compression in (("rejected", "zstd"), ("ledger", "zstd")):
        for i, table in enumerate(tables[kind]):
            pq.write_table(table, out / f"{kind}-{i}.parquet", compression=compression, **writer_options(table.schema))
    for i, table in enumerate(kept):
        staged = out / f"staged-{i}.parquet"
        pq.write_table(table, staged, compression="snappy", **writer_options(table.schema))
        back = pq.read_table(staged)
        pq.write_table(back, out / f"kept-{i}.parquet", compression="zstd", **writer_options(back.schema))
    return rows, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--rss-sizes", default="1000000,10000000",
                        help="sizes at which the no-language-id pipeline's peak RSS is compared ('' to skip)")
    parser.add_argument("--baseline-rows", type=int, default=300_000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--compare-with", type=Path, default=None,
                        help="another qvl source tree, run on the same rows beside this one")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each pipeline; the best one counts")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="qvl-bench-"))
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"polars {pl.__version__}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    t = time.perf_counter()
    data = work / f"rows-{args.rows}"
    if not data.exists():
        generate(data, args.rows)
    print(f"generated {args.rows:,} DataComp-shaped rows in {time.perf_counter() - t:.1f}s under {data}\n")

    checkouts = {"this": None, **({"compared": args.compare_with.resolve()} if args.compare_with else {})}
    best: dict[tuple[str, str], dict] = {}
    for _ in range(args.repeat):  # alternate, so a slower spell of the machine hits both alike
        for mode, extra in (("no_lang", ["--skip-rule", "lang"]), ("whole", [])):
            for name, checkout in checkouts.items():
                r = run_pipeline(data, work / f"out-{mode}-{name}", extra, checkout)
                if (name, mode) not in best or r["seconds"] < best[name, mode]["seconds"]:
                    best[name, mode] = r
    no_lang, whole = best["this", "no_lang"], best["this", "whole"]

    first = next(data.glob("*.parquet"))
    sample = pl.read_parquet(first).head(args.baseline_rows).to_dicts()
    t = time.perf_counter()
    baseline_reasons = per_row_baseline(sample)
    baseline_rate = len(sample) / (time.perf_counter() - t)
    engine_rate, engine_reasons = rule_engine(first, args.baseline_rows)
    agree = sum(a == b for a, b in zip(baseline_reasons, engine_reasons))

    def floor(tuned: bool | None, parts: int) -> float:
        """rows/s of ``parts`` floor processes started together, one per core, on disjoint shards;
        ``tuned`` None: the floor of this design (``design_floor`` on the run without language id)."""
        def call(k: int) -> str:
            if tuned is None:
                return (f"c.design_floor(Path({str(data)!r}), Path({str(work / 'out-no_lang-this')!r}), "
                        f"Path({str(work / f'design-floor-{k}')!r}), {k}, {parts})")
            return f"c.io_floor(Path({str(data)!r}), Path({str(work / f'io-floor-{k}')!r}), {tuned}, {k}, {parts})"
        procs = [subprocess.Popen(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
             f"import curate_filter as c; from pathlib import Path; print(*{call(k)})"],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "POLARS_MAX_THREADS": "1"}) for k in range(parts)]
        results = [p.communicate()[0].split() for p in procs]
        if any(p.returncode for p in procs):
            sys.exit("the I/O floor run failed")
        return sum(int(r[0]) for r in results) / max(float(r[1]) for r in results)

    cores = os.cpu_count() or 1
    io_rate, io_all, io_all_tuned = floor(False, 1), floor(False, cores), floor(True, cores)
    io_design = floor(None, cores)
    rate_no_lang = no_lang["rows"] / no_lang["seconds"]
    rate_whole = whole["rows"] / whole["seconds"]
    print("| measure | figure | target |")
    print("|---|---:|---:|")
    print(f"| pipeline without language id | {rate_no_lang:,.0f} rows/s | >= 3,000,000 |")
    print(f"| I/O floor: read + write each row once, no rules, 1 process on 1 thread | {io_rate:,.0f} rows/s | |")
    print(f"| the floor on every core: {cores} such processes at once, pyarrow's writer / qvl's settings | "
          f"{io_all:,.0f} / {io_all_tuned:,.0f} rows/s | |")
    print(f"| pipeline without language id / the floor on every core: pyarrow's writer, qvl's | "
          f"{rate_no_lang / io_all:.1%} / {rate_no_lang / io_all_tuned:.1%} | >= 50% |")
    print(f"| the I/O of this design on every core, no rules: read; write the run's rejects and ledger; "
          f"stage, read back and write the kept rows | {io_design:,.0f} rows/s | |")
    print(f"| pipeline without language id / the I/O of this design | {rate_no_lang / io_design:.1%} | |")
    print(f"| per-row Python loop, same rules, in memory, 1 core (baseline) | {baseline_rate:,.0f} rows/s | |")
    print(f"| qvl's rules, in memory, same rows (no I/O), {pl.thread_pool_size()} threads | "
          f"{engine_rate:,.0f} rows/s | |")
    print(f"| speed-up over the per-row loop: rules alone / whole pipeline | "
          f"{engine_rate / baseline_rate:.1f}x / {rate_no_lang / baseline_rate:.1f}x | >= 20x |")
    print(f"| rows whose drop reason both give alike (must be all) | {agree:,} of {len(sample):,} | |")
    print(f"| whole pipeline with language id | {rate_whole:,.0f} input rows/s | >= 150,000 |")
    print(f"| rows reaching language id | {whole['rows'] and no_lang['kept'] / no_lang['rows']:.1%} of input | |")
    print(f"| peak RSS, {args.rows:,} rows, whole pipeline | {whole['rss_mib']:,.0f} MiB | |")
    if args.compare_with:
        for mode, label in (("no_lang", "without language id"), ("whole", "with language id")):
            old, new = (best[n, mode]["rows"] / best[n, mode]["seconds"] for n in ("compared", "this"))
            print(f"| {label}: {args.compare_with} -> this checkout | {old:,.0f} -> {new:,.0f} rows/s "
                  f"({new / old:.2f}x) | |")
    for size in [int(s) for s in args.rss_sizes.split(",") if s]:
        folder = work / f"rows-{size}"
        if not folder.exists():
            generate(folder, size)
        r = run_pipeline(folder, work / f"out-rss-{size}", ["--skip-rule", "lang"])
        print(f"| peak RSS, {size:,} rows, without language id | {r['rss_mib']:,.0f} MiB "
              f"({r['rows'] / r['seconds']:,.0f} rows/s) | flat |")


if __name__ == "__main__":
    main()
