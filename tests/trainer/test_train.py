"""The loop: per-stage freezing, learning, exact resume, and two processes under torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qvl.formats.build import FormatSettings, run_format
from qvl.trainer.settings import TrainSettings
from qvl.trainer.train import train


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint" / "model.safetensors"))


@pytest.mark.parametrize("stage, frozen", [(1, "llm."), (2, None), (3, "vision.")])
def test_each_stage_freezes_what_the_paper_freezes(micro, tmp_path, stage, frozen):
    data = micro["sft"] if stage == 3 else micro["multitask"]
    common = dict(stage=stage, data=data, preset=micro["preset"], log=False)
    train(TrainSettings(out=tmp_path / "zero", max_steps=0, **common))
    train(TrainSettings(out=tmp_path / "run", max_steps=4, **common))
    before, after = weights(tmp_path / "zero"), weights(tmp_path / "run")
    for name, tensor in before.items():
        same = torch.equal(tensor, after[name])
        if frozen and name.startswith(frozen):
            assert same, f"{name} changed in stage {stage}"
    trained = {"adapter.", "llm.", "vision."} - {frozen}
    for prefix in trained:
        assert any(not torch.equal(t, after[n]) for n, t in before.items() if n.startswith(prefix)), prefix
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_loss_on_a_repeated_batch_falls(micro, tmp_path):
    train(TrainSettings(stage=2, data=micro["multitask"], out=tmp_path, preset=micro["preset"], max_steps=40,
                        overrides={"micro_batch": 4, "warmup_steps": 2}, log=False))
    curve = losses(tmp_path)
    assert sum(curve[-5:]) / 5 < 0.7 * sum(curve[:5]) / 5
    spread = [json.loads(line)["image_token_spread"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(s is not None and s >= 0 for s in spread)


def test_resume_continues_the_same_curve(micro, tmp_path):
    common = dict(stage=2, data=micro["multitask"], preset=micro["preset"], log=False, checkpoint_every=3)
    train(TrainSettings(out=tmp_path / "whole", max_steps=6, **common))
    train(TrainSettings(out=tmp_path / "split", max_steps=3, **common))
    train(TrainSettings(out=tmp_path / "split", max_steps=6, resume=True, **common))
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert len(losses(tmp_path / "whole")) == 6


def test_init_from_previous_stage_and_bad_data(micro, tmp_path):
    train(TrainSettings(stage=1, data=micro["multitask"], out=tmp_path / "s1", preset=micro["preset"], max_steps=2,
                        log=False))
    train(TrainSettings(stage=2, data=micro["multitask"], out=tmp_path / "s2", preset=micro["preset"], max_steps=1,
                        init=tmp_path / "s1" / "checkpoint", log=False))
    assert weights(tmp_path / "s2")["vision.vit.positional_embedding"].shape[0] == 1 + 6 * 6  # 48 px / 8
    with pytest.raises(ValueError, match="formatted with tokenizer bytes and 4 image tokens; preset tiny needs"):
        train(TrainSettings(stage=2, data=micro["multitask"], out=tmp_path / "x", preset="tiny", max_steps=1,
                            log=False))
    (tmp_path / "t.jsonl").write_text(json.dumps({"task": "text", "text": "Plain text."}) + "\n")
    run_format("multitask", [tmp_path / "t.jsonl"], tmp_path / "qwen2", show_progress=False,
               settings=FormatSettings(model="qwen2-vl"))
    with pytest.raises(ValueError, match="rendered for qwen2-vl; qvl train trains Qwen-VL's architecture"):
        train(TrainSettings(stage=2, data=tmp_path / "qwen2", out=tmp_path / "y", preset=micro["preset"],
                            max_steps=1, log=False))


def test_a_run_leaves_no_loader_processes_behind(micro, tmp_path, monkeypatch):
    """The loader's workers stop when the run ends, finished or failed (left to the garbage
    collector, each lingered, then took its 5 s join timeout)."""
    import multiprocessing

    from qvl.trainer import train as trainer

    before = {p.pid for p in multiprocessing.active_children()}
    common = dict(stage=2, data=micro["multitask"], preset=micro["preset"], max_steps=2, data_workers=2, log=False)
    train(TrainSettings(out=tmp_path / "done", **common))
    assert {p.pid for p in multiprocessing.active_children()} == before

    def disk_full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.Run, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(TrainSettings(out=tmp_path / "failed", **common))
    assert {p.pid for p in multiprocessing.active_children()} == before


def test_a_save_that_cannot_write_is_one_line_and_keeps_the_last_checkpoint(micro, tmp_path):
    """A real write failure (the file-size limit below the model's size, as a full disk fails a
    write): one line naming the checkpoint, and the step-2 checkpoint still resumes."""
    common = ["train", "--stage", "2", "--data", str(micro["multitask"]), "--out", str(tmp_path / "run"), "--preset",
              micro["preset"], "--checkpoint-every", "2", "--no-progress",
              "--data-workers", "0"]  # the limit would also fail the workers' batches in /dev/shm
    limit = "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); " \
            "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv.pop(1)),) * 2); from qvl.cli import app; app()"
    done = subprocess.run([sys.executable, "-c", limit, str(2 ** 40), *common, "--max-steps", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoint = tmp_path / "run" / "checkpoint"
    size = (checkpoint / "model.safetensors").stat().st_size
    before = {f.name: f.read_bytes() for f in checkpoint.iterdir()}
    done = subprocess.run([sys.executable, "-c", limit, str(size // 2), *common, "--max-steps", "4", "--resume"],
                          capture_output=True, text=True, timeout=300)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[-1].startswith(f"error: {checkpoint}: the checkpoint of step 4 could not be written (") and \
        "the previous one is kept" in lines[-1], lines
    assert {f.name: f.read_bytes() for f in checkpoint.iterdir()} == before  # nothing half-written beside it
    train(TrainSettings(stage=2, data=micro["multitask"], out=tmp_path / "run", preset=micro["preset"], max_steps=4,
                        resume=True, log=False, data_workers=0))
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == \
        [1, 2, 3, 4]


@pytest.mark.parametrize("fsdp, port", [(False, 29533), (True, 29534)])
def test_two_processes_give_the_loss_of_one(micro, tmp_path, fsdp, port):
    """torchrun with 2 CPU processes (gloo; DDP or FSDP) and micro-batch 4 sees the rows that
    one process with accumulation 2 sees; the mean over supervised tokens makes their losses
    equal, and the checkpoint holds the whole model either way."""
    script = (
        "import sys; from pathlib import Path; from qvl.trainer.settings import TrainSettings; "
        "from qvl.trainer.train import train; "
        f"train(TrainSettings(stage=2, data=Path({str(micro['multitask'])!r}), out=Path(sys.argv[1]), "
        f"preset={micro['preset']!r}, max_steps=sys.argv[3] == 'resume' and 3 or 2, log=False, fsdp={fsdp}, "
        "checkpoint_every=2, resume=sys.argv[3] == 'resume', overrides={'accumulation': int(sys.argv[2])}))"
    )
    (tmp_path / "run.py").write_text(script)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(port), str(tmp_path / "run.py"), str(tmp_path / "two"), "1"]
    done = subprocess.run(torchrun + ["fresh"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "one"), "2", "fresh"], check=True,
                   capture_output=True, timeout=300)
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(two) == len(one) == 2
    assert two == pytest.approx(one, rel=2e-3)
    whole = weights(tmp_path / "one")
    assert {k: v.shape for k, v in weights(tmp_path / "two").items() if k in whole} == \
        {k: v.shape for k, v in whole.items()}
    done = subprocess.run(torchrun + ["resume"], capture_output=True, text=True, timeout=300)  # one more step
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(tmp_path / "two")[:2] == two and len(losses(tmp_path / "two")) == 3


def test_activation_checkpointing_trains_the_same_curve(micro, tmp_path):
    common = dict(stage=2, data=micro["multitask"], preset=micro["preset"], log=False, max_steps=3)
    train(TrainSettings(out=tmp_path / "kept", activation_checkpointing=False, **common))
    train(TrainSettings(out=tmp_path / "recomputed", activation_checkpointing=True, **common))
    assert losses(tmp_path / "recomputed") == losses(tmp_path / "kept")
    a, b = weights(tmp_path / "recomputed"), weights(tmp_path / "kept")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in b)
