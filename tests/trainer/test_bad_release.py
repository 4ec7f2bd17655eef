"""`qvl convert` meets broken and hostile release folders: every one is a single `error:` line
naming the file (and the field), exit 1 — never a traceback, never an unpickled byte, and
nothing built bigger than the weight files."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from qvl.cli import app
from tests.reference import release_forward as ref

runner = CliRunner()

# The release's layout at a size that converts in a blink (a 512-token vocabulary).
SMALL = {**ref.TINY_CONFIG, "vocab_size": 512, "intermediate_size": 64,
         "visual": {**ref.TINY_CONFIG["visual"], "width": 32, "heads": 2, "layers": 1, "image_size": 28,
                    "mlp_ratio": 2.0}}


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.startswith("error:"), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return " ".join(result.output.split())


def convert(folder: Path, out: Path):
    return runner.invoke(app, ["convert", "from-qwen-vl", str(folder), "--out", str(out)])


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return ref.write_release(tmp_path_factory.mktemp("small") / "hf", ref.random_release(SMALL), SMALL)


def copy_of(small: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "hf"
    shutil.copytree(small, folder)
    return folder


def test_the_small_release_converts(small, tmp_path):
    result = convert(small, tmp_path / "ckpt")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ckpt" / "meta.json").read_text())["resolution"] == 28


@pytest.mark.parametrize("text, field", [
    ("{not json", "not valid JSON"),
    (json.dumps({**SMALL, "num_attention_heads": 0}), "num_attention_heads"),
    (json.dumps(SMALL).replace('"hidden_size": 128', '"hidden_size": Infinity'), "not valid JSON"),
    (json.dumps({**SMALL, "visual": {**SMALL["visual"], "patch_size": 0}}), "visual.patch_size"),
    (json.dumps({**SMALL, "num_hidden_layers": 10 ** 9}), "num_hidden_layers"),
    (json.dumps({**SMALL, "hidden_size": [128]}), "hidden_size"),
    (json.dumps({k: v for k, v in SMALL.items() if k != "visual"}), "visual"),
    (json.dumps([1, 2]), "config.json"),
])
def test_a_bad_config_is_one_line_naming_the_field(small, tmp_path, text, field):
    folder = copy_of(small, tmp_path)
    (folder / "config.json").write_text(text)
    message = one_line_error(convert(folder, tmp_path / "out"))
    assert "config.json" in message and field in message, message
    assert not (tmp_path / "out").exists()


def test_more_layers_than_the_files_hold_is_refused_before_any_key_map(small, tmp_path):
    """A config that asks for far more layers than the weight files hold is checked against the
    files' headers first: nothing proportional to the config's claim is built."""
    folder = copy_of(small, tmp_path)
    (folder / "config.json").write_text(json.dumps({**SMALL, "num_hidden_layers": 1000}))
    message = one_line_error(convert(folder, tmp_path / "out"))
    assert "num_hidden_layers is 1000" in message and "hold 2" in message, message
    (folder / "config.json").write_text(json.dumps({**SMALL, "visual": {**SMALL["visual"], "layers": 900}}))
    assert "visual.layers is 900" in one_line_error(convert(folder, tmp_path / "out"))


def shard(folder: Path) -> Path:
    return folder / "model-00001-of-00002.safetensors"


def test_a_truncated_shard_names_the_file(small, tmp_path):
    folder = copy_of(small, tmp_path)
    data = shard(folder).read_bytes()
    shard(folder).write_bytes(data[: len(data) - 1000])
    message = one_line_error(convert(folder, tmp_path / "out"))
    assert shard(folder).name in message and "truncated" in message, message


def header_file(path: Path, header: bytes, length: int | None = None, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)


@pytest.mark.parametrize("case", ["4TB", "2^40", "not json", "short", "overlap", "bad dtype"])
def test_a_hostile_safetensors_header_names_the_file(small, tmp_path, case):
    folder = copy_of(small, tmp_path)
    path = shard(folder)
    key = "transformer.wte.weight"
    if case == "4TB":
        header_file(path, json.dumps({key: {"dtype": "BF16", "shape": [1 << 40, 2], "data_offsets": [0, 1 << 42]}})
                    .encode(), data=b"\0" * 64)
    elif case == "2^40":
        header_file(path, b"{}", length=1 << 40)
    elif case == "not json":
        header_file(path, b"{\"a\": [1, 2", data=b"\0" * 8)
    elif case == "short":
        path.write_bytes(b"\x05\0\0")
    elif case == "overlap":
        header_file(path, json.dumps({key: {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                      "x": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode(),
                    data=b"\0" * 12)
    else:
        header_file(path, json.dumps({key: {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}).encode(),
                    data=b"\0" * 8)
    message = one_line_error(convert(folder, tmp_path / "out"))
    assert path.name in message, message


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64, torch.uint8])
def test_weights_that_are_not_floating_point_are_refused(small, tmp_path, dtype):
    folder = copy_of(small, tmp_path)
    sd = ref.random_release(SMALL)
    sd["transformer.ln_f.weight"] = sd["transformer.ln_f.weight"].to(dtype)
    shutil.rmtree(folder)
    ref.write_release(folder, sd, SMALL, dtype=torch.bfloat16)  # write_release casts: put the bad one back
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = index["weight_map"]["transformer.ln_f.weight"]
    from safetensors.torch import load_file

    tensors = load_file(str(folder / name))
    tensors["transformer.ln_f.weight"] = sd["transformer.ln_f.weight"].to(dtype)
    save_file(tensors, str(folder / name))
    message = one_line_error(convert(folder, tmp_path / "out"))
    assert "transformer.ln_f.weight" in message and "floating point" in message and name in message, message
    assert not (tmp_path / "out" / "meta.json").exists()


class _Touch:
    """A pickle that, if ever unpickled, would create a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "pytorch_model.bin.index.json"])
def test_a_pickled_checkpoint_is_refused_unopened(tmp_path, name):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SMALL))
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Touch(marker)}))
    if name.endswith("index.json"):
        (folder / name).write_text(json.dumps({"weight_map": {"x": "pytorch_model.bin"}}))
    message = one_line_error(convert(folder, tmp_path / "out"))
    assert name in message and "safetensors" in message, message
    assert not marker.exists()


@pytest.mark.parametrize("index, field", [
    ("{oops", "not valid JSON"),
    (json.dumps({"weight_map": {"transformer.wte.weight": 5}}), "weight_map"),
    (json.dumps({"weight_map": {"transformer.wte.weight": "../../etc/passwd.safetensors"}}), "weight_map"),
    (json.dumps({"weight_map": []}), "weight_map"),
    (json.dumps({"metadata": {}}), "weight_map"),
    (json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}), "lm_head.weight"),
])
def test_a_bad_index_names_the_file_and_field(small, tmp_path, index, field):
    folder = copy_of(small, tmp_path)
    (folder / "model.safetensors.index.json").write_text(index)
    message = one_line_error(convert(folder, tmp_path / "out"))
    assert "model.safetensors.index.json" in message and field in message, message


def test_to_qwen_vl_meets_a_bad_like_and_a_bad_checkpoint(small, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert convert(small, ckpt).exit_code == 0
    like = copy_of(small, tmp_path)
    (like / "config.json").write_text("[not json")
    message = one_line_error(runner.invoke(app, ["convert", "to-qwen-vl", str(ckpt), "--out", str(tmp_path / "o"),
                                                 "--like", str(like)]))
    assert "config.json" in message
    (like / "config.json").write_text(json.dumps(SMALL))
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["resolution"]
    (ckpt / "meta.json").write_text(json.dumps(meta))
    message = one_line_error(runner.invoke(app, ["convert", "to-qwen-vl", str(ckpt), "--out", str(tmp_path / "o"),
                                                 "--like", str(like)]))
    assert "meta.json" in message and "resolution" in message, message


def test_an_index_that_is_not_utf8_names_the_file(small, tmp_path):
    folder = copy_of(small, tmp_path)
    index = folder / "model.safetensors.index.json"
    index.write_bytes(index.read_bytes().replace(b"lm_head", b"lm\x80\xffhead"))
    message = one_line_error(convert(folder, tmp_path / "out"))
    assert index.name in message and "UTF-8" in message, message


def test_to_qwen_vl_of_a_checkpoint_not_in_the_release_shape_says_what_it_lacks(micro, small, tmp_path):
    run = tmp_path / "run"
    trained = runner.invoke(app, ["train", "--stage", "2", "--data", str(micro["multitask"]), "--out", str(run),
                                  "--preset", micro["preset"], "--max-steps", "0", "--no-progress"])
    assert trained.exit_code == 0, trained.output
    message = one_line_error(runner.invoke(app, ["convert", "to-qwen-vl", str(run / "checkpoint"), "--out",
                                                 str(tmp_path / "o"), "--like", str(small)]))
    assert str(run / "checkpoint") in message and "not in the release's shape" in message, message
    assert "[llm] head_dim" in message and "stored_positions" in message, message
    assert not (tmp_path / "o").exists()
