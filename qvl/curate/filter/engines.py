"""Where `qvl curate filter` runs its tasks: this machine, or a Ray cluster.

Both engines run the same functions — ``process_shard`` (rules and language id over one
input shard), ``dedup_partition`` (one hash partition), the balance steps — with the same
arguments, so their outputs are identical; only the scheduling differs. A task that reports
its rows as it goes is given the engine's progress queue as its last argument. Each task writes its own
files atomically and a marker, so either engine resumes a run the other started.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing.managers import SyncManager

from qvl.common.lifeline import exit_with_parent
from qvl.curate.settings import RunSettings


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

    def __enter__(self) -> "LocalEngine":
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


class RayEngine:
    """Tasks on a Ray cluster (``address``) or a local Ray started here (bound to
    127.0.0.1, no dashboard). One CPU per task, one polars thread per task. The output
    folder must be storage every node sees (a shared file system or a mounted bucket)."""

    def __init__(self, address: str | None, cpus: int | None):
        self.address, self.cpus = address, cpus
        self.started = False

    def __enter__(self) -> "RayEngine":
        try:
            import ray
        except ImportError:
            raise RuntimeError("--engine ray needs Ray: pip install 'qvl[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            env = {"env_vars": {"POLARS_MAX_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}}
            if self.address:
                ray.init(address=self.address, runtime_env=env, log_to_driver=False)
            else:
                ray.init(num_cpus=self.cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                         runtime_env=env, log_to_driver=False, configure_logging=False)
            self.started = True
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            self.ray.shutdown()

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


def open_engine(run: RunSettings, workers: int):
    if run.engine == "ray":
        return RayEngine(run.address, run.workers or None)
    if run.engine != "local":
        raise ValueError(f"engine {run.engine!r}: use local or ray")
    return LocalEngine(workers)
