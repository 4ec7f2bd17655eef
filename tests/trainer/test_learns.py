"""The tiny preset learns *where*: referring grounding on the demo world, from scratch, in
about two minutes on two cores — the regression test of issue #4's finding (the
paper's adapter on the same data stays position-blind; see the README)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_model

from qvl.demo.learn import DemoWorld, write_world
from qvl.formats.build import FormatSettings, run_format
from qvl.formats.tokenizers import IMG_PAD, load_tokenizer
from qvl.trainer.generate import grounding_accuracy
from qvl.trainer.model import QwenVL, load_preset
from qvl.trainer.train import TrainSettings, train


def test_referring_grounding_is_learnt(tmp_path):
    files = write_world(tmp_path / "world", DemoWorld(train_images=800, held_out=40, seed=1))
    records = [json.loads(line) for line in files["stage2"].read_text().splitlines()]
    refs = tmp_path / "ref.jsonl"
    refs.write_text("".join(json.dumps(r) + "\n" for r in records if r["task"] == "ref_grounding"))
    preset = load_preset("tiny")
    run_format("multitask", [refs], tmp_path / "shards", files["images"], show_progress=False,
               settings=FormatSettings(tokenizer=preset.tokenizer, image_tokens=preset.image_tokens))
    train(TrainSettings(stage=2, data=tmp_path / "shards", out=tmp_path / "run", max_steps=260, log=False,
                        overrides={"warmup_steps": 40}))
    tok = load_tokenizer(preset.tokenizer)
    torch.manual_seed(0)
    untrained = QwenVL(preset, tok.vocab_size, tok.special(IMG_PAD), 64).eval()
    trained = QwenVL(preset, tok.vocab_size, tok.special(IMG_PAD), 64).eval()
    load_model(trained, str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert grounding_accuracy(untrained, tok, files["held"][:10], 64)["accuracy"] == 0.0
    assert grounding_accuracy(trained, tok, files["held"], 64)["accuracy"] >= 0.5
