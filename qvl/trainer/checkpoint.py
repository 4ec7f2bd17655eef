"""A qvl checkpoint folder: ``model.safetensors`` (the whole model), ``preset.json`` (the
architecture it was built with), ``meta.json`` (stage, step, resolution) and, for resuming,
``state.pt``. The preset travels with the weights, so ``qvl generate``, ``qvl train --init``
(and evaluation) need no ``--preset``; one given that builds another architecture is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

from qvl.errors import QvlError
from qvl.trainer.model import ModelConfig, QwenVL, load_preset


class CheckpointError(QvlError):
    pass


def read_preset(folder: str | Path, explicit: str | None = None) -> ModelConfig:
    """The checkpoint's preset; ``explicit`` (a name or file) may replace it only when it
    builds the same architecture (its stage table may differ)."""
    folder = Path(folder)
    carried = folder / "preset.json"
    chosen = load_preset(explicit) if explicit else None
    if not carried.is_file():  # checkpoints written before presets travelled with them
        if chosen is None:
            meta = _meta(folder)
            try:
                return load_preset(meta.get("preset", "tiny"))
            except ValueError:
                raise CheckpointError(f"{folder}: no preset.json; give the preset it was trained with "
                                      "(--preset)") from None
        return chosen
    own = load_preset(str(carried))
    if chosen is not None and chosen.architecture() != own.architecture():
        raise CheckpointError(f"--preset {explicit}: builds another model than the checkpoint {folder} holds "
                              f"(its preset: {own.name}); leave --preset out to use the checkpoint's")
    return chosen or own


def _meta(folder: Path) -> dict:
    path = folder / "meta.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a checkpoint folder (no meta.json; give a run's checkpoint/ folder "
                              "or the --out of qvl convert)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def load_checkpoint(folder: str | Path, explicit_preset: str | None = None):
    """(model in eval mode, preset, tokenizer, meta) of a checkpoint folder, on the CPU."""
    from safetensors.torch import load_model

    from qvl.formats.tokenizers import IMG_PAD, load_tokenizer

    folder = Path(folder)
    meta = _meta(folder)
    preset = read_preset(folder, explicit_preset)
    tok = load_tokenizer(preset.tokenizer)
    model = QwenVL(preset, tok.vocab_size, tok.special(IMG_PAD), int(meta["resolution"]))
    try:
        load_model(model, str(folder / "model.safetensors"))
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{folder / 'model.safetensors'}: cannot load into preset {preset.name} "
                              f"({str(e)[:300]})") from None
    return model.eval(), preset, tok, meta
