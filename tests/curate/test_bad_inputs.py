"""`qvl curate filter` against broken and hostile inputs: each case ends either with every
input line in kept or rejected (a reject naming its row and reason) or with a one-line
error naming the file, the line or the setting — never a traceback, never a silent loss."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from qvl.cli import app
from qvl.curate.filter.pipeline import run_filter
from qvl.curate.settings import FilterSettings, RunSettings
from qvl.errors import QvlError

runner = CliRunner()
CAPTION = "a red bus parked on a quiet street"


def filter_cli(tmp_path: Path, inputs: list[Path], *extra: str, out: Path | None = None, quick: bool = True):
    """The command as a user types it; ``quick``: one process, no language id."""
    out = out or tmp_path / "out"
    result = runner.invoke(app, ["curate", "filter", *map(str, inputs), "--out", str(out), "--no-progress",
                                 *(["--skip-rule", "lang", "--workers", "1"] if quick else []), *extra])
    return result, out


def outcomes(out: Path) -> dict[str, str | None]:
    """row_id -> drop_reason (None: kept), over both outputs."""
    kept = pl.read_parquet(out / "kept" / "*.parquet") if list((out / "kept").glob("*.parquet")) else None
    rejected = pl.read_parquet(out / "rejected" / "*.parquet")
    found = {} if kept is None else dict.fromkeys(kept["row_id"])
    found.update(zip(rejected["row_id"], rejected["drop_reason"]))
    return found


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.startswith("error:"), result.output
    return " ".join(result.output.split())


# ---------------------------------------------------------------- one bad row: a reject, never a crash

ROW_CASES = {
    # file name, content, expected outcome per row id
    "malformed JSONL line, layout with sizes and scores": (
        "pairs.jsonl",
        json.dumps({"URL": "http://x.test/1.jpg", "TEXT": CAPTION, "WIDTH": 640, "HEIGHT": 480, "similarity": 0.3})
        + "\n{\"URL\": \"http://x.test/2.jpg\", \"TEXT\": \n"
        + json.dumps({"URL": "http://x.test/3.jpg", "TEXT": CAPTION + " again", "WIDTH": 640, "HEIGHT": 480,
                      "similarity": 0.3}) + "\n",
        {"pairs.jsonl:1": None, "pairs.jsonl:2": "malformed_row", "pairs.jsonl:3": None}),
    "first JSONL line malformed": (
        "pairs.jsonl",
        "not json at all\n" + json.dumps({"url": "http://x.test/1.jpg", "text": CAPTION}) + "\n",
        {"pairs.jsonl:1": "malformed_row", "pairs.jsonl:2": None}),
    "UTF-8 BOM before the first JSONL line": (
        "pairs.jsonl", "\ufeff" + json.dumps({"url": "http://x.test/1.jpg", "text": CAPTION}) + "\n",
        {"pairs.jsonl:1": None}),
    "JSONL size that is a string, a list or a boolean": (
        "pairs.jsonl",
        "".join(json.dumps({"url": f"http://x.test/{i}.jpg", "text": f"{CAPTION} {i}", "width": w, "height": 480}) + "\n"
                for i, w in enumerate(["640", [640], True, "wide"])),
        {"pairs.jsonl:1": None, "pairs.jsonl:2": "malformed_row", "pairs.jsonl:3": "malformed_row",
         "pairs.jsonl:4": "malformed_row"}),
    "NaN and infinite sizes and scores in JSONL (Python's json reads them)": (
        "pairs.jsonl",
        '{"url": "http://x.test/1.jpg", "text": "%s", "width": NaN, "height": 480, "clip_score": Infinity}\n'
        '{"url": "http://x.test/2.jpg", "text": "%s two", "width": 1e400, "height": -Infinity}\n' % (CAPTION, CAPTION),
        {"pairs.jsonl:1": None, "pairs.jsonl:2": None}),
    "malformed CSV line in a layout with sizes": (
        "pairs.csv",
        f"URL,TEXT,WIDTH,HEIGHT,similarity\nhttp://x.test/1.jpg,{CAPTION},640,480,0.3\nonly,three,fields\n"
        f"http://x.test/3.jpg,{CAPTION} three,640,480,0.3\n",
        {"pairs.csv:2": None, "pairs.csv:3": "malformed_row", "pairs.csv:4": None}),
    "CSV size that is not a number": (
        "pairs.csv", f"url,text,width,height\nhttp://x.test/1.jpg,{CAPTION},wide,480\n"
        f"http://x.test/2.jpg,{CAPTION} two,nan,480\n",
        {"pairs.csv:2": "malformed_row", "pairs.csv:3": None}),
    "CSV quoted caption over two lines keeps the line numbers true": (
        "pairs.csv", f'url,text\nhttp://x.test/1.jpg,"{CAPTION}\nover two lines"\nhttp://x.test/2.jpg,{CAPTION}\n',
        {"pairs.csv:2": None, "pairs.csv:4": None}),
    "TSV with a row of the wrong field count and a size that is text": (
        "pairs.tsv", f"url\ttext\twidth\thttp\nhttp://x.test/1.jpg\t{CAPTION}\n"
        f"http://x.test/2.jpg\t{CAPTION}\tx\t3\nhttp://x.test/3.jpg\t{CAPTION} 3\t640\t1\n",
        {"pairs.tsv:2": "malformed_row", "pairs.tsv:3": "malformed_row", "pairs.tsv:4": None}),
    "bytes that are not UTF-8": (
        "pairs.tsv", None,  # written below as bytes
        {"pairs.tsv:1": "invalid_utf8", "pairs.tsv:2": None}),
    "headerless CC12M TSV whose first line is odd": (
        "cc12m.tsv", "caption\turl\n" + "".join(f"http://x.test/{i}.jpg\t{CAPTION} {i}\n" for i in range(20)),
        {"cc12m.tsv:1": "length", **{f"cc12m.tsv:{i + 2}": None for i in range(20)}}),  # "url" is one word
    "empty lines and control characters": (
        "pairs.jsonl",
        "\n" + json.dumps({"url": "http://x.test/1.jpg", "text": "a red\u202e bus\x00 on a street"}) + "\n\n",
        {"pairs.jsonl:1": "malformed_row", "pairs.jsonl:2": None, "pairs.jsonl:3": "malformed_row"}),
    "JSONL lone surrogate escapes (Python's json reads them; UTF-8 cannot hold them), a proper pair kept": (
        "pairs.jsonl",
        '{"URL":"http://x.test/1.jpg","TEXT":"a \\ud800 bus parked","WIDTH":640,"HEIGHT":480}\n'
        '{"url":"http://x.test/2.jpg","text":"%s","\\udfff":1}\n'
        '{"url":"http://x.test/3.jpg","text":"%s \\ud83d\\ude8c"}\n' % (CAPTION, CAPTION),
        {"pairs.jsonl:1": "invalid_utf8", "pairs.jsonl:2": "invalid_utf8", "pairs.jsonl:3": "emoji"}),
    "JSONL lines nested past the recursion limit, first and later": (
        "pairs.jsonl",
        "[" * 100_000 + "\n" + json.dumps({"url": "http://x.test/2.jpg", "text": CAPTION}) + "\n"
        + '{"url": "http://x.test/3.jpg", "text": "%s", "x": %s}\n' % (CAPTION, "[" * 100_000 + "]" * 100_000)
        + json.dumps({"url": "http://x.test/4.jpg", "text": CAPTION + " four"}) + "\n",
        {"pairs.jsonl:1": "malformed_row", "pairs.jsonl:2": None, "pairs.jsonl:3": "malformed_row",
         "pairs.jsonl:4": None}),
}


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_one_bad_row_is_a_reject_with_its_reason(tmp_path, case):
    name, content, expected = ROW_CASES[case]
    path = tmp_path / name
    if content is None:
        path.write_bytes(b"http://x.test/1.jpg\ta caption \xff\xfe broken\nhttp://x.test/2.jpg\t" + CAPTION.encode() + b"\n")
        path = path.with_name("pairs.tsv")
        args = ["--map", "url=url,text=text"]
        path.write_bytes(b"url\ttext\n" + path.read_bytes())
        expected = {"pairs.tsv:2": "invalid_utf8", "pairs.tsv:3": None}
    else:
        path.write_text(content, encoding="utf-8")
        args = []
    result, out = filter_cli(tmp_path, [path], *args)
    assert result.exit_code == 0, result.output
    assert outcomes(out) == expected
    report = json.loads((out / "report.json").read_text())
    assert report["accounted"] and report["input_rows"] == len(expected)


def test_non_finite_sizes_are_unknown_non_finite_scores_invalid_and_both_counted(tmp_path):
    path = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"URL": [f"http://x.test/{i}.jpg" for i in range(4)], "TEXT": [CAPTION + f" {i}" for i in range(4)],
                             "WIDTH": [float("nan"), 640.0, float("inf"), 1e300], "HEIGHT": [480.0] * 4,
                             "similarity": [float("nan"), float("-inf"), 0.3, 0.3]}), path)
    result, out = filter_cli(tmp_path, [path])
    assert result.exit_code == 0, result.output
    assert outcomes(out) == {"laion.parquet:0": "invalid_score", "laion.parquet:1": "invalid_score",
                             "laion.parquet:2": None, "laion.parquet:3": None}
    kept = pl.read_parquet(out / "kept" / "*.parquet").sort("row_id")
    assert kept["width"].to_list() == [None, None]  # never -9223372036854775808
    report = json.loads((out / "report.json").read_text())
    laion = report["by_source"]["laion"]
    assert laion["non_finite_numbers"] == 4 and laion["clip_unscored"] == 0
    assert laion["invalid_scores"]["clip_score"] == 2 and laion["dropped"] == {"invalid_score": 2}

    result, out = filter_cli(tmp_path, [path], "--keep-unscored", out=tmp_path / "keep")
    assert result.exit_code == 0, result.output
    kept = pl.read_parquet(out / "kept" / "*.parquet").sort("row_id")
    assert kept["width"].to_list() == [None, 640, None, None]
    assert kept["clip_score"].to_list() == [None, None, 0.3, 0.3]
    assert kept["invalid_scores"].to_list() == [["clip_score"], ["clip_score"], [], []]
    laion = json.loads((out / "report.json").read_text())["by_source"]["laion"]
    assert laion["invalid_scores"]["clip_score"] == 2 and laion["clip_unscored"] == 0 and laion["dropped"] == {}


def test_empty_score_cells_in_csv_and_jsonl_are_invalid_a_missing_column_is_not(tmp_path):
    """A CSV cell left empty and a JSONL record without the key (the first record has it) are a
    column with no value: invalid_score; a file without the column at all: unscored, kept."""
    (tmp_path / "a.csv").write_text(f"URL,TEXT,pwatermark\nhttp://x.test/1.jpg,{CAPTION},0.1\n"
                                    f"http://x.test/2.jpg,{CAPTION} two,\nhttp://x.test/3.jpg,{CAPTION} three, \n")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"URL": "http://x.test/4.jpg", "TEXT": CAPTION + " four", "punsafe": 0.1},
        {"URL": "http://x.test/5.jpg", "TEXT": CAPTION + " five"},
        {"URL": "http://x.test/6.jpg", "TEXT": CAPTION + " six", "punsafe": None},
        {"URL": "http://x.test/7.jpg", "TEXT": CAPTION + " seven", "punsafe": float("nan")}]) + "\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"URL": "http://x.test/8.jpg", "TEXT": CAPTION + " eight"}) + "\n")
    result, out = filter_cli(tmp_path, [tmp_path / "a.csv", tmp_path / "b.jsonl", tmp_path / "c.jsonl"])
    assert result.exit_code == 0, result.output
    assert outcomes(out) == {"a.csv:2": None, "a.csv:3": "invalid_score", "a.csv:4": "invalid_score",
                             "b.jsonl:1": None, "b.jsonl:2": "invalid_score", "b.jsonl:3": "invalid_score",
                             "b.jsonl:4": "invalid_score", "c.jsonl:1": None}
    laion = json.loads((out / "report.json").read_text())["by_source"]["laion"]
    assert laion["invalid_scores"] == {"clip_score": 0, "nsfw": 3, "watermark": 2, "aesthetic": 0}
    assert laion["unscored"] == {"nsfw": 3 + 1, "watermark": 4 + 1, "aesthetic": 8}


# ---------------------------------------------------------------- a whole file or setting: one clear line


def test_unterminated_csv_quote_is_an_error_never_a_merge(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text(f'url,text\nhttp://x.test/1.jpg,"{CAPTION}\nhttp://x.test/2.jpg,{CAPTION}\n'
                    f'http://x.test/3.jpg,{CAPTION}\n')
    message = one_line_error(filter_cli(tmp_path, [path])[0])
    assert "pairs.csv:2:" in message and "not closed" in message and "line 4" in message
    path.write_text('url,text\nhttp://x.test/1.jpg,"a dog\nhttp://x.test/2.jpg,"a cat",x\n')  # closed mid-field
    assert "pairs.csv:2:" in one_line_error(filter_cli(tmp_path, [path], out=tmp_path / "out2")[0])


def test_same_file_twice_is_refused_and_same_names_stay_apart(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "part.jsonl").write_text(json.dumps({"url": f"http://x.test/{folder}.jpg",
                                                                  "text": f"{CAPTION} {folder}"}) + "\n")
    message = one_line_error(filter_cli(tmp_path, [tmp_path / "a" / "part.jsonl", tmp_path / "a" / ".." / "a" / "part.jsonl"])[0])
    assert "given twice" in message
    result, out = filter_cli(tmp_path, [tmp_path / "a", tmp_path / "b"])
    assert result.exit_code == 0, result.output
    assert set(outcomes(out)) == {"a/part.jsonl:1", "b/part.jsonl:1"}


@pytest.mark.parametrize("recipe, message", [
    ('[filter]\nmin_side = "big"\n', "r.toml [filter]: min_side: 'big' is not int"),
    ("[filter]\nclip_thresholds = 0.3\n", "r.toml [filter]: clip_thresholds: 0.3 is not dict"),
    ('[filter]\nskip_rules = "emoji"\n', "r.toml [filter]: skip_rules: 'emoji' is not tuple"),
    ("[filter]\nmin_units = 9\nmax_units = 3\n", "r.toml [filter]: max_units: 3: must be >= min_units (9)"),
    ('[filter]\nlanguages = ["english"]\n', "r.toml [filter]: languages: 'english'"),
    ("[filter]\nmin_lang_score = 2\n", "min_lang_score: 2.0: a probability is in [0, 1]"),
    ("[run]\nworkers = -3\n", "r.toml [run]: workers: -3"),
    ("[run]\nbatch_rows = 0\n", "r.toml [run]: batch_rows: 0: must be >= 1"),
    ('[run]\nengine = "spark"\n', "engine: 'spark': use local or ray"),
    ("filter = 3\n", "r.toml: [filter] must be a table"),
    ("[filtre]\n", "unknown table(s) filtre; use [filter] and [run]"),
])
def test_recipe_values_are_checked_with_file_and_key(tmp_path, recipe, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"url": "http://x.test/1.jpg", "text": CAPTION}) + "\n")
    (tmp_path / "r.toml").write_text(recipe)
    text = one_line_error(filter_cli(tmp_path, [path], "--recipe", str(tmp_path / "r.toml"), quick=False)[0])
    assert message in text and not (tmp_path / "out").exists()


@pytest.mark.parametrize("options, message", [
    (["--min-units", "5", "--max-units", "2"], "max_units: 2: must be >= min_units (5)"),
    (["--languages", "en,"], "languages"),
    (["--clip-threshold", "laion=high"], "--clip-threshold laion=high: not a number"),
    (["--engine", "spark"], "engine: 'spark'"),
])
def test_option_values_are_checked(tmp_path, options, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"url": "http://x.test/1.jpg", "text": CAPTION}) + "\n")
    assert message in one_line_error(filter_cli(tmp_path, [path], *options)[0])


def test_out_that_is_a_file_or_unwritable(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"url": "http://x.test/1.jpg", "text": CAPTION}) + "\n")
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in one_line_error(filter_cli(tmp_path, [path], out=tmp_path / "file")[0])
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "cannot write here" in one_line_error(filter_cli(tmp_path, [path], out=locked / "out")[0])


def test_overwrite_never_deletes_a_folder_qvl_did_not_write(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"url": "http://x.test/1.jpg", "text": CAPTION}) + "\n")
    precious = tmp_path / "home"
    (precious / "kept").mkdir(parents=True)
    (precious / "kept" / "thesis.parquet").write_text("years of work")
    (precious / "report.md").write_text("notes")
    message = one_line_error(filter_cli(tmp_path, [path], "--overwrite", out=precious)[0])
    assert "not a qvl output" in message
    assert (precious / "kept" / "thesis.parquet").read_text() == "years of work" and (precious / "report.md").exists()
    result, out = filter_cli(tmp_path, [path])
    assert result.exit_code == 0
    again, _ = filter_cli(tmp_path, [path], "--min-side", "10", "--overwrite")  # a qvl run: replaced
    assert again.exit_code == 0 and json.loads((out / "report.json").read_text())["settings"]["min_side"] == 10


@pytest.mark.parametrize("content, message", [
    ("x" * 50 + "\n", "none of the first 1 lines is a JSON object"),
])
def test_a_file_that_is_no_jsonl(tmp_path, content, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    assert message in one_line_error(filter_cli(tmp_path, [path])[0])


def test_a_long_first_jsonl_line_is_read(tmp_path):
    path = tmp_path / "pairs.jsonl"
    big = {"url": "http://x.test/1.jpg", "text": CAPTION, "exif": "x" * (2 << 20)}  # a valid 2 MiB line
    path.write_text(json.dumps(big) + "\n" + json.dumps({"url": "http://x.test/2.jpg", "text": CAPTION + " 2"}) + "\n")
    result, out = filter_cli(tmp_path, [path])
    assert result.exit_code == 0, result.output
    assert outcomes(out) == {"pairs.jsonl:1": None, "pairs.jsonl:2": None}


def test_headerless_tsv_layout_is_a_majority_and_said(tmp_path):
    from qvl.curate.sources import shards

    path = tmp_path / "cc.tsv"
    path.write_text("".join(f"http://x.test/{i}.jpg\t{CAPTION}\n" for i in range(9)) + f"{CAPTION}\thttp://x.test/9.jpg\n")
    shard = shards.open_shard(path, 0)
    assert shard.layout.name == "cc12m" and shard.layout_note == "cc12m: 9 of 10 sampled lines are url<TAB>caption"
    path.write_text("".join(f"http://x.test/{i}.jpg\t{CAPTION}\n" for i in range(5))
                    + "".join(f"{CAPTION}\thttp://x.test/{i}.jpg\n" for i in range(5)))
    assert "clear majority" in one_line_error(filter_cli(tmp_path, [path])[0])


def test_killing_the_main_process_ends_its_workers(tmp_path):
    """kill -9 of `qvl curate filter` must not leave its worker processes running."""
    for i in range(4):
        pl.DataFrame({"url": [f"http://x.test/{i}/{j}.jpg" for j in range(300_000)],
                      "text": [f"{CAPTION} {j}" for j in range(300_000)]}).write_parquet(tmp_path / f"p{i}.parquet")
    proc = subprocess.Popen([sys.executable, "-m", "qvl.cli", "curate", "filter", str(tmp_path), "--out",
                             str(tmp_path / "out"), "--workers", "2", "--skip-rule", "lang", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def children() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == proc.pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
        return found

    deadline = time.time() + 60
    while len(children()) < 2 and time.time() < deadline:
        time.sleep(0.2)
    workers = children()
    assert workers, "the filter never started its workers"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()
                 and (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z")]
    assert not alive, f"workers {alive} outlived the killed filter"


# ---------------------------------------------------------------- --lang-model: the one model file it reads

@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "garbage", "not a model"])
def test_a_bad_language_model_is_a_one_line_error_before_any_row_is_read(tmp_path, case):
    from qvl.curate.lang.langid import default_model_path

    good = default_model_path().read_bytes()
    model = tmp_path / "lid.ftz"
    content = {"empty": b"", "truncated": good[: len(good) // 3], "garbage": os.urandom(4096),
               "not a model": b'{"this": "is json"}\n'}
    if case != "missing":
        model.write_bytes(content[case])
    shard = tmp_path / "pairs.jsonl"
    shard.write_text(json.dumps({"URL": "http://x.test/1.jpg", "TEXT": CAPTION}) + "\n")
    result, out = filter_cli(tmp_path, [shard], "--workers", "1", "--lang-model", str(model), quick=False)
    message = one_line_error(result)
    assert str(model.name) in message
    assert not (out / "kept").exists() and not (out / "rejected").exists()


# ---------------------------------------------------------------- recipes, entries, options: one bounded line

def _pairs_file(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"url": "http://x.test/1.jpg", "text": CAPTION}) + "\n")
    return path


def recipe_error(tmp_path: Path, name: str, content: str | bytes) -> str:
    recipe = tmp_path / name
    recipe.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    result, out = filter_cli(tmp_path, [_pairs_file(tmp_path)], "--recipe", str(recipe), quick=False)
    message = one_line_error(result)
    assert name in message and not out.exists(), message
    assert len(message) < 1000, len(message)
    return message


BILLION_LAUGHS = "\n".join(['a0: &a0 "lol"'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]"
                                                   for i in range(1, 9)]) + "\nname: *a8\n"


def test_a_yaml_alias_tree_is_refused_before_it_expands(tmp_path):
    """557 bytes of nested aliases name 9^8 values: refused at the first alias, never expanded."""
    assert len(BILLION_LAUGHS) < 600
    message = recipe_error(tmp_path, "r.yaml", BILLION_LAUGHS)
    assert "aliases" in message and "line 1, column 5" in message
    assert "aliases" in recipe_error(tmp_path, "r.yml", "filter: &f {min_side: 10}\nrun: {}\n")


RECIPE_CASES = {
    # name, content, what the message says
    "TOML inf": ("r.toml", "[filter]\nmax_aspect_ratio = inf\n", "max_aspect_ratio: inf: not a finite number"),
    "TOML nan in a table": ("r.toml", "[filter]\naesthetic_thresholds = { laion = nan }\n",
                            "aesthetic_thresholds.laion: nan: not a finite number"),
    "YAML .inf": ("r.yaml", "filter:\n  aesthetic_threshold_default: .inf\n",
                  "aesthetic_threshold_default: inf: not a finite number"),
    "YAML .nan": ("r.yaml", "filter:\n  clip_top_fraction: .nan\n", "clip_top_fraction: nan: not a finite number"),
    "huge int": ("r.yaml", "filter:\n  min_side: " + "9" * 400 + "\n", "min_side: an integer of 1329 bits: out of range"),
    "int of 5000 digits": ("r.yaml", "filter:\n  min_side: " + "9" * 5000 + "\n", "digits"),
    "regex repeat count": ("r.toml", "[filter]\nmax_punct_run = 9223372036854775807\n", "max_punct_run: 9223372036854775807: 1 to 1000"),
    "a process per shard": ("r.toml", "[run]\nworkers = 100000000\n", "workers: 100000000: processes, 0 (one per core) to 1024"),
    "a file per row": ("r.toml", "[run]\nmax_partitions = 9223372036854775807\n", "max_partitions"),
    "lone surrogate in a YAML string": ("r.yaml", 'filter:\n  lang_model: "\\ud800.ftz"\n', "lang_model: not valid Unicode"),
    "lone surrogate in a YAML key": ("r.yaml", 'filter:\n  "\\ud800": 1\n', "unknown setting(s) '\\ud800'"),
    "a number as a setting name": ("r.yaml", "filter:\n  1: 2\n", "setting names are text, not 1"),
    "a number as a table name": ("r.yaml", "1: {}\n", "unknown table(s) 1"),
    "a huge string": ("r.toml", '[filter]\nmin_side = "' + "x" * 500_000 + '"\n', "min_side: 'xxxxxxxx"),
    "a huge list": ("r.toml", "[filter]\ndataset_tags = [" + ", ".join(["1"] * 50_000) + "]\n", "dataset_tags: 1 is not str"),
    "nested too deeply (YAML)": ("r.yaml", "filter: " + "[" * 100_000 + "]" * 100_000 + "\n", "r.yaml"),
    "nested too deeply (TOML)": ("r.toml", "[filter]\nx = " + "[" * 100_000 + "]" * 100_000 + "\n", "r.toml"),
    "not UTF-8": ("r.toml", b"[filter]\nmin_side = 10\n# \xff\xfe\n", "r.toml:3: not UTF-8 text"),
    "larger than a recipe": ("r.toml", "# " + "x" * (2 << 20) + "\n", "larger than 1 MiB"),
    "many unknown keys": ("r.toml", "[filter]\n" + "".join(f"k{i} = 1\n" for i in range(5000)), "unknown setting(s) k0, k1"),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_a_hostile_recipe_is_one_bounded_line_naming_file_and_key(tmp_path, case):
    name, content, expected = RECIPE_CASES[case]
    assert expected in recipe_error(tmp_path, name, content)


def test_the_largest_punctuation_run_setting_still_compiles(tmp_path):
    result, out = filter_cli(tmp_path, [_pairs_file(tmp_path)], "--recipe", str(_recipe(tmp_path, "max_punct_run = 1000")))
    assert result.exit_code == 0, result.output


def _recipe(tmp_path: Path, line: str) -> Path:
    path = tmp_path / "ok.toml"
    path.write_text(f"[filter]\n{line}\n")
    return path


@pytest.mark.parametrize("content, expected", [
    (b"\n\n   \n\t\n", "entries.txt: no entries (every line is blank)"),
    (b"", "entries.txt: no entries"),
    (b"bus\ncar\n\xff\xfe street\n", "entries.txt:3: not UTF-8 text"),
    # lines end at \n alone: \v, \f, \x1c-\x1e, U+0085, U+2028/9 split no line (wc -l counts this NUL on line 4)
    (b"dog\ncat\n\v\v\v\nbird\x00\n", "entries.txt:4: a control character ('\\x00')"),
    (b"dog\x0bcat\n", "entries.txt:1: whitespace other than a plain space ('\\x0b', U+000B) in an entry: captions "
                     "are cleaned of it, so the entry could never match"),
    (b"dog\x0ccat\n", "entries.txt:1: whitespace other than a plain space ('\\x0c', U+000C)"),
    (b"dog\x1ecat\n", "entries.txt:1: whitespace other than a plain space ('\\x1e', U+001E)"),
    ("dog\ncat\x85x\n".encode(), "entries.txt:2: whitespace other than a plain space ('\\x85', U+0085)"),
    ("dog\u2028cat\n".encode(), "entries.txt:1: whitespace other than a plain space ('\\u2028', U+2028)"),
    ("dog\u2029cat\n".encode(), "entries.txt:1: whitespace other than a plain space ('\\u2029', U+2029)"),
    (b"dog\tbig dog\n", "entries.txt:1: whitespace other than a plain space ('\\t', U+0009)"),
    ("big\u00a0dog\n".encode(), "entries.txt:1: whitespace other than a plain space ('\\xa0', U+00A0)"),
    (b"big  dog\n", "entries.txt:1: two spaces in a row in an entry"),
    ("dog\ncat\u200bx\n".encode(), "entries.txt:2: an invisible format character ('\\u200b', U+200B: zero-width"),
    ("dog\ncat\u202ex\n".encode(), "entries.txt:2: an invisible format character ('\\u202e', U+202E"),
    ("dog\n\ufeffcat\n".encode(), "entries.txt:2: an invisible format character ('\\ufeff', U+FEFF"),
])

def test_a_bad_balance_entries_file_is_one_line_naming_it(tmp_path, content, expected):
    entries = tmp_path / "entries.txt"
    entries.write_bytes(content)
    result, out = filter_cli(tmp_path, [_pairs_file(tmp_path)], "--balance", str(entries))
    assert expected in one_line_error(result) and not (out / "kept").exists()


def test_a_balance_file_that_is_a_fifo_device_or_folder_is_refused_unread(tmp_path):
    """They said "no such file"; a FIFO read by the filter would wait for a writer forever."""
    import os

    os.mkfifo(tmp_path / "fifo")
    for entries in (tmp_path / "fifo", Path("/dev/zero"), tmp_path):
        result, out = filter_cli(tmp_path, [_pairs_file(tmp_path)], "--balance", str(entries))
        assert f"{entries}: not a regular file (a device, folder or pipe)" in one_line_error(result)


def test_an_entry_longer_than_any_real_one_is_one_line_naming_file_and_line(tmp_path):
    """One line of 1M characters crashed the matcher (SIGSEGV at exit) after the run had reported."""
    entries = tmp_path / "entries.txt"
    entries.write_text("bus\n" + "a" * 1_000_000 + "\n")
    result, out = filter_cli(tmp_path, [_pairs_file(tmp_path)], "--balance", str(entries))
    assert "entries.txt:2: an entry of 1,000,000 characters" in one_line_error(result)
    assert not (out / "kept").exists()


def test_an_entry_too_long_for_the_matcher_is_refused_naming_its_line(tmp_path):
    """One entry of 1M characters once crashed the process (SIGSEGV in pyahocorasick): it must be
    refused before any automaton is built — so the command runs in a child process here."""
    entries = tmp_path / "entries.txt"
    entries.write_text("bus\n" + "a" * 1_000_000 + "\n")
    result = subprocess.run([sys.executable, "-m", "qvl.cli", "curate", "filter", str(_pairs_file(tmp_path)),
                             "--out", str(tmp_path / "out"), "--balance", str(entries), "--balance-t", "1",
                             "--skip-rule", "lang", "--workers", "1", "--no-progress"],
                            capture_output=True, text=True, timeout=120)
    output = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 1, output
    assert output.startswith("error:") and "entries.txt:2: an entry of 1,000,000 characters" in output, output
    assert not (tmp_path / "out" / "kept").exists()


def test_an_entries_file_with_a_bom_and_blank_lines_balances(tmp_path):
    entries = tmp_path / "entries.txt"
    entries.write_bytes("\ufeffbus\r\n\r\n \t street\t \r\n".encode())
    result, out = filter_cli(tmp_path, [_pairs_file(tmp_path)], "--balance", str(entries))
    assert result.exit_code == 0, result.output
    assert outcomes(out) == {"pairs.jsonl:1": None}


@pytest.mark.parametrize("options, expected", [
    (["--lang-mix", "en:0.5,zh:0.5"], "--lang-mix takes KEY=VALUE, got 'en:0.5'"),
    (["--lang-mix", "en=inf"], "--lang-mix en=inf: not a finite number"),
    (["--lang-mix", "en=0.5,en=0.5"], "--lang-mix: 'en' given twice"),
    (["--languages", ""], "options: languages: '': a list of lid.176 language codes (en, zh, ja ...)"),
    (["--clip-threshold", "laion=nan"], "--clip-threshold laion=nan: not a finite number"),
    (["--map", "url"], "--map takes KEY=VALUE, got 'url'"),
])
def test_a_malformed_option_is_said_once(tmp_path, options, expected):
    result, _ = filter_cli(tmp_path, [_pairs_file(tmp_path)], *options)
    message = one_line_error(result)
    assert message == f"error: {expected}", result.output  # one line, not a second "error: 1"


@pytest.mark.parametrize("report", [
    "not json", '{"settings": 3}', '{"no settings": {}}', '[1, 2]',
    '{"settings": {"min_side": "big"}}', '{"settings": {"max_aspect_ratio": 1e999}}',
    '{"settings": {"surprise": 1}}', "[" * 100_000, '{"settings": {}, "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
])
def test_a_damaged_previous_report_is_one_line_naming_it(tmp_path, report):
    result, prev = filter_cli(tmp_path, [_pairs_file(tmp_path)], out=tmp_path / "prev")
    assert result.exit_code == 0, result.output
    (prev / "report.json").write_text(report)
    result = runner.invoke(app, ["curate", "filter", "--from-ledger", str(prev), "--out", str(tmp_path / "new"),
                                 "--no-progress", "--workers", "1"])
    assert "report.json" in one_line_error(result)


@pytest.mark.parametrize("damage", ["report not JSON", "report not UTF-8", "report settings an int",
                                    "report without counts", "ledger truncated", "report JSON nested too deeply",
                                    "report JSON with NaN"])
def test_why_and_report_on_a_damaged_run_are_one_line_naming_it(tmp_path, damage):
    result, out = filter_cli(tmp_path, [_pairs_file(tmp_path)])
    assert result.exit_code == 0, result.output
    report = out / "report.json"
    if damage == "report not JSON":
        report.write_text("garbage")
    elif damage == "report not UTF-8":
        report.write_bytes(b"\xff{}")
    elif damage == "report settings an int":
        report.write_text('{"settings": 5}')
    elif damage == "report without counts":
        report.write_text('{"settings": {}}')
    elif damage == "report JSON nested too deeply":
        report.write_text(report.read_text().replace('"settings":', '"x": ' + "[" * 100_000 + "]" * 100_000 + ', "settings":', 1))
    elif damage == "report JSON with NaN":  # Python's json reads it and `--json` printed it: no JSON reader reads that
        report.write_text(report.read_text().replace('"settings":', '"x": NaN, "settings":', 1))
    else:
        for path in (out / "ledger" / "filter").glob("*.parquet"):
            path.write_bytes(b"PAR1 truncated")
    for args in (["why", str(out), "pairs.jsonl:1"], ["report", str(out)], ["report", str(out), "--json"]):
        result = runner.invoke(app, ["curate", *args])
        if args[0] == "report" and (damage == "ledger truncated" or "--json" in args and "JSON" not in damage
                                    and "UTF-8" not in damage):
            assert result.exit_code == 0, result.output  # --json prints the JSON it finds
        else:
            assert str(out) in one_line_error(result)


def test_why_bounds_a_huge_row_id(tmp_path):
    result, out = filter_cli(tmp_path, [_pairs_file(tmp_path)])
    message = one_line_error(runner.invoke(app, ["curate", "why", str(out), "x" * 100_000]))
    assert "not an input row" in message and len(message) < 500


@pytest.mark.parametrize("options, expected", [
    (["--batch-size", "0"], "batch_size: 0: 1 to 65536 pairs"),
    (["--clip-threshold-default", "nan"], "clip_thresholds.default: nan: a cosine similarity is in [-1, 1]"),
    (["--clip-threshold", "laion=2"], "clip_thresholds.laion: 2.0: a cosine similarity is in [-1, 1]"),
    (["--clip-threshold", "laion=inf"], "--clip-threshold laion=inf: not a finite number"),
])
def test_clip_score_settings_are_checked_before_any_model_loads(tmp_path, options, expected):
    result = runner.invoke(app, ["curate", "clip-score", str(tmp_path), "--model", "ViT-B-32", "--pretrained",
                                 str(tmp_path / "w.safetensors"), "--no-progress", *options])
    assert one_line_error(result) == f"error: {expected}"


@pytest.mark.parametrize("damage, expected", [
    ("truncated", "part-00000.parquet: not a readable parquet file"),
    ("row id of another file", "row_id 'other.jsonl:1' is not FILE:LINE of the run's inputs"),
    ("width as text", "column 'width' is large_string, expected a number column"),
    ("no text column", "missing column(s) text"),
    ("run.json inputs an int", "run.json: damaged"),
    ("run.json not JSON", "run.json: damaged"),
])
def test_a_damaged_previous_run_is_one_line_naming_the_file(tmp_path, damage, expected):
    result, prev = filter_cli(tmp_path, [_pairs_file(tmp_path)], out=tmp_path / "prev")
    assert result.exit_code == 0, result.output
    kept = prev / "kept" / "part-00000.parquet"
    frame = pl.read_parquet(kept)
    if damage == "truncated":
        kept.write_bytes(b"junk")
    elif damage == "row id of another file":
        frame.with_columns(row_id=pl.lit("other.jsonl:1")).write_parquet(kept)
    elif damage == "width as text":
        frame.with_columns(width=pl.lit("wide")).write_parquet(kept)
    elif damage == "no text column":
        frame.drop("text").write_parquet(kept)
    else:
        (prev / "_state" / "run.json").write_text('{"inputs": 5}' if "int" in damage else "garbage")
    result = runner.invoke(app, ["curate", "filter", "--from-ledger", str(prev), "--out", str(tmp_path / "new"),
                                 "--no-progress", "--workers", "1", "--skip-rule", "lang"])
    assert expected in one_line_error(result)


def test_a_previous_run_rewritten_by_polars_is_read_again(tmp_path):
    result, prev = filter_cli(tmp_path, [_pairs_file(tmp_path)], out=tmp_path / "prev")
    kept = prev / "kept" / "part-00000.parquet"
    pl.read_parquet(kept).write_parquet(kept)  # large_string, and so on: the same columns
    result = runner.invoke(app, ["curate", "filter", "--from-ledger", str(prev), "--out", str(tmp_path / "new"),
                                 "--no-progress", "--workers", "1", "--skip-rule", "lang"])
    assert result.exit_code == 0, result.output


def test_a_lone_surrogate_or_a_deep_nest_in_one_jsonl_line_is_that_rows_reject(tmp_path):
    """Each ended the whole run with an error naming no file (surrogates not allowed; recursion depth)."""
    good = {"URL": "http://x.test/1.jpg", "TEXT": "a red bus parked on a quiet street", "WIDTH": 640, "HEIGHT": 480}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n"
                    + '{"URL":"http://x.test/2.jpg","TEXT":"a \\ud800 bus parked","WIDTH":640,"HEIGHT":480}\n'
                    + "[" * 100_000 + "\n")
    result, out = filter_cli(tmp_path, [path])
    assert result.exit_code == 0, result.output
    assert outcomes(out) == {"pairs.jsonl:1": None, "pairs.jsonl:2": "invalid_utf8", "pairs.jsonl:3": "malformed_row"}


@pytest.mark.parametrize("state", ["garbage", "[" * 100_000, '{"from": NaN}', '{"from": 5}', "[]",
                                   '{"from": "/x", "clip": [1]}'])
def test_a_damaged_download_state_is_one_line_naming_it(tmp_path, state):
    """clip-score and why read a download's _qvl.json before anything else: damaged, it is named."""
    (tmp_path / "ledger").mkdir()
    pl.DataFrame({"row_id": ["pairs.jsonl:1"]}).write_parquet(tmp_path / "ledger" / "download.parquet")
    (tmp_path / "_qvl.json").write_text(state)
    for args in (["clip-score", str(tmp_path), "--model", "ViT-B-32", "--pretrained", str(tmp_path / "w.safetensors"),
                  "--no-progress"], ["why", str(tmp_path), "pairs.jsonl:1"]):
        message = one_line_error(runner.invoke(app, ["curate", *args]))
        assert "_qvl.json: damaged" in message, message


@pytest.mark.parametrize("state", ["garbage", "[" * 100_000, '{"fingerprint": NaN}', '{"fingerprint": "x"}',
                                   '{"fingerprint": "x", "partitions": [1]}'])
def test_a_damaged_run_state_on_resume_is_one_line_naming_it(tmp_path, state):
    """Running into an --out that holds a run resumes it from _state/run.json: damaged, it is named."""
    result, out = filter_cli(tmp_path, [_pairs_file(tmp_path)])
    assert result.exit_code == 0, result.output
    (out / "_state" / "run.json").write_text(state)
    result, _ = filter_cli(tmp_path, [_pairs_file(tmp_path)])
    assert "_state/run.json: damaged" in one_line_error(result)


def test_a_jsonl_score_the_first_record_lacks_is_read_from_the_records_that_have_it(tmp_path):
    """The file's columns are the keys of its first lines, not of its first line alone: scores given
    only from the second record on were silently dropped (the rows kept as unscored)."""
    lines = ['{"URL":"http://j.com/0","TEXT":"a cat sleeping on the red sofa"}',
             '{"URL":"http://j.com/1","TEXT":"a dog running on the beach today","similarity":0.01}',
             '{"URL":"http://j.com/2","TEXT":"a red car parked in the street","similarity":0.02}']
    (tmp_path / "j.jsonl").write_text("\n".join(lines) + "\n")
    report = run_filter([tmp_path / "j.jsonl"], tmp_path / "out", FilterSettings(second_opinion=False),
                        RunSettings(workers=1), show_progress=False)
    dropped = {r["step"]: r["dropped"] for r in report["funnel"]}
    assert dropped["clip_score"] == 2 and dropped["invalid_score"] == 1 and report["kept_rows"] == 0


def test_a_jsonl_key_first_given_after_the_sampled_lines_is_an_error_not_a_loss(tmp_path):
    from qvl.curate.sources.shards import SAMPLE_LINES

    lines = [f'{{"URL":"http://j.com/{i}","TEXT":"a cat sleeping on the red sofa"}}' for i in range(SAMPLE_LINES + 5)]
    lines.append('{"URL":"http://j.com/x","TEXT":"a dog running on the beach","punsafe":0.99}')
    (tmp_path / "late.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(QvlError, match=rf"late.jsonl:{SAMPLE_LINES + 6}: key 'punsafe' first appears here"):
        run_filter([tmp_path / "late.jsonl"], tmp_path / "out", run=RunSettings(workers=1), show_progress=False)
