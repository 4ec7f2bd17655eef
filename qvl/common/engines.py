"""Where a stage runs its tasks: this machine (``LocalEngine``), or a Ray cluster (``RayEngine``).

Both engines run the same functions with the same arguments, so their outputs are identical;
only the scheduling differs. `qvl curate filter` runs its shard, dedup and balance tasks on
either; `qvl curate download`, `clip-score` and `format` open a ``RayEngine`` for their Ray
paths. A task that reports its rows as it goes is given the engine's progress queue as its
last argument. Each task writes its own files atomically, so either engine resumes a run the
other started.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import secrets
import socket
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing.managers import SyncManager

from qvl.common.lifeline import exit_with_parent
from qvl.errors import QvlError
from qvl.recipes import require


def _init_worker(parent: int) -> None:
    exit_with_parent(parent)


class LocalEngine:
    """Runs tasks inline (one worker) or in a pool of spawned processes, forwarding the
    rows they report to a progress callback. Spawned, not forked: polars' thread pool
    does not survive a fork. Each worker gets an equal share of polars threads. The pool's
    progress queue lives in a manager process: a task is given it as an argument (a plain
    multiprocessing queue can reach a worker only when the worker starts)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> LocalEngine:
        if self.workers > 1:
            ctx = mp.get_context("spawn")
            self.manager = SyncManager(ctx=ctx)
            self.manager.start(_init_worker, (os.getpid(),))
            self.queue = self.manager.Queue()
            self._previous = os.environ.get("POLARS_MAX_THREADS")
            os.environ["POLARS_MAX_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.workers))
            self.pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                            initargs=(os.getpid(),))
        else:
            self.queue = queue.SimpleQueue()
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.manager.shutdown()
            if self._previous is None:
                os.environ.pop("POLARS_MAX_THREADS", None)
            else:
                os.environ["POLARS_MAX_THREADS"] = self._previous

    def _drain(self, on_progress) -> None:
        while True:
            try:
                on_progress(self.queue.get_nowait())
            except queue.Empty:
                return

    def run(self, fn, jobs: dict, on_progress=None):
        """Yield (key, result) for every ``key: args`` job, as each one finishes; with
        ``on_progress``, ``fn`` is given the progress queue after its args, and the rows
        put there reach ``on_progress``."""
        extra = (self.queue,) if on_progress is not None else ()
        if self.pool is None or len(jobs) <= 1:
            for key, args in jobs.items():
                result = fn(*args, *extra)
                if on_progress is not None:
                    self._drain(on_progress)
                yield key, result
            return
        pending = {self.pool.submit(fn, *args, *extra): key for key, args in jobs.items()}
        while pending:
            done, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            if on_progress is not None:
                self._drain(on_progress)
            for fut in done:
                yield pending.pop(fut), fut.result()


@dataclass
class EngineSettings:
    """Where a command runs, never what it decides: the outputs are the same on either engine."""

    engine: str = "local"  # "local" (this machine) or "ray"
    address: str | None = None  # Ray cluster; None: $RAY_ADDRESS, else a local Ray started here
    workers: int | None = None  # Ray: CPUs of a local Ray, or actors of clip-score; None: all

    def __post_init__(self) -> None:
        require(self.engine in ("local", "ray"), "engine", f"{self.engine!r}: use local or ray")
        require(self.workers is None or self.workers >= 1, "workers", f"{self.workers}: must be >= 1")

    @property
    def on_ray(self) -> bool:
        return self.engine == "ray"


class RayUnreachable(QvlError):
    """The Ray cluster named by --ray-address or RAY_ADDRESS cannot be reached."""


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's node address is 127.0.0.1, not the LAN's
CONNECT_TIMEOUT_S = 5.0


def _check_reachable(address: str) -> None:
    """A ``host:port`` with nothing listening is one clear error at once, not Ray's minute of
    retries and a traceback; ``auto``, ``local`` and ``ray://`` are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise RayUnreachable(f"Ray cluster {address}: nothing answers there ({e.strerror or e}); start one "
                             "(`ray start --head`) or fix --ray-address / RAY_ADDRESS") from None


class RayEngine:
    """Tasks on a Ray cluster (``address``, else ``$RAY_ADDRESS``) or a local Ray started here
    (its node on 127.0.0.1, no dashboard, no usage stats, a token made for it). One CPU per
    task, one polars thread per task. The output folder must be storage every node sees (a
    shared file system or a mounted bucket). Inside a process already connected to Ray, that
    connection is used."""

    def __init__(self, address: str | None, cpus: int | None):
        self.address, self.cpus = address or os.environ.get("RAY_ADDRESS") or None, cpus
        self.started = False

    def __enter__(self) -> RayEngine:
        if not self.address and "ray" not in sys.modules:  # Ray reads these when imported; a process
            # that joins the local Ray (img2dataset's) inherits them
            os.environ.setdefault(LOOPBACK_ENV, "0")
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            os.environ.setdefault("RAY_AUTH_MODE", "token")  # a token of this run's own, not ~/.ray/auth_token
            os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
        try:
            import ray
        except ImportError:
            raise RuntimeError("--engine ray needs Ray: pip install 'qvl[ray]'") from None
        self.ray = ray
        if self.address:
            _check_reachable(self.address)
        if not ray.is_initialized():
            env = {"env_vars": {"POLARS_MAX_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}}
            if self.address:
                try:
                    ray.init(address=self.address, runtime_env=env, log_to_driver=False, configure_logging=False)
                except (ConnectionError, RuntimeError) as e:
                    raise RayUnreachable(f"Ray cluster {self.address}: {str(e).splitlines()[0][:300]}") from None
            else:
                ray.init(num_cpus=self.cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                         runtime_env=env, log_to_driver=False, configure_logging=False)
            self.started = True
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            self.ray.shutdown()

    @property
    def gcs_address(self) -> str:
        """The cluster's address, for another process (img2dataset's driver) to join it."""
        return self.ray.get_runtime_context().gcs_address

    def resources(self) -> dict[str, float]:
        return self.ray.cluster_resources()

    def run(self, fn, jobs: dict, on_progress=None):
        """Yield (key, result) for every ``key: args`` job, as each one finishes; with
        ``on_progress``, ``fn`` is given no queue (None) and a finished shard's rows are reported."""
        extra = (None,) if on_progress is not None else ()
        remote = self.ray.remote(num_cpus=1, max_retries=2)(fn)
        pending = {remote.remote(*args, *extra): key for key, args in jobs.items()}
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1)
            for ref in done:
                result = self.ray.get(ref)
                if on_progress is not None:
                    on_progress(sum(result.get("stats", {}).get("input", {}).values()))
                yield pending.pop(ref), result
