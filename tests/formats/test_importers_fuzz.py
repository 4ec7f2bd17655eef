"""Every importer against generated hostile published files: wrong types, non-finite and huge
numbers, lone surrogates, missing and extra keys, records that are not objects, truncated and
scribbled files. The invariant: every published record ends as a sample or a reject naming its
file and place, or the run ends in one QvlError naming the file — never a traceback, never a
silent drop."""

from __future__ import annotations

import io
import json
import pickle
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from qvl.errors import QvlError, RecordError
from qvl.formats import importers
from qvl.formats.build import FormatSettings, run_format

MISSING = object()
HOSTILE = st.one_of(
    st.sampled_from([None, True, 0, -1, 10 ** 400, -(10 ** 400), 2 ** 64, 1e308, float("inf"), float("-inf"),
                     float("nan"), "", " ", ".", "\ud800", "a\udfffb", "../x", [], [1], [[1, 2]], {}, {"a": 1}, "12"]),
    st.text(max_size=4), st.integers(), st.floats(),
)
FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def field(good):
    """The good value most of the time, else a hostile one or no key at all."""
    return st.one_of(st.just(good), st.just(good), HOSTILE, st.just(MISSING))


def record(template: dict):
    """``template`` with some fields hostile or missing, some extra keys; now and then not an object."""
    fields = st.fixed_dictionaries({k: field(v) for k, v in template.items()})
    extra = st.dictionaries(st.text(max_size=3), HOSTILE, max_size=2)
    made = st.builds(lambda f, e: {**e, **{k: v for k, v in f.items() if v is not MISSING}}, fields, extra)
    return st.one_of(made, made, made, HOSTILE)


def many(template: dict, max_size: int = 4):
    return st.lists(record(template), max_size=max_size)


MUTATION = st.one_of(st.none(), st.tuples(st.sampled_from(["cut", "scribble"]), st.floats(0, 1)))


def dump(value, mutation) -> bytes:
    return mutate(json.dumps(value).encode(), mutation)  # NaN and Infinity as JS literals, lone surrogates as \ud800


def mutate(data: bytes, mutation) -> bytes:
    if mutation is None:
        return data
    kind, where = mutation
    at = int(where * len(data))
    return data[:at] if kind == "cut" else data[:at] + b"\xff\x00{" + data[at:]


IMAGE = {"id": 1, "file_name": "red.png"}
REF = {"ref_id": 0, "ann_id": 7, "image_id": 1, "split": "train", "sentences": [{"sent": "the red square", "sent_id": 0}]}
REGION = {"region_id": 1, "image_id": 1, "phrase": "a red square", "x": 1, "y": 2, "width": 30, "height": 40}
WORD = {"image_id": "a", "utf8_string": "STOP", "points": [1, 1, 30, 1, 30, 20, 1, 20]}
TURNS = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a red square"}]

# layout -> strategy of (files {name: bytes}, the published records' indices: the set every
# record must be found at, or None where only "within range" can be said)
LAYOUTS = {
    "coco-captions": st.builds(
        lambda images, anns, m: ({"captions.json": dump({"images": images, "annotations": anns}, m)}, len(anns)),
        many({**IMAGE, "width": 64, "height": 48}), many({"id": 1, "image_id": 1, "caption": "a red square"}),
        MUTATION),
    "vqav2": st.builds(
        lambda sub, qs, anns, m: ({"q.json": dump({"questions": qs, **({} if sub is MISSING else {"data_subtype": sub})},
                                                  m),
                                   "a.json": dump({"annotations": anns}, None)}, len(qs)),
        field("val2014"), many({"question_id": 1, "image_id": 1, "question": "What colour?"}),
        many({"question_id": 1, "multiple_choice_answer": "red"}), MUTATION),
    "gqa": st.builds(
        lambda qs, m: ({"gqa.json": dump(qs, m)}, len(qs)),
        st.dictionaries(st.text(max_size=4), record({"question": "Is it red?", "answer": "yes", "imageId": "red"}),
                        max_size=4), MUTATION),
    "textvqa": st.builds(
        lambda qs, m: ({"TextVQA_0.5.1_train.json": dump({"data": qs}, m)}, len(qs)),
        many({"question_id": 1, "image_id": "red", "question": "What?", "answers": ["red", "red", "blue"]}),
        MUTATION),
    "refcoco": st.builds(
        lambda refs, images, anns, m: ({"refs(unc).p": pickle.dumps(refs, protocol=2),
                                        "instances.json": dump({"images": images, "annotations": anns}, m)},
                                       [i for i, r in enumerate(refs) if not (isinstance(r, dict) and isinstance(
                                           r.get("split"), str) and r["split"] != "train")]),
        many(REF), many({**IMAGE, "width": 64, "height": 48}), many({"id": 7, "image_id": 1, "bbox": [1, 2, 30, 40]}),
        MUTATION),
    "visual-genome": st.builds(
        lambda entries, images, m: ({"region_descriptions.json": dump(entries, m),
                                     "image_data.json": dump(images, None)}, None),
        many({"id": 1, "regions": [REGION, {**REGION, "region_id": 2}]}),
        many({"image_id": 1, "url": "https://vg.example/VG_100K/1.jpg", "width": 64, "height": 48}), MUTATION),
    "textocr": st.builds(
        lambda imgs, anns, links, m: ({"TextOCR_0.1_train.json": dump(
            {"info": {}, "imgs": imgs, "anns": anns, "imgToAnns": links}, m)}, None),
        st.dictionaries(st.sampled_from(["a", "b", "\ud800"]),
                        record({"id": "a", "file_name": "red.png", "width": 64, "height": 48}), max_size=3),
        st.dictionaries(st.sampled_from(["a_1", "a_2", "b_1"]), record(WORD), max_size=3),
        st.dictionaries(st.sampled_from(["a", "b", "c", "\ud800"]),
                        st.one_of(st.lists(st.sampled_from(["a_1", "a_2", "b_1", "zz"]), max_size=3), HOSTILE),
                        max_size=3), MUTATION),
    "llava-pretrain": st.builds(
        lambda recs, m: ({"blip.json": dump(recs, m)}, len(recs)),
        many({"id": "0", "image": "red.png", "conversations": TURNS}), MUTATION),
}

FINITE = st.one_of(st.floats(), st.sampled_from([0.0, 0.5, 5.0, 1e300, float("inf"), float("nan")]))
GRIT = st.builds(
    lambda rows, typed: (rows, typed),
    st.lists(st.tuples(st.text(max_size=12), st.integers(-2 ** 63, 2 ** 63 - 1),
                       st.one_of(st.none(), st.lists(st.lists(FINITE, min_size=5, max_size=8), max_size=3))),
             min_size=1, max_size=4),
    st.booleans())


@pytest.fixture(scope="module")
def images() -> Path:
    root = Path(tempfile.mkdtemp(prefix="qvl-fuzz-images-"))
    for name in ("red.png", "red.jpg", "COCO_val2014_000000000001.jpg", "VG_100K/1.jpg"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), "red").save(root / name, format="PNG")
    return root


def check(layout: str, files: dict[str, bytes], expected, images: Path) -> None:
    """The invariant, through the importer and the renderer both."""
    with tempfile.TemporaryDirectory(prefix="qvl-fuzz-") as folder:
        paths = []
        for name, data in files.items():
            (Path(folder) / name).write_bytes(data)
            paths.append(Path(folder) / name)
        _check(layout, paths, expected, images, Path(folder) / "out")


def _check(layout: str, paths: list[Path], expected, images: Path, out: Path) -> None:
    seen: list[tuple[str, int]] = []

    def records():
        for file, index, record in importers.records(layout, paths):
            assert isinstance(index, int) and file in {str(p) for p in paths}
            assert isinstance(record, (dict, RecordError)), record
            seen.append((file, index))
            yield file, index, f"{Path(file).name}:{index}", record

    try:
        manifest = run_format("multitask", paths, out, images, records=records(), show_progress=False,
                              settings=FormatSettings(tokenizer="bytes", image_tokens=4))
    except QvlError as e:  # one clear error naming a file
        assert not isinstance(e, RecordError), e
        assert any(str(p) in str(e) for p in paths) or str(e).startswith(f"--from {layout}"), e
        return
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert manifest["records"] == len(seen) == manifest["samples"] + manifest["rejected"]
    assert all(r["reason"] and r["detail"] and r["file"] in {str(p) for p in paths} for r in rejects)
    if isinstance(expected, int):
        expected = range(expected)
    if expected is not None:  # no silent drop: every published record is there
        assert {i for _, i in seen} == set(expected), (seen, expected)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_hostile_published_file_never_costs_a_traceback(layout, images):
    @FUZZ
    @given(LAYOUTS[layout])
    def run(made):
        files, expected = made
        check(layout, files, expected, images)

    run()


@FUZZ
@given(made=GRIT)
def test_a_hostile_grit_shard_never_costs_a_traceback(made, images):
    rows, typed = made
    chunks = pa.array([c for _, _, c in rows], pa.list_(pa.list_(pa.float64())))
    table = pa.table({
        "key": [str(i) for i in range(len(rows))], "url": ["https://grit.example/0.jpg"] * len(rows),
        "caption": [c for c, _, _ in rows],
        # a width that is a number, or (a shard of another make) text
        "width": [w for _, w, _ in rows] if typed else [str(w) for _, w, _ in rows], "height": [48] * len(rows),
        "noun_chunks": chunks, "ref_exps": chunks})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    check("grit", {"grit.parquet": buf.getvalue()}, range(len(rows)) if typed else None, images)


GRIT_ROW = {"key": "000373938", "id": 1795296605919, "url": "https://grit.example/0.jpg", "caption": "a dog",
            "width": 64, "height": 48, "noun_chunks": [[0, 5, 0.1, 0.1, 0.5, 0.5, 0.9]],
            "ref_exps": [[0, 5, 0.1, 0.1, 0.5, 0.5, 0.9]]}


@FUZZ
@given(rows=many(GRIT_ROW), mutation=MUTATION)
def test_a_hostile_grit_jsonl_never_costs_a_traceback(rows, mutation, images):
    data = b"".join(json.dumps(row).encode() + b"\n" for row in rows)
    check("grit", {"grit_coyo.jsonl": mutate(data, mutation)}, range(len(rows)) if mutation is None else None, images)


def nested(depth: int, texts: list[str]):
    """A JSON value ``depth`` deep whose strings hold quotes, backslashes and brackets."""
    value: object = texts[0] if texts else ""
    for k in range(depth - 1):
        value = [value, texts[k % len(texts)] if texts else ""] if k % 2 else {"k\\\"[": value}
    return [value]


@FUZZ
@given(st.integers(1, 80), st.lists(st.text(alphabet='ab"\\[]{}', max_size=6), max_size=4),
       st.sampled_from([1, 2, 3, 7, 64, 1 << 20]))
def test_the_depth_guard_counts_only_brackets_outside_strings(depth, texts, size):
    """Blocks of 1 byte up: a string, an escape or a run of backslashes split across two blocks."""
    from qvl.formats.importers import MAX_DEPTH, DepthLimited, LayoutFileError

    reader = DepthLimited(io.BytesIO(json.dumps(nested(depth, texts)).encode()), "f.json", block=size)
    try:
        while reader.read(5):
            pass
    except LayoutFileError as e:
        assert depth > MAX_DEPTH and "f.json: JSON nested more than" in str(e)
    else:
        assert depth <= MAX_DEPTH


# A published file whose top level is not the layout's: (files around the value, the file that
# holds it, the shape the layout publishes there). Any other value would give no records, silently.
GQA_RECORD = {"question": "Is it red?", "answer": "yes", "imageId": "red"}
LLAVA_RECORD = {"id": "0", "image": "red.png", "conversations": TURNS}
SHAPES = {
    "gqa": (lambda top: {"gqa.json": top}, "gqa.json", dict, GQA_RECORD),
    "llava-pretrain": (lambda top: {"blip.json": top}, "blip.json", list, LLAVA_RECORD),
    "visual-genome": (lambda top: {"region_descriptions.json": top, "image_data.json": json.dumps(
        [{"image_id": 1, "url": "https://vg.example/VG_100K/1.jpg", "width": 64, "height": 48}]).encode()},
        "region_descriptions.json", list, {"id": 1, "regions": [REGION]}),
    "coco-captions": (lambda top: {"captions.json": top}, "captions.json", dict, {"images": [], "annotations": []}),
    "textvqa": (lambda top: {"TextVQA_0.5.1_train.json": top}, "TextVQA_0.5.1_train.json", dict, {"data": []}),
}


@pytest.mark.parametrize("layout", list(SHAPES))
def test_a_top_level_that_is_not_the_layouts_is_one_error_naming_the_file(layout, images):
    around, name, shape, good = SHAPES[layout]
    wrong = st.one_of(HOSTILE, st.just([good]), st.just({"0": good}), st.just([]), st.just({}))

    @FUZZ
    @given(top=wrong.filter(lambda v: not isinstance(v, shape)), bom=st.booleans())
    def run(top, bom):
        files = {k: v if isinstance(v, bytes) else (b"\xef\xbb\xbf" if bom else b"") + dump(v, None)
                 for k, v in around(top).items()}
        with tempfile.TemporaryDirectory(prefix="qvl-fuzz-") as folder:
            for file, data in files.items():
                (Path(folder) / file).write_bytes(data)
            with pytest.raises(QvlError, match=f"{name}: ") as e:
                list(importers.records(layout, [Path(folder) / file for file in files]))
            assert not isinstance(e.value, RecordError)

    run()
