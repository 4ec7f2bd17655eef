"""qvl.boundary: what no record may hold reaches nothing past it."""

from __future__ import annotations

import pytest

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
