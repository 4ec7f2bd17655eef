"""Adversarial inputs, one function per case: each runs its case at ``n`` × a base size
(``bad_input_scaling.py`` times them at 1×, 2×, 4× in fresh processes). Each case once took
quadratic time or unbounded memory, or its cost followed what a file claimed rather than what
it holds; time and memory must now grow at most linearly in ``n``, or not at all.

Prefixes name the room: ``formats_`` (importers, format sft/multitask), ``eval_``, ``trainer_``
(convert's claims), ``curate_`` (near-duplicates, recipes).
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

from PIL import Image

from qvl.errors import QvlError
from qvl.formats.build import FormatSettings, run_format


def _records(layout: str, files: list[Path]) -> None:
    from qvl.formats import importers

    try:
        for _ in importers.records(layout, files):
            pass
    except QvlError:
        pass  # refused, named: what is measured is what it cost to get there


def formats_importers_deep_json(n: int) -> None:
    """n x 100 KB of '[' in a streamed file: ijson's prefixes were quadratic (gigabytes); now refused at depth 64."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "blip.json"
        path.write_bytes(b"[" * (100_000 * n))
        _records("llava-pretrain", [path])


def formats_importers_escaped_strings(n: int) -> None:
    """n x 20,000 LLaVA records whose text is full of escaped quotes, backslashes and brackets:
    the nesting guard stays linear."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "blip.json"
        text = '\\"[{' * 20 + "\\\\" * 20 + ']}"' * 20
        path.write_text(json.dumps([{"id": str(i), "image": "a.jpg", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": text}]} for i in range(20_000 * n)]))
        _records("llava-pretrain", [path])


def formats_importers_grit_chunks(n: int) -> None:
    """One GRIT row with n x 10,000 noun chunks: overlap resolution was quadratic; now a reject past 256."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "grit.parquet"
        chunks = [[[float(i), float(i + 1), 0.1, 0.1, 0.5, 0.5, 0.9] for i in range(10_000 * n)]]
        pq.write_table(pa.table({"key": ["0"], "url": ["https://grit.example/0.jpg"], "caption": ["x" * 10_000 * n],
                                 "width": [64], "height": [48],
                                 "noun_chunks": pa.array(chunks, pa.list_(pa.list_(pa.float64())))}), path)
        _records("grit", [path])


def formats_importers_refcoco_memo(n: int) -> None:
    """A refs pickle of n x 100,000 memoized strings, then a LONG_BINPUT 2^32-1: CPython sized its
    memo by that index (32 GB); now the opcodes are scanned (linear) and the index refused."""
    import pickle

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "refs(unc).p"
        body = pickle.dumps([str(i) for i in range(100_000 * n)], protocol=2)[:-1]
        path.write_bytes(body + b"r\xff\xff\xff\xff.")
        (Path(d) / "instances.json").write_text('{"images": [], "annotations": []}')
        _records("refcoco", [path, Path(d) / "instances.json"])


def _sft(turn: str, model: str = "qwen-vl", max_len: int = 1 << 20, image: bool = False) -> None:
    """One conversation whose user turn is ``turn``, rendered and tokenized (``max_len`` high
    enough that it is not refused by its length)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        images = None
        if image:
            images = work / "images"
            images.mkdir()
            Image.new("RGB", (640, 480), "red").save(images / "a.png")
        src = work / "chat.jsonl"
        src.write_text(json.dumps({"conversations": [{"from": "user", "value": turn},
                                                     {"from": "assistant", "value": "ok"}]}) + "\n")
        run_format("sft", [src], work / "out", images, show_progress=False,
                   settings=FormatSettings(model=model, max_len=max_len))


def formats_sft_img_turn(n: int) -> None:
    """200 KB x n of ``<img>`` with no ``</img>`` (was 25 s at 1x: the span regex rescanned)."""
    _sft("<img>" * (40_000 * n))


def formats_sft_ref_turn_qwen25(n: int) -> None:
    """200 KB x n of ``<ref>`` for --model qwen2.5-vl (was 34 s at 1x)."""
    _sft("<ref>" * (40_000 * n), "qwen2.5-vl")


def formats_sft_refs_without_boxes_qwen25(n: int) -> None:
    """``<ref>a</ref>`` 20,000 x n times, one box at the end: a lazy label ran on to it from every ref."""
    _sft("<img>a.png</img>" + "<ref>a</ref> " * (20_000 * n) + "<box>(1,2),(3,4)</box>", "qwen2.5-vl", image=True)


def formats_sft_boxes_after_image_qwen25(n: int) -> None:
    """5,000 x n boxes after one image: each box searched the whole text before it for its image."""
    _sft("<img>a.png</img>" + "<box>(1,2),(3,4)</box>" * (5_000 * n), "qwen2.5-vl", image=True)


def formats_sft_spaces_turn(n: int) -> None:
    """1 MB x n of spaces: tiktoken's regex gives up past ~1M; refused by its length, never encoded."""
    _sft(" " * (1_000_000 * n), max_len=2048)


def formats_multitask_long_caption(n: int) -> None:
    """A caption of 4 MB x n: too long for --max-len by its length alone, never tokenized."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        Image.new("RGB", (64, 48)).save(work / "images" / "a.png")
        src = work / "ann.jsonl"
        src.write_text(json.dumps({"task": "caption", "image": "a.png", "caption": "word " * (800_000 * n)}) + "\n")
        run_format("multitask", [src], work / "out", work / "images", show_progress=False)


def formats_image_file_huge(n: int) -> None:
    """An image file of 2.5 GB x n (sparse: no disk used) under --images: refused by its size, unread."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "images").mkdir()
        with open(work / "images" / "huge.png", "wb") as f:
            Image.new("RGB", (8, 8)).save(f, "PNG")
            f.truncate(2_500_000_000 * n)
        src = work / "ann.jsonl"
        src.write_text(json.dumps({"task": "caption", "image": "huge.png", "caption": "x"}) + "\n")
        run_format("multitask", [src], work / "out", work / "images", show_progress=False)


def eval_grounding_open_parens(n: int) -> None:
    """An answer of 80 KB x n of ``(``: the paper's ``\\((.*?)\\),\\((.*?)\\)`` tried every ``(``
    against the rest of the line (21 s at 80 KB); the scanner reads it once."""
    from qvl.eval import grounding

    grounding.score("(" * 80_000 * n, [0, 0, 10, 10], 100, 100)


def eval_grounding_open_boxes(n: int) -> None:
    """An answer of 80 KB x n of ``(1,2),(`` with no closing ``)``: every ``),(`` a candidate."""
    from qvl.eval import grounding

    grounding.score("(1,2),(" * (80_000 * n // 7), [0, 0, 10, 10], 100, 100)


def eval_vqa_normalize_parens(n: int) -> None:
    """The VQAv2 answer cleanup of 80 KB x n of ``(``, ``.`` and digits mixed."""
    from qvl.eval import vqa

    answer = "(1.,(a." * (80_000 * n // 7)
    vqa.vqa_accuracy(answer, ["yes"] * 10)
    vqa.gqa_accuracy(answer, ["yes"])


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

    from qvl.trainer.release import ReleaseConfig, preset_from_config
    from qvl.trainer.release_keys import key_map

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


def trainer_generate_max_new_tokens(n: int) -> None:
    """`generate --max-new-tokens 10^8 x n` on a micro model with a 256-token context (ran on
    past the context, for ever): stops at the context; flat in n."""
    import torch

    from qvl.formats.tokenizers import IMG_PAD, load_tokenizer
    from qvl.trainer.generate import generate_text
    from qvl.trainer.model import QwenVL
    from qvl.trainer.preset import preset_from_dict

    torch.manual_seed(0)
    preset = preset_from_dict({"name": "micro", "tokenizer": "bytes", "image_tokens": 4,
                               "vision": {"width": 32, "layers": 1, "heads": 2, "patch_size": 8},
                               "adapter": {"heads": 2},
                               "llm": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                       "num_key_value_heads": 2, "intermediate_size": 64,
                                       "max_position_embeddings": 256}}, "micro")
    tok = load_tokenizer(preset.tokenizer)
    model = QwenVL(preset, tok.vocab_size, tok.special(IMG_PAD), 32).eval()
    generate_text(model, tok, 32, "abc", max_new_tokens=10 ** 8 * n)


def curate_near_dup_same_hash(n: int) -> None:
    """12,000 × n images with one pHash (one popular picture under many URLs)."""
    import numpy as np

    from qvl.curate.images.near_dups import near_duplicates

    near_duplicates(np.full(12_000 * n, 0x0F0F_1234_5678_9ABC, dtype=np.uint64), 4)


def curate_near_dup_shared_band(n: int) -> None:
    """12,000 × n distinct pHashes agreeing on one band and random elsewhere: one huge bucket."""
    import numpy as np

    from qvl.curate.images.near_dups import near_duplicates

    rng = np.random.default_rng(0)
    near_duplicates((rng.integers(0, 2 ** 63, 12_000 * n, dtype=np.uint64) << np.uint64(13)) | np.uint64(0x1ABC), 4)


def curate_recipe_aliases(n: int) -> None:
    """A billion-laughs YAML recipe of 9 × n levels: refused before anything is expanded."""
    from qvl.errors import QvlError
    from qvl.recipes import load_recipe

    lines = ['a0: &a0 "lol"'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9 * n)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text("\n".join(lines) + "\nname: *a%d\n" % (9 * n - 1))
        try:
            load_recipe(path)
        except QvlError:
            return
        raise AssertionError("an alias tree was loaded")
