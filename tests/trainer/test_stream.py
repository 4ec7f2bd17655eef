"""Training data streamed from a bucket (a real S3 server on 127.0.0.1) or a local folder: the
same seeded order across shards either way, exact resume (also onto another number of ranks),
a shard cache that stays under its limit, and each storage failure one clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from qvl.cli import app
from qvl.common import remote
from qvl.demo.world import write_annotations
from qvl.formats.build import FormatSettings, run_format
from qvl.trainer.data import DataError, Loader, Shards
from qvl.trainer.stream import CacheError, windows
from tests.conftest import S3Server

runner = CliRunner()
ROWS = 108  # the multitask rows of 16 scenes: 22 shards of at most 5


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Multitask shards of the micro preset's shape, small enough that an epoch spans 22 of them."""
    root = tmp_path_factory.mktemp("stream")
    world = write_annotations(root / "world", n_images=16, size=32)
    run_format("multitask", [world["multitask"]], root / "shards", world["images"], show_progress=False,
               settings=FormatSettings(tokenizer="bytes", image_tokens=4, shard_rows=5, batch=5))
    return root / "shards"


def published(s3, folder: Path) -> str:
    url = s3.bucket() + "/shards"
    remote.publish(folder, url, show_progress=False)
    return url


def loader(data, micro_batch=4, rank=0, world=1, workers=0, window=2, cache_gb=1.0) -> Loader:
    return Loader(Shards(data, cache_gb=cache_gb), micro_batch, 32, 0, 512, seed=7, rank=rank, world=world,
                  log=lambda m: None, workers=workers, window=window)


def take(source: Loader, n: int) -> list[tuple]:
    """``n`` batches as (sample ids, token ids) per row."""
    batches = [source.next() for _ in range(n)]
    return [(b.sample_ids, b.input_ids.tolist()) for b in batches]


def test_the_order_crosses_shards_and_depends_on_the_seed_alone(shards):
    plan = windows(7, 0, 22, 4)
    assert sorted(i for w in plan for i in w) == list(range(22)) and plan == windows(7, 0, 22, 4)
    assert plan != windows(7, 1, 22, 4) and plan != windows(8, 0, 22, 4)
    first = [ids[0] for ids, _ in take(loader(shards, micro_batch=1, window=4), 10) for ids in [ids[0]]]
    shard_of = {}
    for i, name in enumerate(Shards(shards).manifest.shards):
        for row in pa.ipc.open_stream(str(shards / name)).read_all().to_pylist():
            shard_of[row["sample_ids"][0]] = i
    assert len({shard_of[s] for s in first}) > 1  # the first rows already come from several shards


@pytest.mark.parametrize("where, workers", [("local", 2), ("s3", 0), ("s3", 2)])
def test_stop_and_resume_gives_the_batches_of_an_unbroken_run(shards, s3, where, workers):
    data = shards if where == "local" else published(s3, shards)
    whole = take(loader(data, workers=workers), 34)  # 27 steps an epoch: across its end
    first = loader(data, workers=workers)
    head = take(first, 11)
    state = first.state()
    again = loader(data, workers=workers)
    again.restore([state])
    assert head + take(again, 23) == whole
    other = loader(data, workers=2 - workers)  # other workers: the rank's position, not the engine's state
    other.restore([state])
    assert take(other, 23) == whole[11:]


def epoch_rows(old_world: int, new_world: int, steps: int, data) -> list[str]:
    """The samples of epoch 0 when ``old_world`` ranks take ``steps`` micro-batches each and
    ``new_world`` ranks resume from their checkpointed states."""
    old = [loader(data, micro_batch=2, rank=r, world=old_world) for r in range(old_world)]
    seen = [ids for source in old for batch in take(source, steps) for ids in batch[0]]
    states = [source.state() for source in old]
    new = [loader(data, micro_batch=2, rank=r, world=new_world) for r in range(new_world)]
    for source in new:
        source.restore(states)
    left = (ROWS - 2 * old_world * steps) // (2 * new_world)
    for source in new:
        seen += [ids for batch in take(source, left) for ids in batch[0]]
        assert source.epoch == 0
    return [s for ids in seen for s in ids]


@pytest.mark.parametrize("old_world, new_world, steps", [(2, 1, 5), (1, 3, 9)])
def test_resuming_on_another_number_of_ranks_takes_every_row_once(shards, old_world, new_world, steps):
    seen = epoch_rows(old_world, new_world, steps, shards)
    assert len(seen) == ROWS and len(set(seen)) == ROWS


def test_the_cache_never_holds_more_than_its_limit(shards, s3):
    url = published(s3, shards)
    sizes = sorted(p.stat().st_size for p in shards.glob("*.arrow"))
    limit = sum(sizes[-3:])  # a window of one shard, the next prefetched, and a little room
    source = loader(url, micro_batch=2, window=1, cache_gb=limit / 1e9)
    folder = source.shards.cache.folder
    fetched = set()
    for _ in range(ROWS // 2 + 10):  # an epoch and some: every shard, more than fit
        source.next()
        on_disk = [p for p in folder.iterdir() if not p.name.startswith(".")]
        assert sum(p.stat().st_size for p in on_disk if p.exists()) <= limit  # a loader worker may rename one
        fetched |= {p.name.removesuffix(".part") for p in on_disk}
    assert len(fetched) == 22 and len(on_disk) < 22
    tiny = loader(url, window=4, cache_gb=sizes[-1] * 2 / 1e9)
    with pytest.raises(CacheError, match="--cache-gb"):
        tiny.next()


def weights(run: Path) -> dict:
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def test_train_from_a_bucket_stopped_and_resumed_has_the_weights_of_an_unbroken_run(micro, shards, s3, tmp_path):
    url = published(s3, micro["multitask"])

    def train(out: Path, steps: int, *extra: str) -> None:
        result = runner.invoke(app, ["train", "--stage", "2", "--data", url, "--out", str(out), "--preset",
                                     micro["preset"], "--max-steps", str(steps), "--no-progress", *extra])
        assert result.exit_code == 0, result.output

    train(tmp_path / "whole", 6)
    train(tmp_path / "split", 3)
    shutil.copytree(tmp_path / "split", tmp_path / "other")
    train(tmp_path / "split", 6, "--resume")
    train(tmp_path / "other", 6, "--resume", "--data-workers", "0")  # resumed from the position alone
    whole = weights(tmp_path / "whole")
    for run in ("split", "other"):
        resumed = weights(tmp_path / run)
        assert resumed.keys() == whole.keys()
        assert all(resumed[k].equal(whole[k]) for k in whole), run


def one_line_error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.startswith("error:"), result.output
    return " ".join(result.output.split())


def train_args(micro, data: str, out: Path) -> list[str]:
    return ["train", "--stage", "2", "--data", data, "--out", str(out), "--preset", micro["preset"],
            "--max-steps", "1", "--no-progress"]


def test_a_missing_bucket_an_uncommitted_folder_and_no_credentials_are_one_line(micro, s3, tmp_path, monkeypatch):
    assert "s3://no-such-bucket-qvl/shards: no such bucket" in one_line_error(
        train_args(micro, "s3://no-such-bucket-qvl/shards", tmp_path / "a"))
    url = s3.bucket() + "/shards"
    fs, path = remote.filesystem(url)
    fs.put(str(micro["multitask"]) + "/", path, recursive=True)  # objects, never committed
    assert "no committed qvl output" in one_line_error(train_args(micro, url, tmp_path / "b"))
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    message = one_line_error(train_args(micro, url, tmp_path / "c"))
    assert url in message and "qvl-test-secret" not in message, message


def test_a_manifest_naming_a_missing_shard_and_a_damaged_shard_name_the_object(micro, s3, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(micro["multitask"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "shards": manifest["shards"] + ["gone.arrow"]}))
    url = published(s3, folder)
    assert f"{url}/gone.arrow: listed in manifest.json but missing" in one_line_error(
        train_args(micro, url, tmp_path / "a"))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    shard = folder / manifest["shards"][0]
    shard.write_bytes(b"\xff" * 64 + shard.read_bytes()[64:])
    url = published(s3, folder)
    message = one_line_error(train_args(micro, url, tmp_path / "b"))
    assert f"{url}/{shard.name}: not a readable shard" in message, message


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_deleted_mid_run_is_an_error_naming_it(shards, s3, workers):
    url = published(s3, shards)
    source = loader(url, micro_batch=2, window=1, workers=workers)
    source.next()
    last = source.shards.manifest.shards[windows(7, 0, 22, 1)[-1][0]]  # read at the end of the epoch
    fs, path = remote.filesystem(url)
    fs.rm_file(f"{path}/{last}")
    with pytest.raises(remote.RemoteError, match=f"{url}/{last}: no such bucket or object"):
        for _ in range(ROWS):
            source.next()


def test_a_damaged_local_shard_in_a_later_window_is_named(shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    source = loader(folder, micro_batch=2, window=1, workers=2)
    source.next()
    last = folder / source.shards.manifest.shards[windows(7, 0, 22, 1)[-1][0]]
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(DataError, match=f"{last}: not a readable shard"):
        for _ in range(ROWS):
            source.next()


def test_wrong_credentials_are_access_denied_in_one_line(micro, tmp_path, monkeypatch):
    """A second S3 server that checks credentials (moto's IAM on from the first request)."""
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")
    server = S3Server(tmp_path)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        message = one_line_error(train_args(micro, "s3://any-bucket/shards", tmp_path / "run"))
    finally:
        server.stop()
    assert "s3://any-bucket/shards: access denied" in message and "not-the-secret" not in message, message


def test_a_shard_committed_again_at_the_same_size_is_fetched_anew(micro, s3, tmp_path):
    """The cache knows a shard by its manifest id, not its name and size: re-formatted shards
    of the same sizes are never read stale."""
    folder = tmp_path / "shards"
    shutil.copytree(micro["multitask"], folder)
    url = published(s3, folder)
    first = Shards(url, cache_gb=1)
    name = first.manifest.shards[0]
    before = first.cache.use([name])[0].read_bytes()
    shard = folder / name
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: what a folder committed again can hold
    shard.write_bytes(bytes(data))
    remote.publish(folder, url, show_progress=False)
    again = Shards(url, cache_gb=1).cache.use([name])[0]
    assert again.read_bytes() == bytes(data) != before


def test_one_window_is_drawn_as_the_loader_before_streaming_drew_it():
    """Runs measured before streaming (the demo's README figures) keep their batches."""
    import numpy as np

    from qvl.trainer.stream import window_rows

    for seed, epoch in ((2, 0), (0, 3)):
        assert (window_rows(seed, epoch, 0, 500) == np.random.default_rng([seed, epoch]).permutation(500)).all()
