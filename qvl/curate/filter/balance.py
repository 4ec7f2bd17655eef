"""Which clean pairs to keep: the subset's balance, decided after rules 1-12 on their survivors.

Three choices the best curated sets since Qwen-VL made, each optional, each a drop step with
its reason in the funnel, applied in this order:

1. ``clip_top_fraction`` (DataComp's best baseline keeps the top 30% by CLIP L/14): per source
   (or per source and language), keep the pairs whose CLIP score is among the top F of their
   group; the threshold is exact over the whole run (every survivor's score collected in a first
   pass, the k-th largest taken) and written to the report. Unscored pairs pass and are counted.
2. ``balance`` (MetaCLIP): each caption is matched against a list of entries (substrings, with
   Aho-Corasick); counting matches per entry over the run, a pair is kept with probability
   ``max over its entries of min(1, t / count)``: the head of the distribution is flattened, the
   tail kept whole. A caption matching no entry is dropped (``no_entry``).
3. ``lang_mix`` (Qwen-VL's 77.3% English / 22.7% Chinese): last, on the survivors of every
   other rule and step, counted over the whole run. T is the largest total whose every share
   fits in what its language holds; each language keeps round(T x share) rows (the limiting one
   all of its own), so the kept set holds the mix exactly, within one row a language. Which
   rows: a language's survivors of lowest draw, ties broken by row id — not a coin per row,
   whose mix holds only on average. A language not in the mix is dropped.

Every random choice is a hash of (seed, step, row id): a rerun, the Ray engine and
``--from-ledger`` draw alike. The passes over the kept partitions are tasks on the run's engine:
one gathers scores and entry counts; one decides steps 1-2, keeps each row's language and
lang_mix draw aside, and returns the survivors' counts and a histogram of their draws per
language (2^16 buckets: the driver never holds one number a row); when a language's cut falls
inside a bucket, one small pass gathers that bucket's (draw, row id) from every partition, and
the driver fixes the cut; the last decides step 3 and rewrites the partition (its dropped rows
go to ``rejected/balance-K.parquet``, their facts to ``ledger/balance/K.parquet``).
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from qvl.boundary import read_text
from qvl.common import storage
from qvl.curate.settings import FilterSettings
from qvl.errors import QvlError

# MetaCLIP's 500k entries are words and short phrases (a few MB in all). An entry is a path of
# that many nodes in the Aho-Corasick trie, which pyahocorasick frees by recursion: one entry of
# 1M characters overflows the C stack (SIGSEGV), so each is bounded; and each character may be a
# node of ~50 bytes in every worker, so the file is too (16 MiB: under 1 GB a worker).
MAX_ENTRY_CHARS = 1000
MAX_ENTRIES_BYTES = 16 << 20
# lang_mix: the driver sums a histogram of the survivors' draws per language in this many buckets
# (512 KB each), to find the bucket of each language's cut without collecting every draw
MIX_BUCKETS = 1 << 16


def active(s: FilterSettings) -> bool:
    return s.clip_top_fraction is not None or bool(s.balance_entries) or bool(s.lang_mix)


def read_entries(path: str | Path) -> list[str]:
    """The entries of a ``--balance`` file, one a line (lines end at ``\n`` alone, as ``wc -l``
    and editors count them; whitespace around an entry is dropped, blank lines skipped); a file
    that cannot be read, is too large, is not UTF-8, holds an entry too long, an entry that could
    never match, or no entry is one QvlError naming it (and the line)."""
    text = read_text(path, MAX_ENTRIES_BYTES, QvlError, " (balance entries are words and short phrases, one a line)")
    entries = []
    for n, line in enumerate(text.removeprefix("\ufeff").split("\n"), 1):
        if len(entry := line.strip()) > MAX_ENTRY_CHARS:
            raise QvlError(f"{path}:{n}: an entry of {len(entry):,} characters; "
                           f"balance entries are words and short phrases (at most {MAX_ENTRY_CHARS:,})")
        if problem := _unmatchable(entry):
            raise QvlError(f"{path}:{n}: {problem}")
        if entry:
            entries.append(entry)
    if not entries:
        raise QvlError(f"{path}: no entries (every line is blank); give one entry a line")
    return entries


def _unmatchable(entry: str) -> str | None:
    """What in ``entry`` no caption holds once cleaned, said for a message: the filter's
    ``unicode`` and ``irregular`` rules turn controls, invisible format characters (zero-width,
    bidi) and any whitespace run into one plain space, so such an entry could never match."""
    never = "in an entry: captions are cleaned of it, so the entry could never match"
    for c in entry:
        kind = unicodedata.category(c)
        if c.isspace() and c != " ":  # a tab, \v, \f, U+0085, U+2028/9, U+3000...
            return f"whitespace other than a plain space ({c!r}, U+{ord(c):04X}) {never}"
        if kind == "Cc":
            return (f"a control character ({c!r}) in an entry; balance entries are words and short phrases "
                    "(is this a text file?)")
        if kind == "Cf":
            return f"an invisible format character ({c!r}, U+{ord(c):04X}: zero-width, bidi...) {never}"
    return f"two spaces in a row {never}" if "  " in entry else None


@lru_cache(maxsize=2)
def automaton(path: str):
    """(Aho-Corasick automaton over the entries, the entries) — built once per process."""
    import ahocorasick

    entries = read_entries(path)
    auto = ahocorasick.Automaton()
    for i, entry in enumerate(entries):
        auto.add_word(entry, i)
    auto.make_automaton()
    return auto, entries


def matches(texts: list[str | None], path: str) -> pa.ListArray:
    """The entries (indices) each text holds as a substring, each once: a list column built
    from one flat buffer (a list of Python lists would cost more than the matching)."""
    auto, _ = automaton(path)
    flat: list[int] = []
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    for n, t in enumerate(texts):
        if t:
            flat.extend(sorted({i for _, i in auto.iter(t)}))
        offsets[n + 1] = len(flat)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.array(flat, dtype=np.int32)))


def _flat(entries: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column as numpy arrays."""
    entries = entries.combine_chunks() if isinstance(entries, pa.ChunkedArray) else entries
    offsets = entries.offsets.to_numpy()
    return entries.values.to_numpy()[offsets[0]:offsets[-1]], offsets - offsets[0]


def _counts(values: np.ndarray) -> dict[int, int]:
    keys, counts = np.unique(values, return_counts=True)
    return dict(zip(keys.tolist(), counts.tolist()))


def uniform(seed: int, step: str, row_ids: pl.Series) -> np.ndarray:
    """A number in [0, 1) per row id, the same wherever it is drawn: polars' hash of the id,
    seeded by (seed, step) — stable for a polars version, which the run's fingerprint records."""
    salt = int.from_bytes(hashlib.blake2b(f"{seed}\0{step}".encode(), digest_size=8).digest(), "little")
    hashed = row_ids.hash(seed=salt % (2 ** 63)).to_numpy()
    return (hashed >> np.uint64(11)).astype(np.float64) / float(2 ** 53)


def _group(frame: pl.DataFrame, s: FilterSettings) -> pl.Expr:
    return pl.concat_str(["source", "lang"], separator="/") if s.clip_top_by == "source_lang" else pl.col("source")


# ---------------------------------------------------------------- pass 1: what the run holds


def gather(path: Path, s: FilterSettings, matched: Path) -> dict:
    """One kept partition's CLIP scores per group and entry counts; each caption's entries are
    kept aside in ``matched`` for pass 2 (matched once)."""
    frame = pl.read_parquet(path, columns=["row_id", "text", "source", "lang", "clip_score"])
    out: dict = {"rows": frame.height}
    if s.clip_top_fraction is not None:
        scored = frame.filter(pl.col("clip_score").is_not_null()).with_columns(_g=_group(frame, s))
        out["scores"] = {g: part.get_column("clip_score").to_numpy()
                         for (g,), part in scored.partition_by("_g", as_dict=True).items()}
    if s.balance_entries:
        found = matches(frame.get_column("text").to_list(), s.balance_entries)
        storage.write_parquet(matched, pa.table({"entries": found}))
        out["entry_counts"] = _counts(_flat(found)[0])
    return out


def thresholds(gathered: list[dict], fraction: float) -> dict[str, dict]:
    """The exact top-``fraction`` threshold of each group: the k-th largest score."""
    groups: dict[str, list[np.ndarray]] = {}
    for g in gathered:
        for name, scores in g.get("scores", {}).items():
            groups.setdefault(name, []).append(scores)
    out = {}
    for name, parts in sorted(groups.items()):
        scores = np.concatenate(parts)
        k = max(1, math.ceil(fraction * scores.size))
        out[name] = {"threshold": float(np.partition(scores, scores.size - k)[scores.size - k]),
                     "scored": int(scores.size), "keep": k}
    return out


def merge_counts(gathered: list[dict]) -> dict[int, int]:
    total: dict[int, int] = {}
    for g in gathered:
        for i, n in g.get("entry_counts", {}).items():
            total[i] = total.get(i, 0) + n
    return total


# ---------------------------------------------------------------- pass 2: decide


@dataclass(frozen=True)
class Plan:
    """What pass 1 found, for every partition's decisions."""

    top: dict[str, dict]  # group -> threshold
    entry_counts: dict[int, int]


def _reasons(frame: pl.DataFrame, s: FilterSettings, plan: Plan, matched: Path) -> tuple[pl.Series, pa.Array]:
    """Steps 1 and 2 on a kept partition: the drop reason (or null) and each caption's entries."""
    reason = pl.Series("r", [None] * frame.height, dtype=pl.String)
    if plan.top:
        limit = frame.select(_group(frame, s).replace_strict({g: t["threshold"] for g, t in plan.top.items()},
                                                            default=None, return_dtype=pl.Float64)).to_series()
        below = (frame.get_column("clip_score") < limit).fill_null(False)
        reason = pl.select(pl.when(below).then(pl.lit("clip_top_fraction")).otherwise(reason)).to_series()
    found = pa.LargeListArray.from_arrays(pa.array(np.zeros(frame.height + 1, dtype=np.int64)),
                                          pa.array([], pa.int32()))
    if s.balance_entries:
        found = pq.read_table(matched).column("entries").combine_chunks()
        values, offsets = _flat(found)
        counts = np.zeros(max(plan.entry_counts, default=0) + 1, dtype=np.float64)
        counts[list(plan.entry_counts)] = list(plan.entry_counts.values())
        p_entry = np.minimum(1.0, s.balance_t / counts[values]) if values.size else np.zeros(0)
        keep_p = np.full(frame.height, -1.0)  # -1: no entry
        nonempty = offsets[1:] > offsets[:-1]
        if values.size:
            keep_p[nonempty] = np.maximum.reduceat(p_entry, offsets[:-1][nonempty])
        draw = uniform(s.balance_seed, "balance", frame.get_column("row_id"))
        new = np.where(keep_p < 0, "no_entry", np.where(draw >= keep_p, "balance", None))
        reason = pl.select(pl.coalesce(reason, pl.Series(new.tolist(), dtype=pl.String))).to_series()
    return reason, found


def first(path: Path, s: FilterSettings, plan: Plan, work: Path, matched: Path) -> dict:
    """Pass 2: steps 1-2 decided and kept aside with each row's language and lang_mix draw; the
    survivors counted per language, and (with a mix) their draws' histogram per language of
    the mix: what the driver needs to find each language's cut without seeing every draw."""
    frame = pl.read_parquet(path, columns=["row_id", "source", "lang", "clip_score"])
    reason, found = _reasons(frame, s, plan, matched)
    columns = {"row_id": frame.get_column("row_id").to_arrow(), "lang": frame.get_column("lang").to_arrow(),
               "reason": reason.to_arrow(), "entries": found}
    out: dict = {"lang": {k: v for k, v in frame.filter(reason.is_null()).group_by("lang").len().iter_rows()}}
    if s.lang_mix:
        draw = uniform(s.balance_seed, "lang_mix", frame.get_column("row_id"))
        columns["draw"] = pa.array(draw)
        survivors = reason.is_null().to_numpy()
        langs = frame.get_column("lang").to_numpy()
        out["hist"] = {lang: np.bincount(_bucket(draw[survivors & (langs == lang)]), minlength=MIX_BUCKETS)
                       for lang, share in s.lang_mix.items() if share > 0 and lang in out["lang"]}
    storage.write_parquet(work, pa.table(columns))
    return out


def add_into(total: dict, part: dict) -> dict:
    """``total`` plus ``part``, key by key (numbers or histograms): the driver sums the
    partitions' results as they arrive, holding one histogram per language, not one a partition."""
    for key, value in part.items():
        total[key] = total.get(key, 0) + value
    return total


# ---------------------------------------------------------------- step 3: the exact mix


def mix_targets(counts: dict[str, int], mix: dict[str, float]) -> dict[str, int]:
    """How many rows of each language to keep: T x share, rounded and never above the count,
    for the largest total T whose every share > 0 fits in what its language holds (so each
    language is within one row of T x share); a language not in the mix keeps none."""
    total = min((counts.get(lang, 0) / share for lang, share in mix.items() if share > 0), default=0.0)
    return {lang: min(n, round(total * mix.get(lang, 0.0))) for lang, n in counts.items()}


def boundaries(hists: dict[str, np.ndarray], targets: dict[str, int]) -> dict[str, tuple[int, int, int]]:
    """Per language kept in part: (the bucket its k-th lowest draw falls in, how many of that
    bucket's rows are kept, how many it holds)."""
    out = {}
    for lang, hist in hists.items():
        cum = np.cumsum(hist)
        if 0 < (k := targets.get(lang, 0)) < cum[-1]:
            b = int(np.searchsorted(cum, k))
            out[lang] = (b, k - (int(cum[b - 1]) if b else 0), int(hist[b]))
    return out


def boundary_rows(work: Path, buckets: dict[str, int]) -> dict[str, pl.DataFrame]:
    """The optional extra pass: one partition's survivors (draw, row id) in each language's
    boundary bucket — about count / 65,536 rows a language over the whole run."""
    frame = pl.read_parquet(work, columns=["row_id", "lang", "reason", "draw"]).filter(pl.col("reason").is_null())
    bucket = _bucket(frame.get_column("draw").to_numpy())
    langs = frame.get_column("lang")
    return {lang: frame.filter((langs == lang).fill_null(False).to_numpy() & (bucket == b)).select("draw", "row_id")
            for lang, b in buckets.items()}


def mix_cuts(counts: dict[str, int], targets: dict[str, int], edges: dict[str, tuple[int, int, int]],
             rows: dict[str, pl.DataFrame]) -> dict[str, tuple[float, str]]:
    """Each language's cut: the first of its survivors, in (draw, row id) order, not kept — so
    exactly its target sorts before it. A boundary bucket kept whole cuts at the bucket's end
    (row id "": the draw alone decides); none kept cuts at 0, all at 1."""
    cuts = {}
    for lang, n in counts.items():
        k = targets.get(lang, 0)
        if lang in edges:
            b, need, size = edges[lang]
            if need == size:
                cuts[lang] = ((b + 1) / MIX_BUCKETS, "")
            else:
                draw, row_id = rows[lang].sort("draw", "row_id").row(need)
                cuts[lang] = (draw, row_id)
        else:
            cuts[lang] = (1.0, "") if k >= n else (0.0, "")
    return cuts


def _bucket(draw: np.ndarray) -> np.ndarray:
    """A draw's histogram bucket (exact: a draw is a multiple of 2^-53)."""
    return (draw * MIX_BUCKETS).astype(np.int64)


def finish(path: Path, s: FilterSettings, cuts: dict[str, tuple[float, str]], work: Path) -> tuple[pl.DataFrame, dict]:
    """Pass 3: step 3 on what steps 1-2 left — a survivor is kept when its (draw, row id) sorts
    before its language's cut; the partition with ``balance_reason``, and the entry counts of
    what is finally kept."""
    frame = pl.read_parquet(path)
    decided = pl.read_parquet(work, columns=["reason", *(["draw"] if s.lang_mix else [])])
    reason = decided.get_column("reason")
    if s.lang_mix:
        lang, named = frame.get_column("lang"), {k: c for k, c in cuts.items() if k is not None}
        cut_draw = lang.replace_strict({k: c[0] for k, c in named.items()}, default=0.0, return_dtype=pl.Float64)
        cut_row = lang.replace_strict({k: c[1] for k, c in named.items()}, default="", return_dtype=pl.String)
        draw, row_id = decided.get_column("draw"), frame.get_column("row_id")
        kept = ((draw < cut_draw) | ((draw == cut_draw) & (row_id < cut_row))).fill_null(False).to_numpy()
        reason = pl.select(pl.coalesce(reason, pl.Series(np.where(kept, None, "lang_mix").tolist(),
                                                           dtype=pl.String))).to_series()
    values, offsets = _flat(pq.read_table(work, columns=["entries"]).column("entries").combine_chunks())
    kept_rows = reason.is_null().to_numpy()
    per_row = np.repeat(kept_rows, np.diff(offsets))
    return frame.with_columns(balance_reason=reason), _counts(values[per_row])


def plot_entries(before: dict[int, int], after: dict[int, int], path: Path) -> None:
    """The entries' match counts, sorted, before and after balancing (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = False
    for counts, label in ((before, "before"), (after, "after")):
        values = sorted((n for n in counts.values() if n), reverse=True)
        if values:
            ax.plot(range(1, len(values) + 1), values, label=f"{label} ({sum(values):,} matches)")
            plotted = True
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("entry rank")
    ax.set_ylabel("pairs matching the entry")
    if plotted:  # no caption matched: a legend of nothing would warn on stderr
        ax.legend()
    fig.tight_layout()
    with storage.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
