from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from qvl.demo.world import write_annotations
from qvl.formats.build import FormatSettings, run_format

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray, whoever starts it in the tests: its nodes on 127.0.0.1 (not the LAN address Ray picks
# for clusters), no usage stats sent anywhere. Set before any test module imports ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# and its clusters ask for a token made for this session (Ray reads these when it is imported)
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# The real data beside a development checkout (and in CI); absent on a user's machine.
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not present")


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA


MICRO_PRESET = """
name = "micro"
tokenizer = "bytes"
image_tokens = 4
[vision]
width = 32
layers = 2
heads = 2
patch_size = 8
[adapter]
heads = 2
[llm]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
num_key_value_heads = 2
intermediate_size = 64
max_position_embeddings = 1024
[stages]
resolution = [32, 48, 48]
seq_len = [512, 512, 512]
lr = [3e-3, 3e-3, 3e-3]
min_lr = [1e-4, 1e-4, 1e-4]
warmup_steps = [2, 2, 2]
micro_batch = [4, 4, 4]
"""


@pytest.fixture(scope="session")
def micro(tmp_path_factory) -> dict:
    """A micro preset and multitask/SFT shards of the shape world formatted for it."""
    root = tmp_path_factory.mktemp("trainer")
    preset = root / "micro.toml"
    preset.write_text(MICRO_PRESET)
    world = write_annotations(root / "world", n_images=16, size=32)
    shards = {}
    for kind in ("multitask", "sft"):
        shards[kind] = root / kind
        run_format(kind, [world[kind]], shards[kind], world["images"],
                   settings=FormatSettings(tokenizer="bytes", image_tokens=4), show_progress=False)
    return {"preset": str(preset), "root": root, **shards}


class S3Server:
    """A real S3-compatible server (moto's server mode, what s3fs and pyarrow test against) in
    its own process on 127.0.0.1; ``bucket()`` creates a fresh bucket and returns its URL."""

    def __init__(self, tmp: Path):
        import socket
        import subprocess
        import sys
        import time
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / "moto.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"moto server did not start; see {tmp / 'moto.log'}")
                time.sleep(0.2)
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "qvl-test-key",
                    "AWS_SECRET_ACCESS_KEY": "qvl-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}
        self.count = 0

    def bucket(self, name: str = "qvl") -> str:
        import boto3

        self.count += 1
        bucket = f"{name}-{self.count}"
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                     region_name="us-east-1").create_bucket(Bucket=bucket)
        return f"s3://{bucket}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The S3 server for the session, its endpoint and test credentials in the environment
    (subprocesses and Ray workers started after this inherit them)."""
    server = S3Server(tmp_path_factory.mktemp("s3"))
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture
def s3(s3_server, tmp_path, monkeypatch) -> S3Server:
    """A test's own qvl cache (staging folders, mirrors) beside the session's S3 server."""
    monkeypatch.setenv("QVL_CACHE", str(tmp_path / "qvl-cache"))
    return s3_server


def _processes_under(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (the cluster's own temp dir), and their children."""
    found, parents = set(), {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.add(int(entry.name))
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    grown = True
    while grown:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        grown = bool(children)
        found |= children
    return sorted(found)


def _stop(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and
                                                  "Z" not in _state(p) for p in pids):
            time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


@pytest.fixture(scope="session")
def ray_cluster(s3_server) -> str:
    """A Ray cluster of its own for the session: ``ray start --head`` (its GCS, raylet and worker
    processes) on 127.0.0.1 with two CPUs and a token made here, started after the S3 server so
    its workers reach the bucket as a real cluster's nodes do (endpoint and credentials in their
    environment, never shipped by qvl); this process joins it once and
    the commands under test are given its address. Stopped by ending the processes it started
    (found by its own temp dir), never ``ray stop``, which would end other Ray on the machine.
    Ray binds a second node to the machine's LAN address, never 127.0.0.1: one node it is."""
    ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'qvl[ray]'); CI installs it")
    temp = tempfile.mkdtemp(prefix="qvlray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1",
               "--port", str(port), "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false",
               "--temp-dir", temp, "--disable-usage-stats"]
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=120)
        ray.init(address=address, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1", "POLARS_MAX_THREADS": "1"}})
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _stop(_processes_under(temp))
        shutil.rmtree(temp, ignore_errors=True)
