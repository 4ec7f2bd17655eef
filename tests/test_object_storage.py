"""The demo's pipeline against a real S3-compatible server on 127.0.0.1: raw parquet in a
bucket -> filter -> download (from a local HTTP server) -> format -> train stage 2, stopped and
resumed from the bucket on "another machine" — every result equal to the same commands on
local paths; and the bucket's failures (missing bucket, no credentials, a half-written run,
an object deleted mid-run) as one clear error."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from qvl.cli import app
from qvl.common import remote
from tests.curate.conftest import _photo

CAPTIONS = ["a harbour at dawn with small fishing boats", "a red tram crossing an old stone bridge",
            "two children flying a kite on a windy beach", "a bowl of ripe oranges on a wooden table",
            "a snowy mountain road between tall pine trees", "an old bicycle leaning on a yellow wall",
            "a lighthouse on a rocky coast under clouds", "a market stall full of fresh green vegetables",
            "a black cat sleeping on a sunny windowsill", "a busy street with neon signs at night",
            "a wooden cabin beside a quiet lake in autumn", "a plate of pasta with tomato sauce and basil"]


@pytest.fixture(scope="module")
def photos():
    """A loopback HTTP server with one distinct photo per caption."""
    bodies = {f"/p/{i}.jpg": _photo(100 + i) for i in range(len(CAPTIONS))}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = bodies.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def qvl(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    return result.output


def kept(folder: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(f) for f in sorted((folder / "kept").glob("*.parquet"))]).sort("row_id")


def test_the_pipeline_on_a_bucket_equals_the_pipeline_on_local_paths(s3, photos, micro, tmp_path, monkeypatch):
    raw = tmp_path / "raw" / "pairs.parquet"
    raw.parent.mkdir()
    pl.DataFrame({"url": [f"{photos}/p/{i}.jpg" for i in range(len(CAPTIONS))] + [f"{photos}/p/missing.jpg"],
                  "text": CAPTIONS + ["a photo that the server does not have"]}).write_parquet(raw)
    bucket = s3.bucket()
    fs, _ = remote.filesystem(bucket)
    fs.put_file(str(raw), bucket.removeprefix("s3://") + "/raw/pairs.parquet")  # the raw data, as a team uploads it
    local, url = tmp_path / "local", bucket + "/run"
    for base, source in ((local, str(raw.parent)), (url, f"{bucket}/raw")):
        def at(name: str, base=base) -> str:
            return str(base / name) if isinstance(base, Path) else f"{base}/{name}"
        qvl("curate", "filter", source, "--out", at("curated"), "--workers", "1")
        qvl("curate", "download", at("curated"), "--out", at("images"), "--allow-private", "--processes", "1",
            "--threads", "4", "--samples-per-shard", "8")
        qvl("format", "multitask", "--input", at("images/kept/part-00000.parquet"), "--downloads", at("images"),
            "--out", at("shards"), "--tokenizer", "bytes", "--image-tokens", "4")
    mirror = {name: remote.input_folder(f"{url}/{name}", show_progress=False) for name in ("curated", "images", "shards")}
    assert kept(mirror["curated"]).equals(kept(local / "curated")) and len(kept(local / "curated")) == len(CAPTIONS) + 1
    on_bucket, here = kept(mirror["images"]), kept(local / "images")
    assert len(here) == len(CAPTIONS) and on_bucket.select("row_id", "sha256").equals(here.select("row_id", "sha256"))
    for name in ("manifest.json",):
        a, b = json.loads((mirror["shards"] / name).read_text()), json.loads((local / "shards" / name).read_text())
        assert (a["samples"], a["tokens"], a["by_task"]) == (b["samples"], b["tokens"], b["by_task"])
    assert sorted(p.name for p in (mirror["shards"]).glob("*.arrow")) == sorted(p.name for p in (local / "shards").glob("*.arrow"))
    for shard in (local / "shards").glob("*.arrow"):
        assert (mirror["shards"] / shard.name).read_bytes() == shard.read_bytes()

    story = json.loads(CliRunner().invoke(app, ["curate", "why", f"{url}/images", here["row_id"][0], "--json"]).output)
    assert story["verdict"].startswith("kept with its image") and f"{url}/images/kept" in story["verdict"]

    # train stage 2 from the bucket, stopped after 3 steps on one machine, resumed on another. The
    # stop is at the first step after the micro preset's 2 warm-up steps, where --max-steps (the
    # cosine schedule's end) does not change the learning rate yet: the stopped run is a prefix
    steps = 16
    train = ["train", "--stage", "2", "--preset", micro["preset"], "--checkpoint-every", "2"]
    qvl(*train, "--max-steps", str(steps), "--data", str(local / "shards"), "--out", str(local / "train"))
    monkeypatch.setenv("QVL_CACHE", str(tmp_path / "machine-a"))
    qvl(*train, "--max-steps", "3", "--data", f"{url}/shards", "--out", f"{url}/train")
    step = json.loads((remote.input_folder(f"{url}/train", show_progress=False) / "checkpoint/meta.json").read_text())
    assert step["step"] == 3
    monkeypatch.setenv("QVL_CACHE", str(tmp_path / "machine-b"))  # nothing staged here: all from the bucket
    qvl(*train, "--max-steps", str(steps), "--data", f"{url}/shards", "--out", f"{url}/train", "--resume")
    resumed = load_file(str(remote.input_folder(f"{url}/train", show_progress=False) / "checkpoint/model.safetensors"))
    whole = load_file(str(local / "train" / "checkpoint/model.safetensors"))
    assert resumed.keys() == whole.keys() and all((resumed[k] == whole[k]).all() for k in whole)


def one_error(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("error:"), result.output
    return " ".join(result.output.split())


def test_a_missing_bucket_is_one_error_naming_it(s3, tmp_path):
    assert "s3://no-such-bucket/raw: no such" in one_error("curate", "filter", "s3://no-such-bucket/raw", "--out",
                                                           str(tmp_path / "o"), "--no-progress")
    assert "s3://no-such-bucket/run" in one_error("format", "inspect", "s3://no-such-bucket/run")


def test_missing_credentials_are_one_error_and_never_print_a_secret(s3, tmp_path, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    message = one_error("curate", "report", "s3://some-bucket/run")
    assert "s3://some-bucket/run" in message and "credentials" in message.lower()


def test_a_run_that_never_committed_is_refused_as_input(s3, tmp_path):
    url = s3.bucket() + "/curated"
    fs, path = remote.filesystem(url)
    fs.pipe({f"{path}/.qvl": b'{"kind": "curate filter"}', f"{path}/kept/part-0.parquet": b"half"})
    assert "never committed" in one_error("curate", "download", url, "--out", str(tmp_path / "images"), "--no-progress")


def test_an_object_deleted_mid_run_is_one_error_naming_it(s3, tmp_path):
    """The filter lists the bucket, then reads each file: one gone in between is named."""
    url = s3.bucket() + "/raw"
    fs, path = remote.filesystem(url)
    for i in range(2):
        pl.DataFrame({"url": [f"http://x.test/{i}.jpg"], "text": ["a photo of a small red boat"]}).write_parquet(
            tmp_path / f"{i}.parquet")
        fs.put_file(str(tmp_path / f"{i}.parquet"), f"{path}/{i}.parquet")
    files = remote.list_files(url)
    fs.rm_file(f"{path}/1.parquet")
    from qvl.curate.sources.shards import open_shard
    from qvl.errors import QvlError

    open_shard(files[0], 0)
    with pytest.raises(QvlError, match=r"s3://.*/raw/1\.parquet: no such"):
        open_shard(files[1], 1)


def test_text_inputs_stream_from_a_bucket_as_from_disk(s3, tmp_path):
    """JSONL (gzip), CSV and TSV read from the bucket in place give the rows, rejects and
    row ids the same files give on disk."""
    import gzip

    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [{"url": f"http://x.test/{i}.jpg", "text": CAPTIONS[i % len(CAPTIONS)] + f" number {i}"} for i in range(40)]
    with gzip.open(raw / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:20])
        f.write("{not json\n")
    pl.DataFrame(rows[20:30]).write_csv(raw / "b.csv")
    (raw / "c.tsv").write_text("url\ttext\n" + "".join(f"{r['url']}\t{r['text']}\n" for r in rows[30:]) + "x\ty\tz\n")
    bucket = s3.bucket()
    fs, _ = remote.filesystem(bucket)
    fs.put(str(raw) + "/", bucket.removeprefix("s3://") + "/raw/", recursive=True)
    qvl("curate", "filter", str(raw), "--out", str(tmp_path / "local"), "--workers", "1", "--skip-rule", "lang")
    qvl("curate", "filter", f"{bucket}/raw", "--out", str(tmp_path / "from-bucket"), "--workers", "1",
        "--skip-rule", "lang")
    for folder in ("kept", "rejected"):
        a, b = (pl.concat([pl.read_parquet(f) for f in sorted((tmp_path / run / folder).glob("*.parquet"))],
                          how="diagonal_relaxed").sort("row_id") for run in ("local", "from-bucket"))
        assert a.equals(b), folder
    report, local = (json.loads((tmp_path / run / "report.json").read_text()) for run in ("from-bucket", "local"))
    assert report["funnel"] == local["funnel"] and report["input_rows"] > 40
    assert report["inputs"] == [f"{bucket}/raw/{name}" for name in ("a.jsonl.gz", "b.csv", "c.tsv")]


def test_a_mix_recipe_in_a_bucket_reads_its_sources_beside_it(s3, tmp_path):
    from tests.formats.test_mix import source_files, write_recipe

    data = tmp_path / "data"
    source_files(data)
    recipe = write_recipe(data / "mix.toml", {"tokenizer": "bytes", "image_tokens": 4, "seed": 1},
                          [{"name": "caps", "layout": "qvl", "files": ["captions.jsonl"], "images": ".", "count": 5}])
    bucket = s3.bucket()
    fs, _ = remote.filesystem(bucket)
    fs.put(str(data) + "/", bucket.removeprefix("s3://") + "/data/", recursive=True)
    qvl("format", "mix", str(recipe), "--out", str(tmp_path / "local"))
    qvl("format", "mix", f"{bucket}/data/mix.toml", "--out", f"{bucket}/mixed")
    mixed = remote.input_folder(f"{bucket}/mixed", show_progress=False)
    shards = sorted((tmp_path / "local").glob("*.arrow"))
    assert shards and all((mixed / shard.name).read_bytes() == shard.read_bytes() for shard in shards)
    a, b = (json.loads((folder / "manifest.json").read_text()) for folder in (mixed, tmp_path / "local"))
    assert a["samples"] == b["samples"] >= 5 and a["mix"]["available"] == b["mix"]["available"]


def test_the_filter_on_a_ray_cluster_reads_and_writes_a_bucket(s3, ray_cluster, tmp_path):
    from qvl.demo.pairs import write_demo_pairs

    write_demo_pairs(tmp_path / "raw", rows_per_shard=400)
    bucket = s3.bucket()
    fs, _ = remote.filesystem(bucket)
    fs.put(str(tmp_path / "raw") + "/", bucket.removeprefix("s3://") + "/raw/", recursive=True)
    qvl("curate", "filter", str(tmp_path / "raw"), "--out", str(tmp_path / "local"), "--workers", "2")
    qvl("curate", "filter", f"{bucket}/raw", "--out", f"{bucket}/curated", "--engine", "ray", "--address",
        ray_cluster, "--workers", "2")
    on_ray = remote.input_folder(f"{bucket}/curated", show_progress=False)
    assert kept(on_ray).equals(kept(tmp_path / "local")) and len(kept(on_ray)) > 500
    a, b = (json.loads((folder / "report.json").read_text()) for folder in (on_ray, tmp_path / "local"))
    assert a["funnel"] == b["funnel"]
