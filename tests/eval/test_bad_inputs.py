"""`qvl eval` against broken and hostile data and predictions: a bad line or field is one error
line naming the file, the line (or the place in a JSON file) and the field; answers.jsonl is
always JSON; the box parser is linear. Never a traceback."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from qvl.cli import app
from qvl.eval import grounding

runner = CliRunner()
GROUND = {"image": "0.png", "sent": "the red square", "bbox": [2, 3, 20, 25], "width": 40, "height": 30}
VQA = {"question_id": 7, "image": "0.png", "question": "What colour?", "answers": ["red"] * 10}


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def run_eval(task: str, data: Path, predictions: Path, out: Path, *extra: str):
    return runner.invoke(app, ["eval", task, "--data", str(data), "--predictions", str(predictions), "--out", str(out),
                               "--no-progress", *extra])


def one_line_error(result, *names: str) -> str:
    """The run ended in one ``error:`` line that names each of ``names`` (no traceback)."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.output.startswith("error:") and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output
    for name in names:
        assert name in result.output, (name, result.output)
    return result.output


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


# ---------------------------------------------------------------- the probe's findings

def test_a_lone_surrogate_in_predictions_names_the_file_and_line(tmp_path):
    data = write(tmp_path / "ref.jsonl", [GROUND, GROUND])
    preds = write(tmp_path / "preds.jsonl", ['{"answer": "(1,2),(3,4)"}', '{"answer": "bad \\ud800 text"}'])
    one_line_error(run_eval("grounding", data, preds, tmp_path / "o"), "preds.jsonl:2", "not valid Unicode")


@pytest.mark.parametrize("bbox, words", [
    ([20, 25, 2, 3], "is not x1 < x2, y1 < y2"),
    ([2, 3, 2, 25], "is not x1 < x2, y1 < y2"),
    ([2, 3, 2000, 25], "lies outside the 40x30 image"),
    ([-50, 3, 20, 25], "lies outside the 40x30 image"),
])
def test_a_reference_box_no_answer_could_match_names_file_line_and_field(tmp_path, bbox, words):
    data = write(tmp_path / "ref.jsonl", [GROUND, {**GROUND, "bbox": bbox}])
    preds = write(tmp_path / "preds.jsonl", ['{"answer": "(1,2),(3,4)"}'] * 2)
    one_line_error(run_eval("grounding", data, preds, tmp_path / "o"), "ref.jsonl:2: $.bbox", words)


def test_a_reference_box_on_the_image_edge_is_scored(tmp_path):
    data = write(tmp_path / "ref.jsonl", [{**GROUND, "bbox": [0, 0, 40, 30]}, {**GROUND, "bbox": [0, 0, 40.4, 30.2]}])
    preds = write(tmp_path / "preds.jsonl", ['{"answer": "(0,0),(999,999)"}'] * 2)
    result = run_eval("grounding", data, preds, tmp_path / "o")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("answer", [1, None])
def test_vqa_annotation_answers_that_are_not_text(tmp_path, answer):
    questions = {"questions": [{"question_id": 7, "image_id": 42, "question": "How many?"}]}
    annotations = {"annotations": [{"question_id": 7, "answers": [{"answer": "2"}, {"answer": answer}]}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    preds = write(tmp_path / "p.jsonl", [{"question_id": 7, "answer": "two"}])
    result = run_eval("vqa", tmp_path / "q.json", preds, tmp_path / "o", "--annotations", str(tmp_path / "a.json"))
    one_line_error(result, "a.json", "$.annotations[0].answers[1].answer")


def test_coco_captions_with_a_list_image_id(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}],
            "annotations": [{"image_id": [1], "caption": "a dog"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    preds = write(tmp_path / "p.jsonl", [{"image_id": 1, "caption": "a dog"}])
    one_line_error(run_eval("caption", tmp_path / "captions.json", preds, tmp_path / "o"),
                   "captions.json", "$.annotations[0].image_id")


@pytest.mark.parametrize("answer", ["(nan,nan),(nan,nan)", "(inf,0),(inf,10)", "(0,0),(1e400,5)",
                                    "(-Infinity,0),(5,5)", "(0,0),(20000000,5)"])
def test_non_finite_boxes_do_not_parse_and_answers_stay_json(tmp_path, answer):
    assert grounding.parse_box(answer) is None
    data = write(tmp_path / "ref.jsonl", [GROUND])
    preds = write(tmp_path / "preds.jsonl", [{"answer": answer}])
    result = run_eval("grounding", data, preds, tmp_path / "o")
    assert result.exit_code == 0, result.output
    row = strict_json((tmp_path / "o" / "answers.jsonl").read_text())
    assert row["parsed"] is None and row["score"] == 0.0 and row["answer"] == answer


@pytest.mark.parametrize("scale", ["0", "-1", "nan", "inf", "1e300"])
def test_box_scale_out_of_range_is_one_line(tmp_path, scale):
    data = write(tmp_path / "ref.jsonl", [GROUND])
    preds = write(tmp_path / "preds.jsonl", [{"answer": "(1,2),(3,4)"}])
    one_line_error(run_eval("grounding", data, preds, tmp_path / "o", "--box-scale", scale), "box_scale")


def test_a_bad_image_pattern_is_one_line(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps({"questions": [{"question_id": 7, "image_id": 42, "question": "?"}]}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [{"question_id": 7, "answers": [{"answer": "2"}]}]}))
    preds = write(tmp_path / "p.jsonl", [{"question_id": 7, "answer": "two"}])
    result = run_eval("vqa", tmp_path / "q.json", preds, tmp_path / "o", "--annotations", str(tmp_path / "a.json"),
                      "--image-pattern", "{name}.jpg")
    one_line_error(result, "--image-pattern")


# ---------------------------------------------------------------- the box parser

BOX = re.compile(r"\((.*?)\),\((.*?)\)")  # the paper's pattern: the reference the linear scanner must equal


def reference_box(answer: str):
    found = BOX.findall(answer)
    return found[0] if found else None


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.text(alphabet="(),\n 1.-a", max_size=40))
def test_the_linear_scanner_finds_what_the_regex_finds(answer):
    assert grounding.first_box(answer) == reference_box(answer)


@pytest.mark.parametrize("answer", ["(100,200),(300,400)", "x (1,2),(3,4) (5,6),(7,8)", "((1,2),(3,4)", "(a\n,b),(c,d)",
                                    "(1,2),\n(3,4)", "(1,2)),(3,4)", "),(1,2),(3,4)", "(),()", "(" * 50 + "),(1)"])
def test_the_linear_scanner_on_crafted_answers(answer):
    assert grounding.first_box(answer) == reference_box(answer)


# ---------------------------------------------------------------- properties: any file, no traceback

HOSTILE = [None, True, -1, 0, 10 ** 400, 1e308, float("nan"), float("inf"), "", " ", "\ud800", "x" * 300, [], [1, 2],
           {"a": 1}, [[1, 2, 3, 4]], "(1,2),(3,4)"]


def _mutated(record: dict, draw) -> dict:
    """``record`` with one field hostile, missing or added."""
    record = dict(record)
    action = draw(st.sampled_from(["keep"] * 6 + ["add"] * 2 + ["set"] * 2 + ["drop"]))  # mostly one bad line
    key = draw(st.sampled_from(sorted(record)))
    if action == "set":
        record[key] = draw(st.sampled_from(HOSTILE))
    elif action == "drop":
        del record[key]
    elif action == "add":
        record[draw(st.sampled_from(["extra", "id", "answer", "caption"]))] = draw(st.sampled_from(HOSTILE))
    return record


def _line(record: dict, draw) -> str:
    """``record`` mutated, as a JSONL line (NaN, Infinity as Python writes them; \\ud800 escaped), maybe cut short."""
    line = json.dumps(_mutated(record, draw))
    return line[:draw(st.integers(0, len(line)))] if draw(st.integers(0, 19)) == 19 else line


@st.composite
def grounding_files(draw):
    n = draw(st.integers(1, 3))
    data = [_line({**GROUND, "id": i}, draw) for i in range(n)]
    preds = [_line({"id": i, "answer": draw(st.sampled_from(["(1,2),(30,40)", "(nan,1),(2,3)", "no"]))}, draw)
             for i in range(n)]
    return data, preds


def _check(result, files: list[Path], out: Path, n: int) -> None:
    """Exit 0 with every sample scored, or one error line naming one of ``files``."""
    if result.exit_code == 0:
        rows = [strict_json(line) for line in (out / "answers.jsonl").read_text().splitlines()]
        assert len(rows) == n and all(isinstance(r["score"], float) for r in rows)
    else:
        message = one_line_error(result)
        assert any(f.name in message for f in files), message


@settings(max_examples=60, deadline=None, derandomize=True)
@given(grounding_files())
def test_any_grounding_data_and_predictions(files):
    data_lines, pred_lines = files
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, preds = write(tmp / "ref.jsonl", data_lines), write(tmp / "preds.jsonl", pred_lines)
        _check(run_eval("grounding", data, preds, tmp / "o"), [data, preds], tmp / "o", len(data_lines))


@st.composite
def vqa_files(draw):
    n = draw(st.integers(1, 3))
    data = [_line({**VQA, "question_id": i}, draw) for i in range(n)]
    preds = [_line({"question_id": i, "answer": "red"}, draw) for i in range(n)]
    return data, preds


@settings(max_examples=40, deadline=None, derandomize=True)
@given(vqa_files())
def test_any_vqa_data_and_predictions(files):
    data_lines, pred_lines = files
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, preds = write(tmp / "vqa.jsonl", data_lines), write(tmp / "preds.jsonl", pred_lines)
        _check(run_eval("vqa", data, preds, tmp / "o"), [data, preds], tmp / "o", len(data_lines))


@st.composite
def published_files(draw):
    """VQAv2's questions + annotations and COCO captions, one field made hostile."""
    questions = {"data_subtype": "val2014", "questions": [{"question_id": 1, "image_id": 5, "question": "How many?"}]}
    annotations = {"annotations": [{"question_id": 1, "question_type": "how many", "answer_type": "number",
                                    "answers": [{"answer": "2"}] * 10}]}
    coco = {"images": [{"id": 5, "file_name": "a.jpg"}], "annotations": [{"image_id": 5, "caption": "a dog"}]}
    which = draw(st.sampled_from(["questions", "annotations", "coco"]))
    document = {"questions": questions, "annotations": annotations, "coco": coco}[which]
    inner = document["questions" if which == "questions" else "images" if which == "coco" else "annotations"][0]
    mutated = _mutated(inner, draw)
    inner.clear()
    inner.update(mutated)
    text = json.dumps(document)
    return which, (text[:draw(st.integers(0, len(text)))] if draw(st.integers(0, 5)) == 5 else text), \
        questions, annotations, coco


@settings(max_examples=40, deadline=None, derandomize=True)
@given(published_files())
def test_any_published_annotation_file(files):
    from qvl.eval.data import EvalDataError, read

    which, text, questions, annotations, coco = files
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "q.json").write_text(json.dumps(questions))
        (tmp / "a.json").write_text(json.dumps(annotations))
        (tmp / "captions.json").write_text(json.dumps(coco))
        target = {"questions": "q.json", "annotations": "a.json", "coco": "captions.json"}[which]
        (tmp / target).write_text(text)
        try:
            if which == "coco":
                samples = read("caption", tmp / "captions.json")
            else:
                samples = read("vqa", tmp / "q.json", tmp / "a.json")
        except EvalDataError as e:
            assert target in str(e) or "q.json" in str(e), str(e)
        else:
            assert len(samples) == 1 and all(isinstance(a, str) for a in samples[0].fields.get("answers", []))


def test_a_damaged_run_json_is_one_line(tmp_path):
    data = write(tmp_path / "ref.jsonl", [GROUND])
    preds = write(tmp_path / "preds.jsonl", [{"answer": "(1,2),(3,4)"}])
    assert run_eval("grounding", data, preds, tmp_path / "o").exit_code == 0
    (tmp_path / "o" / "run.json").write_bytes(b"{\xff")
    one_line_error(run_eval("grounding", data, preds, tmp_path / "o"), "run.json", "damaged")


@st.composite
def caption_lines(draw):
    return [_line({"image_id": i, "image": f"{i}.jpg", "captions": ["a dog", "a brown dog"]}, draw)
            for i in range(draw(st.integers(1, 3)))]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(caption_lines())
def test_any_caption_lines(lines):
    """Caption JSONL (scored by pycocoevalcap, which needs Java: read here, not scored)."""
    from qvl.eval.data import EvalDataError, read

    with tempfile.TemporaryDirectory() as tmp:
        path = write(Path(tmp) / "captions.jsonl", lines)
        try:
            samples = read("caption", path)
        except EvalDataError as e:
            assert "captions.jsonl" in str(e), str(e)
        else:
            assert len(samples) == len(lines)
            assert all(s.fields["captions"] and all(isinstance(c, str) for c in s.fields["captions"]) for s in samples)


@pytest.mark.parametrize("bbox", [[20, 25, 2, 3], [2, 3, 2000, 25], [-5, 3, 10, 25]])
def test_a_reference_box_that_is_no_box_in_the_image_is_one_error_naming_the_line(tmp_path, bbox):
    """An inverted or outside reference box was scored silently (IoU 0 for every answer)."""
    from qvl.eval.data import EvalDataError, grounding

    good = {"image": "a.jpg", "sent": "the dog", "bbox": [1, 2, 10, 20], "width": 40, "height": 30}
    path = tmp_path / "refcoco.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "bbox": bbox}) + "\n")
    with pytest.raises(EvalDataError, match=r"refcoco.jsonl:2: \$.bbox"):
        grounding(path)
    path.write_text(json.dumps(good) + "\n")
    assert grounding(path)[0].fields["bbox"] == [1.0, 2.0, 10.0, 20.0]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=4, max_size=4))
def test_any_finite_reference_box_is_scored_or_named(bbox):
    x1, y1, x2, y2 = bbox
    drawable = x1 < x2 and y1 < y2 and min(x1, y1) >= -1 and x2 <= 41 and y2 <= 31
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write(tmp / "ref.jsonl", [{**GROUND, "bbox": bbox}])
        preds = write(tmp / "preds.jsonl", ['{"answer": "(1,2),(30,40)"}'])
        result = run_eval("grounding", data, preds, tmp / "o")
        if drawable:
            assert result.exit_code == 0, result.output
        else:
            one_line_error(result, "ref.jsonl:1: $.bbox")
