"""The released Qwen-VL in qvl, proven on a tiny random model in the release's layout: the
conversion fills every tensor, qvl's logits equal a transcription of the release's forward to
1e-5 (fp32), greedy generation agrees, the round trip is bit-identical, and the converted model
fine-tunes with `qvl train --stage 3` on `qvl format sft` shards."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from qvl.cli import app
from qvl.formats.tokenizers import load_tokenizer
from qvl.trainer.checkpoint import load_checkpoint
from qvl.trainer.generate import render_prompt
from qvl.trainer.release import ConvertError, from_qwen_vl, to_qwen_vl
from tests.reference import release_forward as ref

runner = CliRunner()


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("release")
    sd = ref.random_release()
    folder = ref.write_release(root / "Qwen-VL-Chat", sd)
    images = root / "images"
    images.mkdir()
    Image.new("RGB", (90, 70), (200, 40, 40)).save(images / "red.png")
    pixels = torch.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(images / "ramp.png")
    converted = root / "ckpt"
    meta = from_qwen_vl(folder, converted)
    # what the release computes with: its weights as stored (bf16), in fp32
    return {"root": root, "hf": folder, "ckpt": converted, "meta": meta, "images": images,
            "sd": {k: v.to(torch.bfloat16).float() for k, v in sd.items()}}


def test_conversion_fills_every_tensor_and_keeps_the_dtype(release):
    weights = load_file(str(release["ckpt"] / "model.safetensors"))
    model, preset, tok, meta = load_checkpoint(release["ckpt"])
    assert set(weights) == set(model.state_dict())
    assert len(weights) == release["meta"]["tensors"] and {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert preset.llm.intermediate_size == 256 and preset.adapter.heads == 1 and meta["resolution"] == 56
    # the stored Resampler positions are loaded, not recomputed
    assert torch.equal(weights["adapter.pos_embed"], release["sd"]["transformer.visual.attn_pool.pos_embed"].bfloat16())
    assert not model.adapter.pos_embed.requires_grad


def _prompt(release, chat: bool):
    tok = load_tokenizer("qwen-vl")
    text = "Picture 1: <img>red.png</img>\nPicture 2: <img>ramp.png</img>\nWhich picture is red?"
    ids, refs = render_prompt(tok, 256, text, chat=chat)
    raw = [(release["images"] / r).read_bytes() for r in refs]
    return tok, ids, refs, raw


@pytest.mark.parametrize("with_images", [True, False])
def test_logits_equal_the_release_forward(release, with_images):
    model, _, tok, meta = load_checkpoint(release["ckpt"])
    if with_images:
        tok, ids, refs, raw = _prompt(release, chat=True)
        pixels_ref = torch.stack([ref.preprocess(b, 56) for b in raw])
        from qvl.trainer.data import load_image

        pixels = torch.stack([load_image(b, 56) for b in raw])
        assert torch.allclose(pixels, pixels_ref, atol=1e-6)
    else:
        ids, refs, pixels, pixels_ref = render_prompt(tok, 256, "Hello, what can you do?", chat=True)[0], [], None, None
    with torch.no_grad():
        ours = model(torch.tensor([ids]), pixels)[0]
        theirs = ref.logits(release["sd"], ref.TINY_CONFIG, ref.release_ids(ids, refs), pixels_ref)
    assert ours.shape == theirs.shape == (len(ids), 151936)
    assert (ours - theirs).abs().max().item() < 1e-5
    assert theirs.std() > 0.1  # not trivially equal


def test_greedy_generation_gives_the_release_tokens(release):
    tok, ids, refs, raw = _prompt(release, chat=True)
    stop = {tok.special("<|endoftext|>"), tok.special("<|im_end|>")}
    pixels = torch.stack([ref.preprocess(b, 56) for b in raw])
    expected = ref.greedy(release["sd"], ref.TINY_CONFIG, ref.release_ids(ids, refs), pixels, 6, stop)
    result = runner.invoke(app, ["generate", "--checkpoint", str(release["ckpt"]), "--images", str(release["images"]),
                                 "--prompt", "Picture 1: <img>red.png</img>\nPicture 2: <img>ramp.png</img>\n"
                                 "Which picture is red?", "--chat", "--max-new-tokens", "6", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["ids"] == expected and len(expected) == 6 and out["text"] == tok.decode(expected)


def test_round_trip_is_bit_identical_and_keeps_the_release_files(release, tmp_path):
    back = tmp_path / "hf"
    done = to_qwen_vl(release["ckpt"], back, release["hf"])
    index = json.loads((back / "model.safetensors.index.json").read_text())
    restored = {}
    for name in set(index["weight_map"].values()):
        restored.update(load_file(str(back / name)))
    original = {}
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        original.update(load_file(str(release["hf"] / name)))
    assert set(restored) == set(original) and done["tensors"] == len(original)
    for key, tensor in original.items():
        assert restored[key].dtype == tensor.dtype and torch.equal(restored[key].view(torch.int16),
                                                                  tensor.view(torch.int16)), key
    config = json.loads((back / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "torch_dtype"} == \
        {k: v for k, v in ref.TINY_CONFIG.items() if k != "torch_dtype"} and config["torch_dtype"] == "bfloat16"
    assert (back / "modeling_qwen.py").read_text() == (release["hf"] / "modeling_qwen.py").read_text()
    assert not list(back.glob("*.bin")) and not (back / "model.safetensors.index.json.bak").exists()


def test_pickled_shards_are_refused_and_bad_folders(release, tmp_path):
    bin_folder = ref.write_release(tmp_path / "bin", ref.random_release(seed=1), fmt="bin", dtype=torch.float32)
    with pytest.raises(ConvertError, match="a pickled PyTorch checkpoint; qvl reads only safetensors"):
        from_qwen_vl(bin_folder, tmp_path / "from-bin")
    fp32 = ref.write_release(tmp_path / "fp32", ref.random_release(seed=1), dtype=torch.float32)
    meta = from_qwen_vl(fp32, tmp_path / "from-fp32", dtype="bf16")
    assert meta["dtype"] == "torch.bfloat16" and meta["tensors"] == release["meta"]["tensors"]
    sd = ref.random_release(seed=2)
    sd["transformer.visual.extra"] = torch.zeros(3)
    del sd["transformer.h.1.mlp.w2.weight"]
    broken = ref.write_release(tmp_path / "broken", sd)
    with pytest.raises(ConvertError, match=r"no mapping uses: transformer.visual.extra; tensors missing: "
                                           r"transformer.h.1.mlp.w2.weight"):
        from_qwen_vl(broken, tmp_path / "x")
    sd = ref.random_release(seed=3)
    sd["transformer.h.0.mlp.w1.weight"] = sd["transformer.h.0.mlp.w1.weight"][:-1]
    with pytest.raises(ConvertError, match=r"llm.model.layers.0.mlp.up_proj.weight: shape \(255, 128\)"):
        from_qwen_vl(ref.write_release(tmp_path / "shape", sd), tmp_path / "y")
    result = runner.invoke(app, ["convert", "from-qwen-vl", str(tmp_path), "--out", str(tmp_path / "z")])
    assert result.exit_code == 1 and "no config.json" in result.output


def test_the_converted_model_fine_tunes_on_sft_shards(release, tmp_path):
    from qvl.formats.build import FormatSettings, run_format

    convo = tmp_path / "convo.jsonl"
    records = [{"id": f"c{i}", "conversations": [
        {"from": "user", "value": f"Picture 1: <img>{img}</img>\nWhat colour dominates?"},
        {"from": "assistant", "value": answer}]} for i, (img, answer) in
        enumerate([("red.png", "Red, all of it."), ("ramp.png", "A ramp of many colours.")] * 2)]
    convo.write_text("".join(json.dumps(r) + "\n" for r in records))
    run_format("sft", [convo], tmp_path / "sft", release["images"], settings=FormatSettings(), show_progress=False)
    (tmp_path / "short.toml").write_text("[stage]\nwarmup_steps = 1\n")  # the paper's 3,000 would hide the fall
    args = ["train", "--stage", "3", "--data", str(tmp_path / "sft"), "--out", str(tmp_path / "run"), "--init",
            str(release["ckpt"]), "--max-steps", "6", "--micro-batch", "2", "--lr", "2e-3", "--recipe",
            str(tmp_path / "short.toml"), "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and sum(losses[-2:]) < 0.7 * sum(losses[:2])
    carried = json.loads((tmp_path / "run" / "checkpoint" / "preset.json").read_text())
    assert carried["name"] == "qwen-vl-release"  # the preset travels on: generate and --init need no --preset
    weights = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    before = load_file(str(release["ckpt"] / "model.safetensors"))
    assert torch.equal(weights["vision.vit.conv1.weight"].bfloat16(), before["vision.vit.conv1.weight"])  # ViT frozen
    assert torch.equal(weights["adapter.pos_embed"].bfloat16(), before["adapter.pos_embed"])  # fixed in the release
    assert not torch.equal(weights["adapter.query"].bfloat16(), before["adapter.query"])
    wrong = runner.invoke(app, args[:-1] + ["--overwrite", "--preset", "tiny", "--no-progress"])
    assert wrong.exit_code == 1 and "builds another model than the checkpoint" in wrong.output
    bytes_shards = tmp_path / "bytes"
    run_format("sft", [convo], bytes_shards, release["images"], settings=FormatSettings(tokenizer="bytes"),
               show_progress=False)
    refused = runner.invoke(app, ["train", "--stage", "3", "--data", str(bytes_shards), "--out", str(tmp_path / "r2"),
                                  "--init", str(release["ckpt"]), "--max-steps", "1", "--no-progress"])
    assert refused.exit_code == 1 and "formatted with tokenizer bytes" in refused.output
