"""`qvl train` never destroys a run silently: an existing run needs --resume or --overwrite,
--resume needs a checkpoint, a damaged checkpoint or a wrong folder is a one-line error."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qvl.cli import app

runner = CliRunner()


def train_cli(micro, out, *extra):
    return runner.invoke(app, ["train", "--stage", "2", "--data", str(micro["multitask"]), "--out", str(out),
                               "--preset", micro["preset"], "--max-steps", "2", "--no-progress", *extra])


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.startswith("error:"), result.output
    return " ".join(result.output.split())


@pytest.fixture
def run(micro, tmp_path):
    out = tmp_path / "run"
    result = train_cli(micro, out)
    assert result.exit_code == 0, result.output
    return out


def test_training_into_an_existing_run_is_refused(micro, run):
    metrics = (run / "metrics.jsonl").read_text()
    weights = (run / "checkpoint" / "model.safetensors").read_bytes()
    message = one_line_error(train_cli(micro, run))
    assert "holds a training run (checkpoint at step 2); --resume continues it, --overwrite replaces it" in message
    assert (run / "metrics.jsonl").read_text() == metrics  # not cut
    assert (run / "checkpoint" / "model.safetensors").read_bytes() == weights  # not overwritten
    assert "choose one" in one_line_error(train_cli(micro, run, "--resume", "--overwrite"))
    replaced = train_cli(micro, run, "--overwrite", "--max-steps", "1")
    assert replaced.exit_code == 0, replaced.output
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_resume_needs_a_checkpoint(micro, tmp_path):
    message = one_line_error(train_cli(micro, tmp_path / "fresh", "--resume"))
    assert "no checkpoint to resume from" in message and "run without --resume" in message


@pytest.mark.parametrize("damage", ["state.pt", "model.safetensors"])
def test_a_damaged_checkpoint_is_a_clear_error(micro, run, damage):
    path = run / "checkpoint" / damage
    path.write_bytes(path.read_bytes()[:100])
    message = one_line_error(train_cli(micro, run, "--resume", "--max-steps", "3"))
    assert "cannot resume from this checkpoint" in message and "--overwrite starts the run again" in message


def test_a_folder_that_is_no_run_is_left_alone(micro, tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    assert "not a qvl output" in one_line_error(train_cli(micro, precious, "--overwrite"))
    assert (precious / "todo.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in one_line_error(train_cli(micro, tmp_path / "file"))
    assert "not a checkpoint folder" in one_line_error(train_cli(micro, tmp_path / "new", "--init", str(precious)))


def test_shards_that_are_not_a_format_output(micro, tmp_path):
    assert "no manifest.json" in one_line_error(
        runner.invoke(app, ["train", "--stage", "2", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                            "--preset", micro["preset"], "--no-progress"]))
    manifest = json.loads((micro["multitask"] / "manifest.json").read_text())
    assert manifest["records"] > 0
