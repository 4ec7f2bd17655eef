"""LoRA fine-tuning as the released finetune.py does it, on the tiny random release converted to
qvl: the trainable parameters are the release's (real peft on a module tree in the release's
names), LoRA on q/k/v with one A is LoRA on the fused c_attn, a run learns, saves only its
adapters, resumes bit-identically, merges exactly, exports to the release layout, generates the
same with adapters as merged, and refuses bad inputs in one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from qvl.cli import app
from qvl.errors import QvlError
from qvl.trainer import lora
from qvl.trainer.lora import load_checkpoint
from qvl.trainer.release import from_qwen_vl, to_qwen_vl
from qvl.trainer.settings import TrainSettings
from qvl.trainer.train import train
from tests.reference import release_forward as ref

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The tiny release as Qwen-VL-Chat, converted; the same weights as a base model's
    conversion (what `from-qwen-vl` writes for a folder named Qwen-VL); SFT shards; two images."""
    from qvl.formats.build import FormatSettings, run_format

    root = tmp_path_factory.mktemp("lora")
    sd = ref.random_release()
    hf = ref.write_release(root / "Qwen-VL-Chat", sd)
    from_qwen_vl(hf, root / "converted")
    base = root / "converted-base"
    shutil.copytree(root / "converted", base)
    meta = json.loads((base / "meta.json").read_text())
    (base / "meta.json").write_text(json.dumps({**meta, "converted_from": str(root / "Qwen-VL")}))
    images = root / "images"
    images.mkdir()
    Image.new("RGB", (90, 70), (200, 40, 40)).save(images / "red.png")
    Image.new("RGB", (60, 80), (30, 60, 220)).save(images / "blue.png")
    convo = root / "convo.jsonl"
    records = [{"id": f"c{i}", "conversations": [  # text only: 30 tokens a row, not 290 (the ViT is frozen anyway)
        {"from": "user", "value": question}, {"from": "assistant", "value": answer}]} for i, (question, answer) in
        enumerate([("Which colour is the sky?", "Blue, like the sea."), ("And a ripe tomato?", "Red, all of it.")] * 2)]
    convo.write_text("".join(json.dumps(r) + "\n" for r in records))
    run_format("sft", [convo], root / "sft", images, settings=FormatSettings(), show_progress=False)
    return {"root": root, "hf": hf, "sd": sd, "chat": root / "converted", "base": base, "images": images,
            "sft": root / "sft"}


def settings(world, out, **kw) -> TrainSettings:
    common = dict(stage=3, data=world["sft"], out=out, init=world["chat"], max_steps=6, log=False, data_workers=0,
                  activation_checkpointing=False,
                  overrides={"micro_batch": 1, "lr": 3e-2, "warmup_steps": 1, "min_lr": 3e-2},  # flat: resumes alike
                  lora=lora.LoraSettings())
    return TrainSettings(**{**common, **kw})


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- what trains: the release's count


class _Tree(nn.Module):
    """Modules at the release's names and shapes: Linear for 2-D weights, Embedding for wte;
    other tensors as parameters of a plain module. Enough for peft to find its targets."""

    def prepare_inputs_for_generation(self, *args, **kwargs):  # PeftModelForCausalLM reads it
        return kwargs


def release_tree(sd: dict[str, torch.Tensor]) -> nn.Module:
    root = _Tree()
    weights = {k.rsplit(".", 1)[0] for k, t in sd.items() if k.endswith(".weight") and t.ndim == 2}
    for key, tensor in sd.items():
        path, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        parent = root
        parts = path.split(".") if path else []
        owner = path if path in weights else None
        for i, part in enumerate(parts[:-1] if owner else parts):
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        if owner:
            name = parts[-1]
            if not hasattr(parent, name):
                out, inp = sd[path + ".weight"].shape
                parent.add_module(name, nn.Embedding(out, inp) if name == "wte" else
                                  nn.Linear(inp, out, bias=path + ".bias" in sd))
        else:
            parent.register_parameter(leaf, nn.Parameter(torch.empty(tensor.shape)))
    return root


def release_peft(sd, chat: bool) -> tuple[int, dict]:
    """Real peft with finetune.py's LoraConfig, its modules_to_save rule and get_peft_model: the
    trainable count, and the shapes of what peft saves (its adapter file)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    with torch.device("meta"):
        tree = release_tree(sd)
    config = LoraConfig(r=64, lora_alpha=16, target_modules=["c_attn", "attn.c_proj", "w1", "w2"], lora_dropout=0.05,
                        bias="none", task_type="CAUSAL_LM", modules_to_save=None if chat else ["wte", "lm_head"])
    model = get_peft_model(tree, config)
    return model.get_nb_trainable_parameters()[0], {k: tuple(t.shape) for k, t in get_peft_model_state_dict(model).items()}


@pytest.mark.parametrize("chat", [True, False])
def test_trainable_parameters_are_the_release_finetunes(world, chat):
    expected, saved = release_peft(world["sd"], chat)
    model, *_ = load_checkpoint(world["chat" if chat else "base"])
    init = world["chat" if chat else "base"]
    record = lora.record(lora.LoraSettings(), init)
    assert record["chat"] is chat  # the release's rule: "chat" in the name it came from
    lora.apply(model, lora.LoraSettings(), tuple(record["modules_to_save"]))
    h, r, inner, layers, vocab = 128, 64, 256, 2, 151936
    per_layer = (r * h + 3 * h * r) + 2 * r * h + 2 * (r * h + inner * r)  # c_attn, c_proj, w1, w2
    assert lora.count(model) == expected == layers * per_layer + (0 if chat else 2 * vocab * h)
    trained = set(lora.trainable(model))
    assert not any(name.startswith(("vision.", "adapter.")) for name in trained)  # the ViT and attn_pool too
    assert any(".q_proj.lora_A." in n for n in trained) and not any(".k_proj.lora_A." in n for n in trained)
    exported = lora.release_adapters(lora.trainable(model))  # what `convert lora-to-peft` writes
    assert {k: tuple(t.shape) for k, t in exported.items()} == saved


def test_shared_a_computes_lora_on_the_fused_c_attn(world):
    """q, k, v with one A, one dropout mask and three B's = peft's LoRA on the release's c_attn."""
    model, *_ = load_checkpoint(world["chat"])
    settings = lora.LoraSettings(r=8, dropout=0.5)
    lora.apply(model, settings, ())
    attn = model.llm.model.layers[0].self_attn
    with torch.no_grad():
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.lora_B["default"].weight.normal_()
    model.train()
    x = torch.randn(2, 5, 128)
    torch.manual_seed(7)
    ours = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
    base = [getattr(attn, f"{p}_proj").base_layer for p in "qkv"]
    weight, bias = torch.cat([b.weight for b in base]), torch.cat([b.bias for b in base])
    down = attn.q_proj.lora_A["default"].weight
    up = torch.cat([getattr(attn, f"{p}_proj").lora_B["default"].weight for p in "qkv"])
    torch.manual_seed(7)
    fused = F.linear(x, weight, bias) + F.linear(F.linear(F.dropout(x, 0.5, True), down), up) * (16 / 8)
    assert torch.allclose(ours, fused, atol=1e-5) and (ours - F.linear(x, weight, bias)).abs().max() > 0.1


# ---------------------------------------------------------------- a run


@pytest.fixture(scope="module")
def run(world, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("run")
    train(settings(world, out, checkpoint_every=3))
    return {"out": out, "checkpoint": out / "checkpoint"}


def test_a_lora_run_learns_and_saves_only_its_adapters(world, run):
    found = losses(run["out"])
    assert len(found) == 6 and sum(found[-2:]) < 0.7 * sum(found[:2]), found
    checkpoint = run["checkpoint"]
    assert not (checkpoint / "model.safetensors").exists()
    adapters, full = (checkpoint / lora.ADAPTERS).stat().st_size, (world["chat"] / "model.safetensors").stat().st_size
    assert adapters < 0.02 * full  # fp32 adapters against the bf16 model: 0.6% here
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["lora"]["base"]["path"] == str(world["chat"].resolve()) and meta["lora"]["modules_to_save"] == []
    assert meta["lora"]["r"] == 64 and meta["lora"]["alpha"] == 16 and meta["lora"]["dropout"] == 0.05


def test_resume_is_bit_identical(world, run, tmp_path):
    """Stopped at step 3 and resumed = the unbroken run, to the bit. The first half recomputes
    activations (the qwen-vl preset's default): the shared A's cache and dropout mask survive it."""
    train(settings(world, tmp_path, max_steps=3, activation_checkpointing=True))
    train(settings(world, tmp_path, resume=True))
    assert losses(tmp_path) == losses(run["out"])
    whole, split = (load_file(str(p / "checkpoint" / lora.ADAPTERS)) for p in (run["out"], tmp_path))
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)
    from qvl.trainer.train import RunError

    with pytest.raises(RunError, match="its LoRA r is 64, this run's 8 .--lora-r."):
        train(settings(world, tmp_path, resume=True, max_steps=7, lora=lora.LoraSettings(r=8)))
    with pytest.raises(RunError, match="a LoRA run's checkpoint .adapters only.: add --lora"):
        train(settings(world, tmp_path, resume=True, max_steps=7, lora=None))


def test_merged_logits_equal_the_adapters_and_generation_agrees(world, run, tmp_path):
    merged, *_ = load_checkpoint(run["checkpoint"])
    unmerged, *_ = lora.load(run["checkpoint"], merge=False)
    base, *_ = load_checkpoint(world["chat"])
    ids = torch.tensor([[151644, 872, 198, 9707, 11, 1128, 374, 419, 30, 151645]])
    with torch.no_grad():
        a, b, c = merged(ids, None), unmerged(ids, None), base(ids, None)
    assert (a - b).abs().max() < 1e-5 and (a - c).abs().max() > 1e-2
    result = runner.invoke(app, ["convert", "merge", str(run["checkpoint"]), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    prompt = ["--prompt", "<img>red.png</img>What colour dominates?", "--images", str(world["images"]), "--chat",
              "--max-new-tokens", "5", "--json"]
    outputs = [runner.invoke(app, ["generate", "--checkpoint", str(c)] + prompt)
               for c in (run["checkpoint"], tmp_path / "merged")]
    assert all(o.exit_code == 0 for o in outputs), outputs[0].output
    assert json.loads(outputs[0].output) == json.loads(outputs[1].output)
    from qvl.trainer.data import load_image
    from qvl.trainer.generate import greedy_batch, render_prompt

    on_disk, _, tok, _ = load_checkpoint(tmp_path / "merged")
    prompt_ids, _ = render_prompt(tok, 256, "<img>red.png</img>What colour dominates?", chat=True)
    pixels = load_image((world["images"] / "red.png").read_bytes(), 56)[None]
    tokens = [greedy_batch(m, tok, [prompt_ids], pixels, 6, min_new_tokens=6)[0] for m in (unmerged, on_disk)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 6


def test_to_qwen_vl_merges_into_the_release_layout(world, run, tmp_path):
    from qvl.trainer.release import Tensors, _weight_files

    to_qwen_vl(run["checkpoint"], tmp_path / "hf", world["hf"])
    written = Tensors(*_weight_files(tmp_path / "hf"))
    assert {k: tuple(e.shape) for k, e in written.entries.items()} == {k: tuple(t.shape) for k, t in world["sd"].items()}
    vit = "transformer.visual.transformer.resblocks.0.attn.in_proj.weight"
    assert torch.equal(written.get(vit), world["sd"][vit].bfloat16().float())  # frozen: only the LLM moved
    c_attn = "transformer.h.0.attn.c_attn.weight"
    assert (written.get(c_attn) - world["sd"][c_attn].bfloat16().float()).abs().max() > 1e-4
    assert not list((tmp_path).glob(".merged-*"))


def test_adapters_load_into_the_release_model_with_peft(world, run, tmp_path):
    """`convert lora-to-peft`: real peft's PeftModel.from_pretrained on a model in the release's
    names gets the LoRA deltas qvl trained (c_attn's = q, k, v's stacked)."""
    from peft import PeftModel

    result = runner.invoke(app, ["convert", "lora-to-peft", str(run["checkpoint"]), "--out", str(tmp_path / "peft")])
    assert result.exit_code == 0, result.output
    tree = release_tree(world["sd"])
    tree.load_state_dict(world["sd"])
    release = PeftModel.from_pretrained(tree, str(tmp_path / "peft"))
    ours, *_ = lora.load(run["checkpoint"], merge=False)
    for n in range(2):
        theirs, mine = getattr(release.base_model.model.transformer.h, str(n)), ours.llm.model.layers[n]
        pairs = [(theirs.attn.c_attn, [mine.self_attn.q_proj, mine.self_attn.k_proj, mine.self_attn.v_proj]),
                 (theirs.attn.c_proj, [mine.self_attn.o_proj]), (theirs.mlp.w1, [mine.mlp.up_proj]),
                 (theirs.mlp.w2, [mine.mlp.gate_proj])]
        for module, parts in pairs:
            expected = torch.cat([p.get_delta_weight("default") for p in parts])
            assert torch.allclose(module.get_delta_weight("default"), expected, atol=1e-7)
            assert expected.abs().max() > 1e-4  # trained: not the zero update of a fresh B
    assert release.peft_config["default"].r == 64 and release.peft_config["default"].lora_alpha == 16


# ---------------------------------------------------------------- refusals


def test_a_base_that_is_not_the_recorded_one_is_one_line(world, run, tmp_path):
    """generate and eval: a changed base, a missing one, a recorded one that is gone: one line
    each naming both; a copied base (another path) is accepted."""
    other = tmp_path / "other"
    shutil.copytree(world["chat"], other)
    weights = load_file(str(other / "model.safetensors"))
    save_file({k: v * 1.01 for k, v in weights.items()}, str(other / "model.safetensors"), {"format": "pt"})
    args = ["generate", "--checkpoint", str(run["checkpoint"]), "--prompt", "Hi", "--max-new-tokens", "1"]
    wrong = runner.invoke(app, args + ["--base", str(other)])
    assert wrong.exit_code == 1 and wrong.output.count("\n") == 1, wrong.output
    assert f"trained on {world['chat'].resolve()}" in wrong.output and f"{other} is another model" in wrong.output
    missing = runner.invoke(app, args + ["--base", str(tmp_path / "gone")])
    assert missing.exit_code == 1 and "gone is missing (no model.safetensors)" in missing.output
    moved = tmp_path / "moved-base"
    shutil.copytree(world["chat"], moved)  # a copy: new path and mtime, same fingerprint
    assert runner.invoke(app, args + ["--base", str(moved)]).exit_code == 0
    lost = tmp_path / "lost"  # the checkpoint of a run whose recorded base is gone
    shutil.copytree(run["checkpoint"], lost)
    meta = json.loads((lost / "meta.json").read_text())
    meta["lora"]["base"]["path"] = str(tmp_path / "was-here")
    (lost / "meta.json").write_text(json.dumps(meta))
    gone = runner.invoke(app, ["generate", "--checkpoint", str(lost), "--prompt", "Hi"])
    assert gone.exit_code == 1 and gone.output.count("\n") == 1 and "was-here is missing" in gone.output
    assert "give --base" in gone.output
    data = tmp_path / "ref.jsonl"
    data.write_text(json.dumps({"image": "red.png", "sent": "the red", "bbox": [2, 3, 20, 25], "width": 90,
                                "height": 70}) + "\n")
    evaluate = ["eval", "grounding", "--data", str(data), "--checkpoint", str(run["checkpoint"]), "--images",
                str(world["images"]), "--device", "cpu", "--no-progress"]
    scored = runner.invoke(app, evaluate + ["--out", str(tmp_path / "e1"), "--base", str(world["chat"])])
    assert scored.exit_code == 0 and json.loads((tmp_path / "e1" / "metrics.json").read_text())["n"] == 1, scored.output
    refused = runner.invoke(app, evaluate + ["--out", str(tmp_path / "e2"), "--base", str(other)])
    assert refused.exit_code == 1 and f"{other} is another model" in refused.output
    # a LoRA-merged base: the same file but for the LLM's linears (which the old fingerprint,
    # 64 blocks of the file, landing mostly in wte/lm_head, let pass)
    merged = tmp_path / "merged-base"
    shutil.copytree(world["chat"], merged)
    base_weights = load_file(str(world["chat"] / "model.safetensors"))
    trained, *_ = load_checkpoint(run["checkpoint"])
    state = trained.state_dict()
    linears = [k for k in base_weights if k.startswith("llm.model.layers.") and "_proj." in k]
    assert sum(not torch.equal(state[k].to(base_weights[k].dtype), base_weights[k]) for k in linears) == 12  # 6 a layer
    save_file({k: state[k].to(v.dtype) if k in linears else v for k, v in base_weights.items()},
              str(merged / "model.safetensors"), {"format": "pt"})
    assert lora._legacy_fingerprint(merged / "model.safetensors") == lora._legacy_fingerprint(
        world["chat"] / "model.safetensors")  # what the old scheme missed
    swapped = runner.invoke(app, args + ["--base", str(merged)])
    assert swapped.exit_code == 1 and swapped.output.count("\n") == 1, swapped.output
    assert f"trained on {world['chat'].resolve()}" in swapped.output and f"{merged} is another model" in swapped.output
    # --base given a LoRA checkpoint; --base for a checkpoint of whole weights; a recorded path with control characters
    adapters_only = runner.invoke(app, args + ["--base", str(lost)])
    assert adapters_only.exit_code == 1 and "is a LoRA run's checkpoint too" in adapters_only.output
    whole = runner.invoke(app, ["generate", "--checkpoint", str(world["chat"]), "--prompt", "Hi", "--base", str(other)])
    assert whole.exit_code == 1 and "is not a LoRA run's checkpoint" in whole.output and "drop --base" in whole.output
    meta["lora"]["base"]["path"] = str(tmp_path / "was\x1b[2Jhere")
    (lost / "meta.json").write_text(json.dumps(meta))
    escaped = runner.invoke(app, ["generate", "--checkpoint", str(lost), "--prompt", "Hi"])
    assert escaped.exit_code == 1 and "\x1b" not in escaped.output and "was\\x1b[2Jhere" in escaped.output, escaped.output


@pytest.mark.parametrize("field, value, message", [
    ("r", 1_000_000_000, "<= 4096 - at `$.lora.r`"), ("r", -8, ">= 1 - at `$.lora.r`"),
    ("dropout", 2.0, "< 1.0 - at `$.lora.dropout`"), ("alpha", 0, "> 0.0 - at `$.lora.alpha`"),
    ("alpha", -16, "> 0.0 - at `$.lora.alpha`"), ("alpha", 1e300, "<= 10000.0 - at `$.lora.alpha`"),
    ("extra", 1, "unknown field `extra` - at `$.lora`"),
])
def test_a_damaged_lora_record_is_one_line(run, tmp_path, field, value, message):
    """meta.json's lora record in the ranges the options take, no unknown keys: one line naming the file and field."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    meta = json.loads((run["checkpoint"] / "meta.json").read_text())
    meta["lora"][field] = value
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(QvlError) as e:
        lora.read_record(folder)
    assert str(e.value).startswith(str(folder / "meta.json")) and message in str(e.value) and "\n" not in str(e.value)


def test_damaged_adapters_are_one_line(world, run, tmp_path):
    """A rank above the layers' width, NaN and integer adapter tensors: one line naming the file, field or tensor."""
    folder = tmp_path / "ckpt"
    shutil.copytree(run["checkpoint"], folder)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "lora": {**meta["lora"], "r": 4096}}))
    with pytest.raises(lora.LoraError, match=r"meta.json: lora.r 4096: above the width of a layer it adapts .* "
                                             r"min\(in, out\) = 128"):
        lora.load(folder)
    (folder / "meta.json").write_text(json.dumps(meta))
    tensors = load_file(str(folder / lora.ADAPTERS))
    key = sorted(tensors)[0]
    for damaged, message in [({key: torch.full_like(tensors[key], float("nan"))}, f"tensor {key} holds NaN"),
                             ({key: tensors[key].to(torch.int8)}, f"tensor {key} is I8; adapters are floating point")]:
        save_file({**tensors, **damaged}, str(folder / lora.ADAPTERS))
        with pytest.raises(QvlError, match=message) as e:
            lora.load(folder)
        assert str(e.value).startswith(str(folder / lora.ADAPTERS))
        exported = runner.invoke(app, ["convert", "lora-to-peft", str(folder), "--out", str(tmp_path / "peft")])
        assert exported.exit_code == 1 and message in exported.output and not (tmp_path / "peft").exists()
    save_file({k: v.half() for k, v in tensors.items()}, str(folder / lora.ADAPTERS))
    lora.load(folder)  # fp16 adapters: upcast


@pytest.mark.parametrize("extra, message", [
    (["--stage", "1", "--lora"], "--lora: stage 1 trains the ViT and adapter with the LLM frozen"),
    (["--stage", "3", "--lora", "--lora-r", "0"], "--lora-r 0: the adapters' rank, an integer from 1 to 4,096"),
    (["--stage", "3", "--lora", "--lora-dropout", "1"], "--lora-dropout 1.0: a probability from 0 to below 1"),
    (["--stage", "3", "--q-lora"], "--q-lora needs --lora"),
    (["--stage", "3", "--lora-base"], "--lora-base needs --lora"),
    (["--stage", "3", "--lora", "--lora-alpha", "1e6"], "--lora-alpha 1000000.0: above 0 and at most 10,000"),
    (["--stage", "3", "--lora", "--q-lora", "--lora-base"], "--q-lora with --lora-base: the release's Q-LoRA trains no"),
    (["--stage", "3", "--lora", "--lora-r", "4096"], "--lora-r 4096: above the width of a layer it adapts"),
])
def test_bad_lora_options_are_one_line(world, tmp_path, extra, message):
    result = runner.invoke(app, ["train", "--data", str(world["sft"]), "--out", str(tmp_path / "r"), "--init",
                                 str(world["chat"]), "--max-steps", "1", "--no-progress"] + extra)
    assert result.exit_code == 1 and message in result.output and result.output.count("\n") == 1, result.output


def test_lora_needs_a_whole_init(world, run, tmp_path):
    with pytest.raises(lora.LoraError, match="--lora needs --init"):
        train(settings(world, tmp_path / "a", init=None))
    lora.check(lora.LoraSettings(), 2, world["chat"], False)  # stage 2 trains the LLM: LoRA is allowed
    with pytest.raises(lora.LoraError, match="checkpoint: no model.safetensors .a LoRA run's checkpoint holds its "):
        train(settings(world, tmp_path / "b", init=run["checkpoint"]))
    with pytest.raises(lora.LoraError, match="checkpoint: a LoRA run's checkpoint .* qvl convert merge makes a base"):
        train(settings(world, tmp_path / "c", init=run["checkpoint"], lora=None))  # full training from it


def test_q_lora_trains_on_a_4bit_base(world, tmp_path):
    """bitsandbytes quantises NF4 on the CPU here: the LLM's blocks in 4 bits, LoRA on top."""
    bnb = pytest.importorskip("bitsandbytes")
    from qvl.trainer.train import loop, setup

    s = settings(world, tmp_path, max_steps=3, lora=lora.LoraSettings(q_lora=True))
    r = setup(s)
    attn = r.model.llm.model.layers[0].self_attn
    assert isinstance(attn.q_proj.base_layer, bnb.nn.Linear4bit) and attn.q_proj.base_layer.weight.dtype == torch.uint8
    assert lora.count(r.model) == release_peft(world["sd"], chat=True)[0]  # Q-LoRA: no modules_to_save
    loop(r)
    r.save()
    found = losses(tmp_path)
    assert len(found) == 3 and found[-1] < found[0], found
    merged, *_ = load_checkpoint(tmp_path / "checkpoint")  # on the full-precision base
    assert isinstance(merged.llm.model.layers[0].self_attn.q_proj, nn.Linear)


@pytest.mark.parametrize("precision, frozen", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_frozen_base_is_kept_in_bf16_when_computing_in_bf16(world, tmp_path, precision, frozen):
    """What `qvl plan` counts for LoRA: the frozen base in bf16 (half of 4 bytes a parameter), the
    adapters fp32 for AdamW."""
    from qvl.trainer.train import setup

    run = setup(settings(world, tmp_path / "run", precision=precision))
    kinds = {(p.requires_grad, p.dtype) for p in run.model.parameters()}
    assert kinds == {(False, frozen), (True, torch.float32)}


def test_a_nan_loss_and_plan_refusals_are_one_line(world, tmp_path, monkeypatch):
    """A NaN loss stops train in one line; `qvl plan` refuses --q-lora --lora-base as train does,
    and plans a preset without a vocab_size, as tiny (its vocabulary from its tokenizer)."""
    tiny = (tmp_path / "tiny.toml")
    from qvl.trainer.preset import PRESETS

    text = (PRESETS / "tiny.toml").read_text()
    tiny.write_text(text.replace('name = "tiny"', 'name = "inner"').replace("hidden_size = 192", "hidden_size = 64"))
    refused = runner.invoke(app, ["plan", "--q-lora", "--lora-base"])
    assert refused.exit_code == 1 and "--q-lora with --lora-base" in refused.output and refused.output.count("\n") == 1
    for preset in ("tiny", str(tiny)):  # no vocab_size in [llm]: its tokenizer's, as qvl train builds it
        planned = runner.invoke(app, ["plan", "--preset", preset, "--lora"])
        assert planned.exit_code == 0 and "fits 24 / 40 / 80 GiB" in planned.output, planned.output
    monkeypatch.setattr("torch.nn.functional.cross_entropy", lambda logits, *a, **k: logits.sum(1) * float("nan"))
    result = runner.invoke(app, ["train", "--data", str(world["sft"]), "--out", str(tmp_path / "r"), "--init",
                                 str(world["chat"]), "--max-steps", "1", "--no-progress", "--stage", "3", "--lora", "--micro-batch", "1",
                                 "--accumulation", "1", "--data-workers", "0"])
    last = result.output.splitlines()[-1]  # after train's header line
    assert result.exit_code == 1 and last.startswith("error: step 0: loss is nan on samples"), result.output
    assert "Traceback" not in result.output


def test_a_base_from_a_bucket_is_recorded_by_its_url(world, s3, tmp_path):
    """--init s3://…: the record names the URL, not this machine's mirror of it; on "another
    machine" (the mirror gone) loading the adapters fetches the base from the bucket again."""
    from qvl.common import remote

    shutil.copytree(world["chat"], tmp_path / "chat")
    shutil.copytree(world["chat"], tmp_path / "upload" / "checkpoint",  # as a run with --out s3://… leaves it
                    ignore=shutil.ignore_patterns(".qvl"))
    run = s3.bucket() + "/runs/chat"
    remote.publish(tmp_path / "upload", run, show_progress=False)
    url = run + "/checkpoint"
    done = runner.invoke(app, ["train", "--stage", "3", "--lora", "--init", url, "--data", str(world["sft"]),
                               "--out", str(tmp_path / "run"), "--max-steps", "1", "--micro-batch", "1",
                               "--accumulation", "1", "--data-workers", "0", "--no-progress"])
    assert done.exit_code == 0, done.output
    checkpoint = tmp_path / "run" / "checkpoint"
    assert json.loads((checkpoint / "meta.json").read_text())["lora"]["base"]["path"] == url
    shutil.rmtree(remote.cache_root())
    fetched = load_checkpoint(checkpoint)[0].state_dict()
    assert (remote.cache_root() / "mirror").is_dir()
    local = load_checkpoint(checkpoint, base=tmp_path / "chat")[0].state_dict()
    assert fetched.keys() == local.keys() and all(torch.equal(fetched[k], local[k]) for k in local)


@pytest.mark.parametrize("url, message", [
    ("s3://", "names no bucket"), ("s3://no-such-bucket-qvl/run/checkpoint", "no credentials found"),
    ("nosuch://b/x", "cannot open this kind of URL"), ("http://127.0.0.1:9/x", "no such file or folder"),
    ("s3://b/" + "a" * 5000, "more characters"), ("x" * 100_000, "is missing (no model.safetensors)"),
])
def test_a_recorded_base_url_that_cannot_be_fetched_is_one_line(run, tmp_path, monkeypatch, url, message):
    """meta.json's base a URL that names no bucket, needs credentials nobody gave, no protocol
    qvl reads, nothing there, 5,000 characters, or a path no file system takes: one line, quickly,
    never a traceback."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    lost = tmp_path / "lost"
    shutil.copytree(run["checkpoint"], lost)
    meta = json.loads((lost / "meta.json").read_text())
    meta["lora"]["base"]["path"] = url
    (lost / "meta.json").write_text(json.dumps(meta))
    done = runner.invoke(app, ["generate", "--checkpoint", str(lost), "--prompt", "Hi"])
    assert done.exit_code == 1 and done.output.startswith("error: ") and done.output.count("\n") == 1, done.output
    assert message in done.output and len(done.output) < 2100, done.output
