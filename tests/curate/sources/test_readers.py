"""Input layouts, formats and bad input: a clear error, or the row in the rejects."""

from __future__ import annotations

import gzip
import json

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qvl.curate.sources import readers, shards
from qvl.curate.sources.shards import InputError
from tests.conftest import needs_shared_data


def read_all(path, **kw) -> pl.DataFrame:
    shard = shards.open_shard(path, 0, **kw)
    return pl.concat(list(readers.read_batches(shard, batch_rows=2)), how="diagonal_relaxed")


def test_laion_parquet_is_recognised_and_carries_other_columns(tmp_path):
    p = tmp_path / "laion.parquet"
    pq.write_table(pa.table({"URL": ["http://a/1.jpg"], "TEXT": ["a cat"], "WIDTH": [640.0], "HEIGHT": [480.0],
                             "similarity": [0.31], "punsafe": [0.01], "LICENSE": ["?"]}), p)
    shard = shards.open_shard(p, 3)
    assert shard.layout.name == "laion"
    df = read_all(p)
    row = df.row(0, named=True)
    assert (row["url"], row["text_raw"], row["width"], row["height"], row["clip_score"], row["source"]) == (
        "http://a/1.jpg", "a cat", 640, 480, 0.31, "laion")
    assert row["nsfw"] == 0.01 and row["watermark"] is None and row["LICENSE"] == "?"  # published scores mapped
    assert row["row_id"] == "laion.parquet:0"


def test_datacomp_uses_the_l14_score(tmp_path):
    p = tmp_path / "dc.parquet"
    pq.write_table(pa.table({"uid": ["u1"], "url": ["http://a"], "text": ["t"], "original_width": [1],
                             "original_height": [2], "clip_b32_similarity_score": [0.1],
                             "clip_l14_similarity_score": [0.3]}), p)
    df = read_all(p)
    assert shards.open_shard(p, 0).layout.name == "datacomp"
    assert df.get_column("clip_score").to_list() == [0.3]
    assert df.get_column("clip_b32_similarity_score").to_list() == [0.1]


@pytest.mark.parametrize("line, layout, text", [
    ("a dog on the beach\thttp://x/1.jpg\n", "cc3m", "a dog on the beach"),
    ("http://x/1.jpg\ta dog on the beach\n", "cc12m", "a dog on the beach"),
])
def test_headerless_cc_tsv(tmp_path, line, layout, text):
    p = tmp_path / "cc.tsv"
    p.write_text(line * 3, encoding="utf-8")
    assert shards.open_shard(p, 0).layout.name == layout
    df = read_all(p)
    assert df.get_column("text_raw").to_list() == [text] * 3
    assert df.get_column("row_id").to_list() == ["cc.tsv:1", "cc.tsv:2", "cc.tsv:3"]


def test_source_option_and_column(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"url": "u", "text": "t", "source": "mine"}) + "\n")
    assert read_all(p).get_column("source").to_list() == ["mine"]
    assert read_all(p, source="other").get_column("source").to_list() == ["other"]


def test_mapping_for_unknown_layouts(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("image_link,caption,score\nhttp://a,\"a, quoted caption\",1\n")
    with pytest.raises(InputError, match=r"x.csv: unknown layout.*--map"):
        shards.open_shard(p, 0)
    df = read_all(p, mapping={"url": "image_link", "text": "caption"})
    assert df.get_column("text_raw").to_list() == ["a, quoted caption"]
    assert df.get_column("score").to_list() == ["1"]  # passthrough columns of text files stay text
    with pytest.raises(InputError, match="lacks: nope"):
        shards.open_shard(p, 0, mapping={"url": "image_link", "text": "nope"})


def test_missing_text_column_names_file_and_columns(tmp_path):
    p = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"URL": ["u"], "caption": ["t"]}), p)
    with pytest.raises(InputError, match=r"bad.parquet: unknown layout \(columns: URL, caption\)"):
        shards.open_shard(p, 0)


def test_wrong_column_type_is_named(tmp_path):
    p = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"url": ["u"], "text": [1]}), p)
    with pytest.raises(InputError, match=r"bad.parquet: column 'text' is int64, expected a string column"):
        shards.open_shard(p, 0)


def test_truncated_parquet_is_a_clear_error(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"url": ["u"] * 100, "text": ["t"] * 100}), good)
    bad = tmp_path / "cut.parquet"
    bad.write_bytes(good.read_bytes()[:-30])
    with pytest.raises(InputError, match="cut.parquet: not a readable parquet file"):
        shards.open_shard(bad, 0)


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(InputError, match="unsupported file type"):
        shards.open_shard(tmp_path / "a.txt", 0)
    with pytest.raises(InputError, match="no such file"):
        shards.discover([tmp_path / "missing.parquet"])
    with pytest.raises(InputError, match="holds no parquet"):
        shards.discover([tmp_path])


def test_invalid_utf8_row_is_flagged_not_lost(tmp_path):
    p = tmp_path / "cc.tsv"
    p.write_bytes(b"good caption here\thttp://x/1\nbad \xff\xfe caption\thttp://x/2\nfine too\thttp://x/3\n")
    df = read_all(p).sort("_seq")
    assert df.get_column("_input_error").to_list() == [None, "invalid_utf8", None]
    assert df.get_column("text_raw").to_list()[1] == "bad \ufffd\ufffd caption"
    assert df.get_column("row_id").to_list() == ["cc.tsv:1", "cc.tsv:2", "cc.tsv:3"]


def test_malformed_tsv_lines_keep_their_line_numbers(tmp_path):
    p = tmp_path / "cc.tsv"
    p.write_text("one\thttp://x/1\nno tab on this line\ntwo\thttp://x/2\na\tb\tc\nthree\thttp://x/3\n")
    df = read_all(p).sort("_seq")
    assert df.get_column("row_id").to_list() == [f"cc.tsv:{i}" for i in range(1, 6)]
    assert df.get_column("_input_error").to_list() == [None, "malformed_row", None, "malformed_row", None]
    assert df.get_column("text_raw").to_list()[1] == "no tab on this line"


def test_jsonl_bad_lines_and_gzip(tmp_path):
    p = tmp_path / "pairs.jsonl.gz"
    lines = [json.dumps({"url": "http://a", "text": "ok one"}), "{not json", json.dumps([1, 2]),
             json.dumps({"url": "http://b", "text": None}), json.dumps({"url": "http://c", "text": "ok two"})]
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    df = read_all(p).sort("_seq")
    assert df.get_column("row_id").to_list() == [f"pairs.jsonl.gz:{i}" for i in range(1, 6)]
    assert df.get_column("_input_error").to_list() == [None, "malformed_row", "malformed_row", None, None]
    assert df.get_column("text_raw").to_list() == ["ok one", "{not json", "[1, 2]", None, "ok two"]


_FIELD = st.one_of(
    st.none(), st.booleans(), st.integers(-(10 ** 30), 10 ** 30), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(), max_size=3))
_HOSTILE_LINE = st.one_of(
    st.fixed_dictionaries({"url": _FIELD, "text": _FIELD, "width": _FIELD, "height": _FIELD},
                          optional={"extra": _FIELD}).map(lambda d: json.dumps(d).encode()),
    st.sampled_from([b'{"url": "http://x/1", "text": "a \\ud800 cat"}', b'{"\\udc00": 1, "url": "u", "text": "t"}',
                     b'{"url": "u", "text": "a \\ud83d\\ude00 cat"}', b"[" * 5000, b'{"url": ' + b"[" * 3000,
                     b"", b"not json", b"[1, 2]", b'{"url": "u", "text": "t"', b"\xff\xfe{}", b'{"width": NaN}']),
    st.binary(max_size=30).filter(lambda b: b"\n" not in b and b"\r" not in b))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(lines=st.lists(_HOSTILE_LINE, min_size=1, max_size=8))
def test_any_jsonl_line_is_a_row_or_a_reject_never_a_crash(tmp_path_factory, lines):
    """Every line comes back once, as a row or a reject with its reason, and every row writes to
    parquet (no lone surrogate gets through) — or the file is one InputError naming it."""
    path = tmp_path_factory.mktemp("j") / "pairs.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    try:
        df = read_all(path, mapping={"url": "url", "text": "text"})
    except InputError as e:
        assert "pairs.jsonl" in str(e)
        return
    assert sorted(df.get_column("row_id").to_list()) == sorted(f"pairs.jsonl:{i + 1}" for i in range(len(lines)))
    assert set(df.get_column("_input_error").drop_nulls()) <= {"malformed_row", "invalid_utf8"}
    df.write_parquet(tmp_path_factory.mktemp("p") / "rows.parquet")


@needs_shared_data
def test_broken_scores_are_named_per_row_absent_ones_are_not(shared_data, tmp_path):
    """Real LAION captions (URL/TEXT only) with score columns added: NaN, inf, null and absurd
    values in a column the file has are ``invalid_scores``; a column of null type is no score."""
    real = pq.read_table(shared_data / "external" / "laion_img2dataset" / "test_1000.parquet",
                         columns=["URL", "TEXT"]).slice(0, 6)
    p = tmp_path / "laion.parquet"
    pq.write_table(real.append_column("similarity", pa.array([0.3, float("nan"), None, 0.3, 1e300, 0.31]))
                   .append_column("pwatermark", pa.array([0.1, 0.1, 0.2, float("inf"), 0.1, float("-inf")]))
                   .append_column("punsafe", pa.nulls(6)), p)
    df = read_all(p)
    assert df["invalid_scores"].to_list() == [[], ["clip_score"], ["clip_score"], ["watermark"], ["clip_score"],
                                              ["watermark"]]
    assert df["nsfw"].null_count() == 6 and df["text_raw"].to_list() == real["TEXT"].to_pylist()


def test_a_qvl_output_read_again_keeps_its_unscored_rows_unscored(tmp_path):
    """qvl's outputs have every score column, null where the input had none: their own
    ``invalid_scores`` tells the broken nulls from the absent ones."""
    p = tmp_path / "kept.parquet"
    pq.write_table(pa.table({"url": ["http://a/1", "http://a/2", "http://a/3"], "text": ["a", "b", "c"],
                             "clip_score": [None, None, 0.3], "nsfw": pa.array([None, None, None], pa.float64()),
                             "invalid_scores": [[], ["clip_score"], ["nsfw"]], "source": ["cc3m", "laion", "laion"]}),
                   p)
    df = read_all(p)
    assert df["invalid_scores"].to_list() == [[], ["clip_score"], ["nsfw"]]
    assert df["source"].to_list() == ["cc3m", "laion", "laion"]


def test_a_row_that_could_not_be_read_has_no_broken_score(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text(json.dumps({"URL": "http://a/1", "TEXT": "a cat", "similarity": 0.3}) + "\n{broken\n"
                 + json.dumps({"URL": "http://a/2", "TEXT": "a dog", "similarity": "high"}) + "\n")
    df = read_all(p).sort("row_id")
    assert df["_input_error"].to_list() == [None, "malformed_row", "malformed_row"]
    assert df["invalid_scores"].to_list() == [[], [], []]
