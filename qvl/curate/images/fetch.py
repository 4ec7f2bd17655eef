"""Runs one img2dataset download in its own process: ``python -m qvl.curate.images.fetch CONFIG.json``.

img2dataset starts its workers with "spawn", which imports this module again in each of
them (as ``__mp_main__``): what ``guard`` installs at import therefore holds in every
process that fetches. It makes img2dataset's ``urllib.request.urlopen`` go through the
address screen (every connection and redirect hop, unless ``QVL_ALLOW_PRIVATE=1``), and
makes its store-as-served path decode every image before it is written, so bytes that are
not an image (a page, a truncated file, a decompression bomb) never reach a shard.
albumentations (imported by img2dataset) must not look for updates over the network.

With ``distributor: ray`` in the config, this process joins the Ray cluster at ``$QVL_RAY_ADDRESS``
and img2dataset runs each shard as a Ray task; every worker process of the job runs ``guard``
when it starts (Ray's ``worker_process_setup_hook``), before it fetches anything.
"""

from __future__ import annotations

import json
import os
import sys

ALLOW_PRIVATE = "QVL_ALLOW_PRIVATE"
MAX_PIXELS = "QVL_MAX_PIXELS"
RAY_ADDRESS = "QVL_RAY_ADDRESS"


def guard() -> None:
    import urllib.request

    from img2dataset import resizer

    from qvl.common import pixels
    from qvl.curate.images import netcheck

    if os.environ.get(ALLOW_PRIVATE) != "1":
        urllib.request.install_opener(netcheck.opener())
    max_pixels = int(os.environ.get(MAX_PIXELS, pixels.MAX_PIXELS))
    call = resizer.Resizer.__call__

    def checked(self, img_stream, blurring_bbox_list=None):
        if not self.disable_all_reencoding:  # img2dataset decodes (and bounds the area) itself
            return call(self, img_stream, blurring_bbox_list)
        data = img_stream.read()
        try:
            width, height = pixels.decoded_size(data, max_pixels)
        except pixels.BadImage as e:
            return None, None, None, None, None, f"{e.reason}: {e}"
        return data, width, height, width, height, None

    if not getattr(call, "qvl_checked", False):
        checked.qvl_checked = True
        resizer.Resizer.__call__ = checked


if __name__ in ("__main__", "__mp_main__"):  # this process, or a worker img2dataset spawned
    from qvl.common.lifeline import exit_with_parent

    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
    exit_with_parent()
    guard()


def join_ray() -> None:
    """Connect to the cluster as a job whose every worker screens and checks as this process does."""
    import ray

    passed = {key: os.environ[key] for key in (ALLOW_PRIVATE, MAX_PIXELS, "NO_ALBUMENTATIONS_UPDATE") if key in os.environ}
    ray.init(address=os.environ[RAY_ADDRESS], log_to_driver=False, configure_logging=False,
             runtime_env={"worker_process_setup_hook": "qvl.curate.images.fetch.guard", "env_vars": passed})


def main() -> None:
    from img2dataset import download

    from qvl.common.lifeline import PARENT_ENV

    os.environ[PARENT_ENV] = str(os.getpid())  # img2dataset's workers watch this process

    with open(sys.argv[1], encoding="utf-8") as f:
        config = json.load(f)
    if config.get("distributor") == "ray":
        join_ray()
    download(**config)


if __name__ == "__main__":
    main()
