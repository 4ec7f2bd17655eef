"""`qvl eval grounding|caption|vqa`: generate with a checkpoint (or read answers made
elsewhere), score as the paper's scripts score, write ``answers.jsonl``, ``metrics.json`` and
``report.md``.

Generation follows the scripts in the Qwen-VL repository's ``eval_mm/``: their prompts, greedy
decoding, their ``max_new_tokens``/``min_new_tokens``, special tokens dropped from the answer.
Samples go in batches (left-padded, on the KV cache); under ``torchrun`` each rank takes a
contiguous share. Each answer is appended to ``EVAL/answers.part-RANK.jsonl`` as soon as its
batch is done, so a killed run resumes where it stopped; the parts are then merged into
``EVAL/answers.jsonl`` in data order (id, prompt, raw answer, parsed value, score) and scored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from qvl.boundary import MAX_COORD
from qvl.common import remote, storage
from qvl.eval import caption as caption_scorer
from qvl.eval import grounding as grounding_scorer
from qvl.eval import vqa as vqa_scorer
from qvl.eval.data import EvalDataError, Sample, predictions, read
from qvl.formats.families import picture
from qvl.recipes import require

TASKS = ("grounding", "caption", "vqa")


@dataclass(frozen=True)
class Protocol:
    """What the paper's script asks and how long it lets the model answer."""

    base: str  # the prompt of a pre-trained model ({image}, {sent}, {question} filled in)
    chat: str  # one ChatML user turn for a chat model
    max_new_tokens: int  # in the tokens of Qwen-VL's tokenizer, as the paper's script counts them
    min_new_tokens: int
    # an answer of the length the budget was set for: with another tokenizer (the demo's bytes) the
    # budgets grow by the ratio of its tokens to Qwen-VL's on this text, so the same answer fits
    sized_for: str


PROTOCOLS = {
    "grounding": Protocol("<img>{image}</img><ref>{sent}</ref><box>", picture(1, "{image}") + "Where is {sent}?",
                          28, 10, "the man on the left (120,345),(567,890)"),
    "caption": Protocol("<img>{image}</img>Describe the image in English:",
                        picture(1, "{image}") + "Describe the image in English:", 30, 8,
                        "A man riding a red bicycle down a city street next to a row of parked cars."),
    "vqa": Protocol("<img>{image}</img>{question} Answer:", picture(1, "{image}") + "{question}", 10, 1,
                    "two people on the beach"),
}


def token_budget(protocol: Protocol, tok) -> tuple[int, int]:
    """(max, min) new tokens for ``tok``: the paper's figures for Qwen-VL's tokenizer (and any
    tokenizer that splits ``sized_for`` as it does), scaled by the ratio of token counts for
    another, so that a byte-level tokenizer is not cut off mid-box."""
    from qvl.formats.tokenizers import load_tokenizer

    plain = protocol.sized_for  # text only: the tags are one token in every tokenizer that has them
    ratio = len(tok.encode_text(plain)) / len(load_tokenizer("qwen-vl").encode_text(plain))
    ratio = max(ratio, 1.0)
    return math.ceil(protocol.max_new_tokens * ratio), math.ceil(protocol.min_new_tokens * ratio)
PAPER = {  # the released models' figures, in the paper's percentages (README of Qwen/Qwen-VL)
    "grounding": "RefCOCO val/testA/testB 89.36/92.26/85.34, RefCOCO+ 83.12/88.25/77.21, RefCOCOg val/test "
                 "85.58/85.48 (Qwen-VL); 88.55/92.27/84.51, 82.82/88.59/76.79, 85.96/86.32 (Qwen-VL-Chat)",
    "caption": "CIDEr NoCaps 121.4, Flickr30K 85.8 (Qwen-VL, zero-shot); 120.2, 81.0 (Qwen-VL-Chat)",
    "vqa": "VQAv2 dev 78.8, OK-VQA 58.6, GQA 59.3, TextVQA 63.8 (Qwen-VL); 78.2, 56.6, 57.5, 61.5 (Qwen-VL-Chat)",
}


@dataclass
class EvalSettings:
    task: str
    data: Path
    out: Path
    checkpoint: Path | None = None  # None: score --predictions
    predictions: Path | None = None
    images: Path | None = None
    annotations: Path | None = None  # VQAv2's annotations JSON beside its questions JSON
    image_pattern: str | None = None  # VQAv2 image file names, e.g. COCO_val2014_{image_id:012d}.jpg
    chat: bool = False
    system: str | None = None
    prompt: str | None = None  # another prompt template ({image}, {sent}, {question})
    metric: str = "auto"  # vqa: vqa (ten human answers) or gqa (one answer, the GQA script's cleanup)
    box_scale: float = 999.0
    batch_size: int = 8
    device: str = "auto"
    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    preset: str | None = None
    base: Path | None = None  # a LoRA run's checkpoint: its base, if it moved (default: the recorded one)
    use_java: bool | None = None  # captions: None = when Java is installed
    progress: bool = True

    def __post_init__(self) -> None:
        require(self.task in TASKS, "task", f"{self.task!r}: use {', '.join(TASKS)}")
        require((self.checkpoint is None) != (self.predictions is None), "checkpoint",
                "give --checkpoint (generate) or --predictions (score answers made elsewhere), one of them")
        require(self.metric in ("auto", "vqa", "gqa"), "metric", f"{self.metric!r}: use auto, vqa or gqa")
        require(math.isfinite(self.box_scale) and 1e-6 <= self.box_scale <= MAX_COORD, "box_scale",
                f"{self.box_scale}: must be a number from 1e-6 to {MAX_COORD:g}")
        require(self.batch_size >= 1, "batch_size", f"{self.batch_size}: must be >= 1")


def fill_prompt(template: str, sample: Sample) -> str:
    """The template with ``{image}`` and the sample's fields in it (plain replacement: a
    question may hold braces)."""
    text = template.replace("{image}", sample.image)
    for name in ("sent", "question"):
        if name in sample.fields:
            text = text.replace("{" + name + "}", sample.fields[name])
    return text


# ---------------------------------------------------------------- scoring


def score_one(task: str, sample: Sample, answer: str, s: EvalSettings) -> dict:
    """What one answer parses to and scores (captions are scored as a corpus: later)."""
    if task == "grounding":
        f = sample.fields
        return grounding_scorer.score(answer, f["bbox"], f["width"], f["height"], s.box_scale)
    if task == "vqa":
        refs = sample.fields["answers"]
        metric = s.metric if s.metric != "auto" else ("vqa" if len(refs) > 1 else "gqa")
        parsed = vqa_scorer.normalize_answer(answer) if metric == "vqa" else vqa_scorer.gqa_answer(answer)
        return {"parsed": parsed, "score": vqa_scorer.METRICS[metric](answer, refs), "metric": metric}
    return {"parsed": answer.strip(), "score": None}


def summarize(task: str, samples: list[Sample], rows: list[dict], s: EvalSettings) -> dict:
    n = len(rows)
    metrics: dict = {"task": task, "n": n}
    if task == "grounding":
        metrics["grounding_acc"] = sum(r["score"] for r in rows) / n
        metrics["parsed"] = sum(r["parsed"] is not None for r in rows) / n
    elif task == "vqa":
        metrics["vqa_acc"] = sum(r["score"] for r in rows) / n
        metrics["metric"] = sorted({r["metric"] for r in rows})
        for kind in ("question_type", "answer_type"):
            groups: dict[str, list[float]] = {}
            for sample, r in zip(samples, rows):
                if sample.fields.get(kind) is not None:
                    groups.setdefault(str(sample.fields[kind]), []).append(r["score"])
            if groups:
                metrics[f"by_{kind}"] = {k: sum(v) / len(v) for k, v in sorted(groups.items())}
    else:
        result = caption_scorer.score({x.id: x.fields["captions"] for x in samples},
                                      {r["id"]: r["answer"] for r in rows}, s.use_java)
        metrics.update(result["metrics"])
        metrics.update(tokenizer=result["tokenizer"], comparable=result["comparable"])
        for r in rows:
            r["score"] = result["per_image"][r["id"]]
    return metrics


# ---------------------------------------------------------------- answers


def _read_parts(out: Path) -> dict[str, dict]:
    """Answers written so far by any rank (a line cut by a kill is dropped, and redone)."""
    done = {}
    for part in sorted(out.glob("answers.part-*.jsonl")):
        for line in part.read_bytes().splitlines():
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):  # not JSON, not UTF-8 (a line cut by a kill), nested past parsing
                continue
            if isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("id", "prompt", "answer")):
                done[row["id"]] = row
    return done


def _predictions(path: Path, samples: list[Sample], task: str) -> dict[str, str]:
    """Answers made elsewhere: ``{id|question_id|image_id, answer|caption}`` a line, matched by
    id — or by line order when no line has an id. A missing or extra id is an error naming it."""
    rows = predictions(path)
    answers = {}
    has_ids = any(row.key() is not None for _, row in rows)
    if not has_ids and len(rows) != len(samples):
        raise EvalDataError(f"{path}: {len(rows)} answers without ids for {len(samples)} samples")
    for i, (n, row) in enumerate(rows):
        text = row.answer if row.answer is not None else row.caption
        key = row.key() if has_ids else samples[i].id
        if key is None:
            raise EvalDataError(f"{path}:{n}: no id (others have one)")
        if str(key) in answers:
            raise EvalDataError(f"{path}:{n}: id {key} answered twice")
        answers[str(key)] = text
    ids = {x.id for x in samples}
    missing, extra = sorted(ids - set(answers)), sorted(set(answers) - ids)
    if missing or extra:
        raise EvalDataError(f"{path}: " + "; ".join(
            part for part in (f"no answer for id(s) {', '.join(missing[:10])}" if missing else "",
                              f"id(s) not in the data: {', '.join(extra[:10])}" if extra else "") if part))
    return answers


def _generate(s: EvalSettings, samples: list[Sample], out: Path, rank: int, world: int) -> None:
    import torch

    from qvl.common.progress import progress_bar
    from qvl.errors import AnnotationError
    from qvl.formats.images import ImageStore
    from qvl.trainer.data import load_image
    from qvl.trainer.generate import greedy_batch, render_prompt
    from qvl.trainer.lora import load_checkpoint

    protocol = PROTOCOLS[s.task]
    template = s.prompt or (protocol.chat if s.chat else protocol.base)
    model, preset, tok, meta = load_checkpoint(s.checkpoint, s.preset, s.base)
    budget = token_budget(protocol, tok)
    max_new = s.max_new_tokens or budget[0]
    min_new = budget[1] if s.min_new_tokens is None else s.min_new_tokens
    device = torch.device("cuda" if s.device == "auto" and torch.cuda.is_available() else
                          "cpu" if s.device == "auto" else s.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    model.to(device)
    store = ImageStore(s.images)
    share = len(samples) // world + (1 if rank < len(samples) % world else 0)
    start = rank * (len(samples) // world) + min(rank, len(samples) % world)
    mine = samples[start:start + share]
    done = _read_parts(out)
    todo = [x for x in mine if x.id not in done]
    part = out / f"answers.part-{rank}.jsonl"
    if part.is_file():  # keep the whole lines a killed run wrote, never append to a cut one
        storage.write_text(part, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in done.values()
                                         if row["id"] in {x.id for x in mine}))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    special = set(tok.specials.values())
    with progress_bar(disable=not s.progress or rank != 0) as bar, open(part, "a", encoding="utf-8") as sink:
        task = bar.add_task(f"eval {s.task}", total=len(mine), completed=len(mine) - len(todo), unit="samples")
        for i in range(0, len(todo), s.batch_size):
            batch = todo[i:i + s.batch_size]
            prompts, images = [], []
            for sample in batch:
                text = fill_prompt(template, sample)
                ids, refs = render_prompt(tok, preset.image_tokens, text, s.chat, s.system)
                try:
                    images += [load_image(store.read(ref)[0], int(meta["resolution"])) for ref in refs]
                except AnnotationError as e:
                    raise EvalDataError(f"sample {sample.id}: {e}") from None
                prompts.append((text, ids))
            pixels = torch.stack(images) if images else None
            with autocast:
                outputs = greedy_batch(model, tok, [ids for _, ids in prompts], pixels, max_new, min_new)
            for sample, (text, _), new in zip(batch, prompts, outputs):
                answer = tok.decode([t for t in new if t not in special])  # special tokens dropped, as the scripts do
                row = {"id": sample.id, "prompt": text, "answer": answer}
                sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
            bar.advance(task, len(batch))


def evaluate(s: EvalSettings) -> dict:
    """Answers (generated or given), scored; returns the metrics, also written to ``out``."""
    out = Path(s.out)
    samples = read(s.task, Path(s.data), s.annotations, s.image_pattern)
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    identity = {"task": s.task, "data": remote.origin(s.data), "checkpoint": _fingerprint(s.checkpoint),
                "predictions": remote.origin(s.predictions) if s.predictions else None,
                "chat": s.chat, "prompt": s.prompt, "system": s.system}
    if rank == 0:
        try:
            existing = storage.claim(out, "eval")
        except storage.OutputError as e:
            raise EvalDataError(str(e)) from None
        try:
            previous = storage.read_json(out / "run.json") if (out / "run.json").is_file() else None
        except (OSError, ValueError):
            raise EvalDataError(f"{out / 'run.json'}: damaged; use another --out") from None
        if existing and previous is not None and previous != identity:
            raise EvalDataError(f"{out}: holds an evaluation of another checkpoint, data or prompt; use another --out")
        storage.write_json(out / "run.json", identity)
    if s.checkpoint is not None:
        if world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if os.environ.get("LOCAL_RANK") and _cuda() else "gloo")
            dist.barrier()
        _generate(s, samples, out, rank, world)
        if world > 1:
            dist.barrier()
            if rank != 0:
                return {}
        done = _read_parts(out)
        missing = [x.id for x in samples if x.id not in done]
        if missing:
            raise EvalDataError(f"{out}: no answer for {len(missing)} sample(s) (e.g. {missing[0]}); run again to resume")
        answers = {x.id: done[x.id]["answer"] for x in samples}
        prompts = {x.id: done[x.id]["prompt"] for x in samples}
    else:
        answers = _predictions(Path(s.predictions), samples, s.task)
        prompts = {}
    rows = []
    for sample in samples:
        row = {"id": sample.id, "prompt": prompts.get(sample.id), "answer": answers[sample.id]}
        row.update(score_one(s.task, sample, answers[sample.id], s))
        rows.append(row)
    metrics = summarize(s.task, samples, rows, s)
    with storage.atomic_path(out / "answers.jsonl") as tmp:
        # allow_nan=False: answers.jsonl is JSON, whatever an answer held (no NaN, no Infinity)
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows),
                       encoding="utf-8")
    metrics["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(s).items()}
    metrics["checkpoint"] = str(s.checkpoint) if s.checkpoint else None
    storage.write_json(out / "metrics.json", metrics)
    storage.write_text(out / "report.md", report(metrics))
    return metrics


def _fingerprint(checkpoint: Path | None) -> dict | None:
    """A checkpoint as answers depend on it: its folder and its weights file as they are now
    (a retrained checkpoint in the same folder is another checkpoint)."""
    if checkpoint is None:
        return None
    weights = Path(checkpoint) / "model.safetensors"
    stat = weights.stat() if weights.is_file() else None
    return {"path": remote.origin(checkpoint),
            "weights": [stat.st_size, stat.st_mtime_ns] if stat else None}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


MAIN = {"grounding": ("grounding_acc", "accuracy (IoU >= 0.5)"), "vqa": ("vqa_acc", "VQA accuracy"),
        "caption": ("cider", "CIDEr")}


def headline(metrics: dict) -> str:
    """The task's main figure in the paper's units (percent; CIDEr x 100)."""
    key, name = MAIN[metrics["task"]]
    return f"{name} {100 * metrics[key]:.2f}"


def report(metrics: dict) -> str:
    task = metrics["task"]
    lines = [f"# qvl eval {task}", "", f"{metrics['n']:,} samples, {headline(metrics)} "
             f"(the paper's units; `metrics.json` holds fractions)", ""]
    if task == "caption":
        lines += ["| metric | score |", "|---|---:|"]
        lines += [f"| {k} | {'—' if metrics[k] is None else f'{100 * metrics[k]:.2f}'} |"
                  for k in ("cider", "bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l")]
        if not metrics["comparable"]:
            lines += ["", f"Tokenizer: {metrics['tokenizer']} — not comparable with the paper's figures."]
    for kind in ("by_question_type", "by_answer_type"):
        if kind in metrics:
            lines += ["", f"| {kind[3:]} | accuracy |", "|---|---:|"]
            lines += [f"| {k} | {100 * v:.2f} |" for k, v in metrics[kind].items()]
    lines += ["", f"The released models, in the paper: {PAPER[task]}.", ""]
    return "\n".join(lines)
