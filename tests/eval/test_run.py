"""`qvl eval` end to end on a micro model: answers written before scoring, a killed run
resumed to the same answers, answers made elsewhere re-scored, the datasets' published files
read, and two torchrun processes giving one process's answers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from qvl.cli import app
from qvl.eval.data import EvalDataError
from qvl.eval.run import EvalSettings, evaluate
from qvl.trainer.settings import TrainSettings
from qvl.trainer.train import train

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(micro, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval")
    train(TrainSettings(stage=2, data=micro["multitask"], out=root / "run", preset=micro["preset"], max_steps=0,
                        log=False))
    images = root / "images"
    images.mkdir()
    colours = ["red", "blue", "green", "yellow", "purple"]
    for i, colour in enumerate(colours):
        Image.new("RGB", (40 + 8 * i, 30 + 4 * i), colour).save(images / f"{i}.png")
    grounding = root / "refcoco_val.jsonl"
    grounding.write_text("".join(json.dumps({"image": f"{i}.png", "sent": f"the {c} square {{odd}}", "bbox": [
        2, 3, 20 + i, 25], "width": 40 + 8 * i, "height": 30 + 4 * i}) + "\n" for i, c in enumerate(colours)))
    vqa = root / "vqa.jsonl"
    vqa.write_text("".join(json.dumps({"question_id": 100 + i, "image": f"{i}.png", "question": "What colour is it?",
                                       "answers": [c] * 6 + ["dark " + c] * 4, "answer_type": "other",
                                       "question_type": "what color"}) + "\n" for i, c in enumerate(colours)))
    return {"root": root, "ckpt": root / "run" / "checkpoint", "images": images, "grounding": grounding, "vqa": vqa}


def settings(setup, out: Path, **kw) -> EvalSettings:
    return EvalSettings(task=kw.pop("task", "grounding"), data=kw.pop("data", setup["grounding"]), out=out,
                        checkpoint=kw.pop("checkpoint", setup["ckpt"]), images=setup["images"], progress=False, **kw)


def test_answers_then_scores_and_a_killed_run_resumes(setup, tmp_path):
    fresh = evaluate(settings(setup, tmp_path / "fresh", batch_size=2))
    rows = [json.loads(line) for line in (tmp_path / "fresh" / "answers.jsonl").read_text().splitlines()]
    assert fresh["n"] == len(rows) == 5 and [r["id"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert all(r["prompt"].startswith("<img>") and r["prompt"].endswith("</ref><box>") for r in rows)
    assert "{odd}" in rows[0]["prompt"]  # braces in a sentence stay text
    assert fresh["grounding_acc"] == sum(r["score"] for r in rows) / 5
    # a kill after two answers and half a line: the next run redoes only what is missing
    killed = tmp_path / "killed"
    killed.mkdir()
    part = (tmp_path / "fresh" / "answers.part-0.jsonl").read_text().splitlines()
    (killed / "answers.part-0.jsonl").write_text(part[0] + "\n" + part[1] + "\n" + part[2][:20])
    (killed / ".qvl").write_text(json.dumps({"kind": "eval"}))
    resumed = evaluate(settings(setup, killed, batch_size=3))
    assert (killed / "answers.jsonl").read_text() == (tmp_path / "fresh" / "answers.jsonl").read_text()
    assert resumed["grounding_acc"] == fresh["grounding_acc"]


def test_batches_answer_as_single_samples(setup, tmp_path):
    one = evaluate(settings(setup, tmp_path / "one", task="vqa", data=setup["vqa"], batch_size=1))
    four = evaluate(settings(setup, tmp_path / "four", task="vqa", data=setup["vqa"], batch_size=4))
    assert (tmp_path / "one" / "answers.jsonl").read_text() == (tmp_path / "four" / "answers.jsonl").read_text()
    assert one["vqa_acc"] == four["vqa_acc"] and set(one["by_answer_type"]) == {"other"}


def test_predictions_made_elsewhere_are_rescored_by_id_or_order(setup, tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": 100 + i, "answer": a}) + "\n" for i, a in
                               enumerate(["Red.", "the blue", "dark green", "two", "purple!"])))
    result = runner.invoke(app, ["eval", "vqa", "--data", str(setup["vqa"]), "--predictions", str(answers),
                                 "--out", str(tmp_path / "o"), "--no-progress"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    # "Red.", "the blue", "purple!" normalize to answers 6 humans gave: 1.0 each; "dark green" (4 humans): every
    # leave-one-out subset still holds 3 or 4 of them: 1.0; "two" becomes "2", which nobody said: 0
    assert metrics["vqa_acc"] == pytest.approx(4 / 5) and metrics["n"] == 5
    assert "VQA accuracy 80.00" in result.output
    unordered = tmp_path / "order.jsonl"
    unordered.write_text("".join(json.dumps({"answer": a}) + "\n" for a in ["red", "blue", "green", "x", "y"]))
    by_order = evaluate(EvalSettings(task="vqa", data=setup["vqa"], out=tmp_path / "o2", predictions=unordered,
                                     progress=False))
    assert by_order["vqa_acc"] == pytest.approx(3 / 5)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"question_id": 100, "answer": "red"}) + "\n"
                       + json.dumps({"question_id": 999, "answer": "red"}) + "\n")
    with pytest.raises(EvalDataError, match=r"no answer for id\(s\) 101, 102, 103, 104; id\(s\) not in the data: 999"):
        evaluate(EvalSettings(task="vqa", data=setup["vqa"], out=tmp_path / "o3", predictions=missing, progress=False))


def test_the_datasets_published_files(setup, tmp_path):
    questions = {"data_subtype": "val2014", "questions": [
        {"question_id": 7, "image_id": 42, "question": "How many dogs?"}]}
    annotations = {"annotations": [{"question_id": 7, "image_id": 42, "question_type": "how many",
                                    "answer_type": "number", "answers": [{"answer": "2"}] * 9 + [{"answer": "3"}]}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    (tmp_path / "p.jsonl").write_text(json.dumps({"question_id": 7, "answer": "two"}) + "\n")
    out = evaluate(EvalSettings(task="vqa", data=tmp_path / "q.json", annotations=tmp_path / "a.json",
                                out=tmp_path / "vqa", predictions=tmp_path / "p.jsonl", progress=False))
    assert out["vqa_acc"] == 1.0 and out["by_question_type"] == {"how many": 1.0}
    from qvl.eval.data import read

    assert read("vqa", tmp_path / "q.json", tmp_path / "a.json")[0].image == "COCO_val2014_000000000042.jpg"
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 1, "caption": "a dog on a beach"}, {"image_id": 1, "caption": "a brown dog"},
                            {"image_id": 2, "caption": "two cats on a sofa"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    (tmp_path / "c.jsonl").write_text(json.dumps({"image_id": 1, "caption": "a dog on the beach"}) + "\n"
                                      + json.dumps({"image_id": 2, "caption": "two cats on a sofa"}) + "\n")
    caps = evaluate(EvalSettings(task="caption", data=tmp_path / "captions.json", out=tmp_path / "cap",
                                 predictions=tmp_path / "c.jsonl", progress=False, use_java=False))
    assert caps["cider"] > 0 and caps["comparable"] is False and "not comparable" in (tmp_path / "cap" / "report.md").read_text()


@pytest.mark.parametrize("line, message", [
    ('{"image": "0.png", "sent": "x", "bbox": [1, 2, 3], "width": 40, "height": 30}', "at `$.bbox`"),
    ('{"image": "0.png", "sent": "x", "bbox": [1, 2, 3, 4], "width": 0, "height": 30}', "at `$.width`"),
    ('{"image": "0.png", "bbox": [1, 2, 3, 4], "width": 40, "height": 30}', "missing required field `sent`"),
    ("[1]", "Expected `object`, got `array`"),
])
def test_bad_data_is_an_error_naming_the_line(setup, tmp_path, line, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"image": "0.png", "sent": "x", "bbox": [1, 2, 3, 4], "width": 40, "height": 30})
                    + "\n" + line + "\n")
    result = runner.invoke(app, ["eval", "grounding", "--data", str(data), "--checkpoint", str(setup["ckpt"]),
                                 "--images", str(setup["images"]), "--out", str(tmp_path / "o"), "--no-progress"])
    assert result.exit_code == 1 and "bad.jsonl:2" in result.output and message in result.output, result.output


def test_two_processes_answer_as_one(setup, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        "import sys; from pathlib import Path; from qvl.eval.run import EvalSettings, evaluate; "
        f"evaluate(EvalSettings(task='grounding', data=Path({str(setup['grounding'])!r}), out=Path(sys.argv[1]), "
        f"checkpoint=Path({str(setup['ckpt'])!r}), images=Path({str(setup['images'])!r}), progress=False, "
        "batch_size=2))")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", "29541", str(script), str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    evaluate(settings(setup, tmp_path / "one"))
    assert (tmp_path / "two" / "answers.jsonl").read_text() == (tmp_path / "one" / "answers.jsonl").read_text()
    assert sorted(p.name for p in (tmp_path / "two").glob("answers.part-*")) == ["answers.part-0.jsonl",
                                                                                  "answers.part-1.jsonl"]


def test_the_token_budget_is_the_papers_for_qwen_and_fits_the_same_answer_in_bytes():
    """The paper's max_new_tokens count Qwen-VL's tokens; the demo's byte tokenizer needs more for the
    same answer, or its chat grounding is cut off mid-box (`the blue triangle(750,250`)."""
    from qvl.demo.world import COLORS, SHAPES
    from qvl.eval.run import PROTOCOLS, token_budget
    from qvl.formats.tokenizers import load_tokenizer

    qwen, byte = load_tokenizer("qwen-vl"), load_tokenizer("bytes")
    assert {k: token_budget(p, qwen) for k, p in PROTOCOLS.items()} == {
        k: (p.max_new_tokens, p.min_new_tokens) for k, p in PROTOCOLS.items()}
    longest = max((f"the {c} {s}" for c in COLORS for s in SHAPES), key=len)
    answer = byte.encode(f"<ref>{longest}</ref><box>(999,999),(999,999)</box>") + [byte.special("<|im_end|>")]
    assert len(answer) > PROTOCOLS["grounding"].max_new_tokens  # what cut the demo's answers off
    assert len(answer) <= token_budget(PROTOCOLS["grounding"], byte)[0]
