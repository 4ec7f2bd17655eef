"""`qvl format export` through its real consumers: ms-swift 4.6.0 and LLaMA-Factory 0.9.5, each
in its own virtualenv (`tests/interop/setup_consumers.sh`, `make interop`), run their own
preprocessing on qvl's exports (`run_swift.py`, `run_llamafactory.py`), and every sample is
compared with qvl's own rendering of the same record (`qvl format sft --model …` of the images as
the tool hands them to the processor: for ms-swift resized by qwen_vl_utils' `fetch_image`, for
LLaMA-Factory pre-resized by its plugin): input ids and labels (each image's pad run taken as one
token), image-pad counts, `image_grid_thw`, and — for Qwen2.5-VL's pixel boxes — the size the
boxes were computed for against the size the tool feeds the model, and the `bbox_2d` written
against the box in pixels of that size. An export moved to another folder loads in both tools.

Skipped when the consumers' environments are absent, unless QVL_INTEROP is set (then their
absence fails). QVL_INTEROP_DIR: where setup_consumers.sh put them (default .interop/).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvl.formats import families
from qvl.formats.build import FormatSettings, run_format
from qvl.formats.export import (
    ExportSettings,
    fed_size,
    run_export,
    tool_bounds,
    tool_resize,
)
from tests.reference.processors import reference_processor

HERE = Path(__file__).resolve().parent
ENVS = Path(os.environ.get("QVL_INTEROP_DIR") or HERE.parents[1] / ".interop")
PYTHONS = {"ms-swift": ENVS / "swift" / "bin" / "python", "llamafactory": ENVS / "lf" / "bin" / "python"}
RUNNERS = {"ms-swift": HERE / "run_swift.py", "llamafactory": HERE / "run_llamafactory.py"}
REQUIRED = os.environ.get("QVL_INTEROP", "") not in ("", "0")
MISSING = [str(p) for p in PYTHONS.values() if not p.exists()]
pytestmark = pytest.mark.skipif(
    bool(MISSING) and not REQUIRED,
    reason=f"consumer envs absent ({', '.join(MISSING)}): run tests/interop/setup_consumers.sh or `make interop`")

TOOLS = ("ms-swift", "llamafactory")
MODELS = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
# the template a user names for each (a local folder gives ms-swift no way to choose): LLaMA-Factory
# has one qwen2_vl template for Qwen2/2.5-VL, and qwen3_vl_nothink for Qwen3-VL-Instruct
TEMPLATES = {("ms-swift", "qwen2-vl"): "qwen2_vl", ("ms-swift", "qwen2.5-vl"): "qwen2_5_vl",
             ("ms-swift", "qwen3-vl"): "qwen3_vl", ("llamafactory", "qwen2-vl"): "qwen2_vl",
             ("llamafactory", "qwen2.5-vl"): "qwen2_vl", ("llamafactory", "qwen3-vl"): "qwen3_vl_nothink"}
CONFIGS = {"qwen2-vl": "Qwen2VLConfig", "qwen2.5-vl": "Qwen2_5_VLConfig", "qwen3-vl": "Qwen3VLConfig"}
VISION = {"qwen2-vl": dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2),
          "qwen2.5-vl": dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2),
          "qwen3-vl": dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                           deepstack_visual_indexes=[0])}
IMAGE_PAD = 151655

# name: (width, height, mode) as stored; exif.jpg says "rotate 90°" (Orientation 6)
IMAGES = {"photo.png": (640, 480, "RGB"), "tiny.png": (17, 23, "RGB"), "wide.png": (1500, 10, "RGB"),
          "tall.png": (10, 1500, "RGB"), "strip.png": (2000, 13, "RGB"), "big.jpg": (1200, 800, "RGB"),
          "exif.jpg": (300, 200, "RGB"), "grey.png": (320, 240, "L"), "rgba.png": (200, 150, "RGBA")}
BOX = "<ref>the thing</ref><box>(400,0),(500,999)</box>"


def conversation(sample_id: str, *turns: str) -> dict:
    return {"id": sample_id, "conversations": [{"from": ("user", "assistant")[i % 2], "value": t}
                                               for i, t in enumerate(turns)]}


RECORDS = [
    conversation("single", "<img>photo.png</img>\nDescribe the picture.", "Noise in many colours."),
    conversation("multi_image", "<img>photo.png</img><img>grey.png</img>\nWhat differs?", "The second is grey."),
    conversation("multi_turn_boxes", "<img>photo.png</img>\nWhere is the cat?",
                 "<ref>the cat</ref><box>(100,100),(500,500)</box>", "And the sofa?",
                 "<ref>the sofa</ref><box>(0,500),(999,999)</box>, below it."),
    conversation("chinese", "<img>rgba.png</img>\n这是什么？", "<ref>一只猫</ref><box>(100,200),(600,900)</box>在沙发上。"),
    *[conversation(f"box_{name.split('.')[0]}", f"<img>{name}</img>\nWhere is the thing?", BOX)
      for name in ("tiny.png", "wide.png", "tall.png", "strip.png", "exif.jpg", "grey.png", "big.jpg")],
    conversation("newline_turn", "<img>photo.png</img>\nWhat is it?", "Noise.", "\nAnd in one word?", "Noise."),
    conversation("answer_newline", "<img>photo.png</img>\nWhat is it?", "\nNoise."),
    conversation("nfd", "<img>photo.png</img>\nCafe\u0301 au lait?", "Cafe\u0301."),
    conversation("text_only", "Hello, who are you?", "A helpful assistant."),
    {"id": "system", "messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "<image>\nWhat is it?"},
                                  {"role": "assistant", "content": "Grey noise."}], "images": ["grey.png"]},
    {"id": "system_newline", "messages": [{"role": "system", "content": "\nBe brief."},
                                          {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hi."}]},
]
SAMPLES = [r["id"] for r in RECORDS]
BOXED = [r["id"] for r in RECORDS if "<box>" in json.dumps(r)]

# What the consumers do differently today, per (check, tool, model, sample): each such comparison is
# an xfail(strict=True) naming the cause, so it flips to a failure when it is fixed. None today: the
# export sizes images the way each tool does (ms-swift's qwen_vl_utils resize, LLaMA-Factory's 28-px
# stretch) and `qvl format sft --model` tokenizes a turn's header with its content.
KNOWN: dict[tuple[str, str, str, str], str] = {}


def known(check: str, tool: str, model: str, sample: str) -> list:
    reason = KNOWN.get((check, tool, model, sample))
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


def cases(check: str, samples=SAMPLES, models=MODELS):
    return [pytest.param(tool, model, sample, id=f"{tool}-{model}-{sample}",
                         marks=known(check, tool, model, sample))
            for tool in TOOLS for model in models for sample in samples]


def tool_images(images: Path, folder: Path, settings: ExportSettings) -> Path:
    """``images`` as the tool hands them to the processor: ms-swift resized by qwen_vl_utils'
    `fetch_image` (the processor then takes them as they are), LLaMA-Factory pre-resized by its
    plugin's `_preprocess_image` (shrunk to image_max_pixels, grown to image_min_pixels, a side
    under 28 px stretched): what `qvl format sft` renders for that tool."""
    folder.mkdir(parents=True, exist_ok=True)
    fam = families.family(settings.model)
    bounds = tool_bounds(settings, fam)
    for path in images.iterdir():
        image = Image.open(path)
        if settings.target == "ms-swift":
            size = fed_size(bounds, fam, *image.size)
        else:
            size = tool_resize(*image.size, bounds.max_pixels, bounds.min_pixels)
        image.resize(size).save(folder / path.name) if size != image.size else shutil.copy(path, folder)
    return folder


def make_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (width, height, mode) in IMAGES.items():
        rng = np.random.default_rng(width * 7 + height)
        pixels = rng.integers(0, 255, (height, width, 4), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGBA").convert(mode) if mode != "RGBA" else Image.fromarray(pixels, "RGBA")
        if name == "exif.jpg":
            exif = Image.Exif()
            exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
            image.save(folder / name, exif=exif)
        else:
            image.save(folder / name)


def model_folder(name: str, folder: Path) -> Path:
    """A local model folder the tools accept: qvl's reference processor (tokenizer, image
    processor, chat template; no hub) and a tiny config of the family (no weights)."""
    import transformers

    reference_processor(name, folder)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=151936, head_dim=32)
    getattr(transformers, CONFIGS[name])(text_config=text, vision_config=VISION[name]).save_pretrained(folder)
    return folder


def run_consumer(tool: str, jobs: list[list[str]], folder: Path, env: dict | None = None) -> float:
    """Run ``tool``'s runner over ``jobs`` in its own venv; the time it took."""
    if not PYTHONS[tool].exists():
        pytest.fail(f"QVL_INTEROP is set but {PYTHONS[tool]} is absent: run tests/interop/setup_consumers.sh")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{tool}-jobs.json").write_text(json.dumps(jobs))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "MAX_PIXELS",
                                                                       "MIN_PIXELS", "IMAGE_M"))}
    clean.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DISABLE_VERSION_CHECK="1",
                 HF_HOME=str(folder / "hf-home"), MODELSCOPE_CACHE=str(folder / "ms-cache"),
                 TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **(env or {}))
    start = time.monotonic()
    done = subprocess.run([str(PYTHONS[tool]), str(RUNNERS[tool]), str(folder / f"{tool}-jobs.json")], cwd=folder,
                          env=clean, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        pytest.fail(f"{tool}'s preprocessing failed (rc {done.returncode}):\n{done.stderr[-4000:]}")
    return time.monotonic() - start


def qvl_sizes(tool: str, model: str, images: Path, refs: list[str], settings: ExportSettings) -> list[tuple[int, int]]:
    """The size the export computed each image's boxes for: what it says the tool feeds the model."""
    fam = families.family(model)
    bounds = tool_bounds(settings, fam)
    return [fed_size(bounds, fam, *Image.open(images / ref).size) for ref in refs]


def box_of(fed: tuple[int, int]) -> list[int]:
    """BOX's (400,0),(500,999) in pixels of an image fed at ``fed``: where its bbox_2d must be."""
    width, height = fed
    return [round(400 / 1000 * width), 0, round(500 / 1000 * width), round(999 / 1000 * height)]


def collapse(ids: list[int], labels: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(ids, labels) with each run of image pads as one pad; the runs' lengths."""
    out_ids, out_labels, runs = [], [], []
    for i, (t, label) in enumerate(zip(ids, labels)):
        if t == IMAGE_PAD and i and ids[i - 1] == IMAGE_PAD:
            runs[-1] += 1
            continue
        if t == IMAGE_PAD:
            runs.append(1)
        out_ids.append(t)
        out_labels.append(label)
    return out_ids, out_labels, runs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    if MISSING:  # only reached with QVL_INTEROP set
        pytest.fail(f"QVL_INTEROP is set but the consumer envs are absent ({', '.join(MISSING)}): "
                    "run tests/interop/setup_consumers.sh")
    root = tmp_path_factory.mktemp("interop")
    make_images(root / "img")
    src = root / "records.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    models = {m: model_folder(m, root / "models" / m) for m in MODELS}
    import datasets

    qvl, exports, jobs, refs = {}, {}, {}, {}
    for model in MODELS:
        for tool in TOOLS:
            out = root / f"sft-{tool}-{model}"
            folder = tool_images(root / "img", root / f"img-{tool}-{model}", ExportSettings(target=tool, model=model))
            run_format("sft", [src], out, folder, show_progress=False,
                       settings=FormatSettings(model=model, max_len=100_000))
            qvl[tool, model] = {r["id"]: r for r in datasets.load_from_disk(str(out)).with_format(None)}
        for tool in TOOLS:
            out = root / f"export-{tool}-{model}"
            settings = ExportSettings(target=tool, model=model)
            report = run_export([src], out, root / "img", settings=settings, show_progress=False)
            exported = [json.loads(line) for line in (out / "data.jsonl").read_text(encoding="utf-8").splitlines()]
            exports[tool, model] = (report, exported, settings)
            # each tool set the way export.json says: ms-swift reads its bounds from the environment
            # (one process per setting), LLaMA-Factory from its arguments
            resize = report["resize"]
            if tool == "ms-swift":
                setting = (("MAX_PIXELS", str(resize["max_pixels"])), ("MIN_PIXELS", str(resize["min_pixels"])))
                extra = []
            else:
                setting = ()
                extra = [f"image_max_pixels={resize['image_max_pixels']}",
                         f"image_min_pixels={resize['image_min_pixels']}"]
            jobs[tool, setting] = jobs.get((tool, setting), []) + [
                [str(out), str(models[model]), TEMPLATES[tool, model], str(root / f"{tool}-{model}.json"), *extra]]
    timings = dict.fromkeys(TOOLS, 0.0)
    for i, ((tool, setting), group) in enumerate(jobs.items()):
        timings[tool] += run_consumer(tool, group, root / "work" / str(i), dict(setting))
    results = {(tool, model): json.loads((root / f"{tool}-{model}.json").read_text())
               for tool in TOOLS for model in MODELS}
    refs = {r["id"]: [m.group(0)[5:-6] for m in __import__("re").finditer(r"<img>.*?</img>", json.dumps(r))]
            or r.get("images", []) for r in RECORDS}
    print(f"\nconsumers' preprocessing: {', '.join(f'{t} {s:.0f} s' for t, s in timings.items())}")
    return {"root": root, "qvl": qvl, "exports": exports, "results": results, "refs": refs, "models": models}


def sample(world, tool: str, model: str, sample_id: str):
    report, exported, settings = world["exports"][tool, model]
    order = [r["id"] for r in exported]
    assert sample_id in order, f"{sample_id} not exported: {report['rejected_by_reason']}"
    got = world["results"][tool, model][order.index(sample_id)]
    assert "error" not in got, f"{tool} refused {sample_id}: {got.get('error')}"
    return exported[order.index(sample_id)], got, settings


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("model", MODELS)
def test_every_record_loads(world, tool, model):
    report, exported, _ = world["exports"][tool, model]
    assert report["rejected"] == 0 and len(exported) == len(RECORDS)
    results = world["results"][tool, model]
    assert len(results) == len(exported), f"{tool} dropped rows: {len(results)} of {len(exported)}"
    assert [r.get("error") for r in results] == [None] * len(results)


@pytest.mark.parametrize("tool,model,sample_id", cases("ids"))
def test_ids_and_labels(world, tool, model, sample_id):
    """The tool's input ids and labels are qvl's (each image's pads compared as one token)."""
    _, got, _ = sample(world, tool, model, sample_id)
    ours = world["qvl"][tool, model][sample_id]
    tool_ids, tool_labels, _ = collapse(got["input_ids"], got["labels"])
    qvl_ids, qvl_labels, _ = collapse(ours["input_ids"], ours["labels"])
    assert tool_ids == qvl_ids
    assert tool_labels == qvl_labels


@pytest.mark.parametrize("tool,model,sample_id", cases("grids"))
def test_image_grids(world, tool, model, sample_id):
    """The tool's image_grid_thw is what the export sized each image to, and its pad runs are the
    grid's tokens and `qvl format sft`'s (for LLaMA-Factory: of the images it pre-resizes)."""
    record, got, settings = sample(world, tool, model, sample_id)
    refs = world["refs"][sample_id]
    _, _, runs = collapse(got["input_ids"], got["labels"])
    assert runs == [t * h * w // 4 for t, h, w in got["image_grid_thw"]]
    assert [tuple(s) for s in got["fed_sizes"]] == qvl_sizes(tool, model, world["root"] / "img", refs, settings)
    ours = world["qvl"][tool, model][sample_id]
    assert runs == collapse(ours["input_ids"], ours["labels"])[2]


@pytest.mark.parametrize("tool,model,sample_id", cases("boxes", BOXED, ("qwen2.5-vl",)))
def test_box_placement(world, tool, model, sample_id):
    """Qwen2.5-VL's bbox_2d are pixels of the image the model is fed: the size the export computed
    them for is the size the tool feeds."""
    record, got, settings = sample(world, tool, model, sample_id)
    refs = world["refs"][sample_id]
    assert any('"bbox_2d"' in m["content"] for m in record["messages"])
    fed = [tuple(s) for s in got["fed_sizes"]]
    assumed = qvl_sizes(tool, model, world["root"] / "img", refs, settings)
    assert fed == assumed, f"boxes computed for {assumed}, {tool} feeds {fed}"
    if sample_id.startswith("box_"):  # BOX, one image: the bbox_2d written are BOX in pixels of what the tool feeds
        assert json.loads(record["messages"][-1]["content"])["bbox_2d"] == box_of(fed[0])


@pytest.fixture(scope="module")
def moved(world):
    """Qwen2.5-VL exports moved to another folder after they were written (the folder they were
    written to gone), each loaded there by its tool: ms-swift with ROOT_IMAGE_DIR at the new
    place (swift.env says to set it so), LLaMA-Factory with dataset_dir at the new place."""
    root = world["root"]
    out = {}
    for tool in TOOLS:
        written = root / f"portable-{tool}" / "export"
        settings = ExportSettings(target=tool, model="qwen2.5-vl")
        run_export([root / "records.jsonl"], written, root / "img", settings=settings, show_progress=False)
        there = root / f"elsewhere-{tool}" / "renamed"
        there.parent.mkdir()
        shutil.move(str(written), there)
        shutil.rmtree(written.parent)
        resize = json.loads((there / "export.json").read_text())["resize"]
        env, extra = {}, []
        if tool == "ms-swift":
            env = {"MAX_PIXELS": str(resize["max_pixels"]), "MIN_PIXELS": str(resize["min_pixels"])}
        else:
            extra = [f"image_max_pixels={resize['image_max_pixels']}", f"image_min_pixels={resize['image_min_pixels']}"]
        run_consumer(tool, [[str(there), str(world["models"]["qwen2.5-vl"]), TEMPLATES[tool, "qwen2.5-vl"],
                             str(root / f"elsewhere-{tool}" / "out.json"), *extra]], root / f"elsewhere-{tool}", env)
        exported = [json.loads(line) for line in (there / "data.jsonl").read_text(encoding="utf-8").splitlines()]
        out[tool] = (there, exported, json.loads((root / f"elsewhere-{tool}" / "out.json").read_text()))
    return out


@pytest.mark.parametrize("tool", TOOLS)
def test_export_is_portable(world, moved, tool):
    """Every image path is relative to the export folder (LLaMA-Factory's media_dir defaults to
    its dataset_dir; ms-swift resolves it under ROOT_IMAGE_DIR), so a moved export loads in the
    tool, every record, with the same ids and grids as where it was written."""
    there, exported, results = moved[tool]
    paths = [p for r in exported for p in r["images"]]
    assert paths and not any(Path(p).is_absolute() for p in paths)
    assert all((there / p).is_file() for p in paths)
    assert [r.get("error") for r in results] == [None] * len(exported)
    assert results == world["results"][tool, "qwen2.5-vl"]
    snippet = (there / ("swift.env" if tool == "ms-swift" else "llamafactory.yaml")).read_text()
    resize = json.loads((there / "export.json").read_text())["resize"]
    if tool == "ms-swift":
        assert f"MAX_PIXELS={resize['max_pixels']}\n" in snippet and f"MIN_PIXELS={resize['min_pixels']}\n" in snippet
    else:
        assert f"image_max_pixels: {resize['image_max_pixels']}\n" in snippet
        assert f"image_min_pixels: {resize['image_min_pixels']}\n" in snippet


# Other bounds than the tools' defaults, set in the tool the way export.json says (ms-swift:
# MAX_PIXELS/MIN_PIXELS in its environment; LLaMA-Factory: image_max_pixels/image_min_pixels).
BOUNDS = {"ms-swift": ExportSettings(target="ms-swift", model="qwen2.5-vl", max_image_pixels=200_000),
          "llamafactory": ExportSettings(target="llamafactory", model="qwen2.5-vl", tool_max_pixels=256 * 256)}


@pytest.fixture(scope="module")
def bounded(world):
    root = world["root"]
    src = root / "records.jsonl"
    out = {}
    for tool, settings in BOUNDS.items():
        folder = root / f"bounds-{tool}"
        folder.mkdir()
        report = run_export([src], folder / "export", root / "img", settings=settings, show_progress=False)
        resize = report["resize"]
        env, extra = {}, []
        if tool == "ms-swift":
            env = {"MAX_PIXELS": str(resize["max_pixels"]), "MIN_PIXELS": str(resize["min_pixels"])}
        else:
            extra = [f"image_max_pixels={resize['image_max_pixels']}", f"image_min_pixels={resize['image_min_pixels']}"]
        run_consumer(tool, [[str(folder / "export"), str(world["models"]["qwen2.5-vl"]), TEMPLATES[tool, "qwen2.5-vl"],
                             str(folder / "out.json"), *extra]], folder, env)
        exported = [json.loads(line) for line in (folder / "export" / "data.jsonl").read_text().splitlines()]
        out[tool] = (exported, json.loads((folder / "out.json").read_text()))
    return out


@pytest.mark.parametrize("tool,model,sample_id", cases("bounds", BOXED, ("qwen2.5-vl",)))
def test_box_placement_with_the_bounds_export_json_names(world, bounded, tool, model, sample_id):
    """Exported for other bounds, run with the settings export.json names: the boxes still land."""
    exported, results = bounded[tool]
    order = [r["id"] for r in exported]
    got = results[order.index(sample_id)]
    fed = [tuple(s) for s in got["fed_sizes"]]
    assumed = qvl_sizes(tool, model, world["root"] / "img", world["refs"][sample_id], BOUNDS[tool])
    assert fed == assumed, f"boxes computed for {assumed}, {tool} feeds {fed}"
