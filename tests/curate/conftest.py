"""Shared by the download and clip-score tests: a real HTTP server on 127.0.0.1 serving
good, tiny, wide, broken, truncated, missing and slow images, and one download of it."""

from __future__ import annotations

import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from qvl.curate.filter.pipeline import run_filter
from qvl.curate.images.download import DownloadSettings, run_download
from qvl.curate.settings import FilterSettings, RunSettings


def _jpeg(size, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def _png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 10)).save(buf, "PNG")
    return buf.getvalue()


GOOD = _jpeg((320, 240))


def _photo(seed: int, size=(400, 300), crop: int = 0, quality: int = 90, fmt: str = "JPEG") -> bytes:
    """A smooth, photo-like picture (blurred random blocks), optionally resized, cropped, re-encoded."""
    import numpy as np
    from PIL import ImageFilter

    rng = np.random.default_rng(seed)
    img = Image.fromarray((np.kron(rng.random((12, 16)), np.ones((25, 25))) * 255).astype("uint8")).convert("RGB")
    img = img.filter(ImageFilter.GaussianBlur(6))
    if crop:
        img = img.crop((crop, crop, img.width - crop, img.height - crop))
    buf = io.BytesIO()
    img.resize(size).save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()
BODIES = {
    "/good.jpg": GOOD,
    "/same-bytes.jpg": GOOD,  # the same image under another URL: a duplicate by hash
    "/photo.png": _png((400, 300)),
    "/tiny.jpg": _jpeg((120, 90)),
    "/wide.jpg": _jpeg((900, 200)),
    "/not-an-image.jpg": b"<html>gone</html>",
    "/truncated.jpg": _jpeg((500, 400), (1, 2, 3))[:400],
    # one photo under three URLs (re-encoded, resized, cropped by 1%), and two other photos
    "/near/original.jpg": _photo(0),
    "/near/smaller.png": _photo(0, size=(320, 240), fmt="PNG"),
    "/near/cropped.jpg": _photo(0, crop=4, quality=60),
    "/near/other-1.jpg": _photo(1),
    "/near/other-2.jpg": _photo(2),
}
# caption, path, expected drop_reason (None: kept)
PAIRS = [
    ("a red square on a white wall", "/good.jpg", None),
    ("the red square", "/same-bytes.jpg", "duplicate_image"),  # shorter caption loses
    ("a green field under a grey sky", "/photo.png", None),
    ("a very small picture of a dog", "/tiny.jpg", "image_too_small"),
    ("a long panorama of the old harbour", "/wide.jpg", "image_aspect_ratio"),
    ("this page is not an image", "/not-an-image.jpg", "image_corrupt"),
    ("a truncated photo of a boat", "/truncated.jpg", "image_corrupt"),
    ("a picture that is not there", "/missing.jpg", "download_failed"),
    ("a picture that takes too long", "/slow.jpg", "download_failed"),
]


# path -> where it redirects (a hostile dataset's server sending the client elsewhere)
REDIRECTS = {
    "/to-good.jpg": "/good.jpg",
    "/to-metadata.jpg": "http://169.254.169.254/latest/meta-data/",
    "/to-file.jpg": "file:///etc/passwd",
    "/to-encoded-loopback.jpg": "http://127.0.0.%31:{port}/good.jpg",
}


class Server:
    def __init__(self):
        self.slow = True
        self.hits: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                server.hits.append(self.path)
                if self.path in REDIRECTS:
                    self.send_response(302)
                    self.send_header("Location", REDIRECTS[self.path].format(port=server.port))
                    self.end_headers()
                    return
                if self.path == "/slow.jpg":
                    if server.slow:
                        time.sleep(4)  # past the download timeout
                    body = _jpeg((300, 300), (5, 5, 200))
                elif self.path in BODIES:
                    body = BODIES[self.path]
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except BrokenPipeError:  # the client gave up (the slow one)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    s.httpd.shutdown()


@pytest.fixture(scope="session")
def curated(tmp_path_factory, server) -> Path:
    folder = tmp_path_factory.mktemp("curated")
    raw = folder / "raw.parquet"
    pl.DataFrame({"url": [server.base + p for _, p, _ in PAIRS] + ["file:///etc/passwd"],
                  "text": [c for c, _, _ in PAIRS] + ["a local file that must not be read"]}).write_parquet(raw)
    run_filter([raw], folder / "out", FilterSettings(skip_rules=("lang",)), RunSettings(workers=1),
               show_progress=False)
    return folder / "out"


SETTINGS = DownloadSettings(allow_private=True, timeout=2, processes=1, threads=8, samples_per_shard=4)


@pytest.fixture(scope="session")
def downloaded(tmp_path_factory, curated, server) -> Path:
    out = tmp_path_factory.mktemp("images") / "out"
    run_download(curated, out, SETTINGS, show_progress=False)
    return out


