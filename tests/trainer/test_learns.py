"""The tiny preset learns *where*: referring grounding on the demo world, from scratch, in
a few minutes on two cores — the regression test of issue #4's finding (the paper's adapter
on the same data stays position-blind; see the README). Measured the way users measure it:
`qvl eval grounding` on the held-out images, answers then re-scored with --predictions."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from qvl.cli import app
from qvl.demo.learn import DemoWorld, write_world
from qvl.formats.build import FormatSettings, run_format
from qvl.trainer.model import load_preset
from qvl.trainer.train import TrainSettings, train

runner = CliRunner()


def eval_cli(files, checkpoint, out):
    result = runner.invoke(app, ["eval", "grounding", "--data", str(files["held_grounding"]), "--images",
                                 str(files["held_images"]), "--checkpoint", str(checkpoint), "--out", str(out),
                                 "--box-scale", "1000", "--batch-size", "16", "--no-progress"])
    assert result.exit_code == 0, result.output
    return json.loads((out / "metrics.json").read_text())


def test_referring_grounding_is_learnt(tmp_path):
    files = write_world(tmp_path / "world", DemoWorld(train_images=800, held_out=40, seed=1))
    records = [json.loads(line) for line in files["stage2"].read_text().splitlines()]
    refs = tmp_path / "ref.jsonl"
    refs.write_text("".join(json.dumps(r) + "\n" for r in records if r["task"] == "ref_grounding"))
    preset = load_preset("tiny")
    run_format("multitask", [refs], tmp_path / "shards", files["images"], show_progress=False,
               settings=FormatSettings(tokenizer=preset.tokenizer, image_tokens=preset.image_tokens))
    for name, steps in (("untrained", 0), ("run", 260)):
        train(TrainSettings(stage=2, data=tmp_path / "shards", out=tmp_path / name, max_steps=steps, log=False,
                            overrides={"warmup_steps": 40}))
    assert eval_cli(files, tmp_path / "untrained" / "checkpoint", tmp_path / "eval-untrained")["grounding_acc"] == 0.0
    trained = eval_cli(files, tmp_path / "run" / "checkpoint", tmp_path / "eval")
    assert trained["grounding_acc"] >= 0.5 and trained["n"] == 40
    again = runner.invoke(app, ["eval", "grounding", "--data", str(files["held_grounding"]), "--predictions",
                                str(tmp_path / "eval" / "answers.jsonl"), "--box-scale", "1000", "--out",
                                str(tmp_path / "rescored"), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "rescored" / "metrics.json").read_text())["grounding_acc"] == trained["grounding_acc"]
