"""The layout of a download's ``--out`` folder, shared by download, the pixel checks, clip-score
and why: one place that knows where attempts, the ledger and the state live."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qvl.curate.filter import report as report_mod
from qvl.errors import QvlError


class DownloadError(QvlError):
    """A whole input or output folder cannot be used; the message names it."""


@dataclass(frozen=True)
class Folders:
    out: Path

    @property
    def attempts(self) -> Path:
        return self.out / "attempts"

    def attempt(self, n: int) -> Path:
        return self.attempts / f"{n:03d}"

    @property
    def ledger(self) -> Path:
        return self.out / "ledger"

    @property
    def state(self) -> Path:
        return self.out / "_qvl.json"

    def read_state(self) -> dict:
        """``_qvl.json``: where the download came from, and clip-score's choices. Damaged (not
        JSON, nested past the recursion limit, NaN, no curated run, a clip that is no table)
        is one DownloadError naming it, never a traceback in download, clip-score or why."""
        try:
            state = report_mod.read(self.state)
            if not isinstance(state.get("from"), str) or not isinstance(state.get("clip", {}), dict):
                raise ValueError("no curated run (`from`) or a `clip` that is not a table")
        except (OSError, ValueError) as e:
            raise DownloadError(f"{self.state}: damaged, not the state of a qvl curate download ({e})") from None
        return state
