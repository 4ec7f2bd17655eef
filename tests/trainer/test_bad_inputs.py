"""`qvl train` never destroys a run silently: an existing run needs --resume or --overwrite,
--resume needs a checkpoint, a damaged checkpoint or a wrong folder is a one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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


# ---------------------------------------------------------------- checkpoints and shards, damaged


@pytest.fixture
def checkpoint(run, tmp_path):
    """A copy of a run's checkpoint, to damage."""
    folder = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoint", folder)
    return folder


def generate_cli(checkpoint, prompt="<ref>a</ref>"):
    return runner.invoke(app, ["generate", "--checkpoint", str(checkpoint), "--prompt", prompt,
                               "--max-new-tokens", "2"])


def test_generate_with_an_empty_prompt_is_one_line(checkpoint):
    assert generate_cli(checkpoint).exit_code == 0
    assert "--prompt" in one_line_error(generate_cli(checkpoint, ""))


@pytest.mark.parametrize("damage", ["truncated", "no resolution", "resolution as text", "huge resolution",
                                    "meta not json", "meta a list"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(micro, checkpoint, tmp_path, damage):
    meta_path, weights = checkpoint / "meta.json", checkpoint / "model.safetensors"
    meta = json.loads(meta_path.read_text())
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-500])
        expect = ["model.safetensors"]
    elif damage == "meta not json":
        meta_path.write_text("{'stage': 1")
        expect = ["meta.json"]
    elif damage == "meta a list":
        meta_path.write_text("[]")
        expect = ["meta.json"]
    else:
        meta.pop("resolution")
        if damage != "no resolution":
            meta["resolution"] = "48" if damage == "resolution as text" else 10 ** 12
        meta_path.write_text(json.dumps(meta))
        expect = ["meta.json", "resolution"]
    for result in (generate_cli(checkpoint),
                   train_cli(micro, tmp_path / "next", "--init", str(checkpoint), "--max-steps", "1")):
        message = one_line_error(result)
        assert all(word in message for word in expect), message


def copy_shards(micro, tmp_path) -> Path:
    folder = tmp_path / "shards"
    shutil.copytree(micro["multitask"], folder)
    return folder


def train_on(micro, data, out):
    return runner.invoke(app, ["train", "--stage", "2", "--data", str(data), "--out", str(out),
                               "--preset", micro["preset"], "--max-steps", "1", "--no-progress"])


@pytest.mark.parametrize("field", ["records", "rejected", "shards", "tokenizer", "settings"])
def test_a_manifest_missing_a_field_names_it(micro, tmp_path, field):
    data = copy_shards(micro, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest[field]
    (data / "manifest.json").write_text(json.dumps(manifest))
    message = one_line_error(train_on(micro, data, tmp_path / "run"))
    assert "manifest.json" in message and field in message, message


@pytest.mark.parametrize("value", [-1, "3", 1e400, None, [1]])
def test_a_manifest_with_bad_counts_names_the_field(micro, tmp_path, value):
    data = copy_shards(micro, tmp_path)
    text = (data / "manifest.json").read_text()
    manifest = json.loads(text)
    manifest["records"] = "__VALUE__"
    (data / "manifest.json").write_text(json.dumps(manifest).replace('"__VALUE__"', "1e400" if value == 1e400
                                                                     else json.dumps(value)))
    message = one_line_error(train_on(micro, data, tmp_path / "run"))
    assert "manifest.json" in message and "records" in message, message


@pytest.mark.parametrize("where", ["head", "middle", "tail", "escape"])
def test_a_scribbled_shard_names_the_file(micro, tmp_path, where):
    data = copy_shards(micro, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    path = data / manifest["shards"][0]
    raw = bytearray(path.read_bytes())
    if where == "head":
        raw[:64] = b"\xff" * 64
    elif where == "middle":
        middle = len(raw) // 2
        raw[middle:middle + 256] = bytes(range(256))
    elif where == "tail":
        raw = raw[: len(raw) // 3]
    else:  # a shard name that leaves the folder
        manifest["shards"][0] = "../../" + manifest["shards"][0]
        (data / "manifest.json").write_text(json.dumps(manifest))
    path.write_bytes(bytes(raw))
    result = train_on(micro, data, tmp_path / "run")
    if where == "middle" and result.exit_code == 0:
        return  # the scribble landed in image bytes or token values a row can hold: trained on, no crash
    message = one_line_error(result)
    assert ("manifest.json" if where == "escape" else path.name) in message, message
