"""Atomic parquet writes with writer settings chosen per column."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qvl.common import storage


def test_dictionaries_and_statistics_only_where_they_pay(tmp_path):
    table = pa.table({
        "text": [f"caption number {i}" for i in range(1000)],
        "source": ["laion", "coyo"] * 500,
        "width": list(range(1000)),
        "failed_rules": [["clip_score"], []] * 500,
    })
    path = tmp_path / "out.parquet"
    storage.write_parquet(path, table)
    meta = pq.ParquetFile(path).metadata.row_group(0)
    columns = {meta.column(i).path_in_schema.split(".")[0]: meta.column(i) for i in range(meta.num_columns)}
    assert columns["source"].has_dictionary_page and columns["failed_rules"].has_dictionary_page
    assert not columns["text"].has_dictionary_page and not columns["width"].has_dictionary_page
    assert columns["width"].is_stats_set and not columns["text"].is_stats_set
    assert pq.read_table(path).equals(table)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left beside it


def test_a_large_list_of_strings_is_dictionary_encoded_too(tmp_path):
    """polars exports lists as large lists (the ledger's failed_rules): same encoding as a list."""
    table = pa.table({"failed_rules": pa.array([["clip_score"], []] * 500, pa.large_list(pa.large_string()))})
    path = tmp_path / "ledger.parquet"
    storage.write_parquet(path, table)
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).has_dictionary_page
    assert pq.read_table(path).equals(table)


def test_a_sink_streams_batches_and_commits_an_empty_file_with_its_schema(tmp_path):
    schema = pa.schema([("text", pa.string()), ("source", pa.string())])
    full = storage.ParquetSink(tmp_path / "full.parquet", schema)
    full.write(pa.table({"text": ["a", "b"], "source": ["x", "x"]}))
    full.write(pa.table({"text": ["c"], "source": ["y"]}))
    full.commit()
    empty = storage.ParquetSink(tmp_path / "empty.parquet", schema)
    empty.commit()
    assert pq.read_table(tmp_path / "full.parquet").column("text").to_pylist() == ["a", "b", "c"]
    assert pq.read_table(tmp_path / "empty.parquet").schema == schema
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.parquet", "full.parquet"]


def test_a_folder_a_failed_command_only_marked_can_be_claimed_again(tmp_path):
    """A command that claims --out and then fails on a typo leaves only the marker: the corrected
    command, or another command, may take the folder (it was refused as "holds a run")."""
    out = tmp_path / "run"
    assert storage.claim(out, "train") is False
    assert storage.claim(out, "train") is False and storage.claim(out, "format") is False
    (out / "state.json").write_text("{}")
    with pytest.raises(storage.OutputError, match="holds a qvl format output"):
        storage.claim(out, "train")
