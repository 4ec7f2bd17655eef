"""Runs one img2dataset download in its own process: ``python -m qvl.curate.fetch CONFIG.json``.

img2dataset starts its workers with "spawn", so its call must sit under ``__main__`` of a
module that re-imports cleanly; albumentations (imported by it) must not look for
updates over the network.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    from img2dataset import download

    with open(sys.argv[1], encoding="utf-8") as f:
        download(**json.load(f))


if __name__ == "__main__":
    main()
