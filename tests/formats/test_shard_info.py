"""`qvl format inspect` on damaged outputs: the manifest is decoded into a typed struct; a
missing, damaged or foreign one is one error line naming the file, never a traceback."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from qvl.cli import app
from qvl.formats.build import FormatSettings, run_format

runner = CliRunner()


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    Image.new("RGB", (32, 24), "red").save(root / "red.png")
    (root / "ann.jsonl").write_text(json.dumps({"task": "caption", "image": "red.png", "caption": "a red square"}))
    run_format("multitask", [root / "ann.jsonl"], root / "out", root, show_progress=False,
               settings=FormatSettings(tokenizer="bytes", image_tokens=4))
    return root / "out"


def inspect(folder):
    return runner.invoke(app, ["format", "inspect", str(folder)])


def test_a_good_output_shows_its_row(output):
    result = inspect(output)
    assert result.exit_code == 0 and "task=caption" in result.output, result.output


@pytest.mark.parametrize("damage, message", [
    (lambda m: m.pop("tokenizer"), "missing required field `tokenizer`"),
    (lambda m: m.update(tokenizer=["bytes"]), "$.tokenizer"),
    (lambda m: m.update(records=-1), "$.records"),
    (lambda m: m.update(rejected=10 ** 30), "$.rejected"),
    (lambda m: m.update(model=None), "$.model"),
])
def test_a_damaged_manifest_is_one_line_naming_it(output, tmp_path, damage, message):
    import shutil

    folder = tmp_path / "out"
    shutil.copytree(output, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    damage(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = inspect(folder)
    assert result.exit_code == 1 and result.output.startswith("error:") and "Traceback" not in result.output
    assert str(folder / "manifest.json") in result.output and message in result.output, result.output


@pytest.mark.parametrize("content", [None, "{not json", '{"tokenizer": "\\ud800", "records": 1, "rejected": 0}'])
def test_a_missing_or_broken_manifest_is_one_line(output, tmp_path, content):
    import shutil

    folder = tmp_path / "out"
    shutil.copytree(output, folder)
    if content is None:
        (folder / "manifest.json").unlink()
    else:
        (folder / "manifest.json").write_text(content)
    result = inspect(folder)
    assert result.exit_code == 1 and result.output.startswith("error:") and "Traceback" not in result.output
    assert "manifest.json" in result.output, result.output


def _features_of(value):
    return lambda folder: (folder / "dataset_info.json").write_text(json.dumps({"features": value}))


def _without_task(folder):
    import shutil

    import datasets

    datasets.load_from_disk(str(folder)).remove_columns("task").save_to_disk(str(folder.parent / "re"))
    for name in ("dataset_info.json", "state.json", "data-00000-of-00001.arrow"):
        shutil.copy(folder.parent / "re" / name, folder / name)


@pytest.mark.parametrize("damage, message", [
    (_features_of(5), "not a qvl format output (argument of type 'int' is not iterable)"),
    (_features_of({"id": {"dtype": "string", "_type": "Value"}}), "not a qvl format output"),
    (lambda folder: (folder / "state.json").write_text('{"_data_files": 5}'), "not a qvl format output"),
    (lambda folder: (folder / "data-00000-of-00001.arrow").write_bytes(b"\xff" * 300), "not a qvl format output"),
    (_without_task, "not a qvl format output (no column(s) task)"),
])
def test_a_damaged_dataset_folder_is_one_line_naming_it(output, tmp_path, damage, message):
    import shutil

    folder = tmp_path / "out"
    shutil.copytree(output, folder)
    damage(folder)
    result = inspect(folder)
    assert result.exit_code == 1 and result.output.startswith("error:") and "Traceback" not in result.output
    assert f"{folder}: {message}" in " ".join(result.output.split()), result.output
