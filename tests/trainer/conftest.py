from __future__ import annotations


import pytest

from qvl.demo.world import write_annotations
from qvl.formats.build import FormatSettings, run_format

MICRO_PRESET = """
name = "micro"
tokenizer = "bytes"
image_tokens = 4
[vision]
width = 32
layers = 2
heads = 2
patch_size = 8
[adapter]
heads = 2
[llm]
hidden_size = 32
num_hidden_layers = 2
num_attention_heads = 2
num_key_value_heads = 2
intermediate_size = 64
max_position_embeddings = 1024
[stages]
resolution = [32, 48, 48]
seq_len = [512, 512, 512]
lr = [3e-3, 3e-3, 3e-3]
min_lr = [1e-4, 1e-4, 1e-4]
warmup_steps = [2, 2, 2]
micro_batch = [4, 4, 4]
"""


@pytest.fixture(scope="session")
def micro(tmp_path_factory) -> dict:
    """A micro preset and multitask/SFT shards of the shape world formatted for it."""
    root = tmp_path_factory.mktemp("trainer")
    preset = root / "micro.toml"
    preset.write_text(MICRO_PRESET)
    world = write_annotations(root / "world", n_images=16, size=32)
    shards = {}
    for kind in ("multitask", "sft"):
        shards[kind] = root / kind
        run_format(kind, [world[kind]], shards[kind], world["images"],
                   settings=FormatSettings(tokenizer="bytes", image_tokens=4), show_progress=False)
    return {"preset": str(preset), "root": root, **shards}
