"""Recipes as a hostile user writes them: any table of any values is either settings or one
QvlError naming the file (and the key), bounded in length — never another exception."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qvl.curate.filter.balance import read_entries
from qvl.curate.settings import FilterSettings, RunSettings
from qvl.errors import QvlError
from qvl.recipes import RecipeError, fill, load_recipe, resolve, table

FIELDS = sorted({f.name for cls in (FilterSettings, RunSettings) for f in dataclasses.fields(cls)})
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=8))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(10 ** 30), 10 ** 30),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["\ud800", "en", "laion", "source_lang", "x" * 300]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=8)
toml_values = st.one_of(
    st.sampled_from(["inf", "-inf", "nan", "+nan", "9" * 30, "9" * 5000, "-9223372036854775809", "1e999", "true",
                     '"\\ud800"', '"\\uDFFF"', '"en"', "[1, \"a\"]", "{ laion = nan }", "{ en = 0.5, zh = 0.5 }",
                     "[[[[]]]]", "2024-01-01", "0.3", "-1", "0", "1", '""', "[\"en\", \"zh\"]", "'''x'''"]),
    st.integers().map(str), st.floats().map(repr), st.text(max_size=10))


def check(path: Path) -> None:
    try:
        data = load_recipe(path)
        unknown = set(data) - {"filter", "run"}
        if unknown:
            return
        fill(FilterSettings, table(data, "filter", str(path)), f"{path} [filter]")
        fill(RunSettings, table(data, "run", str(path)), f"{path} [run]")
    except QvlError as e:
        message = str(e)
        assert str(path) in message and len(message) < 2000 + len(str(path)), message
        message.encode("utf-8")  # printable as it is


@FUZZ
@given(st.dictionaries(st.sampled_from(["filter", "run"]), st.dictionaries(keys, values, max_size=4), max_size=2))
def test_any_yaml_table_is_settings_or_one_error_naming_the_file(tmp_path, data):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=False), encoding="utf-8")
    check(path)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["filter", "run"]), keys, toml_values), max_size=6),
       st.sampled_from(["", "&a ", "*a "]))
def test_any_toml_or_yaml_text_is_settings_or_one_error_naming_the_file(tmp_path, rows, alias):
    path = tmp_path / "r.toml"
    path.write_text("".join(f"[{t}]\n{k!r} = {v}\n".replace("'", '"', 2) for t, k, v in rows),
                    encoding="utf-8", errors="surrogatepass")
    check(path)
    path = tmp_path / "r.yml"
    path.write_text("".join(f"{t}:\n  {k!r}: {alias}{v}\n" for t, k, v in rows[:1]), encoding="utf-8",
                    errors="surrogatepass")
    check(path)


@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=20), st.text(max_size=20).map(lambda t: t.encode("utf-8", "surrogatepass")),
                          st.sampled_from([b"", b"  ", b"\t", b"\xff\xfe", b"\xef\xbb\xbf", b"\r"])), max_size=8))
def test_any_entries_file_is_entries_or_one_error_naming_it(tmp_path, lines):
    path = tmp_path / "entries.txt"
    path.write_bytes(b"\n".join(lines))
    try:
        entries = read_entries(path)
    except QvlError as e:
        assert str(path) in str(e)
        return
    assert entries and all(e and e == e.strip() for e in entries)
    assert not any(c < " " and c != "\t" for e in entries for c in e)


@pytest.mark.parametrize("text", ["\0\0\0\n", "cat\n\x07dog\n", "ok\n\x1b[31mred\n"])
def test_an_entry_with_a_control_character_is_refused_naming_the_line(tmp_path, text):
    """A NUL-filled or binary file is not a list of phrases: refused, not 'entries' that match nothing."""
    path = tmp_path / "entries.txt"
    path.write_text(text)
    with pytest.raises(QvlError, match=rf"{path}:\d+: a control character"):
        read_entries(path)


def test_resolve_layers_settings_lowest_first_and_options_left_out_are_not_given():
    previous = {"min_side": 10, "nsfw_threshold_default": None, "max_units": 50}  # a previous run: nsfw off
    recipe = {"min_side": 20, "languages": ["en"]}
    options = {"min_side": 30, "max_units": None, "lang_model": None}
    settings = resolve(FilterSettings, previous, recipe, options=options, where="r.toml [filter]")
    assert (settings.min_side, settings.max_units, settings.languages) == (30, 50, ("en",))
    assert settings.nsfw_threshold_default is None and settings.lang_model is None
    with pytest.raises(RecipeError, match=r"r.toml \[filter\]: unknown setting\(s\) min_sides"):
        resolve(FilterSettings, {"min_sides": 1}, where="r.toml [filter]")
