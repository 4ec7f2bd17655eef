"""Sharded training (FSDP2 under torchrun, 2 gloo CPU processes): the meta-device build filled
from --init, sharded DCP checkpoints resumed on 2 ranks and on 1, their consolidation, CPU
offload and activation checkpointing — and bf16's master weights."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from qvl.cli import app
from qvl.common import remote
from qvl.trainer.checkpoint import CheckpointError, load_checkpoint
from qvl.trainer.settings import SettingsError, TrainSettings
from qvl.trainer.train import RunError, train

SCRIPT = """
import json, sys
from pathlib import Path
import torch.distributed as dist
from qvl.trainer.settings import TrainSettings
from qvl.trainer.train import train
dist.init_process_group("gloo")  # joined once: runs one after another in the same processes keep it
for kwargs in json.loads(sys.argv[1]):
    train(TrainSettings(**{**kwargs, "out": Path(kwargs["out"]), "data": Path(kwargs["data"])}))
dist.destroy_process_group()
"""


class Exploit:
    """A pickle that runs a command when loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"echo code-ran > {self.path}",)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def torchrun(tmp_path: Path, port: int, *more: dict, **settings) -> None:
    """A run on 2 ranks; ``more``: runs after it in the same processes (a launch costs seconds)."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(port), str(script),
                           json.dumps([settings, *more], default=str)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_sharded_runs_resume_anywhere_and_consolidate(micro, s3, tmp_path):
    """Stage 3 from a stage-1 checkpoint at another resolution, sharded over 2 ranks, bf16:
    - built on the meta device and filled from --init: the frozen ViT (its position table
      interpolated 32 -> 48 px), stored in bf16, equals the one-process build's in bf16 bit for
      bit, the trained parts are fp32, and the first losses match one process with the same
      global batch;
    - 4 steps in one go (activation checkpointing and CPU offload on) equal 2 steps, then a
      resume from the sharded checkpoint to 4 (both off): same losses, same weights;
    - the step-2 checkpoint resumes in one process (no FSDP) with the next step's loss, a later
      save killed while writing its shards beside it; that one-process checkpoint (whole weights,
      AdamW state keyed by numbers) resumes on 2 ranks under FSDP and saves sharded;
    - the end-of-run model.safetensors equals `qvl convert consolidate` of the shards (beside
      them, into --out, and from a run in a bucket into a URL); a crafted
      .metadata or state.pt runs nothing, damaged shards, index or state.pt are one line each."""
    train(TrainSettings(stage=1, data=micro["multitask"], out=tmp_path / "s1", preset=micro["preset"], max_steps=1,
                        log=False))
    init = tmp_path / "s1" / "checkpoint"
    common = dict(stage=3, data=micro["sft"], init=init, log=False, checkpoint_every=2, data_workers=0,
                  precision="bf16")
    torchrun(tmp_path, 29541, out=tmp_path / "whole", max_steps=4, fsdp=True, activation_checkpointing=True,
             cpu_offload=True, **common)
    torchrun(tmp_path, 29542, out=tmp_path / "split", max_steps=2, fsdp=True, **common)
    shutil.copytree(tmp_path / "split", tmp_path / "one")

    killed = tmp_path / "one" / "checkpoint" / "shards-000000004-dead"  # a save killed while writing
    killed.mkdir()
    (killed / "__0_0.distcp").write_bytes(b"half")
    train(TrainSettings(out=tmp_path / "one", max_steps=3, resume=True, overrides={"accumulation": 2}, **common))
    assert not killed.exists() and not list((tmp_path / "one" / "checkpoint").glob("shards-*"))
    assert losses(tmp_path / "one")[:2] == losses(tmp_path / "whole")[:2]
    assert losses(tmp_path / "one")[2] == pytest.approx(losses(tmp_path / "whole")[2], rel=2e-3)

    # 2 -> 2 resumed; in the same launch the one-process checkpoint (whole weights, AdamW state
    # numbered) resumed on 2 ranks under FSDP, its next save sharded
    torchrun(tmp_path, 29543, dict(out=tmp_path / "one", max_steps=4, fsdp=True, resume=True, **common),
             out=tmp_path / "split", max_steps=4, fsdp=True, resume=True, **common)
    assert losses(tmp_path / "one")[3] == pytest.approx(losses(tmp_path / "whole")[3], rel=5e-3)
    assert len(list((tmp_path / "one" / "checkpoint").glob("shards-000000004-*"))) == 1
    assert torch.load(tmp_path / "one" / "checkpoint" / "state.pt", weights_only=True)["step"] == 4

    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    whole, split = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert whole.keys() == split.keys()
    assert all(torch.allclose(whole[k], split[k], rtol=0, atol=1e-6) for k in whole)

    train(TrainSettings(out=tmp_path / "eager", max_steps=2, overrides={"accumulation": 2}, **common))
    eager = weights(tmp_path / "eager")
    assert eager.keys() == whole.keys()
    for name, tensor in whole.items():  # the frozen ViT stored in bf16, the trained parts' masters in fp32
        assert tensor.dtype == (torch.bfloat16 if name.startswith("vision.") else torch.float32), name
    assert all(torch.equal(eager[k].to(torch.bfloat16), whole[k]) for k in whole if k.startswith("vision."))
    assert whole["vision.vit.positional_embedding"].shape[0] == 1 + 6 * 6
    assert losses(tmp_path / "eager") == pytest.approx(losses(tmp_path / "whole")[:2], rel=2e-3)

    checkpoint = tmp_path / "whole" / "checkpoint"
    (checkpoint / "model.safetensors").rename(tmp_path / "gathered.safetensors")
    with pytest.raises(CheckpointError, match=f"{checkpoint}: holds sharded weights only .*; "
                                              f"qvl convert consolidate {checkpoint} writes"):
        load_checkpoint(checkpoint)
    gathered = load_file(str(tmp_path / "gathered.safetensors"))

    def same_weights(folder: Path) -> None:
        consolidated = load_file(str(folder / "model.safetensors"))
        assert set(gathered) == set(consolidated)
        assert all(torch.equal(consolidated[k], gathered[k]) for k in gathered)
        load_checkpoint(folder)

    # a run in a bucket: read, never changed there; --out a new folder of whole weights (a URL too)
    run = s3.bucket() + "/whole"
    shutil.copytree(tmp_path / "whole", tmp_path / "upload")
    remote.publish(tmp_path / "upload", run, show_progress=False)
    done = CliRunner().invoke(app, ["convert", "consolidate", f"{run}/checkpoint"])
    assert done.exit_code == 1 and done.output.strip().startswith(f"error: {run}/checkpoint: a checkpoint in a bucket "
                                                                  "is read, not changed: give --out"), done.output
    for inside in (f"{run}/checkpoint", f"{run}/checkpoint/", f"{run}/checkpoint/whole"):  # the run's own objects
        done = CliRunner().invoke(app, ["convert", "consolidate", f"{run}/checkpoint", "--out", inside])
        assert done.exit_code == 1 and done.output.startswith(f"error: {run}/checkpoint"), done.output
        assert "is read, not changed" in done.output or "holds objects qvl did not write" in done.output, done.output
    assert (remote.input_any(f"{run}/checkpoint", show_progress=False) / "state.pt").is_file()
    done = CliRunner().invoke(app, ["convert", "consolidate", f"{run}/checkpoint", "--out", f"{run}-weights"])
    assert done.exit_code == 0, done.output
    same_weights(remote.input_folder(f"{run}-weights", show_progress=False))
    for _ in range(2):  # again into its own output: replaced
        done = CliRunner().invoke(app, ["convert", "consolidate", str(checkpoint), "--out", str(tmp_path / "weights")])
        assert done.exit_code == 0, done.output
        same_weights(tmp_path / "weights")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "others").mkdir()
    (tmp_path / "others" / "mine.txt").write_text("mine")
    for target, says in ((tmp_path / "notes.txt", "is a file, not a folder"), (tmp_path / "others", "is not a qvl output")):
        done = CliRunner().invoke(app, ["convert", "consolidate", str(checkpoint), "--out", str(target)])
        assert done.exit_code == 1 and done.output.startswith(f"error: {target}: ") and says in done.output, done.output
    assert (tmp_path / "notes.txt").read_text() == "mine" and [f.name for f in (tmp_path / "others").iterdir()] == \
        ["mine.txt"]
    assert not (checkpoint / "model.safetensors").exists()
    done = CliRunner().invoke(app, ["convert", "consolidate", str(checkpoint)])  # beside the shards
    assert done.exit_code == 0, done.output
    same_weights(checkpoint)

    # hostile or damaged files: one line naming the file, nothing run, no advice to unpickle
    shards = next(checkpoint.glob("shards-*"))
    index = (shards / ".metadata").read_bytes()

    def consolidate_fails(expected: str, *also: str) -> None:
        done = CliRunner().invoke(app, ["convert", "consolidate", str(checkpoint)])
        assert done.exit_code == 1 and len(done.output.strip().splitlines()) == 1, done.output
        assert done.output.startswith(f"error: {expected}") and "weights_only" not in done.output, done.output
        assert all(fragment in done.output for fragment in also), done.output

    (shards / ".metadata").write_bytes(pickle.dumps(Exploit(tmp_path / "PWNED")))
    consolidate_fails(f"{shards / '.metadata'}: not a DCP index qvl reads: it refers to posix.system")
    assert not (tmp_path / "PWNED").exists()
    (shards / ".metadata").write_bytes(b"\x80\x04garbage")
    consolidate_fails(f"{shards / '.metadata'}: damaged, or not a DCP index")
    (shards / ".metadata").write_bytes(index)
    (shards / "__0_0.distcp").write_bytes(b"\0" * (shards / "__0_0.distcp").stat().st_size)
    consolidate_fails(f"{shards / '__0_0.distcp'}", ": damaged (tensor model.")
    (checkpoint / "state.pt").write_bytes(pickle.dumps(Exploit(tmp_path / "PWNED")))
    consolidate_fails(f"{checkpoint / 'state.pt'}: damaged, or not written by qvl")
    assert not (tmp_path / "PWNED").exists()
    (checkpoint / "state.pt").unlink()
    consolidate_fails(f"{checkpoint}: not a sharded checkpoint (its model.safetensors is the whole model)")

    damaged = tmp_path / "split" / "checkpoint"
    index = next(damaged.glob("shards-*")) / ".metadata"
    saved = index.read_bytes()
    index.write_bytes(pickle.dumps(Exploit(tmp_path / "PWNED")))
    with pytest.raises(RunError, match=f"{index}: not a DCP index qvl reads: it refers to posix.system"):
        train(TrainSettings(out=tmp_path / "split", max_steps=5, resume=True, **common))
    assert not (tmp_path / "PWNED").exists()
    index.write_bytes(saved)
    shard = next(damaged.glob("shards-*")) / "__1_0.distcp"
    shard.unlink()
    with pytest.raises(RunError, match=f"{shard}: missing \\(a shard of this checkpoint\\)"):
        train(TrainSettings(out=tmp_path / "split", max_steps=5, resume=True, **common))


def test_sharded_build_from_an_llm_folder_is_the_whole_build(micro, tmp_path):
    """--llm FOLDER under --fsdp: the LLM's shards read from the folder's safetensors, the ViT
    and adapter given the random weights a one-process build gives them: the same model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qvl.trainer.preset import load_preset

    llm = load_preset(micro["preset"]).llm
    Qwen2ForCausalLM(Qwen2Config(vocab_size=473, **llm.qwen2_fields())).save_pretrained(tmp_path / "llm")
    common = dict(stage=2, data=micro["multitask"], preset=micro["preset"], llm=str(tmp_path / "llm"), max_steps=0,
                  precision="fp32", log=False, data_workers=0)
    torchrun(tmp_path, 29544, out=tmp_path / "two", fsdp=True, **common)
    train(TrainSettings(out=tmp_path / "one", **common))
    two, one = weights(tmp_path / "two"), weights(tmp_path / "one")
    assert two.keys() == one.keys()
    assert all(torch.equal(two[k], one[k]) for k in one)
    assert torch.equal(two["llm.model.layers.1.mlp.up_proj.weight"],
                       load_file(str(tmp_path / "llm" / "model.safetensors"))["model.layers.1.mlp.up_proj.weight"])
    done = CliRunner().invoke(app, ["convert", "consolidate", str(tmp_path / "one" / "checkpoint")])
    assert done.exit_code == 1
    assert done.output.strip() == f"error: {tmp_path / 'one' / 'checkpoint'}: not a sharded checkpoint (its " \
                                  "model.safetensors is the whole model)"


def test_one_process_notices(micro, tmp_path, capsys):
    """--fsdp on one process says it runs unsharded; a resume with another global batch says so."""
    common = dict(stage=2, data=micro["multitask"], out=tmp_path, preset=micro["preset"], data_workers=0,
                  progress=False)
    train(TrainSettings(max_steps=1, fsdp=True, **common))
    assert "notice: --fsdp shards the model over the processes of torchrun" in capsys.readouterr().out
    train(TrainSettings(max_steps=2, resume=True, overrides={"accumulation": 2}, **common))
    out = capsys.readouterr().out
    assert "notice: the global batch changed from " in out and "--fsdp" not in out


def test_a_sharded_save_killed_before_its_commit_keeps_the_whole_checkpoint(tmp_path, monkeypatch):
    """A whole checkpoint (one process wrote it) resumed under FSDP: its next save, killed while
    writing shards, leaves model.safetensors and state.pt as they were (1-rank gloo group)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from qvl.trainer.checkpoint import _save_sharded

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    for name in ("model.safetensors", "state.pt"):
        (folder / name).write_bytes(b"step 2")
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dcp, "save", killed)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(KeyboardInterrupt):
            _save_sharded(folder, model, optimizer, [{}], 4, True, False)
    finally:
        dist.destroy_process_group()
    assert all((folder / name).read_bytes() == b"step 2" for name in ("model.safetensors", "state.pt"))


def test_cpu_offload_needs_fsdp(micro, tmp_path):
    with pytest.raises(SettingsError, match="--cpu-offload: offloads FSDP's shards; add --fsdp"):
        train(TrainSettings(stage=2, data=micro["multitask"], out=tmp_path, cpu_offload=True, log=False))


def test_bf16_master_weights_lose_small_updates():
    """Why the trained weights stay fp32 under bf16 compute: an AdamW step of lr 1e-5 moves a
    weight of ~1 by ~1e-5, below bf16's spacing there (2**-7): in bf16 a thousand such steps
    leave the weight where it was; in fp32 they add up."""
    update = torch.tensor(1e-5)
    master, bf16 = torch.ones(()), torch.ones((), dtype=torch.bfloat16)
    for _ in range(1000):
        master -= update
        bf16 -= update.to(torch.bfloat16)
    assert bf16 == 1.0
    assert master == pytest.approx(0.99, abs=1e-4)
