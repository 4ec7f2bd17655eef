"""Throughput of `qvl format sft`, beside a per-sample baseline written like Qwen-VL's
finetune.py (tokenize each turn, build lists), in one run; and packing efficiency.

    python benchmarks/format_sft.py [--conversations 4000] [--repeats 3]
    python benchmarks/format_sft.py --model qwen2.5-vl [--conversations 1000]

The baseline does less than qvl: no file reading, no image bytes, no Arrow writing. With
``--model``, the baseline is the transformers processor of that family applied per sample —
chat template, then the processor on the text and the image, the way LLaMA-Factory and
ms-swift preprocess — and every sample's ids must be identical to qvl's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests/reference's oracle

from qvl.formats.build import FormatSettings, run_format
from qvl.formats.families import picture
from qvl.formats.tokenizers import load_tokenizer

WORDS = ("the a dog cat runs on beach park red blue small large image shows two three people near river "
         "city street car train bridge tree sky cloud sunset morning light wooden table chair window").split()
ZH = "图中有一只狗在海滩上奔跑红色的汽车停在街道旁边天空中有白云"


def sentence(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return "".join(rng.choice(ZH) for _ in range(rng.randint(10, 60)))
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 120))).capitalize() + "."


def generate(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (64, 64)) -> tuple[Path, Path]:
    rng = random.Random(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(16):
        Image.new("RGB", size, (i * 15, 80, 160)).save(images / f"{i}.png")
    path = folder / "convos.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            turns = []
            for t in range(rng.randint(2, 6)):
                user = sentence(rng) + "?"
                if t == 0 and rng.random() < 0.5:
                    user = picture(1, f"{rng.randrange(16)}.png") + user
                turns += [{"from": "user", "value": user},
                          {"from": "assistant", "value": " ".join(sentence(rng) for _ in range(rng.randint(1, 4)))}]
            f.write(json.dumps({"id": f"c{i}", "conversations": turns}, ensure_ascii=False) + "\n")
    return path, images


def baseline(path: Path) -> tuple[int, int, float]:
    """Qwen-VL finetune.py's preprocess, per sample (images as 256 pads, as qvl does)."""
    tok = load_tokenizer("qwen-vl")
    enc = tok._enc
    im_start, im_end = tok.special("<|im_start|>"), tok.special("<|im_end|>")
    img = [tok.special("<img>")] + [tok.special("<imgpad>")] * 256 + [tok.special("</img>")]

    def tokenizer(text):
        text = unicodedata.normalize("NFC", text)
        out, pos = [], 0
        while (start := text.find("<img>", pos)) >= 0:
            out += enc.encode(text[pos:start], allowed_special="all") + img
            pos = text.index("</img>", start) + 6
        return out + enc.encode(text[pos:], allowed_special="all")

    roles = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
    t = time.perf_counter()
    samples = tokens = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            source = json.loads(line)["conversations"]
            nl_tokens = tokenizer("\n")
            system = [im_start] + tokenizer("system") + nl_tokens + tokenizer("You are a helpful assistant.") + \
                [im_end] + nl_tokens
            input_id = list(system)
            target = [im_start] + [-100] * (len(system) - 3) + [im_end] + nl_tokens
            for sentence_ in source:
                role = roles[sentence_["from"]]
                _input_id = tokenizer(role) + nl_tokens + tokenizer(sentence_["value"]) + [im_end] + nl_tokens
                input_id += _input_id
                if role == "<|im_start|>user":
                    target += [im_start] + [-100] * (len(_input_id) - 3) + [im_end] + nl_tokens
                else:
                    target += [im_start] + [-100] * len(tokenizer(role)) + \
                        _input_id[len(tokenizer(role)) + 1:-2] + [im_end] + nl_tokens
            samples += 1
            tokens += len(input_id)
    return samples, tokens, time.perf_counter() - t


def family_baseline(path: Path, images: Path, model: str, work: Path) -> tuple[list[list[int]], float, float]:
    """The family's transformers processor per sample, as fine-tuning frameworks run it."""
    from tests.reference.processors import reference_processor

    t = time.perf_counter()
    processor = reference_processor(model, work / "processor")
    setup_s = time.perf_counter() - t
    out = []
    t = time.perf_counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            messages, pictures = [], []
            for turn in json.loads(line)["conversations"]:
                text = turn["value"]
                role = "user" if turn["from"] == "user" else "assistant"
                if "<img>" in text:
                    ref = text[text.index("<img>") + 5:text.index("</img>")]
                    pictures.append(Image.open(images / ref).convert("RGB"))
                    content = [{"type": "image"}, {"type": "text", "text": text.split("\n", 1)[1]}]
                else:
                    content = [{"type": "text", "text": text}]
                messages.append({"role": role, "content": content})
            rendered = processor.apply_chat_template(messages, tokenize=False)
            out.append(list(processor(text=[rendered], images=pictures or None)["input_ids"][0]))
    return out, setup_s, time.perf_counter() - t


def compare_family(args, work: Path) -> None:
    import datasets

    from qvl.formats.tokenizers import load_tokenizer

    path, images = generate(work, args.conversations, size=(640, 480))
    t = time.perf_counter()
    load_tokenizer(args.model, args.model)  # once per process, like the processor's construction below
    qvl_setup_s = time.perf_counter() - t
    qvl_s = float("inf")
    for _ in range(args.repeats):
        t = time.perf_counter()
        manifest = run_format("sft", [path], work / "out", images, show_progress=False, overwrite=True,
                              settings=FormatSettings(model=args.model, max_len=100_000))
        qvl_s = min(qvl_s, time.perf_counter() - t)
    expected, base_setup_s, base_s = family_baseline(path, images, args.model, work)
    rows = datasets.load_from_disk(str(work / "out")).with_format(None)
    same = sum(list(r["input_ids"]) == e for r, e in zip(rows, expected))
    print(f"\n{args.conversations:,} conversations, {manifest['tokens']:,} tokens, {manifest['images']:,} images "
          f"of 640x480 (rendered for {args.model})\n")
    print("| measure | setup s (once) | samples/s | target |")
    print("|---|---:|---:|---:|")
    print(f"| transformers processor per sample (chat template + processor) | {base_setup_s:.2f} | "
          f"{len(expected) / base_s:,.0f} | |")
    print(f"| qvl format sft --model {args.model}: read, render, tokenize, images inline, Arrow shards "
          f"(best of {args.repeats}) | {qvl_setup_s:.2f} | {manifest['samples'] / qvl_s:,.0f} | |")
    print(f"| speed-up | | {base_s / qvl_s:.1f}x | >= 20x |")
    print(f"| samples whose ids are identical | | {same:,} of {len(expected):,} | all |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3, help="each figure is the best of this many runs")
    parser.add_argument("--model", default=None, help="qwen2-vl, qwen2.5-vl or qwen3-vl: against its processor")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qvl-bench-sft-"))
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    if args.model:
        compare_family(args, work)
        return
    path, images = generate(work, args.conversations)
    b_s = q_s = p_s = float("inf")
    for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits both alike
        b_samples, b_tokens, seconds = baseline(path)
        b_s = min(b_s, seconds)
        t = time.perf_counter()
        manifest = run_format("sft", [path], work / "out", images, settings=FormatSettings(max_len=8192),
                              show_progress=False, overwrite=True)
        q_s = min(q_s, time.perf_counter() - t)
        t = time.perf_counter()
        packed = run_format("sft", [path], work / "packed", images, settings=FormatSettings(pack_to=2048),
                            show_progress=False, overwrite=True)
        p_s = min(p_s, time.perf_counter() - t)
    assert manifest["samples"] == b_samples and manifest["tokens"] == b_tokens, "qvl and the baseline disagree"
    print(f"\n{args.conversations:,} conversations, {b_tokens:,} tokens, "
          f"{manifest['images']:,} images inline\n")
    print("| measure | samples/s | tokens/s | target |")
    print("|---|---:|---:|---:|")
    print(f"| baseline: finetune.py preprocess per sample (no I/O) | {b_samples / b_s:,.0f} | {b_tokens / b_s:,.0f} | |")
    print(f"| qvl format sft, end to end (read, render, images, write) | {manifest['samples'] / q_s:,.0f} | "
          f"{manifest['tokens'] / q_s:,.0f} | >= 1,000,000 tokens/s |")
    print(f"| speed-up | {b_s / q_s:.1f}x | | >= 3x |")
    print(f"| qvl format sft --pack-to 2048 | {packed['samples'] / p_s:,.0f} | {packed['tokens'] / p_s:,.0f} | |")
    print(f"| packing efficiency at 2048 (real tokens / capacity) | {packed['packing']['efficiency']:.1%} "
          f"({packed['rows']:,} rows, {packed['rejected']} longer than 2048 rejected) | | >= 95% |")
    padded = packed["tokens"] / (packed["samples"] * 2048)
    print(f"| padding every sample to 2048 instead | {padded:.1%} | | |")


if __name__ == "__main__":
    main()
