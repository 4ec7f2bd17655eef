"""`qvl train` never destroys a run silently: an existing run needs --resume or --overwrite,
--resume needs a checkpoint, a damaged checkpoint or a wrong folder is a one-line error."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qvl.cli import app

runner = CliRunner()


def train_cli(micro, out, *extra):
    return runner.invoke(app, ["train", "--stage", "2", "--data", str(micro["multitask"]), "--out", str(out),
                               "--preset", micro["preset"], "--max-steps", "2", "--no-progress", *extra])


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.startswith("error:"), result.output
    return " ".join(result.output.split())


@pytest.fixture
def run(micro, tmp_path):
    out = tmp_path / "run"
    result = train_cli(micro, out)
    assert result.exit_code == 0, result.output
    return out


def test_training_into_an_existing_run_is_refused(micro, run):
    metrics = (run / "metrics.jsonl").read_text()
    weights = (run / "checkpoint" / "model.safetensors").read_bytes()
    message = one_line_error(train_cli(micro, run))
    assert "holds a training run (checkpoint at step 2); --resume continues it, --overwrite replaces it" in message
    assert (run / "metrics.jsonl").read_text() == metrics  # not cut
    assert (run / "checkpoint" / "model.safetensors").read_bytes() == weights  # not overwritten
    assert "choose one" in one_line_error(train_cli(micro, run, "--resume", "--overwrite"))
    replaced = train_cli(micro, run, "--overwrite", "--max-steps", "1")
    assert replaced.exit_code == 0, replaced.output
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_resume_needs_a_checkpoint(micro, tmp_path):
    message = one_line_error(train_cli(micro, tmp_path / "fresh", "--resume"))
    assert "no checkpoint to resume from" in message and "run without --resume" in message


@pytest.mark.parametrize("damage", ["state.pt", "model.safetensors"])
def test_a_damaged_checkpoint_is_a_clear_error(micro, run, damage):
    path = run / "checkpoint" / damage
    path.write_bytes(path.read_bytes()[:100])
    message = one_line_error(train_cli(micro, run, "--resume", "--max-steps", "3"))
    expected = "state.pt: damaged, or not written by qvl" if damage == "state.pt" else "cannot resume from this checkpoint"
    assert expected in message and "--overwrite starts the run again" in message
    assert "weights_only" not in message  # never torch's advice to unpickle a damaged file


def test_a_folder_that_is_no_run_is_left_alone(micro, tmp_path):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    assert "not a qvl output" in one_line_error(train_cli(micro, precious, "--overwrite"))
    assert (precious / "todo.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    assert "is a file, not a folder" in one_line_error(train_cli(micro, tmp_path / "file"))
    assert "not a checkpoint folder" in one_line_error(train_cli(micro, tmp_path / "new", "--init", str(precious)))


def test_shards_that_are_not_a_format_output(micro, tmp_path):
    assert "no manifest.json" in one_line_error(
        runner.invoke(app, ["train", "--stage", "2", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
                            "--preset", micro["preset"], "--no-progress"]))
    manifest = json.loads((micro["multitask"] / "manifest.json").read_text())
    assert manifest["records"] > 0


# ---------------------------------------------------------------- checkpoints and shards, damaged


@pytest.fixture(scope="module")
def trained(micro, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    result = train_cli(micro, out, "--max-steps", "0")
    assert result.exit_code == 0, result.output
    return out / "checkpoint"


@pytest.fixture
def checkpoint(trained, tmp_path):
    """A copy of a checkpoint, to damage."""
    folder = tmp_path / "ckpt"
    shutil.copytree(trained, folder)
    return folder


def generate_cli(checkpoint, prompt="<ref>a</ref>"):
    return runner.invoke(app, ["generate", "--checkpoint", str(checkpoint), "--prompt", prompt,
                               "--max-new-tokens", "2"])


def test_generate_with_an_empty_prompt_is_one_line(checkpoint):
    assert generate_cli(checkpoint).exit_code == 0
    assert "--prompt" in one_line_error(generate_cli(checkpoint, ""))


@pytest.mark.parametrize("damage", ["truncated", "no resolution", "resolution as text", "huge resolution",
                                    "meta not json", "meta a list"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(micro, checkpoint, tmp_path, damage):
    meta_path, weights = checkpoint / "meta.json", checkpoint / "model.safetensors"
    meta = json.loads(meta_path.read_text())
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-500])
        expect = ["model.safetensors"]
    elif damage == "meta not json":
        meta_path.write_text("{'stage': 1")
        expect = ["meta.json"]
    elif damage == "meta a list":
        meta_path.write_text("[]")
        expect = ["meta.json"]
    else:
        meta.pop("resolution")
        if damage != "no resolution":
            meta["resolution"] = "48" if damage == "resolution as text" else 10 ** 12
        meta_path.write_text(json.dumps(meta))
        expect = ["meta.json", "resolution"]
    for result in (generate_cli(checkpoint),
                   train_cli(micro, tmp_path / "next", "--init", str(checkpoint), "--max-steps", "1")):
        message = one_line_error(result)
        assert all(word in message for word in expect), message


def copy_shards(micro, tmp_path) -> Path:
    folder = tmp_path / "shards"
    shutil.copytree(micro["multitask"], folder)
    return folder


def train_on(micro, data, out):
    return runner.invoke(app, ["train", "--stage", "2", "--data", str(data), "--out", str(out),
                               "--preset", micro["preset"], "--max-steps", "1", "--no-progress"])


@pytest.mark.parametrize("field", ["records", "rejected", "shards", "tokenizer", "settings"])
def test_a_manifest_missing_a_field_names_it(micro, tmp_path, field):
    data = copy_shards(micro, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest[field]
    (data / "manifest.json").write_text(json.dumps(manifest))
    message = one_line_error(train_on(micro, data, tmp_path / "run"))
    assert "manifest.json" in message and field in message, message


@pytest.mark.parametrize("value", [-1, "3", 1e400, None, [1]])
def test_a_manifest_with_bad_counts_names_the_field(micro, tmp_path, value):
    data = copy_shards(micro, tmp_path)
    text = (data / "manifest.json").read_text()
    manifest = json.loads(text)
    manifest["records"] = "__VALUE__"
    (data / "manifest.json").write_text(json.dumps(manifest).replace('"__VALUE__"', "1e400" if value == 1e400
                                                                     else json.dumps(value)))
    message = one_line_error(train_on(micro, data, tmp_path / "run"))
    assert "manifest.json" in message and "records" in message, message


@pytest.mark.parametrize("where", ["head", "middle", "tail", "escape"])
def test_a_scribbled_shard_names_the_file(micro, tmp_path, where):
    data = copy_shards(micro, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    path = data / manifest["shards"][0]
    raw = bytearray(path.read_bytes())
    if where == "head":
        raw[:64] = b"\xff" * 64
    elif where == "middle":
        middle = len(raw) // 2
        raw[middle:middle + 256] = bytes(range(256))
    elif where == "tail":
        raw = raw[: len(raw) // 3]
    else:  # a shard name that leaves the folder
        manifest["shards"][0] = "../../" + manifest["shards"][0]
        (data / "manifest.json").write_text(json.dumps(manifest))
    path.write_bytes(bytes(raw))
    result = train_on(micro, data, tmp_path / "run")
    if where == "middle" and result.exit_code == 0:
        return  # the scribble landed in image bytes or token values a row can hold: trained on, no crash
    message = one_line_error(result)
    assert ("manifest.json" if where == "escape" else path.name) in message, message


def test_rows_with_scribbled_values_are_skipped_and_named(micro, tmp_path):
    """A shard that passes Arrow's checks may still hold values no row can have: each such row is
    skipped with a log line naming its samples; every row is either batched or named."""
    import pyarrow as pa

    from qvl.schemas.samples import SAMPLE
    from qvl.trainer.data import DataError, Loader, Shards

    data = copy_shards(micro, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    path = data / manifest["shards"][0]
    rows = pa.ipc.open_stream(pa.memory_map(str(path))).read_all().to_pylist()
    rows[0]["input_ids"][0] = 10 ** 6  # beyond the vocabulary
    rows[1]["labels"] = rows[1]["labels"][:-1]  # lengths disagree
    with_image = next(i for i, r in enumerate(rows) if r["images"] and i > 1)
    rows[with_image]["images"][0]["bytes"] = b"\x89PNG scribbled"
    rows[3]["sample_lengths"] = [0, len(rows[3]["input_ids"])]
    bad = {0, 1, 3, with_image}
    with pa.ipc.new_stream(str(path), SAMPLE) as writer:
        writer.write_table(pa.Table.from_pylist(rows, SAMPLE))
    shards = Shards(data)
    logs: list[str] = []
    loader = Loader(shards, 1, 32, 0, 512, seed=0, log=logs.append, vocab_size=473, image_pad=(472, 4))
    seen = [loader.next().sample_ids[0] for _ in range(len(rows) - len(bad))]
    assert loader.epoch == 0
    assert sorted(map(tuple, seen)) == sorted(tuple(r["sample_ids"]) for i, r in enumerate(rows) if i not in bad)
    assert len(logs) == len(bad) and all(str(rows[i]["sample_ids"]) in " ".join(logs) for i in bad), logs
    for row in rows:
        row["input_ids"][0] = 10 ** 6
    with pa.ipc.new_stream(str(path), SAMPLE) as writer:
        writer.write_table(pa.Table.from_pylist(rows, SAMPLE))
    loader = Loader(Shards(data), 1, 32, 0, 512, seed=0, log=lambda m: None, vocab_size=473, image_pad=(472, 4))
    with pytest.raises(DataError, match="no row of the shards can be trained on"):
        loader.next()


HEAD = "name = 'x'\ntokenizer = 'bytes'\nimage_tokens = 4\n"
VISION = "[vision]\nwidth = 32\nlayers = 1\nheads = 2\n"


@pytest.mark.parametrize("text, field", [
    (HEAD + VISION + "patch_size = 0\n", "patch_size"),
    (HEAD + VISION + "patch_size = 8\n[stages]\nlr = [inf, 1e-3, 1e-3]\n", "lr"),
    ("name = 'x'\ntokenizer = 'bytes'\nimage_tokens = 5\n", "image_tokens"),
    ("name = [", "not a qvl preset"),
    ("a = " + "[" * 100_000, "nested too deeply"),  # tomllib's RecursionError
    ("a = 1" + "0" * 5000, "not a qvl preset"),  # Python's limit on integer digits
    (HEAD + VISION + "patch_size = 8\n[llm]\nhidden_size = 33\nnum_attention_heads = 2\n", "hidden_size"),
    (HEAD.replace("'bytes'", "'gpt9'") + VISION + "patch_size = 8\n", "tokenizer 'gpt9': use qwen-vl"),  # not --tokenizer
])
def test_a_bad_preset_file_is_one_line_naming_it(micro, tmp_path, text, field):
    preset = tmp_path / "bad.toml"
    preset.write_text(text)
    result = runner.invoke(app, ["train", "--stage", "2", "--data", str(micro["multitask"]), "--out",
                                 str(tmp_path / "run"), "--preset", str(preset), "--max-steps", "1", "--no-progress"])
    message = one_line_error(result)
    assert "bad.toml" in message and field in message, message


@pytest.mark.parametrize("llm, field", [
    ("", "[llm] needs hidden_size, num_hidden_layers"),  # transformers' defaults would build 7B parameters
    ("hidden_size = 65536\nnum_hidden_layers = 8\nnum_attention_heads = 512\nintermediate_size = 1048576\n",
     "more than this machine's"),
])
def test_a_preset_too_big_to_build_is_refused_before_allocating(micro, tmp_path, llm, field):
    preset = tmp_path / "big.toml"
    preset.write_text("name = 'big'\ntokenizer = 'bytes'\nimage_tokens = 4\n[vision]\nwidth = 32\nlayers = 1\n"
                      f"heads = 2\npatch_size = 8\n[llm]\n{llm}")
    result = runner.invoke(app, ["train", "--stage", "2", "--data", str(micro["multitask"]), "--out",
                                 str(tmp_path / "run"), "--preset", str(preset), "--max-steps", "1", "--no-progress"])
    message = one_line_error(result)
    assert "preset big" in message and field in message, message


@pytest.mark.parametrize("option, value, named", [
    ("--micro-batch", "0", "--micro-batch"),  # hung: "1 steps of 0x1x1" forever
    ("--accumulation", "1000000000000", "--accumulation"),  # hung
    ("--max-steps", "-5", "--max-steps"),  # trained 0 steps, exit 0
    ("--max-rejected", "nan", "--max-rejected"),  # switched the reject check off
    ("--seed", str(10 ** 30), "--seed"),  # numpy's message, no option named
])
def test_training_settings_out_of_range_are_one_line_before_any_work(micro, tmp_path, option, value, named):
    assert named in one_line_error(train_cli(micro, tmp_path / "run", option, value))
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_generate_refuses_no_new_tokens_and_a_prompt_that_is_not_unicode(checkpoint):
    """--max-new-tokens -1 printed nothing, exit 0 (10^8 is capped at the context: see the test below)."""
    for value in ("0", "-1"):
        result = runner.invoke(app, ["generate", "--checkpoint", str(checkpoint), "--prompt", "<ref>a</ref>",
                                     "--max-new-tokens", value])
        assert "--max-new-tokens" in one_line_error(result)
    result = runner.invoke(app, ["generate", "--checkpoint", str(checkpoint), "--prompt", "a\udcff",
                                 "--max-new-tokens", "2"])
    assert "--prompt" in one_line_error(result)


def test_a_preset_nested_past_the_parser_is_one_line(micro, tmp_path):
    """tomllib recursed into a RecursionError traceback."""
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 100_000)
    result = runner.invoke(app, ["train", "--stage", "2", "--data", str(micro["multitask"]), "--out",
                                 str(tmp_path / "run"), "--preset", str(deep)])
    assert "deep.toml" in one_line_error(result)


@pytest.mark.parametrize("damage", ["nan", "int64", "missing key"])
def test_weights_that_load_but_cannot_be_right_are_one_line(checkpoint, damage):
    """NaN weights generated garbage with exit 0; an int64 weight loaded; a missing key printed torch's
    multi-line state_dict error."""
    import torch
    from safetensors.torch import load_file, save_file

    path = checkpoint / "model.safetensors"
    weights = load_file(str(path))
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
    if damage == "nan":
        weights[name] = torch.full_like(weights[name], float("nan"))
    elif damage == "int64":
        weights[name] = weights[name].to(torch.int64)
    else:
        del weights[name]
    save_file(weights, str(path))
    result = generate_cli(checkpoint)
    message = one_line_error(result)
    assert "model.safetensors" in message and result.output.count("\n") == 1


# ---------------------------------------------------------------- settings out of range, refused before loading


@pytest.mark.parametrize("option, value", [
    ("--micro-batch", "0"),  # hung: no row ever filled a micro-batch
    ("--accumulation", "1000000000000"),  # hung collecting micro-batches
    ("--max-steps", "-5"),  # trained 0 steps silently
    ("--max-rejected", "nan"),  # disabled the reject check silently
    ("--max-rejected", "1.5"),
    ("--seed", "99999999999"),  # numpy's message
    ("--seed", "-1"),
    ("--lr", "0"),  # torch's message, after the model was built
    ("--lr", "nan"),
])
def test_a_setting_out_of_range_is_refused_naming_it(micro, tmp_path, option, value):
    out = tmp_path / "run"
    message = one_line_error(train_cli(micro, out, option, value))
    assert message.startswith(f"error: {option}"), message
    assert not out.exists()  # refused before the run folder was claimed


def test_a_recipe_stage_setting_is_named_with_its_file_and_table(micro, tmp_path):
    out = tmp_path / "run"
    for text, said in [("[stage]\ncolour = 1\n", "unknown setting(s) colour"),
                       ("[stage]\nmicro_batch = 0\n", "micro_batch"),
                       ("[stage]\nlr = 'fast'\n", "lr")]:
        recipe = tmp_path / "r.toml"
        recipe.write_text(text)
        message = one_line_error(train_cli(micro, out, "--recipe", str(recipe)))
        assert f"{recipe} [stage]: " in message and said in message, message
    assert not out.exists()


def test_a_train_recipe_table_other_than_stage_is_refused(micro, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[stag]\nmicro_batch = 4\n")  # was ignored: the run went on with the defaults
    message = one_line_error(train_cli(micro, tmp_path / "run", "--recipe", str(recipe)))
    assert "unknown table(s) stag" in message, message


def test_a_run_refused_after_its_folder_was_claimed_can_be_run_again_corrected(micro, tmp_path):
    out = tmp_path / "run"
    bad = tmp_path / "bad.toml"
    tiny = (Path(__file__).parents[2] / "qvl" / "trainer" / "presets" / "tiny.toml").read_text()
    bad.write_text(re.sub(r"(\[llm\][^\n]*\n)", r"\1num_hiden_layers = 1\n", tiny))
    message = one_line_error(train_cli(micro, out, "--preset", str(bad)))
    assert "num_hiden_layers" in message, message
    assert [p.name for p in out.iterdir()] == [".qvl"]  # claimed, then refused
    result = train_cli(micro, out)  # no "holds a training run" for a folder the failed run only marked
    assert result.exit_code == 0, result.output


def short_context(checkpoint: Path, positions: int) -> None:
    """The checkpoint's preset with a context of ``positions`` tokens (rotary positions: no weights change)."""
    preset = json.loads((checkpoint / "preset.json").read_text())
    preset["llm"]["max_position_embeddings"] = positions
    (checkpoint / "preset.json").write_text(json.dumps(preset))


def test_generate_stops_at_the_context_length(checkpoint):
    short_context(checkpoint, 40)
    result = runner.invoke(app, ["generate", "--checkpoint", str(checkpoint), "--prompt", "abc", "--json",
                                 "--max-new-tokens", "100000000"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["ids"]) <= 40 - 3
    message = one_line_error(runner.invoke(app, ["generate", "--checkpoint", str(checkpoint), "--prompt", "x" * 40]))
    assert "--prompt" in message and "context of 40" in message
    for wrong in ("0", "-1"):
        message = one_line_error(runner.invoke(app, ["generate", "--checkpoint", str(checkpoint), "--prompt", "abc",
                                                     "--max-new-tokens", wrong]))
        assert "--max-new-tokens" in message, message


@pytest.mark.parametrize("damage, said", [
    ("a key missing", "missing tensors"),
    ("an extra key", "tensors the model does not have"),
    ("a wrong shape", "shapes that differ"),
    ("int64", "not floating point"),
    ("nan", "NaN or infinite"),
    ("inf", "NaN or infinite"),
])
def test_weights_of_another_shape_or_not_numbers_are_one_line_naming_the_tensor(checkpoint, damage, said):
    from safetensors.torch import load_file, save_file

    path = checkpoint / "model.safetensors"
    weights = load_file(path)
    key = sorted(k for k, t in weights.items() if t.ndim == 2)[0]
    if damage == "a key missing":
        del weights[key]
    elif damage == "an extra key":
        weights["stray.weight"] = torch.zeros(2)
        key = "stray.weight"
    elif damage == "a wrong shape":
        weights[key] = weights[key][:1].clone()
    elif damage == "int64":
        weights[key] = weights[key].long()
    else:
        weights[key] = torch.full_like(weights[key], float(damage))
    save_file(weights, path)
    message = one_line_error(generate_cli(checkpoint))
    assert str(path) in message and said in message and key in message, message


@pytest.mark.parametrize("option", ["--prompt", "--system"])
def test_a_prompt_that_is_not_unicode_names_the_option(checkpoint, option):
    args = {"--prompt": "ok", "--system": "ok", option: "a\udcff"}  # a byte the shell could not decode
    message = one_line_error(runner.invoke(app, ["generate", "--checkpoint", str(checkpoint), "--chat",
                                                 "--prompt", args["--prompt"], "--system", args["--system"]]))
    assert message.startswith(f"error: {option}: not valid Unicode"), message


def test_a_shard_cut_short_while_a_run_reads_it_is_one_error(micro, tmp_path):
    """A shard truncated after the run checked it (another job rewrote it): a loader process
    dies of SIGBUS on the memory-mapped file; the run says so about the data, not shared memory."""
    from qvl.trainer.data import DataError
    from qvl.trainer.settings import TrainSettings
    from qvl.trainer.train import run_to_end, setup

    data = copy_shards(micro, tmp_path)
    run = setup(TrainSettings(stage=2, data=data, out=tmp_path / "run", preset=micro["preset"], max_steps=50,
                              data_workers=2, log=False, progress=False))
    run.loader.next()  # the workers have the shard mapped
    for shard in sorted(data.glob("*.arrow")):
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 3)
    with pytest.raises(DataError, match=f"^{re.escape(str(data))}: a loader process died of a bus error: a shard "
                                        "changed or was cut short while this run read it"):
        run_to_end(run)
