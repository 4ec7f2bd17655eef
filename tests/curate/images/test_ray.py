"""The image stages on a Ray cluster of their own (``ray start --head`` on 127.0.0.1, joined by
``--ray-address``) give the local engine's results: the same kept rows, drop reasons, image
facts, ledger and report from `curate download`; the same scores from `curate clip-score`;
the address screen holds in every Ray worker; a Ray download resumes like a local one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from qvl.cli import app
from qvl.common.engines import EngineSettings
from qvl.curate.images import netcheck
from qvl.curate.images.clipscore import ClipSettings, run_clip_score
from qvl.curate.images.download import DownloadSettings, _fetch, run_download
from tests.curate.conftest import SETTINGS
from tests.curate.images.test_clipscore import tiny_clip  # noqa: F401 - the fixture, used below

pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'qvl[ray]'); CI installs it")


def _table(out: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(out / name).sort("row_id")


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _same_outputs(ray_out: Path, local_out: Path) -> None:
    for name in ("kept/*.parquet", "rejected/*.parquet", "ledger/download.parquet"):
        ray_table, local_table = _table(ray_out, name), _table(local_out, name)
        assert ray_table.equals(local_table), name
    assert _report(ray_out) == _report(local_out)


@pytest.fixture(scope="module")
def on_ray(tmp_path_factory, curated, ray_cluster) -> Path:
    """The conftest's download again, through the command line, on the cluster --ray-address names."""
    out = tmp_path_factory.mktemp("ray") / "out"
    result = CliRunner().invoke(app, ["curate", "download", str(curated), "--out", str(out), "--allow-private",
                                      "--timeout", str(SETTINGS.timeout), "--threads", str(SETTINGS.threads),
                                      "--samples-per-shard", str(SETTINGS.samples_per_shard), "--processes", "1",
                                      "--no-progress", "--engine", "ray", "--ray-address", ray_cluster])
    assert result.exit_code == 0, result.output
    return out


def test_a_ray_download_is_the_local_download(on_ray, downloaded):
    """Same rows kept, same reasons, same sha256, size and pHash per row, same shards and keys."""
    assert len(list((on_ray / "attempts" / "000").glob("*.tar"))) > 1  # several shards: several Ray tasks
    assert _table(on_ray, "kept/*.parquet").height == 2 and _report(on_ray)["accounted"]
    _same_outputs(on_ray, downloaded)


def test_near_duplicates_are_grouped_across_the_ray_tasks(tmp_path, server, ray_cluster):
    """One photo under three URLs, fetched by three Ray tasks (a shard each): one pair kept, as
    the local engine keeps (tests/curate/images/test_download.py), the others naming it."""
    from qvl.curate.filter.pipeline import run_filter
    from qvl.curate.settings import FilterSettings, RunSettings

    captions = {"/near/original.jpg": "a blurred red and green pattern of blocks on a wall",
                "/near/other-1.jpg": "another blurred pattern of coloured blocks",
                "/near/smaller.png": "a blurred pattern of blocks",
                "/near/other-2.jpg": "a third blurred pattern of coloured blocks",
                "/near/cropped.jpg": "blurred blocks of colour seen up close"}
    raw = tmp_path / "raw.parquet"
    pl.DataFrame({"url": [server.base + p for p in captions], "text": list(captions.values())}).write_parquet(raw)
    run_filter([raw], tmp_path / "curated", FilterSettings(skip_rules=("lang",)), RunSettings(workers=1),
               show_progress=False)
    settings = DownloadSettings(**{**SETTINGS.__dict__, "samples_per_shard": 2})
    report = run_download(tmp_path / "curated", tmp_path / "out", settings, show_progress=False,
                          engine=EngineSettings("ray", ray_cluster))
    ledger = _table(tmp_path / "out", "ledger/download.parquet")
    outcome = dict(zip(ledger["url"], ledger["drop_reason"]))
    assert {p: outcome[server.base + p] for p in captions} == {
        "/near/original.jpg": None, "/near/smaller.png": "near_duplicate_image",
        "/near/cropped.jpg": "near_duplicate_image", "/near/other-1.jpg": None, "/near/other-2.jpg": None}
    lost = ledger.filter(pl.col("drop_reason") == "near_duplicate_image")
    winner = ledger.filter(pl.col("url") == server.base + "/near/original.jpg")["row_id"][0]
    assert set(lost["near_duplicate_of"]) == {winner} and report["accounted"]
    group = ledger.filter(pl.col("near_duplicate_of").is_not_null() | (pl.col("row_id") == winner))
    assert group["image_tar"].n_unique() == 3  # the group spans the shards of three tasks


def test_format_reads_a_ray_download(on_ray, downloaded, tmp_path):
    from qvl.formats.build import FormatSettings, run_format

    settings = FormatSettings(tokenizer="bytes", image_tokens=4)
    shards = {}
    for name, folder in (("ray", on_ray), ("local", downloaded)):
        run_format("multitask", sorted((folder / "kept").glob("*.parquet")), tmp_path / name, downloads=folder,
                   settings=settings, show_progress=False)
        shards[name] = pl.read_ipc_stream(tmp_path / name / "data-00000-of-00001.arrow")
    assert shards["ray"].height == 2 and shards["ray"].equals(shards["local"])


def test_an_interrupted_ray_download_resumes_like_a_local_one(tmp_path, curated, downloaded, server, ray_cluster):
    """A run killed before its last shard: running again on Ray fetches that shard alone."""
    out = tmp_path / "out"
    shutil.copytree(downloaded, out)
    attempt = out / "attempts" / "000"
    (attempt / "_qvl" / "done.json").unlink()
    last = max(attempt.glob("*.tar")).stem
    queue_urls = set(pl.read_parquet(attempt / f"{last}.parquet")["url"])
    for name in (f"{last}.tar", f"{last}.parquet", f"{last}_stats.json", f"_qvl/{last}.checks.parquet"):
        (attempt / name).unlink(missing_ok=True)
    hits = len(server.hits)
    run_download(curated, out, SETTINGS, show_progress=False, engine=EngineSettings("ray", ray_cluster))
    assert {server.base + h for h in server.hits[hits:]} == queue_urls
    _same_outputs(out, downloaded)


def test_the_address_screen_holds_in_every_ray_worker(tmp_path, server, ray_cluster):
    """Rows the pre-screen never saw (as a redirect would bring them) reach img2dataset's Ray
    workers: each worker refuses the loopback connection, and the server is never hit."""
    from qvl.common.engines import RayEngine

    paths = ["/good.jpg", "/photo.png", "/to-good.jpg", "/tiny.jpg", "/wide.jpg"]
    queue = pl.DataFrame({"url": [server.base + p for p in paths], "text": ["x"] * len(paths),
                          "row_id": [f"r:{i}" for i in range(len(paths))]})
    hits = len(server.hits)
    with RayEngine(ray_cluster, None) as ray:
        _fetch(queue, tmp_path / "attempt", DownloadSettings(timeout=2, threads=8), False, ray)
    status = pl.concat([pl.read_parquet(p) for p in sorted((tmp_path / "attempt").glob("*.parquet"))])
    assert status.height == len(paths) and set(status["status"]) == {"failed_to_download"}
    assert all(netcheck.REFUSED in e for e in status["error_message"])
    assert server.hits[hits:] == []


def test_clip_scores_on_an_actor_pool_are_the_local_scores(downloaded, tiny_clip, tmp_path, ray_cluster):  # noqa: F811
    config, weights = tiny_clip
    settings = ClipSettings(model=str(config), pretrained=weights, batch_size=3, threshold_default=0.0,
                            thresholds={})
    for name in ("local", "ray"):
        shutil.copytree(downloaded, tmp_path / name)
    local = run_clip_score(tmp_path / "local", settings, show_progress=False)
    on_ray = run_clip_score(tmp_path / "ray", settings, show_progress=False,
                            engine=EngineSettings("ray", ray_cluster, workers=2))
    scores = {name: _table(tmp_path / name, "ledger/clip.parquet") for name in ("local", "ray")}
    assert scores["ray"]["row_id"].to_list() == scores["local"]["row_id"].to_list() and scores["ray"].height >= 3
    assert (scores["ray"]["clip_score_computed"] - scores["local"]["clip_score_computed"]).abs().max() <= 1e-5
    assert on_ray["kept_rows"] == local["kept_rows"] and on_ray["funnel"] == local["funnel"]
    for name in ("kept/*.parquet", "rejected/*.parquet"):
        ray_ids = _table(tmp_path / "ray", name).select("row_id", *(["drop_reason"] if "rejected" in name else []))
        assert ray_ids.equals(_table(tmp_path / "local", name).select(ray_ids.columns)), name


def test_a_dead_ray_address_is_one_error_line(curated, tmp_path, ray_cluster):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    result = CliRunner().invoke(app, ["curate", "download", str(curated), "--out", str(tmp_path / "out"),
                                      "--engine", "ray", "--ray-address", dead, "--no-progress"])
    assert result.exit_code == 1 and result.output.startswith("error: Ray cluster " + dead)
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
