"""The Typer app: every command of the design is listed; errors are messages, not tracebacks."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from qvl.cli import app

runner = CliRunner()


def test_help_lists_every_command():
    assert all(c in runner.invoke(app, ["--help"]).output for c in ("curate", "format", "train", "demo"))
    out = runner.invoke(app, ["curate", "--help"]).output
    assert all(c in out for c in ("filter", "download", "clip-score", "report"))
    out = runner.invoke(app, ["format", "--help"]).output
    assert "multitask" in out and "sft" in out


@pytest.mark.parametrize("args, message", [
    (["curate", "download", "{tmp}", "--out", "{tmp}/o"], "no report.json"),
    (["curate", "clip-score", "{tmp}", "--model", "ViT-B-32", "--pretrained", "{tmp}/w.safetensors"],
     "not the --out of a finished `qvl curate download`"),
    (["curate", "why", "{tmp}", "x:1"], "no ledger here"),
    (["curate", "filter", "--out", "{tmp}/o"], "give input files"),
])
def test_image_commands_explain_a_wrong_folder(tmp_path, args, message):
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 1 and message in " ".join(result.output.split()), result.output


def test_filter_with_recipe_and_options(tmp_path):
    p = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"URL": ["http://a/1", "http://a/2"], "TEXT": ["a dog on the beach", "a cat 😀 on a mat"],
                             "WIDTH": [150.0, 800.0], "HEIGHT": [150.0, 600.0], "similarity": [0.2, 0.3]}), p)
    recipe = tmp_path / "r.toml"
    recipe.write_text('[filter]\nmin_side = 100\nskip_rules = ["emoji"]\n[run]\nworkers = 1\n')
    result = runner.invoke(app, ["curate", "filter", str(p), "--out", str(tmp_path / "o"), "--recipe", str(recipe),
                                 "--clip-threshold", "laion=0.1", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["settings"]["min_side"] == 100 and report["settings"]["clip_thresholds"]["laion"] == 0.1
    dropped = {r["step"]: r["dropped"] for r in report["funnel"]}
    assert dropped["too_small"] == 0 and dropped["clip_score"] == 0 and dropped["emoji"] == 0
    assert dropped["non_en_zh_chars"] == 1  # the emoji still is no en/zh character
    shown = runner.invoke(app, ["curate", "report", str(tmp_path / "o")])
    assert shown.exit_code == 0 and "Funnel" in shown.output
    # the answer goes to stdout (to pipe or redirect), and <PERSON>-like settings survive the markdown
    assert "Funnel" in shown.stdout and "<PERSON>" in shown.stdout, shown.stdout


@pytest.mark.parametrize("recipe_text, message", [
    ("[filter]\nmin_sid = 3\n", "unknown setting(s) min_sid"),
    ("[filter\n", "not valid TOML"),
    ("[filtre]\n", "unknown table(s) filtre"),
    ('[filter]\nskip_rules = ["emojis"]\n', "unknown rule(s) to skip: emojis"),
])
def test_bad_recipes_are_clear_errors(tmp_path, recipe_text, message):
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"url": "u", "text": "t"}\n')
    recipe = tmp_path / "r.toml"
    recipe.write_text(recipe_text)
    result = runner.invoke(app, ["curate", "filter", str(p), "--out", str(tmp_path / "o"), "--recipe", str(recipe)])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_bad_input_is_a_message(tmp_path):
    p = tmp_path / "x.parquet"
    p.write_bytes(b"PAR1 not really")
    result = runner.invoke(app, ["curate", "filter", str(p), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "x.parquet: not a readable parquet file" in result.output
    result = runner.invoke(app, ["curate", "report", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and "no report here" in result.output


def test_a_preset_nested_too_deeply_is_one_line_naming_it(tmp_path):
    """tomllib recurses once per ``[``: 100k of them were a RecursionError traceback."""
    preset = tmp_path / "deep.toml"
    preset.write_text("a = " + "[" * 100_000)
    result = runner.invoke(app, ["train", "--stage", "1", "--data", str(tmp_path / "shards"), "--out",
                                 str(tmp_path / "run"), "--preset", str(preset), "--no-progress"])
    assert result.exit_code == 1 and result.output.startswith("error:"), result.output
    assert "deep.toml: not a qvl preset" in " ".join(result.output.split())


@pytest.mark.parametrize("args, names", [
    (["curate", "filter", "{tmp}/p.jsonl", "--out", "{tmp}/o", "--balance-t", "nan"], "'--balance-t'"),
    (["format", "sft", "--max-pixels", "nan"], "'--max-pixels'"),
    (["curate", "filter", "{tmp}/p.jsonl", "--out", "{tmp}/o", "--workers", "1" * 5000], "'--workers'"),
    (["curate", "filter", "{tmp}/p.jsonl"], "'--out'"),
    (["curate", "filter", "--no-such-option"], "--no-such-option"),
    (["no-such-command"], "'no-such-command'"),
    (["train", "--stage", "9", "--data", "{tmp}", "--out", "{tmp}/o"], "'--stage'"),
])
def test_a_usage_error_is_one_line_naming_the_option(tmp_path, args, names):
    """Typer's boxed usage panel (a dozen lines) becomes one ``error:`` line; exit 2 as click's."""
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and names in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and len(result.output) < 2200, result.output
    assert "Traceback" not in result.output and "╭" not in result.output


def test_a_bare_group_still_prints_its_help():
    result = runner.invoke(app, ["curate"])
    assert "filter" in result.output and "error:" not in result.output
