"""The model's pieces: adapter shapes at 224 and 448, positions, no attention across packed samples."""

from __future__ import annotations

import torch

from qvl.trainer.data import collate
from qvl.trainer.model import Adapter, QwenVL, VisionEncoder, load_preset, sincos_2d


def test_adapter_shapes_at_224_and_448():
    vision = VisionEncoder({"width": 64, "layers": 1, "heads": 2, "patch_size": 14}, 224)
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
    vision = VisionEncoder({"width": 32, "layers": 1, "heads": 2, "patch_size": 8}, 32)
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
