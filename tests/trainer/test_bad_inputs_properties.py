"""Generated hostile inputs for every file the trainer and `qvl convert` read: release
``config.json``, safetensors bytes, checkpoint ``meta.json``, shard manifests and presets. The
invariant: the file is read, or one ``QvlError`` names it — never another exception."""

from __future__ import annotations

import itertools
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from qvl.cli import app
from qvl.errors import QvlError
from qvl.trainer.checkpoint import CheckpointMeta, read_meta, read_safetensors_header
from qvl.trainer.data import Shards
from qvl.trainer.model import QwenVL
from qvl.trainer.preset import load_preset
from qvl.trainer.release import plan_from_qwen_vl
from tests.reference import release_forward as ref
from tests.trainer.test_bad_release import SMALL

runner = CliRunner()
FAST = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

hostile = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2 ** 80, max_value=2 ** 80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6), st.just("\ud800"),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                 max_size=2))


def paths(value: dict, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested dict (dicts only; a list is one value)."""
    out = []
    for key, item in value.items():
        out.append(prefix + (key,))
        if isinstance(item, dict):
            out += paths(item, prefix + (key,))
    return out


@st.composite
def mutated(draw, base: dict) -> dict:
    """``base`` with one to three keys deleted, replaced by a hostile value, or added."""
    value = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        candidates = paths(value)
        if not candidates:
            break
        path = draw(st.sampled_from(candidates))
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        if not isinstance(parent, dict) or path[-1] not in parent:
            continue
        action = draw(st.sampled_from(["delete", "replace", "replace", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "replace":
            parent[path[-1]] = draw(hostile)
        else:
            parent[draw(st.text(min_size=1, max_size=8))] = draw(hostile)
    return value


def write(path: Path, value) -> None:
    path.write_text(json.dumps(value))  # NaN and Infinity written as JavaScript would: not JSON


_CASES = itertools.count()


def fresh(tmp_path: Path) -> Path:
    """A new folder for one generated example (hypothesis reuses the test's tmp_path)."""
    folder = tmp_path / f"case{next(_CASES)}"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return ref.write_release(tmp_path_factory.mktemp("small") / "hf", ref.random_release(SMALL), SMALL)


@FAST
@given(config=mutated(SMALL))
def test_a_generated_config_is_planned_or_named(small, tmp_path, config):
    """Everything `convert from-qwen-vl` checks before reading a tensor (the CLI's one error line
    for these is tested in test_bad_release.py); a planned conversion's shapes then decide."""
    folder = fresh(tmp_path) / "hf"
    folder.mkdir()
    for item in small.iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item)
    write(folder / "config.json", config)
    try:
        planned = plan_from_qwen_vl(folder)
    except QvlError as e:
        assert str(folder) in str(e)
        return
    assert planned[0].num_hidden_layers == SMALL["num_hidden_layers"]


@settings(max_examples=6, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(config=mutated(SMALL))
def test_a_generated_config_converts_or_is_one_error_line(small, tmp_path, config):
    folder = fresh(tmp_path) / "hf"
    folder.mkdir()
    for item in small.iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item)
    write(folder / "config.json", config)
    result = runner.invoke(app, ["convert", "from-qwen-vl", str(folder), "--out", str(folder.parent / "out")])
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception, SystemExit))
    if result.exit_code:
        assert result.output.startswith("error:") and str(folder) in " ".join(result.output.split()), result.output


def _safetensors_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "base.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
               "c": torch.zeros(0, 2)}, str(path))
    return path.read_bytes()


@st.composite
def damaged_bytes(draw, base: bytes) -> bytes:
    data = bytearray(base)
    kind = draw(st.sampled_from(["truncate", "scribble", "length", "append", "header"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    if kind == "scribble":
        at = draw(st.integers(0, len(data) - 1))
        junk = draw(st.binary(min_size=1, max_size=16))
        data[at:at + len(junk)] = junk
        return bytes(data)
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2 ** 64 - 1))) + bytes(data[8:])
    if kind == "append":
        return bytes(data) + draw(st.binary(min_size=1, max_size=64))
    header = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
    header = draw(mutated(header))
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + bytes(data[8 + struct.unpack("<Q", data[:8])[0]:])


@FAST
@given(data=st.data())
def test_damaged_safetensors_bytes_are_read_whole_or_named(tmp_path, data):
    """A header that passes the check describes tensors that are all inside the file: reading
    every one of them then succeeds."""
    base = _safetensors_bytes(tmp_path)
    path = fresh(tmp_path) / "model.safetensors"
    path.write_bytes(data.draw(damaged_bytes(base)))
    try:
        entries = read_safetensors_header(path)
    except QvlError as e:
        assert str(path) in str(e)
        return
    with safe_open(str(path), "pt") as handle:
        for key, entry in entries.items():
            assert list(handle.get_tensor(key).shape) == entry.shape


META = {"stage": 2, "step": 10, "preset": "micro", "resolution": 48, "precision": "fp32", "settings": "..."}


@FAST
@given(meta=mutated(META))
def test_a_generated_meta_json_is_typed_or_named(tmp_path, meta):
    folder = fresh(tmp_path)
    write(folder / "meta.json", meta)
    try:
        got = read_meta(folder)
    except QvlError as e:
        assert str(folder / "meta.json") in str(e)
        return
    assert isinstance(got, CheckpointMeta) and type(got.resolution) is int and 1 <= got.resolution <= 4096


@pytest.fixture(scope="module")
def shards(micro, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards") / "multitask"
    shutil.copytree(micro["multitask"], folder)
    return folder


@FAST
@given(data=st.data())
def test_a_generated_manifest_is_typed_or_named(shards, tmp_path, data):
    base = json.loads((shards / "manifest.json").read_text())
    manifest = data.draw(mutated({k: base[k] for k in ("records", "rejected", "shards", "tokenizer", "model",
                                                       "vocab_size", "settings", "kind")}))
    folder = fresh(tmp_path)
    for item in shards.iterdir():
        if item.name != "manifest.json":
            (folder / item.name).symlink_to(item)
    write(folder / "manifest.json", manifest)
    try:
        loaded = Shards(folder, max_rejected_fraction=1.0)
    except QvlError as e:
        assert str(folder) in str(e)
        return
    assert loaded.manifest.shards and isinstance(loaded.manifest.records, int)


PRESET = {"name": "micro", "tokenizer": "bytes", "image_tokens": 4,
          "vision": {"width": 32, "layers": 2, "heads": 2, "patch_size": 8},
          "adapter": {"heads": 2}, "llm": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                           "num_key_value_heads": 2, "intermediate_size": 64},
          "stages": {"resolution": [32, 48, 48], "lr": [3e-3, 3e-3, 3e-3]}}


@FAST
@given(preset=mutated(PRESET))
def test_a_generated_preset_builds_or_is_named(tmp_path, preset):
    """A preset that passes the check builds its model (on the meta device: no memory)."""
    path = fresh(tmp_path) / "preset.json"
    write(path, preset)
    try:
        config = load_preset(str(path))
    except QvlError as e:
        assert str(path) in str(e)
        return
    with torch.device("meta"):
        QwenVL(config, 300, 259, config.stages.get("resolution", [64])[0])
