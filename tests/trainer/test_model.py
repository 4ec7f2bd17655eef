"""The model's pieces: adapter shapes at 224 and 448, positions, no attention across packed samples;
presets: typed, typos named, round trips."""

from __future__ import annotations

import json

import pytest
import torch

from qvl.trainer.adapter import Adapter, sincos_2d
from qvl.trainer.data import collate
from qvl.trainer.model import QwenVL
from qvl.trainer.preset import (
    PRESETS,
    PresetError,
    VisionConfig,
    load_preset,
    preset_from_dict,
)
from qvl.trainer.vision import VisionEncoder


def test_adapter_shapes_at_224_and_448():
    vision = VisionEncoder(VisionConfig(width=64, layers=1, heads=2, patch_size=14), 224)
    adapter = Adapter(256, 64, 96, 4)
    for res, patches in ((224, 256), (448, 1024)):
        vision.set_resolution(res)
        tokens = vision(torch.randn(2, 3, res, res))
        assert tokens.shape == (2, patches, 64)
        assert adapter(tokens).shape == (2, 256, 96)


def test_windowed_queries_read_only_their_own_cell():
    torch.manual_seed(0)
    adapter = Adapter(16, 32, 48, 4, window=True, slot_positions=True).eval()
    patches = torch.randn(1, 64, 32)  # an 8x8 patch grid: each of the 4x4 queries owns 2x2 patches
    changed = patches.clone().reshape(1, 8, 8, 32)
    changed[0, 6:, 6:] += 5.0  # only the bottom-right cell's patches
    a, b = adapter(patches), adapter(changed.reshape(1, 64, 32))
    moved = (a - b).abs().amax(-1)[0]
    assert moved[15] > 1e-3 and torch.all(moved[:15] == 0)
    # the same content everywhere still gives each slot its own token (its place on the grid)
    flat = adapter(torch.ones(1, 64, 32))[0]
    assert torch.unique(flat.round(decimals=6), dim=0).shape[0] == 16
    # a grid with fewer patches than queries: every query still sees its nearest patch
    assert adapter(torch.randn(2, 9, 32)).isfinite().all()


def test_position_embedding_interpolation_keeps_the_grid():
    vision = VisionEncoder(VisionConfig(width=32, layers=1, heads=2, patch_size=8), 32)
    before = vision.vit.positional_embedding.detach().clone()
    vision.set_resolution(64)
    vision.set_resolution(32)  # down again: bicubic there and back stays close
    assert vision.vit.positional_embedding.shape == before.shape
    assert torch.allclose(vision.vit.positional_embedding[0], before[0])  # class token untouched


def test_sincos_positions_differ_per_cell():
    pos = sincos_2d(16, 3, 3)
    assert pos.shape == (9, 16) and torch.unique(pos, dim=0).shape[0] == 9


def test_no_token_attends_across_packed_samples(micro):
    preset = load_preset(micro["preset"])
    torch.manual_seed(0)
    model = QwenVL(preset, 256 + 217, 256 + 216, 32).eval()
    a = {"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8], "images": [], "task": "text", "sample_ids": ["a"],
         "sample_lengths": [4]}
    b = {"input_ids": [9, 10, 11], "labels": [9, 10, 11], "images": [], "task": "text", "sample_ids": ["b"],
         "sample_lengths": [3]}
    packed = {**a, "input_ids": a["input_ids"] + b["input_ids"], "labels": a["labels"] + b["labels"],
              "sample_ids": ["a", "b"], "sample_lengths": [4, 3]}
    with torch.no_grad():
        outs = []
        for rows in ([a], [b], [packed]):
            batch = collate(rows, 32, 0)
            outs.append(model(batch.input_ids, None, batch.attention_mask, batch.position_ids))
    assert torch.allclose(outs[2][0, :4], outs[0][0], atol=1e-5)
    assert torch.allclose(outs[2][0, 4:], outs[1][0], atol=1e-5)


def test_a_packed_micro_batch_has_the_padded_batchs_loss_and_gradient(micro):
    """collate packs a micro-batch's rows into fewer, fuller rows: every sample still sees only
    itself and the same tokens are targets (a packed row's first label is not predicted from
    the row before it), so the loss, its gradient and each task's loss are the padded batch's."""
    from qvl.trainer.data import Shards, pack_rows
    from qvl.trainer.train import IGNORE_INDEX

    preset = load_preset(micro["preset"])
    rows = Shards(micro["multitask"]).tables([0])[0].slice(0, 12).to_pylist()
    rows.append({"input_ids": [65, 66, 67], "labels": [65, 66, 67], "images": [], "task": "text",
                 "sample_ids": ["t"], "sample_lengths": [3]})  # a text row: its first label is supervised
    lengths = [len(r["input_ids"]) for r in rows]
    assert len(pack_rows(lengths, max(lengths) * 2)) < len(rows)
    torch.manual_seed(0)
    model = QwenVL(preset, 256 + 217, 256 + 216, 32)
    results = []
    for pack_to in (None, max(lengths) * 2):
        batch = collate(rows, 32, 0, pack_to=pack_to)
        model.zero_grad()
        logits = model(batch.input_ids, batch.pixels, batch.attention_mask, batch.position_ids)
        targets = batch.labels[:, 1:]
        per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets,
                                                      ignore_index=IGNORE_INDEX, reduction="none")
        per_token.sum().backward()
        by_task = {}
        for row, spans in enumerate(batch.spans):
            for task, start, end in spans:
                by_task[task] = by_task.get(task, 0.0) + float(per_token[row, max(start - 1, 0):end - 1].detach().sum())
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((batch.input_ids.shape[0], int((targets != IGNORE_INDEX).sum()), float(per_token.detach().sum()),
                        grad, by_task, sorted(sum(batch.sample_ids, []))))
    (rows_padded, n_padded, loss_padded, grad_padded, tasks_padded, ids_padded), \
        (rows_packed, n_packed, loss_packed, grad_packed, tasks_packed, ids_packed) = results
    assert rows_packed < rows_padded and n_packed == n_padded and ids_packed == ids_padded
    assert abs(loss_packed - loss_padded) < 1e-3 * abs(loss_padded)
    assert torch.allclose(grad_packed, grad_padded, rtol=1e-3, atol=1e-5)
    assert tasks_packed.keys() == tasks_padded.keys() and all(
        abs(tasks_packed[t] - tasks_padded[t]) < 1e-3 * abs(tasks_padded[t]) for t in tasks_padded)


@pytest.mark.parametrize("name", ["tiny", "qwen-vl"])
def test_a_bundled_preset_round_trips_through_its_json(name):
    preset = load_preset(name)
    assert preset_from_dict(json.loads(json.dumps(preset.to_dict())), "preset.json") == preset


@pytest.mark.parametrize("part, typo", [("vision", "pos_tabel"), ("adapter", "widow"), ("llm", "hidden_sise")])
def test_a_misspelt_key_in_a_preset_toml_is_named(tmp_path, part, typo):
    path = tmp_path / "typo.toml"
    path.write_text((PRESETS / "tiny.toml").read_text().replace(f"[{part}]", f"[{part}]\n{typo} = 1"))
    with pytest.raises(PresetError, match=rf"typo.toml: \[{part}\]: unknown setting\(s\) {typo}"):
        load_preset(str(path))


def test_a_misspelt_key_in_a_checkpoints_preset_json_is_named(tmp_path):
    carried = load_preset("tiny").to_dict()
    carried["llm"]["num_hiden_layers"] = 3
    path = tmp_path / "preset.json"
    path.write_text(json.dumps(carried))
    with pytest.raises(PresetError, match=r"preset.json: \[llm\]: unknown setting\(s\) num_hiden_layers"):
        load_preset(str(path))


def test_a_preset_json_written_before_typed_configs_still_loads(tmp_path):
    """Older checkpoints carry only the keys their preset set."""
    path = tmp_path / "preset.json"
    path.write_text(json.dumps({"name": "tiny", "tokenizer": "bytes", "image_tokens": 16,
                                "vision": {"width": 128, "layers": 3, "heads": 4, "patch_size": 8, "mlp_ratio": 4.0},
                                "adapter": {"heads": 4, "window": True, "slot_positions": True},
                                "llm": {"hidden_size": 192, "num_hidden_layers": 3, "num_attention_heads": 4,
                                        "num_key_value_heads": 4, "intermediate_size": 512,
                                        "max_position_embeddings": 2048}}))
    assert load_preset(str(path)).architecture() == load_preset("tiny").architecture()


@pytest.mark.parametrize("class_token", [True, False])  # open_clip's ViT, and the release's PatchViT
def test_activation_checkpointing_keeps_less_and_changes_no_number(micro, class_token):
    """With checkpointing the forward pass keeps a fraction of the activations for the backward
    (the ViT blocks' and LLM layers' are recomputed), and the loss and every gradient are the ones
    kept activations give."""
    import dataclasses

    preset = load_preset(micro["preset"])
    preset = dataclasses.replace(preset, vision=dataclasses.replace(preset.vision, class_token=class_token))
    ids = torch.tensor([[256 + 216] * 4 + [5, 6, 7, 8] * 8, [9, 10] + [256 + 216] * 4 + [11, 12] * 15])
    pixels = torch.randn(2, 3, 32, 32)
    results = []
    for on in (False, True):
        torch.manual_seed(0)
        model = QwenVL(preset, 256 + 217, 256 + 216, 32).train()
        model.set_activation_checkpointing(on)
        kept = []

        def pack(t, kept=kept):
            kept.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(ids, pixels)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        sum(kept)))
    (loss_off, grads_off, kept_off), (loss_on, grads_on, kept_on) = results
    assert kept_on < 0.6 * kept_off  # what the forward pass holds for the backward
    assert torch.equal(loss_on, loss_off) and grads_on.keys() == grads_off.keys()
    assert all(torch.allclose(grads_on[n], grads_off[n], rtol=0, atol=1e-7) for n in grads_off)


def test_the_real_presets_checkpoint_activations_and_tiny_does_not():
    """On for qwen-vl (and the converted release: ``release.preset_from_config``), off for tiny;
    it is not part of the architecture a checkpoint must match."""
    assert load_preset("qwen-vl").activation_checkpointing and not load_preset("tiny").activation_checkpointing
    assert load_preset("qwen-vl").architecture() == preset_from_dict(
        {**load_preset("qwen-vl").to_dict(), "activation_checkpointing": False}, "x").architecture()
