"""qvl.boundary: what no record may hold reaches nothing past it — whatever bytes arrive,
``decode_json`` gives a value of the type or one RecordError."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qvl.boundary import decode_json
from qvl.errors import RecordError


@pytest.mark.parametrize("data, reason", [
    (b"[" * 100_000, "malformed_json"),  # msgspec recursed into a RecursionError traceback
    (b'{"a": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "malformed_json"),
    (b'{"a": NaN}', "malformed_json"),
    (b'{"a": "\\ud800"}', "bad_text"),
    (b'{"\x80": 1}', "bad_text"),
])
def test_what_a_json_record_may_not_hold_is_a_record_error(data, reason):
    with pytest.raises(RecordError) as e:
        decode_json(data)
    assert e.value.reason == reason


def test_a_plain_record_decodes():
    assert decode_json(b'{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}


def test_a_report_that_is_a_deep_nest_or_holds_nan_is_one_line(tmp_path):
    """`curate report` met a RecursionError traceback, and printed NaN as --json."""
    from typer.testing import CliRunner

    from qvl.cli import app

    for content in ("[" * 100_000, '{"a": NaN}'):
        (tmp_path / "report.json").write_text(content)
        result = CliRunner().invoke(app, ["curate", "report", str(tmp_path), "--json"])
        assert result.exit_code == 1 and result.output.startswith("error:") and "report.json" in result.output
        assert "Traceback" not in result.output and "NaN" not in result.output.split("(")[0]


class Meta(msgspec.Struct):
    resolution: int = 0


DEEP = [
    (b"[" * 100_000, Any),
    (b"[" * 100_000 + b"]" * 100_000, Any),
    (b'{"resolution": 1, "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", Meta),  # a field msgspec skips
    (b'{"a": ' + b"{\"b\": " * 100_000, dict),
]


@pytest.mark.parametrize("data, type_", DEEP)
def test_a_deep_nest_is_malformed_json_not_a_recursion_error(data, type_):
    with pytest.raises(RecordError) as e:
        decode_json(data, type_)
    assert e.value.reason == "malformed_json" and "nested too deeply" in str(e.value)
    with pytest.raises(RecordError) as e:
        decode_json(data.decode(), type_, reason="malformed_row")
    assert e.value.reason == "malformed_row"


def test_a_nest_of_ordinary_depth_decodes():
    assert decode_json(b"[" * 500 + b"]" * 500) is not None


@settings(max_examples=60, deadline=None, derandomize=True)
@given(depth=st.integers(0, 200_000), opener=st.sampled_from([b"[", b'{"k":']), tail=st.binary(max_size=20))
def test_any_nest_is_a_value_or_a_record_error(depth, opener, tail):
    try:
        decode_json(opener * depth + tail)
    except RecordError as e:
        assert e.reason in {"malformed_json", "bad_field", "bad_text"}


def test_a_fifo_device_or_folder_is_refused_unread(tmp_path):
    """Opening a FIFO with no writer waited forever; /dev/zero read up to the bound."""
    import os
    import threading

    from qvl.boundary import read_bounded, read_text
    from qvl.errors import QvlError

    os.mkfifo(tmp_path / "fifo")
    errors = {}

    def read(path):
        try:
            read_text(path, 1 << 20, what=" (a test file)")
        except QvlError as e:
            errors[str(path)] = str(e)

    for path in (tmp_path / "fifo", "/dev/zero", tmp_path):
        reader = threading.Thread(target=read, args=(path,), daemon=True)
        reader.start()
        reader.join(10)
        assert errors.get(str(path)) == f"{path}: not a regular file (a device, folder or pipe) (a test file)", errors
    (tmp_path / "ok").write_bytes(b"x" * 10)
    assert read_bounded(tmp_path / "ok", 10) == b"x" * 10
    with pytest.raises(QvlError, match="larger than 9 bytes"):
        read_bounded(tmp_path / "ok", 9)
