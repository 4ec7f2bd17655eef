"""`qvl format --engine ray`: the records cut into parts rendered by Ray tasks give the local
engine's output — the same rows (token ids, labels, images, sample ids) in the same order when
the shards are read in order, packed or not, the same manifest and the same rejects."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from qvl.cli import app
from qvl.common.engines import EngineSettings
from qvl.demo.world import write_annotations
from qvl.formats.build import FormatSettings, run_format
from qvl.formats.on_ray import run_format_on_ray

pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'qvl[ray]'); CI installs it")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """The demo's shape world, with records to reject and an id given twice."""
    world = write_annotations(tmp_path_factory.mktemp("world"), n_images=12, size=32)
    with open(world["multitask"], "a") as f:
        f.write("{broken json\n")
        f.write(json.dumps({"task": "caption", "image": "missing.png", "caption": "gone"}) + "\n")
        f.write(json.dumps({"task": "caption", "image": "scene_00001.png", "caption": "a repeat", "id": "twice"}) + "\n")
        f.write(json.dumps({"task": "caption", "image": "scene_00002.png", "caption": "word " * 400}) + "\n")
        f.write(json.dumps({"task": "caption", "image": "scene_00003.png", "caption": "again", "id": "twice"}) + "\n")
    return world


def _rows(out: Path) -> pa.Table:
    """Every row of an output, its shards read in the manifest's order."""
    names = json.loads((out / "manifest.json").read_text())["shards"]
    return pa.concat_tables([pa.ipc.open_stream(pa.memory_map(str(out / n))).read_all() for n in names])


def _same(ray_out: Path, local_out: Path, ray_manifest: dict, local_manifest: dict) -> None:
    assert ray_manifest == local_manifest  # counts, duplicates, packing, fingerprint
    assert _rows(ray_out).equals(_rows(local_out))
    assert pq.read_table(ray_out / "rejects.parquet").equals(pq.read_table(local_out / "rejects.parquet"))


@pytest.mark.parametrize("kind, pack_to", [("multitask", None), ("multitask", 160), ("sft", None), ("sft", 400)])
def test_ray_parts_give_the_local_samples(world, tmp_path, ray_cluster, kind, pack_to):
    """Parts of 3 records, buffers of 6 samples per task: packing flushes inside parts and
    across their borders, and the replay still gives the local rows in the local order."""
    settings = FormatSettings(tokenizer="bytes", image_tokens=4, max_len=400, pack_to=pack_to, pack_buffer=6,
                              batch=5, shard_rows=9)
    args = (kind, [world[kind]], None, world["images"])
    local = run_format(args[0], args[1], tmp_path / "local", args[3], settings=settings, show_progress=False)
    on_ray = run_format_on_ray(args[0], args[1], tmp_path / "ray", args[3], settings=settings, show_progress=False,
                               engine=EngineSettings("ray", ray_cluster), part_records=3)
    assert local["records"] > 3 * 3 and local["samples"] > 0
    if kind == "multitask":
        assert local["rejected"] >= 3 and local["duplicate_ids"]["samples"] == 1
    if pack_to:
        assert local["rows"] < local["samples"]
    _same(tmp_path / "ray", tmp_path / "local", on_ray, local)


def test_the_cli_formats_on_ray(world, tmp_path, ray_cluster):
    common = ["--tokenizer", "bytes", "--image-tokens", "4", "--images", str(world["images"]), "--no-progress"]
    outs = {}
    for name, extra in (("local", []), ("ray", ["--engine", "ray", "--ray-address", ray_cluster])):
        outs[name] = tmp_path / name
        result = CliRunner().invoke(app, ["format", "sft", "--input", str(world["sft"]), "--out", str(outs[name]),
                                          *common, *extra])
        assert result.exit_code == 0, result.output
    manifests = {name: json.loads((out / "manifest.json").read_text()) for name, out in outs.items()}
    _same(outs["ray"], outs["local"], manifests["ray"], manifests["local"])
