"""`qvl demo` end to end on a small world: every stage runs, eval.json says what it measured."""

from __future__ import annotations

import json

from qvl.demo.learn import DemoWorld
from qvl.demo.run import run_demo


def test_demo_runs_every_stage_and_writes_eval(tmp_path):
    world = DemoWorld(train_images=40, held_out=6, steps=(2, 3, 2))
    results = run_demo(tmp_path, rows_per_shard=300, show_progress=False, world=world, log=lambda m: None)
    report = json.loads((tmp_path / "curated" / "report.json").read_text())
    assert report["accounted"] and report["input_rows"] == 300 * 3 + 150
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    for key in ("grounding_acc", "grounding_acc_untrained", "chat_caption_em", "lora_grounding_acc",
                "stage2_chat_grounding_acc"):
        assert 0.0 <= evaluation[key] <= 1.0
    assert set(evaluation["stage2"]) == {"grounding_acc", "caption_em", "vqa_em"}
    assert evaluation["held_out_images"] == 6 and evaluation["examples"]
    for stage in (1, 2, 3):
        assert (tmp_path / "learn" / f"stage{stage}" / "checkpoint" / "model.safetensors").is_file()
    lora_run = tmp_path / "learn" / "stage3-lora" / "checkpoint"
    assert (lora_run / "adapter.safetensors").is_file() and not (lora_run / "model.safetensors").exists()
    # the tiny preset ties embeddings and lm_head: LoRA on the base trains one copy of both, and the merge keeps them tied
    import torch

    from qvl.trainer.checkpoint import load_checkpoint as load_whole
    from qvl.trainer.lora import load_checkpoint, write_merged

    adapted = load_checkpoint(lora_run)[0]
    write_merged(lora_run, tmp_path / "merged")
    merged = load_whole(tmp_path / "merged")[0]
    assert merged.llm.lm_head.weight is merged.llm.model.embed_tokens.weight
    ids = torch.arange(40).reshape(1, 40)
    with torch.no_grad():
        assert torch.allclose(adapted(ids, None), merged(ids, None), atol=1e-5)
    assert "grounding accuracy" in results["summary"]
    # the demo's stage-2 grounding is `qvl eval grounding` on its held-out set: the same figure from the CLI
    from typer.testing import CliRunner

    from qvl.cli import app

    world_dir = tmp_path / "learn" / "world"
    cli = CliRunner().invoke(app, ["eval", "grounding", "--data", str(world_dir / "held.jsonl"), "--images",
                                   str(world_dir / "held"), "--checkpoint",
                                   str(tmp_path / "learn" / "stage2" / "checkpoint"), "--box-scale", "1000",
                                   "--out", str(tmp_path / "cli-eval"), "--no-progress"])
    assert cli.exit_code == 0, cli.output
    assert json.loads((tmp_path / "cli-eval" / "metrics.json").read_text())["grounding_acc"] == \
        evaluation["stage2"]["grounding_acc"]
    assert (tmp_path / "learn" / "eval" / "stage2-referring" / "answers.jsonl").is_file()


def test_the_demo_learns_what_the_readme_says(tmp_path):
    """The README's headline, from the demo's own world and steps (the regression test of issue
    #4's finding too: the tiny preset learns *where* from scratch): the finished model asked in
    chat, and the stage-2 model on the paper's referring prompt, each far above the same model
    untrained. Re-scoring the answers with --predictions gives the same figure."""
    from typer.testing import CliRunner

    from qvl.cli import app
    from qvl.demo.learn import run_learning_demo

    result = run_learning_demo(tmp_path / "learn", tmp_path / "eval.json", log=lambda m: None)
    assert result["grounding_acc"] >= 0.8 and result["grounding_acc_untrained"] <= 0.1, result
    assert result["stage2"]["grounding_acc"] >= 0.8 and result["stage2_untrained"]["grounding_acc"] <= 0.1, result
    assert result["chat_caption_em"] >= 0.8 and result["held_out_images"] == 200
    # LoRA (the release's r 64, alpha 16) teaches the stage-2 model the chat form, as a full stage 3 does
    assert result["lora_grounding_acc"] >= 0.6 and result["stage2_chat_grounding_acc"] <= 0.1, result
    world = tmp_path / "learn" / "world"
    again = CliRunner().invoke(app, ["eval", "grounding", "--data", str(world / "held.jsonl"), "--predictions",
                                     str(tmp_path / "learn" / "eval" / "final-chat" / "answers.jsonl"),
                                     "--box-scale", "1000", "--out", str(tmp_path / "rescored"), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "rescored" / "metrics.json").read_text())["grounding_acc"] == result["grounding_acc"]
