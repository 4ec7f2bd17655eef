"""`qvl format mix` against broken and hostile recipes: a recipe is decoded into typed settings
(known keys, values of their type, finite numbers in range, valid text) or refused in one line
naming the file, the table and the key; a recipe that is read draws every record into the
shards or the rejects. Never a traceback."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from qvl.cli import app

runner = CliRunner()


def source_files(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), "red").save(root / "red.png")
    src = root / "captions.jsonl"
    src.write_text("".join(json.dumps({"task": "caption", "image": "red.png", "caption": f"a red square {i}"}) + "\n"
                           for i in range(3)))
    return src


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else "inf" if value == math.inf else "-inf" if value == -math.inf \
            else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value) if isinstance(value, str) else str(value)


def write_recipe(path: Path, mix: dict, sources: list[dict]) -> Path:
    """The recipe as TOML or YAML (by ``path``'s suffix); None values are left out."""
    mix = {k: v for k, v in mix.items() if v is not None}
    sources = [{k: v for k, v in s.items() if v is not None} for s in sources]
    if path.suffix == ".toml":
        lines = ["[mix]", *(f"{json.dumps(k)} = {toml_value(v)}" for k, v in mix.items())]
        for s in sources:
            lines += ["", "[[source]]", *(f"{json.dumps(k)} = {toml_value(v)}" for k, v in s.items())]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    else:
        path.write_text(yaml.safe_dump({"mix": mix, "source": sources}), encoding="utf-8")
    return path


def mix(recipe: Path, out: Path):
    return runner.invoke(app, ["format", "mix", str(recipe), "--out", str(out), "--no-progress"])


def one_line_error(result, *names: str) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.output.startswith("error:") and "Traceback" not in result.output, result.output
    assert result.output.count("\n") == 1, result.output
    for name in names:
        assert name in result.output, (name, result.output)
    return result.output


MIX = {"seed": 0, "tokenizer": "bytes", "image_tokens": 4, "pack_to": 256}


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
@pytest.mark.parametrize("change, message", [
    ({"fraction": math.inf}, "fraction: inf: not a finite number"),
    ({"fraction": math.nan}, "fraction: nan"),
    ({"fraction": -0.5}, "fraction: -0.5"),
    ({"count": 10 ** 30}, "count: an integer of 100 bits: out of range"),
    ({"count": 3000 * 3}, "asks for more than 1000 copies of each of its 3 records"),
    ({"count": "5"}, "count: '5' is not"),
    ({"name": None}, "missing setting(s) name"),
    ({"files": []}, "files: a source needs its files"),
    ({"images": "a\0b"}, "images: a path cannot hold a NUL character"),
])
def test_a_bad_source_is_one_line_naming_the_file(tmp_path, suffix, change, message):
    src = source_files(tmp_path / "data")
    source = {"name": "caps", "layout": "qvl", "files": [str(src)], "images": str(src.parent), "count": None,
              "fraction": 1.0, **change}
    if "count" in change:
        source["fraction"] = None
    recipe = write_recipe(tmp_path / f"mix{suffix}", MIX, [source])
    one_line_error(mix(recipe, tmp_path / "out"), recipe.name, message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, message", [
    ({"seed": 10 ** 30}, "seed: an integer of 100 bits: out of range"),
    ({"image_tokens": 0}, "[mix]: image_tokens: 0"),
    ({"pack_to": -1}, "[mix]: pack_to: -1"),
    ({"colour": "red"}, "unknown setting(s) colour"),
])
def test_bad_mix_settings_are_one_line_naming_the_file(tmp_path, change, message):
    src = source_files(tmp_path / "data")
    recipe = write_recipe(tmp_path / "mix.toml", {**MIX, **change},
                          [{"name": "caps", "layout": "qvl", "files": [str(src)], "images": str(src.parent),
                            "count": 2}])
    one_line_error(mix(recipe, tmp_path / "out"), "mix.toml", message)


def test_a_lone_surrogate_in_a_yaml_recipe(tmp_path):
    src = source_files(tmp_path / "data")
    recipe = write_recipe(tmp_path / "mix.yaml", MIX, [{"name": "caps\ud800", "layout": "qvl", "files": [str(src)],
                                                        "count": 2}])
    one_line_error(mix(recipe, tmp_path / "out"), "mix.yaml", "$.source[0].name", "not valid Unicode")


# ---------------------------------------------------------------- property: any recipe

HOSTILE = [None, True, -1, 0, 2, 10 ** 30, 0.5, math.inf, math.nan, -math.inf, "", "x", "\ud800", [], [1], {"a": 1}]


@st.composite
def recipes(draw):
    """A recipe of one or two sources over a small file, some of its values hostile or missing."""
    def maybe(value):
        return draw(st.sampled_from(HOSTILE)) if draw(st.integers(0, 5)) == 5 else value

    mix_table = {key: maybe(value) for key, value in MIX.items()}
    if draw(st.integers(0, 9)) == 9:
        mix_table[draw(st.sampled_from(["colour", "max_len"]))] = draw(st.sampled_from(HOSTILE))
    sources = []
    for i in range(draw(st.integers(1, 2))):
        share = {"count": maybe(draw(st.integers(0, 6)))} if draw(st.booleans()) else \
            {"fraction": maybe(draw(st.sampled_from([0.0, 0.5, 1.0, 2.5])))}
        source = {"name": maybe(f"s{i}"), "layout": maybe("qvl"), "files": maybe(["SRC"]), "images": maybe("IMAGES"),
                  **share}
        if draw(st.integers(0, 9)) == 9:
            source[draw(st.sampled_from(["tasks", "split", "count", "weight"]))] = draw(st.sampled_from(HOSTILE))
        sources.append(source)
    return draw(st.sampled_from([".toml", ".yaml"])), mix_table, sources, draw(st.integers(0, 12))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(recipes())
def test_any_recipe_is_drawn_or_refused_in_one_line(recipe):
    suffix, mix_table, sources, cut = recipe
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = source_files(tmp / "data")
        swap = {"SRC": str(src), "IMAGES": str(src.parent)}
        sources = [{k: [swap.get(x, x) for x in v] if isinstance(v, list) else swap.get(v, v) if isinstance(v, str)
                    else v for k, v in s.items()} for s in sources]
        path = write_recipe(tmp / f"mix{suffix}", mix_table, sources)
        if cut == 12:  # a truncated file
            text = path.read_bytes()
            path.write_bytes(text[:len(text) // 2])
        result = mix(path, tmp / "out")
        if result.exit_code == 0:
            manifest = json.loads((tmp / "out" / "manifest.json").read_text())
            assert manifest["records"] == manifest["samples"] + manifest["rejected"]
        else:
            one_line_error(result, path.name)


# ---------------------------------------------------------------- a source's tasks

def test_records_of_tasks_not_asked_for_are_counted_and_a_source_of_none_is_refused(tmp_path):
    src = source_files(tmp_path / "data")
    with src.open("a") as f:
        f.write(json.dumps({"task": "vqa", "image": "red.png", "question": "What colour?", "answer": "red"}) + "\n")
    source = {"name": "caps", "layout": "qvl", "files": [str(src)], "images": str(src.parent), "count": 1}
    result = mix(write_recipe(tmp_path / "vqa.toml", MIX, [{**source, "tasks": ["vqa"]}]), tmp_path / "out")
    assert result.exit_code == 0 and "3 records of other tasks skipped" in result.output, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["mix"]["available"] == {"caps": 1} and manifest["mix"]["skipped_by_task"] == {"caps": 3}
    assert manifest["samples"] == 1 and manifest["by_source"]["caps"].keys() == {"vqa"}
    recipe = write_recipe(tmp_path / "ocr.toml", MIX, [{**source, "tasks": ["ocr"]}])
    one_line_error(mix(recipe, tmp_path / "out2"), "ocr.toml", "caps: no records of tasks ocr in its files "
                   "(4 of other tasks skipped)")
    recipe = write_recipe(tmp_path / "typo.toml", MIX, [{**source, "tasks": ["vqa2"]}])
    one_line_error(mix(recipe, tmp_path / "out3"), "typo.toml", "tasks: unknown 'vqa2'")


def test_a_layout_asked_for_a_task_it_lacks_is_named_by_its_source(tmp_path):
    """The recipe's source is what asked for the task, not a --from the user never typed."""
    src = source_files(tmp_path / "data")
    recipe = write_recipe(tmp_path / "mix.toml", MIX, [{"name": "questions", "layout": "gqa", "files": [str(src)],
                                                        "images": str(src.parent), "count": 1, "tasks": ["ocr"]}])
    output = one_line_error(mix(recipe, tmp_path / "out"), "[[source]] questions (layout = 'gqa')",
                            "gqa gives vqa, not ocr")
    assert "--from" not in output


@pytest.mark.parametrize("text, message", [
    ("mix:\n  seed: [1,\n    2\nsource: 3\n", "not valid YAML: while parsing a flow sequence"),
    ("mix:\n  seed: 1\n  seed: 2\nsource: []\n", "the key 'seed' is written twice"),
])
def test_a_yaml_error_is_one_line(tmp_path, text, message):
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(text)
    one_line_error(mix(recipe, tmp_path / "out"), "mix.yaml", message)


# ---------------------------------------------------------------- a source's request and files

def gqa_files(root: Path, n: int = 1) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), "red").save(root / "red.jpg")
    path = root / "questions.json"
    path.write_text(json.dumps({str(i): {"question": f"What colour {i}?", "answer": "red", "imageId": "red"}
                                for i in range(n)}))
    return path


@pytest.mark.parametrize("change, message", [
    ({"layout": "refcoco", "files": ["refs(unc).p", "instances.json"], "split": "tset"},
     "[[source]] s (layout = 'refcoco'): split 'tset': not a split of refcoco; one of train, val, test"),
    ({"split": "val"}, "[[source]] s (layout = 'gqa'): split 'val': gqa has no splits to choose from"),
    ({"layout": "qvl", "split": "val"}, "[[source]] s: split: a qvl source has no splits"),
    ({"layout": "cocoo"}, "[[source]] s (layout = 'cocoo'): unknown layout; known: coco-captions"),
    ({"tasks": ["grounding"]}, "[[source]] s (layout = 'gqa'): gqa gives vqa, not grounding"),
    ({"tasks": ["captionz"]}, "[[source]] s (layout = 'gqa'): gqa gives vqa, not captionz"),
    ({"files": ["nope.json"]}, "[[source]] s: files: DATA/nope.json: no such file"),
    ({"files": ["/dev/null"]}, "[[source]] s: files: /dev/null: not a regular file"),
    ({"files": ["truncated.json"]}, "[[source]] s: DATA/truncated.json: not readable JSON (truncated"),
    ({"layout": "qvl", "files": ["truncated.json"]}, "[[source]] s: DATA/truncated.json: not valid JSON"),
])
def test_a_bad_source_request_or_file_names_the_recipe_and_the_source(tmp_path, change, message):
    data = tmp_path / "data"
    gqa_files(data)
    for name in ("refs(unc).p", "instances.json"):  # never read: the split is refused first
        (data / name).write_bytes(b"")
    (data / "truncated.json").write_text('{"1": {"question": "What')
    source = {"name": "s", "layout": "gqa", "files": ["questions.json"], "images": ".", "count": 1, **change}
    recipe = write_recipe(data / "mix.toml", MIX, [source])
    output = one_line_error(mix(recipe, tmp_path / "out"), f"{recipe} ", message.replace("DATA", str(data)))
    assert "--from" not in output and "--split" not in output


def test_a_file_listed_twice_in_a_source_is_refused(tmp_path):
    questions = gqa_files(tmp_path / "data")
    recipe = write_recipe(tmp_path / "data" / "mix.toml", MIX, [
        {"name": "s", "layout": "gqa", "files": [str(questions), "./questions.json"], "images": ".",
         "fraction": 1.0}])
    one_line_error(mix(recipe, tmp_path / "out"), f"{recipe} [[source]] s: files: {tmp_path}/data/questions.json "
                   f"is listed twice (also as {questions})")


def test_relative_paths_are_the_recipes_folders_and_the_draw_is_the_same_from_anywhere(tmp_path, monkeypatch):
    """A recipe means the same files and the same draw wherever it is run from, however it is named."""
    gqa_files(tmp_path / "ds" / "gqa", 40)
    (tmp_path / "recipes").mkdir()
    recipe = write_recipe(tmp_path / "recipes" / "mix.toml", MIX, [
        {"name": "g", "layout": "gqa", "files": ["../ds/gqa/questions.json"], "images": "../ds/gqa",
         "fraction": 0.5}])
    ids = []
    for cwd, named in ((tmp_path / "recipes", "mix.toml"), (tmp_path, "recipes/mix.toml"), ("/", str(recipe))):
        monkeypatch.chdir(cwd)
        out = tmp_path / f"out{len(ids)}"
        result = mix(Path(named), out)
        assert result.exit_code == 0, result.output
        import datasets

        ids.append(sorted(i for row in datasets.load_from_disk(str(out))["sample_ids"] for i in row))
    assert 5 < len(ids[0]) < 35 and ids[0] == ids[1] == ids[2]
