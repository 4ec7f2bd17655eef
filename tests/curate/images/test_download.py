"""`qvl curate download`: img2dataset against a real HTTP server on 127.0.0.1, every pair
accounted for, pixel checks on the real bytes, private addresses refused, failed rows retried."""

from __future__ import annotations

import io
import re
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qvl.curate.images import netcheck
from qvl.curate.images.download import DownloadSettings, run_download
from qvl.curate.images.folders import DownloadError
from qvl.formats.images import ImageStore
from tests.curate.conftest import BODIES, PAIRS, SETTINGS


def _outcomes(out: Path) -> dict[str, str | None]:
    kept = pl.read_parquet(out / "kept" / "*.parquet")
    rejected = pl.read_parquet(out / "rejected" / "*.parquet")
    outcome = {url: None for url in kept["url"]}
    outcome.update(dict(zip(rejected["url"], rejected["drop_reason"])))
    return outcome


def test_every_pair_gets_its_outcome(downloaded, server):
    outcome = _outcomes(downloaded)
    expected = {server.base + p: reason for _, p, reason in PAIRS}
    expected["file:///etc/passwd"] = "bad_url"
    assert outcome == expected


def test_report_continues_the_filter_funnel(downloaded, curated):
    import json

    report = json.loads((downloaded / "report.json").read_text())
    before = json.loads((curated / "report.json").read_text())
    assert report["accounted"] and report["input_rows"] == before["input_rows"] == len(PAIRS) + 1
    assert report["kept_rows"] == 2 and report["rejected_rows"] == before["rejected_rows"] + len(PAIRS) - 1
    steps = {r["step"]: r["dropped"] for r in report["funnel"] if r.get("stage") == "download"}
    assert steps["image_corrupt"] == 2 and steps["download_failed"] == 2 and steps["bad_url"] == 1
    assert (downloaded / "funnel.png").stat().st_size > 0 and "image_corrupt" in (downloaded / "report.md").read_text()


def test_kept_rows_carry_their_image_and_formats_can_read_it(downloaded, server):
    kept = pl.read_parquet(downloaded / "kept" / "*.parquet")
    row = kept.filter(pl.col("url") == server.base + "/photo.png").row(0, named=True)
    assert (row["image_width"], row["image_height"]) == (400, 300) and len(row["sha256"]) == 64
    data, _ = ImageStore(None, downloaded).read(row["url"])
    assert Image.open(io.BytesIO(data)).size == (400, 300)  # the served bytes, not re-encoded
    rejected = pl.read_parquet(downloaded / "rejected" / "*.parquet")
    why = dict(zip(rejected["url"], rejected["download_error"]))
    assert "404" in why[server.base + "/missing.jpg"]
    status = dict(zip(rejected["url"], rejected["download_status"]))
    assert status["file:///etc/passwd"] == "not fetched" and status[server.base + "/missing.jpg"] == "failed_to_download"
    assert set(kept["download_status"]) == {"success"}


def test_the_kept_pairs_format_into_caption_samples_with_their_images(downloaded, tmp_path):
    from qvl.formats.build import FormatSettings, run_format

    kept = sorted((downloaded / "kept").glob("*.parquet"))
    manifest = run_format("multitask", kept, tmp_path / "shards", downloads=downloaded, show_progress=False,
                          settings=FormatSettings(tokenizer="bytes", image_tokens=4))
    assert manifest["samples"] == manifest["records"] == 2 and manifest["images"] == 2
    assert manifest["by_task"] == {"caption": {"samples": 2, "tokens": manifest["tokens"]}}


def test_ledger_has_one_row_per_curated_pair(downloaded, curated):
    ledger = pl.read_parquet(downloaded / "ledger" / "download.parquet")
    kept_before = pl.read_parquet(curated / "kept" / "*.parquet")
    assert sorted(ledger["row_id"]) == sorted(kept_before["row_id"])
    assert ledger.filter(pl.col("drop_reason") == "image_too_small")["image_width"].to_list() == [120]


def test_running_again_fetches_nothing_new(downloaded, curated):
    before = sorted(p.name for p in (downloaded / "attempts").iterdir())
    run_download(curated, downloaded, SETTINGS, show_progress=False)
    assert sorted(p.name for p in (downloaded / "attempts").iterdir()) == before == ["000"]


def test_retry_failed_requeues_only_the_failed_rows(tmp_path, curated, server):
    out = tmp_path / "out"
    run_download(curated, out, SETTINGS, show_progress=False)
    server.slow = False
    try:
        run_download(curated, out, SETTINGS, retry_failed=True, show_progress=False)
    finally:
        server.slow = True
    queue = pl.read_parquet(out / "attempts" / "001" / "_qvl" / "queue.parquet")
    assert sorted(queue["url"]) == sorted(server.base + p for p in ("/missing.jpg", "/slow.jpg"))
    outcome = _outcomes(out)
    assert outcome[server.base + "/slow.jpg"] is None and outcome[server.base + "/missing.jpg"] == "download_failed"


def test_private_addresses_are_refused_and_never_fetched(tmp_path, curated):
    out = tmp_path / "out"
    report = run_download(curated, out, DownloadSettings(timeout=2, processes=1), show_progress=False)
    assert report["kept_rows"] == 0 and report["accounted"]
    rejected = pl.read_parquet(out / "rejected" / "*.parquet")
    assert set(rejected["drop_reason"]) == {"private_address", "bad_url"}
    assert not (out / "attempts").exists()


@pytest.mark.parametrize("host, refused", [
    ("127.0.0.1", True), ("10.1.2.3", True), ("192.168.0.7", True), ("169.254.169.254", True),
    ("[::1]", True), ("[::ffff:10.0.0.1]", True), ("localhost", True), ("printer.local", True),
    ("intranet", True), ("8.8.8.8", False), ("[2001:4860:4860::8888]", False),
])
def test_private_hosts(host, refused):
    frame = netcheck.screen(pl.DataFrame({"url": [f"http://{host}:80/a.jpg"]}), allow_private=False, resolve=False)
    assert (frame["_refused"][0] == "private_address") is refused


def test_a_folder_that_is_not_a_filter_run_is_a_clear_error(tmp_path):
    with pytest.raises(DownloadError, match="report.json"):
        run_download(tmp_path, tmp_path / "out", SETTINGS, show_progress=False)
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "part-00000.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(DownloadError, match="part-00000.parquet: not a readable parquet file"):
        run_download(tmp_path, tmp_path / "out", SETTINGS, show_progress=False)


KEPT = {"row_id": ["a.jsonl:1", "a.jsonl:2"], "url": ["http://x.test/1.jpg", "http://x.test/2.jpg"],
        "text": ["a red bus", "a blue car"], "source": ["laion"] * 2, "lang": ["en"] * 2}


@pytest.mark.parametrize("change, report, message", [
    ({"url": [5, 6]}, None, "column(s) url (Int64) must be text"),
    ({"row_id": ["a.jsonl:1"] * 2}, None, "row_id 'a.jsonl:1' is missing or repeats"),
    ({"row_id": [None, "a.jsonl:2"]}, None, "row_id None is missing or repeats"),
    ({}, "garbage", "report.json: not a qvl filter report"),
    ({}, '{"settings": 5}', "report.json: not a qvl filter report"),
    ({}, '{"settings": {}}', "report.json: not a qvl filter report"),
    ({}, "[" * 100_000, "report.json: not a qvl filter report"),
    ({}, '{"settings": {"min_side": NaN, "max_aspect_ratio": 3}}', "report.json: not a qvl filter report"),
])
def test_a_hand_edited_filter_output_is_one_error_naming_it(tmp_path, change, report, message):
    """The kept rows a download reads are typed and one row per id (else kept + rejected != input)."""
    (tmp_path / "kept").mkdir()
    pl.DataFrame({**KEPT, **change}).write_parquet(tmp_path / "kept" / "part-00000.parquet")
    (tmp_path / "report.json").write_text(report or '{"settings": {"min_side": 1, "max_aspect_ratio": 3}}')
    with pytest.raises(DownloadError, match=re.escape(message)):
        run_download(tmp_path, tmp_path / "out", SETTINGS, show_progress=False)


def test_why_tells_the_whole_story(downloaded, curated, server):
    from qvl.curate.why import WhyError, explain

    ledger = pl.read_parquet(downloaded / "ledger" / "download.parquet")
    tiny = ledger.filter(pl.col("url") == server.base + "/tiny.jpg")["row_id"][0]
    story = explain(downloaded, tiny)
    assert story["verdict"].startswith("rejected by image_too_small")
    outcome = {s["step"]: s["outcome"] for s in story["steps"]}
    assert outcome["length"] == "pass" and outcome["lang"] == "switched off" and outcome["image_too_small"] == "FAIL"
    good = ledger.filter(pl.col("url") == server.base + "/photo.png")["row_id"][0]
    assert explain(downloaded, good)["verdict"].startswith("kept with its image attempts/000/")
    dup = ledger.filter(pl.col("url") == server.base + "/same-bytes.jpg")["row_id"][0]
    assert explain(downloaded, dup)["verdict"] == "rejected by duplicate_image"
    with pytest.raises(WhyError, match="row ids look like"):
        explain(curated, "nope:1")


# ---------------------------------------------------------------- the address screen, as the client connects


@pytest.mark.parametrize("url, host", [
    ("http://127.0.0.%31:80/x.jpg", "127.0.0.1"),
    ("http://%31%32%37.%30.%30.%31:80/x.jpg", "127.0.0.1"),
    ("HTTP://LocalHost./x.jpg", "localhost"),
    ("http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/x.jpg", "localhost"),  # full-width letters
    ("http://\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11/x", "127.0.0.1"),  # full-width digits and dot
    ("http://user:pw@10.0.0.1:8080/x", "10.0.0.1"),
    ("http://[::ffff:7f00:1]:80/x", "[::ffff:7f00:1]"),
    ("https://images.example.com/a.jpg?x=1", "images.example.com"),
    ("file:///etc/passwd", None),
    ("gopher://127.0.0.1/x", None),
    ("http:///x.jpg", None),
])
def test_host_as_the_client_connects_to_it(url, host):
    assert netcheck.host_of(url) == host


@pytest.mark.parametrize("host", [
    "127.0.0.%31", "%31%32%37.%30.%30.%31", "127.1", "0x7f.0.0.1", "0177.0.0.1", "2130706433", "0x7f000001",
    "[::ffff:127.0.0.1]", "[64:ff9b::a00:1]", "[2002:a9fe:a9fe::]", "[::127.0.0.1]", "0.0.0.0", "localhost.",
    "%6c%6f%63%61%6c%68%6f%73%74", "\uff11\uff12\uff17\uff0e\uff10\uff0e\uff10\uff0e\uff11", "169.254.169.254",
    "100.64.0.1", "[fe80::1%25eth0]",
])
def test_every_spelling_of_a_private_address_is_refused(host):
    frame = netcheck.screen(pl.DataFrame({"url": [f"http://{host}:8000/a.jpg"]}), allow_private=False, resolve=False)
    assert frame["_refused"][0] == "private_address", frame["_refused_why"][0]


def _curated_urls(tmp_path: Path, urls: list[str]) -> Path:
    from qvl.curate.filter.pipeline import run_filter
    from qvl.curate.settings import FilterSettings, RunSettings

    raw = tmp_path / "raw.parquet"
    pl.DataFrame({"url": urls, "text": [f"a photo of a red square number {i}" for i in range(len(urls))]}).write_parquet(raw)
    run_filter([raw], tmp_path / "curated", FilterSettings(skip_rules=("lang",)), RunSettings(workers=1),
               show_progress=False)
    return tmp_path / "curated"


def test_encoded_loopback_urls_are_refused_and_the_server_never_hit(tmp_path, server):
    port = server.port
    urls = [f"http://127.0.0.%31:{port}/good.jpg", f"http://%31%32%37.%30.%30.%31:{port}/photo.png",
            f"http://0x7f.1:{port}/good.jpg", f"http://2130706433:{port}/photo.png",
            f"http://[::ffff:7f00:1]:{port}/good.jpg", f"http://localhost.:{port}/photo.png"]
    curated = _curated_urls(tmp_path, urls)
    hits = len(server.hits)
    report = run_download(curated, tmp_path / "out", DownloadSettings(timeout=2, processes=1), show_progress=False)
    rejected = pl.read_parquet(tmp_path / "out" / "rejected" / "*.parquet")
    assert report["kept_rows"] == 0 and report["accounted"]
    assert rejected["drop_reason"].to_list() == ["private_address"] * len(urls)
    assert len(server.hits) == hits and not (tmp_path / "out" / "attempts").exists()


def _public_loopback() -> netcheck.Screen:
    """The test server on 127.0.0.1 stands for a public site; everything else private stays private."""
    import ipaddress

    loopback = ipaddress.ip_address("127.0.0.1")
    return netcheck.Screen(is_private=lambda ip: ip != loopback and netcheck.private_address(ip))


def test_every_redirect_hop_is_screened(server):
    """img2dataset's own fetch function, through the opener the download processes install."""
    import urllib.request

    from img2dataset.downloader import download_image

    previous = urllib.request._opener
    urllib.request.install_opener(netcheck.opener(_public_loopback()))
    try:
        def fetch(path):
            return download_image((0, server.base + path), 2, "qvl", None)

        _, stream, error = fetch("/to-good.jpg")  # a redirect to a public address is followed
        assert error is None and stream.getvalue() == BODIES["/good.jpg"]
        for path in ("/to-metadata.jpg", "/to-file.jpg"):
            hits = len(server.hits)
            _, stream, error = fetch(path)
            assert stream is None and netcheck.REFUSED in error, error
            assert server.hits[hits:] == [path]  # the hop to the private address was never made
    finally:
        urllib.request.install_opener(previous)


def test_the_connection_screen_sees_the_decoded_host(server):
    """Whatever the pre-screen missed, the connection itself refuses loopback however spelt."""
    import urllib.error

    screen_opener = netcheck.opener()
    hits = len(server.hits)
    for url in (server.base + "/good.jpg", f"http://127.0.0.%31:{server.port}/good.jpg",
                f"http://0x7f.1:{server.port}/good.jpg"):
        with pytest.raises(urllib.error.URLError, match="address screen"):
            screen_opener.open(url, timeout=2)
    assert server.hits[hits:] == []
    # a hop to 127.0.0.%31 reaches 127.0.0.1: followed only where that address counts as public
    public = netcheck.opener(_public_loopback())
    assert public.open(server.base + "/to-encoded-loopback.jpg", timeout=2).read() == BODIES["/good.jpg"]
    assert server.hits[hits:] == ["/to-encoded-loopback.jpg", "/good.jpg"]


def test_bytes_that_are_not_an_image_are_never_stored(downloaded, server):
    import tarfile

    ledger = pl.read_parquet(downloaded / "ledger" / "download.parquet")
    bad = ledger.filter(pl.col("drop_reason") == "image_corrupt")
    assert sorted(bad["url"]) == sorted(server.base + p for p in ("/not-an-image.jpg", "/truncated.jpg"))
    assert all(e.startswith("corrupt_image") for e in bad["download_error"])
    stored = set()
    for tar in (downloaded / "attempts").rglob("*.tar"):
        with tarfile.open(tar) as t:
            stored |= {m.name for m in t.getmembers() if m.name.endswith(".jpg")}
    kept_keys = set(ledger.filter(pl.col("download_status") == "success")["image_key"])
    assert {name.rsplit(".", 1)[0] for name in stored} == kept_keys
    assert not set(bad["image_key"].drop_nulls()) & kept_keys


def test_near_duplicate_images_keep_one_pair(tmp_path, server):
    """The same photo re-encoded, resized and lightly cropped under three URLs -> one kept (the
    longest caption); two different photos -> both kept; the ledger names the winner."""
    from qvl.curate.filter.pipeline import run_filter
    from qvl.curate.settings import FilterSettings, RunSettings
    from qvl.curate.why import explain

    captions = {"/near/original.jpg": "a blurred red and green pattern of blocks on a wall",
                "/near/smaller.png": "a blurred pattern of blocks",
                "/near/cropped.jpg": "blurred blocks of colour seen up close",
                "/near/other-1.jpg": "another blurred pattern of coloured blocks",
                "/near/other-2.jpg": "a third blurred pattern of coloured blocks"}
    raw = tmp_path / "raw.parquet"
    pl.DataFrame({"url": [server.base + p for p in captions], "text": list(captions.values())}).write_parquet(raw)
    run_filter([raw], tmp_path / "curated", FilterSettings(skip_rules=("lang",)), RunSettings(workers=1),
               show_progress=False)
    report = run_download(tmp_path / "curated", tmp_path / "out", SETTINGS, show_progress=False)
    outcome = _outcomes(tmp_path / "out")
    assert {p: outcome[server.base + p] for p in captions} == {
        "/near/original.jpg": None, "/near/smaller.png": "near_duplicate_image",
        "/near/cropped.jpg": "near_duplicate_image", "/near/other-1.jpg": None, "/near/other-2.jpg": None}
    ledger = pl.read_parquet(tmp_path / "out" / "ledger" / "download.parquet")
    winner = ledger.filter(pl.col("url") == server.base + "/near/original.jpg")["row_id"][0]
    lost = ledger.filter(pl.col("drop_reason") == "near_duplicate_image")
    assert set(lost["near_duplicate_of"]) == {winner}
    story = explain(tmp_path / "out", lost["row_id"][0])
    assert story["verdict"] == "rejected by near_duplicate_image"
    assert {s["step"]: s["value"] for s in story["steps"]}["near_duplicate_image"].startswith(
        f"the same picture as {winner}")
    steps = {r["step"]: r["dropped"] for r in report["funnel"] if r.get("stage") == "download"}
    assert steps["near_duplicate_image"] == 2 and report["accounted"]
    again = run_download(tmp_path / "curated", tmp_path / "off", DownloadSettings(
        **{**SETTINGS.__dict__, "near_dup_bits": -1}), show_progress=False)
    assert again["kept_rows"] == 5


def test_multi_index_hashing_finds_what_a_full_comparison_finds():
    import numpy as np

    from qvl.curate.images.near_dups import near_duplicates

    rng = np.random.default_rng(0)
    base = rng.integers(0, 2 ** 63, 40, dtype=np.uint64)
    flips = [base[i // 3] ^ np.uint64(sum(1 << int(b) for b in rng.choice(64, i % 5, replace=False)))
             for i in range(120)]
    hashes = np.array(flips, dtype=np.uint64)
    found = near_duplicates(hashes, 4)
    # brute force: union of every pair within 4 bits, the smallest index leading
    parent = list(range(len(hashes)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i
    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            if int(np.bitwise_count(hashes[i] ^ hashes[j])) <= 4:
                a, b = root(i), root(j)
                parent[max(a, b)] = min(a, b)
    assert found == {i: root(i) for i in range(len(hashes)) if root(i) != i} and found


def _peak_bytes(work) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_many_copies_of_one_picture_group_in_bounded_memory():
    """4,000 images with one pHash (a popular picture re-encoded) were compared n×n (128 MB here,
    1 GiB at 12,000); now identical hashes are one group from the start."""
    import numpy as np

    from qvl.curate.images.near_dups import near_duplicates

    hashes = np.full(4000, 0x0F0F_1234_5678_9ABC, dtype=np.uint64)
    hashes[::7] ^= np.uint64(0b11)  # a few copies two bits off: still the same group
    found = {}
    peak = _peak_bytes(lambda: found.update(near_duplicates(hashes, 4)))
    assert found == {i: 0 for i in range(1, 4000)}
    assert peak < 32 * 2 ** 20, peak


def test_distinct_hashes_sharing_a_band_group_in_bounded_memory():
    """4,000 distinct hashes that agree on one band (and nowhere else) all fall in one bucket:
    it is split again on its other bits, never compared as one dense matrix."""
    import numpy as np

    from qvl.curate.images.near_dups import near_duplicates

    rng = np.random.default_rng(1)
    hashes = (rng.integers(0, 2 ** 63, 4000, dtype=np.uint64) << np.uint64(13)) | np.uint64(0x1ABC)
    hashes[1] = hashes[0] ^ np.uint64(1 << 40)  # one real pair among them
    found = {}
    peak = _peak_bytes(lambda: found.update(near_duplicates(hashes, 4)))
    assert found == {1: 0}
    assert peak < 32 * 2 ** 20, peak


def _brute_force_groups(hashes, bits):
    import numpy as np

    parent = list(range(len(hashes)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i
    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            if int(np.bitwise_count(hashes[i] ^ hashes[j])) <= bits:
                a, b = root(i), root(j)
                parent[max(a, b)] = min(a, b)
    return {i: root(i) for i in range(len(hashes)) if root(i) != i}


@given(st.lists(st.tuples(st.integers(0, 7), st.sets(st.integers(0, 63), max_size=6)), min_size=1, max_size=80),
       st.integers(0, 16))
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_near_duplicates_match_a_full_comparison(monkeypatch, records, bits):
    """Copies, flipped bits, buckets split again and blocks joined: the groups of a full comparison."""
    import numpy as np

    from qvl.curate.images import near_dups

    monkeypatch.setattr(near_dups, "_LEAF", 4)  # split every bucket of more than four hashes again
    monkeypatch.setattr(near_dups, "_BLOCK", 16)  # many small blocks and joins
    bases = [0x0123_4567_89AB_CDEF, 0xFEDC_BA98_7654_3210, 0x00FF_00FF_00FF_00FF, 0, 1 << 63, 0x5555_5555_5555_5555,
             0x0F0F_0F0F_0F0F_0F0F, 0x1234_0000_0000_1234]
    hashes = np.array([bases[b] ^ sum(1 << f for f in flips) for b, flips in records], dtype=np.uint64)
    assert near_dups.near_duplicates(hashes, bits) == _brute_force_groups(hashes, bits)
