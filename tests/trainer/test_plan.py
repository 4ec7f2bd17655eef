"""`qvl plan`: activations measured on the meta device are what a real CPU run saves, the
per-layer fit extrapolates, and parameters are counted by mode."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from typer.testing import CliRunner

from qvl.cli import app
from qvl.trainer.lora import LoraSettings
from qvl.trainer.plan import PlanSettings, build, count, measure, plan, prepare, step_at
from qvl.trainer.preset import load_preset

runner = CliRunner()

SMALL = """
name = "small"
tokenizer = "qwen-vl"
image_tokens = 16
activation_checkpointing = false
[vision]
class_token = false
width = 64
layers = 2
heads = 4
patch_size = 14
[adapter]
heads = 4
stored_positions = true
[llm]
vocab_size = 1000
hidden_size = 64
num_hidden_layers = 3
num_attention_heads = 4
num_key_value_heads = 4
head_dim = 16
intermediate_size = 160
tie_word_embeddings = false
[stages]
resolution = [56, 56, 56]
seq_len = [64, 64, 64]
"""
EVERY = ("vision", "adapter", "llm")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "small.toml"
    path.write_text(SMALL)
    return str(path)


@pytest.mark.parametrize("mode,trains,ckpt", [("full", EVERY, False), ("full", ("adapter", "llm"), True),
                                              ("lora", (), False)])
def test_meta_device_saves_what_a_real_cpu_run_saves(small, mode, trains, ckpt):
    s = PlanSettings(preset=small, mode=mode, micro_batch=2, lora_base=mode == "lora")
    cfg = load_preset(small)
    real = measure(cfg, s, trains, 56, 64, torch.float32, ckpt, device="cpu", depths=(1, 2))
    meta = measure(cfg, s, trains, 56, 64, torch.float32, ckpt, depths=(1, 2))
    assert [fit.measured for fit in real] == [fit.measured for fit in meta]  # saved, and the peak
    saved, peak = meta
    assert 0 < saved.per_llm_layer and all(peak.measured[k] > saved.measured[k] for k in saved.measured)


def test_fit_on_one_and_two_layers_predicts_three(small):
    cfg, s = load_preset(small), PlanSettings(preset=small)
    for dtype in (torch.float32, torch.bfloat16):
        for ckpt in (False, True):
            saved, peak = measure(cfg, s, EVERY, 56, 64, dtype, ckpt, depths=(1, 2))
            assert step_at(cfg, s, EVERY, 56, 64, dtype, ckpt, 3, 3) == (saved.predict(3, 3), peak.predict(3, 3))
    bf16, _ = measure(cfg, s, EVERY, 56, 64, torch.bfloat16, False, depths=(1, 2))
    fp32, _ = measure(cfg, s, EVERY, 56, 64, torch.float32, False, depths=(1, 2))
    assert bf16.per_llm_layer < fp32.per_llm_layer  # bf16 halves most of what is kept (RMSNorm keeps fp32)


def test_checkpointing_keeps_only_layer_inputs(small):
    cfg, s = load_preset(small), PlanSettings(preset=small)
    kept, kept_peak = measure(cfg, s, EVERY, 56, 64, torch.float32, False, depths=(1, 2))
    redone, redone_peak = measure(cfg, s, EVERY, 56, 64, torch.float32, True, depths=(1, 2))
    assert redone.per_llm_layer == 64 * 64 * 4  # one [1, 64 tokens, 64] fp32 input per layer
    assert redone.per_vit_block < kept.per_vit_block and redone.per_llm_layer < kept.per_llm_layer
    assert redone_peak.per_llm_layer < kept_peak.per_llm_layer


def test_parameters_by_mode(small):
    cfg = load_preset(small)
    h, ff, r, layers, vocab = 64, 160, 8, 3, 1000
    lora = count(prepare(build(cfg, 56), PlanSettings(mode="lora", lora=LoraSettings(r=r)), (), False))
    assert lora.lora == layers * (r * (h + 3 * h) + r * 2 * h + 2 * r * (h + ff))  # fused qkv: one A, B 3h x r
    assert lora.trainable == lora.lora and lora.modules_to_save == 0
    base = count(prepare(build(cfg, 56), PlanSettings(mode="lora", lora=LoraSettings(r=r), lora_base=True), (), False))
    assert base.modules_to_save == 2 * vocab * h and base.trainable == base.lora + base.modules_to_save
    assert base.nf4 == layers * (4 * h * h + 3 * h * ff)
    full = count(prepare(build(cfg, 56), PlanSettings(), ("adapter", "llm"), False))
    assert full.trainable == full.adapter - 16 * h + full.llm  # the adapter's stored positions stay frozen
    assert full.frozen == full.vision + 16 * h


def test_release_preset_is_the_release_config():
    from qvl.trainer.release import ReleaseConfig, VisualConfig, preset_from_config

    release = preset_from_config(ReleaseConfig(
        hidden_size=4096, num_attention_heads=32, num_hidden_layers=32, intermediate_size=22016,
        layer_norm_epsilon=1e-6, rotary_emb_base=10000, vocab_size=151936, kv_channels=128,
        visual=VisualConfig(width=1664, layers=48, heads=16, patch_size=14, mlp_ratio=4.9231, output_dim=4096,
                            image_size=448)))
    bundled = load_preset("qwen-vl-chat")
    assert bundled.architecture() == release.architecture()
    c = count(prepare(build(bundled, 448), PlanSettings(), EVERY, True))
    assert 9.6e9 < c.vision + c.adapter + c.llm < 9.7e9 and 1.8e9 < c.vision < 1.9e9


def test_plan_cli_prints_a_table(small):
    result = runner.invoke(app, ["plan", "--preset", small, "--stage", "2", "--gpus", "2"])
    assert result.exit_code == 0, result.output
    assert "activations: saved for backward" in result.output and "fits 24 / 40 / 80 GiB" in result.output
    lora = plan(PlanSettings(preset=small, mode="lora"))
    full = plan(PlanSettings(preset=small, gpus=1))
    assert lora.total < full.total and all(lora.fits().values())
    sharded = plan(dataclasses.replace(full.settings, gpus=4))
    assert sharded.total < full.total


@pytest.mark.parametrize("args,message", [(["--gpus", "0"], "--gpus 0"), (["--preset", "nope"], "preset 'nope'"),
                                          (["--q-lora", "--stage", "1"], "stage 1"),
                                          (["--cpu-offload", "--lora"], "--cpu-offload")])
def test_plan_bad_inputs_one_line(args, message):
    result = runner.invoke(app, ["plan", *args])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and message in result.output, result.output
