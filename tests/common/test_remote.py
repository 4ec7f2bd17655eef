"""Object storage against a real S3-compatible server on 127.0.0.1: committed folders,
resumed uploads, mirrors that fetch only what changed, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qvl.common import remote


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("given, expected", [
    ("s3://bucket/run", "s3://bucket/run"), (Path("s3://bucket/run"), "s3://bucket/run"),
    ("file:///tmp/x", Path("/tmp/x")), (Path("file:///tmp/x"), Path("/tmp/x")), ("runs/a", Path("runs/a")),
    (Path("gs://b/k"), "gs://b/k"), ("S3://b/a/../c/", "s3://b/c"), ("s3:/b/k", "s3://b/k"),
])
def test_location_keeps_urls_and_paths_apart(given, expected):
    assert remote.location(given) == expected


@pytest.mark.parametrize("given", ["s3://", "s3:///..", "s3://b/../.."])
def test_a_url_without_a_bucket_is_refused(given):
    with pytest.raises(remote.RemoteError, match="names no bucket"):
        remote.location(given)


def test_publish_then_mirror_round_trips_a_folder(s3, tmp_path):
    url = s3.bucket() + "/run"
    src = _folder(tmp_path / "src", {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)) * 10})
    manifest = remote.publish(src, url, show_progress=False)
    assert {name: entry["size"] for name, entry in manifest["files"].items()} == {"a.txt": 5, "sub/b.bin": 2560}
    got = remote.input_folder(url, show_progress=False)
    assert (got / "a.txt").read_bytes() == b"alpha" and (got / "sub/b.bin").read_bytes() == bytes(range(256)) * 10


def test_a_folder_without_its_manifest_is_not_trusted(s3, tmp_path):
    url = s3.bucket() + "/half"
    fs, path = remote.filesystem(url)
    fs.pipe(path + "/part-0.parquet", b"half a run")  # objects of a run that died before its manifest
    with pytest.raises(remote.RemoteError, match="no committed qvl output"):
        remote.input_folder(url, show_progress=False)


def test_republishing_sends_only_what_changed_and_removes_what_went(s3, tmp_path):
    url = s3.bucket() + "/run"
    src = _folder(tmp_path / "src", {"keep.txt": b"same", "old.txt": b"gone soon"})
    remote.publish(src, url, show_progress=False)
    fs, path = remote.filesystem(url)
    before = fs.info(path + "/keep.txt")["LastModified"]
    (src / "old.txt").unlink()
    (src / "new.txt").write_bytes(b"new")
    remote.publish(src, url, show_progress=False)
    assert sorted(fs.ls(path, detail=False)) == sorted(f"{path}/{n}" for n in ("keep.txt", "new.txt", remote.COMMITTED))
    assert fs.info(path + "/keep.txt")["LastModified"] == before
    mirror = remote.input_folder(url, show_progress=False)
    assert sorted(p.name for p in mirror.iterdir() if p.name != remote.STAGED_FROM) == ["keep.txt", "new.txt"]


def test_a_file_rewritten_at_the_same_size_is_sent_and_fetched_again(s3, tmp_path):
    """A checkpoint is rewritten at every save with the same size: size alone would keep the old one."""
    url = s3.bucket() + "/run"
    src = _folder(tmp_path / "src", {"model.bin": b"step-2"})
    remote.publish(src, url, show_progress=False)
    assert (remote.input_folder(url, show_progress=False) / "model.bin").read_bytes() == b"step-2"
    (src / "model.bin").write_bytes(b"step-6")
    remote.publish(src, url, show_progress=False)
    assert (remote.input_folder(url, show_progress=False) / "model.bin").read_bytes() == b"step-6"


def test_an_output_staged_and_killed_resumes_and_commits_once(s3, tmp_path):
    url = s3.bucket() + "/out"
    with pytest.raises(KeyboardInterrupt), remote.output(url, show_progress=False) as folder:
        (folder / "done-part").write_text("1")
        raise KeyboardInterrupt  # killed before the command finished: nothing committed
    assert remote.committed(url) is None
    with remote.output(url, show_progress=False) as again:
        assert (again / "done-part").read_text() == "1"  # resumes from what the first run wrote
        (again / "second-part").write_text("2")
    assert set(remote.committed(url)["files"]) == {"done-part", "second-part"}


def test_an_output_starts_from_what_the_bucket_committed(s3, tmp_path, monkeypatch):
    url = s3.bucket() + "/out"
    with remote.output(url, show_progress=False) as folder:
        (folder / "report.json").write_text("{}")
    monkeypatch.setenv("QVL_CACHE", str(tmp_path / "another-machine"))
    with remote.output(url, show_progress=False) as folder:
        assert (folder / "report.json").read_text() == "{}"


def test_a_missing_bucket_and_wrong_credentials_are_one_clear_error(s3, tmp_path, monkeypatch):
    with pytest.raises(remote.RemoteError, match="no-such-bucket-here"):
        remote.input_folder("s3://no-such-bucket-here/run", show_progress=False)
    with pytest.raises(remote.RemoteError, match="no-such-bucket-here") as e:
        remote.publish(_folder(tmp_path / "x", {"a": b"1"}), "s3://no-such-bucket-here/run", show_progress=False)
    assert "qvl-test-secret" not in str(e.value)


def test_a_manifest_naming_files_outside_the_folder_is_refused(s3, tmp_path):
    url = s3.bucket() + "/evil"
    fs, path = remote.filesystem(url)
    fs.pipe(path + "/" + remote.COMMITTED, json.dumps({"files": {"../../etc/x": 1}}).encode())
    with pytest.raises(remote.RemoteError, match="outside the folder"):
        remote.input_folder(url, show_progress=False)


def test_a_mirrored_input_is_known_by_its_url_on_every_machine(s3, tmp_path, monkeypatch):
    url = s3.bucket() + "/curated"
    remote.publish(_folder(tmp_path / "src", {"kept/part-0.parquet": b"rows"}), url, show_progress=False)
    origins = []
    for machine in ("a", "b"):
        monkeypatch.setenv("QVL_CACHE", str(tmp_path / machine))
        folder = remote.input_folder(url, show_progress=False)
        origins.append((remote.origin(folder), remote.origin(folder / "kept/part-0.parquet")))
    assert origins == [(url, url + "/kept/part-0.parquet")] * 2
    assert remote.origin(tmp_path / "src") == str((tmp_path / "src").resolve())


def test_only_the_files_a_command_reads_are_fetched(s3, tmp_path):
    url = s3.bucket() + "/curated"
    remote.publish(_folder(tmp_path / "src", {".qvl": b"{}", "report.json": b"{}", "kept/a.parquet": b"k",
                                              "ledger/a.parquet": b"big"}), url, show_progress=False)
    folder = remote.input_folder(url, show_progress=False, only=("kept/", "report.json"))
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
                  and p.name != remote.STAGED_FROM) == [".qvl", "kept/a.parquet", "report.json"]


def test_an_output_never_replaces_what_qvl_did_not_write(s3, tmp_path):
    bucket = s3.bucket()
    fs, path = remote.filesystem(bucket)
    fs.pipe(path + "/theirs/data.bin", b"someone's data")
    with pytest.raises(remote.RemoteError, match="holds objects qvl did not write"), \
            remote.output(bucket + "/theirs", show_progress=False):
        pass
    with pytest.raises(remote.RemoteError, match="the root of a bucket"), remote.output(bucket, show_progress=False):
        pass
    with pytest.raises(remote.RemoteError, match="no such bucket"), \
            remote.output("s3://no-such-bucket-x/run", show_progress=False):
        pass
    assert fs.cat(path + "/theirs/data.bin") == b"someone's data"


def test_rerunning_deletes_only_what_qvl_committed_before(s3, tmp_path):
    url = s3.bucket() + "/run"
    src = _folder(tmp_path / "src", {".qvl": b"{}", "a.txt": b"1", "old.txt": b"2"})
    remote.publish(src, url, show_progress=False)
    fs, path = remote.filesystem(url)
    fs.pipe({path + "/notes.txt": b"a user's note", path + "/nested/part.bin": b"another output"})
    (src / "old.txt").unlink()
    remote.publish(src, url, show_progress=False)
    assert fs.cat(path + "/notes.txt") == b"a user's note" and fs.cat(path + "/nested/part.bin") == b"another output"
    assert not fs.exists(path + "/old.txt")


def test_an_object_changed_after_its_commit_is_refused_and_healed_by_the_next_commit(s3, tmp_path):
    url = s3.bucket() + "/run"
    src = _folder(tmp_path / "src", {"kept.parquet": b"good rows"})
    remote.publish(src, url, show_progress=False)
    fs, path = remote.filesystem(url)
    fs.pipe(path + "/kept.parquet", b"\x00" * 9)  # same size, other bytes
    with pytest.raises(remote.RemoteError, match=r"kept\.parquet: changed after it was committed"):
        remote.input_folder(url, show_progress=False)
    remote.publish(src, url, show_progress=False)  # the writer's next commit sends it again
    assert (remote.input_folder(url, show_progress=False) / "kept.parquet").read_bytes() == b"good rows"


def test_a_file_overwritten_at_the_same_size_is_fetched_again(s3, tmp_path):
    url = s3.bucket() + "/recipe.toml"
    fs, path = remote.filesystem(url)
    fs.pipe(path, b"count = 20")
    assert remote.input_file(url).read_bytes() == b"count = 20"
    fs.pipe(path, b"count = 10")
    assert remote.input_file(url).read_bytes() == b"count = 10"
    assert remote.origin(remote.input_file(url)) == url


@pytest.mark.parametrize("body, message", [
    (b"not json", "not a qvl manifest"), (b"[" * 100_000, "not a qvl manifest"),
    (b'{"files": {"a": {"size": true, "id": "x"}}}', "is not {size, id}"),
    (b'{"files": {"a": {"size": 1e30, "id": "x"}}}', "is not {size, id}"),
])
def test_a_damaged_manifest_is_one_error(s3, body, message):
    url = s3.bucket() + "/run"
    fs, path = remote.filesystem(url)
    fs.pipe(path + "/" + remote.COMMITTED, body)
    with pytest.raises(remote.RemoteError, match=message):
        remote.input_folder(url, show_progress=False)
