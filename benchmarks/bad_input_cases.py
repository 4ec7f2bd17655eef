"""Adversarial inputs whose cost must not grow with what they claim: one function per case,
each running the input at n times its base size (`bad_input_scaling.py` times them at 1x, 2x, 4x).

Trainer / `qvl convert` cases (issue #19): a release config.json claiming millions of layers
(the key map was built before any check: 4.4 GB at 10^6), and a safetensors header listing many
tensors (read once, linearly, and bounded at 16 MiB).
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

from qvl.errors import QvlError

_RELEASE = {"hidden_size": 128, "num_attention_heads": 2, "kv_channels": 64, "num_hidden_layers": 2,
            "intermediate_size": 64, "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000, "vocab_size": 512,
            "visual": {"heads": 2, "image_size": 28, "layers": 1, "mlp_ratio": 2.0, "output_dim": 128,
                       "patch_size": 14, "width": 32}}


def _safetensors(path: Path, keys: list[str]) -> None:
    """A valid safetensors file holding one float32 scalar per key (names are what the checks read)."""
    header = json.dumps({key: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
                         for i, key in enumerate(keys)}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * (4 * len(keys)))


def _release_keys() -> list[str]:
    import msgspec

    from qvl.trainer.release import ReleaseConfig, key_map, preset_from_config

    preset = preset_from_config(msgspec.convert(_RELEASE, ReleaseConfig))
    return [key for entry in key_map(preset) for key in entry[0]]


def trainer_convert_claimed_layers(n: int) -> None:
    """`convert from-qwen-vl` of a 2-layer release whose config.json claims 10^6 x n layers
    (was 4.4 GB of key map at 10^6 before any check); flat in n."""
    from qvl.trainer.release import from_qwen_vl

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        folder.mkdir()
        _safetensors(folder / "model.safetensors", _release_keys())
        (folder / "config.json").write_text(json.dumps({**_RELEASE, "num_hidden_layers": 10 ** 6 * n}))
        try:
            from_qwen_vl(folder, Path(tmp) / "out")
        except QvlError:
            pass


def trainer_convert_layers_beyond_the_files(n: int) -> None:
    """A config whose layer count is in range (250 x n) but beyond the 2 layers the files hold:
    refused from the headers before the key map or the model's shapes are built."""
    from qvl.trainer.release import from_qwen_vl

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        folder.mkdir()
        _safetensors(folder / "model.safetensors", _release_keys())
        (folder / "config.json").write_text(json.dumps({**_RELEASE, "num_hidden_layers": 250 * n}))
        try:
            from_qwen_vl(folder, Path(tmp) / "out")
        except QvlError:
            pass


def trainer_safetensors_header(n: int) -> None:
    """A safetensors header listing 20,000 x n tensors, read and checked (linear)."""
    from qvl.trainer.checkpoint import read_safetensors_header

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        _safetensors(path, [f"t.{i}" for i in range(20_000 * n)])
        try:
            read_safetensors_header(path)
        except QvlError:
            pass
