"""Where `qvl curate filter` runs its tasks: ``process_shard`` (rules and language id over one
input shard), ``dedup_partition`` (one hash partition) and the balance steps, on this machine or
on Ray (the engines themselves are ``qvl.common.engines``, shared with the image stages and
`qvl format`)."""

from __future__ import annotations

from qvl.common.engines import LocalEngine, RayEngine
from qvl.curate.settings import RunSettings


def open_engine(run: RunSettings, workers: int):
    if run.engine == "ray":
        return RayEngine(run.address, run.workers or None)
    if run.engine != "local":
        raise ValueError(f"engine {run.engine!r}: use local or ray")
    return LocalEngine(workers)
