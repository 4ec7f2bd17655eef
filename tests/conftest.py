from __future__ import annotations

import os
from pathlib import Path

import pytest

from qvl.demo.world import write_annotations
from qvl.formats.build import FormatSettings, run_format

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# The real data beside a development checkout (and in CI); absent on a user's machine.
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} not present")


@pytest.fixture
def shared_data() -> Path:
    return SHARED_DATA


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
