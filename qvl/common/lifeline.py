"""Worker processes end with the process that started them.

A pool worker (``curate filter``) or a download process whose parent was killed — Ctrl-C
twice, ``kill -9``, an out-of-memory kill — would otherwise go on reading, writing and
fetching for a run nobody waits for. Each such process watches its parent and exits when
it is gone (its files are written atomically, so what it leaves is only ``*.tmp-*``
leftovers that the next run removes).
"""

from __future__ import annotations

import os
import threading
import time

POLL_S = 0.5


PARENT_ENV = "QVL_PARENT_PID"  # how a process tells the processes it starts who to watch


def exit_with_parent(parent: int | None = None) -> None:
    """Watch ``parent`` (default: ``$QVL_PARENT_PID``, else the parent now). Given, not read
    from ``getppid()`` alone: a worker that starts after its parent already died would take
    init for its parent and never leave."""
    parent = parent or int(os.environ.get(PARENT_ENV) or os.getppid())

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="qvl-lifeline", daemon=True).start()
