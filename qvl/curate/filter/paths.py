"""Where a filter run keeps its outputs, work files and markers under ``--out``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from qvl.curate.sources.shards import Shard


@dataclasses.dataclass(frozen=True)
class Paths:
    out: Path

    @property
    def kept(self) -> Path:
        return self.out / "kept"

    @property
    def rejected(self) -> Path:
        return self.out / "rejected"

    @property
    def survivors(self) -> Path:
        return self.out / "_work" / "survivors"

    @property
    def state(self) -> Path:
        return self.out / "_state"

    @property
    def staged(self) -> Path:  # kept rows waiting for the balance steps
        return self.out / "_work" / "kept"

    @property
    def ledger(self) -> Path:
        return self.out / "ledger"

    def shard_marker(self, shard: Shard) -> Path:
        return self.state / "shards" / f"{shard.key}.json"

    def partition_marker(self, k: int) -> Path:
        return self.state / "partitions" / f"{k:05d}.json"

