"""`qvl curate clip-score IMAGES --model NAME --pretrained PATH`: image-text similarity of
the downloaded pairs with open_clip, from a local checkpoint only.

The model is an open_clip config name (``ViT-B-32``) or a JSON config file (a model of
your own, or the tiny one the tests build); the weights are a local ``.safetensors``
(or a ``.pt``/``.bin`` read with ``weights_only=True``) — a missing file is an error, never
a hub download. Every downloaded image that decodes is scored (so a later threshold can
use the score whatever else it failed), per shard, cached, on CPU or GPU in batches. The
scores go to ``IMAGES/ledger/clip.parquet``; the download's outputs are then re-derived
with the ``clip_score`` rule on the computed score (per-source thresholds), as
``clip_score_computed`` in the funnel. Kept rows carry ``clip_score`` (computed) and
``clip_score_dataset`` (the score the dataset shipped, if any).

On Ray (``engine=EngineSettings("ray")``) a pool of ``Scorer`` actors, each loading the model
once (one GPU each where the cluster has GPUs, else one CPU), scores the shards; the shards,
their batches and the cache are the local engine's, so the scores and outputs are too.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from PIL import Image

from qvl.common import storage
from qvl.common.engines import EngineSettings
from qvl.common.progress import progress_bar
from qvl.curate.images import download as dl
from qvl.curate.images.folders import Folders
from qvl.curate.images.pixel_checks import IMAGE_SUFFIXES
from qvl.errors import QvlError
from qvl.recipes import require


class ClipScoreError(QvlError):
    pass


@dataclass
class ClipSettings:
    model: str = "ViT-B-32"  # open_clip config name, or a path to a JSON model config
    pretrained: Path | None = None  # local checkpoint file
    batch_size: int = 64
    device: str = "auto"  # auto: cuda when available
    thresholds: dict[str, float] | None = None  # per source; None: the filter run's clip_thresholds
    threshold_default: float | None = None
    aesthetic_head: Path | None = None  # a LAION aesthetic linear head: aesthetic_computed beside the score

    def __post_init__(self) -> None:
        require(1 <= self.batch_size <= 65_536, "batch_size", f"{self.batch_size}: 1 to 65536 pairs")
        for source, value in {**(self.thresholds or {}), "default": self.threshold_default}.items():
            require(value is None or -1 <= value <= 1, f"clip_thresholds.{source}",
                    f"{value}: a cosine similarity is in [-1, 1]")


class AestheticHead:
    """LAION-AI's aesthetic predictor: one linear layer on the unit-norm CLIP image embedding
    (``sa_0_4_vit_b_32_linear.pth`` for ViT-B/32, ``…_l_14_…`` for ViT-L/14), read weights-only."""

    def __init__(self, path: Path, dim: int):
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            self.weight, self.bias = state["weight"].float().reshape(-1), state["bias"].float().reshape(())
        except (OSError, RuntimeError, KeyError, TypeError, AttributeError) as e:
            raise ClipScoreError(f"--aesthetic-head {path}: not a linear head with weight and bias ({e})") from None
        if self.weight.numel() != dim:
            raise ClipScoreError(f"--aesthetic-head {path}: made for {self.weight.numel()}-d embeddings, the CLIP "
                                 f"model gives {dim}-d (B/32: 512, L/14: 768)")

    def __call__(self, unit_embeddings: torch.Tensor) -> torch.Tensor:
        return unit_embeddings.float() @ self.weight.to(unit_embeddings.device) + self.bias.to(unit_embeddings.device)


def model_name(model: str, pretrained: Path | None) -> str:
    """The open_clip name of ``model`` (a config name, or a JSON config registered here), its
    checkpoint checked to be a local file: what is wrong is said before any model is built."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip

    name = model
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise ClipScoreError(f"{path}: no such model config")
        open_clip.add_model_config(path)
        name = path.stem
    if name not in open_clip.list_models():
        raise ClipScoreError(f"{model}: not an open_clip model config (see open_clip.list_models()) or a .json file")
    if pretrained is None or not Path(pretrained).is_file():
        raise ClipScoreError(f"--pretrained {pretrained}: a local checkpoint file is required (nothing is downloaded)")
    return name


def load_model(model: str, pretrained: Path | None, device: torch.device):
    """(model, preprocess, tokenizer, name) from local files only."""
    import open_clip

    name = model_name(model, pretrained)
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, device=device)
        _load_weights(clip, Path(pretrained))
    except (RuntimeError, ValueError, OSError) as e:
        raise ClipScoreError(f"{pretrained}: cannot load into {name} ({e})") from None
    return clip.eval(), preprocess, open_clip.get_tokenizer(name), name


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items()}
    model.load_state_dict(state)


def _fingerprint(s: ClipSettings) -> str:
    files = [Path(p) for p in (s.pretrained, s.aesthetic_head) if p is not None]
    blob = "|".join([s.model] + [f"{p.resolve()}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in files])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@torch.no_grad()
def score_shard(clip, preprocess, tokenizer, device, tar_path: Path, rows: pl.DataFrame, batch_size: int,
                head: AestheticHead | None = None) -> pl.DataFrame:
    """Cosine similarity of each (image in the tar, its text) and, with ``head``, the image's
    aesthetic score; rows: key, row_id, text."""
    wanted = dict(zip(rows["key"], zip(rows["row_id"], rows["text"])))
    ids, scores, aesthetic = [], [], []
    images, texts = [], []

    def flush():
        if not images:
            return
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        with autocast:
            img = clip.encode_image(torch.stack(images).to(device))
            txt = clip.encode_text(tokenizer(texts).to(device))
        img = img.float() / img.float().norm(dim=-1, keepdim=True)
        txt = txt.float() / txt.float().norm(dim=-1, keepdim=True)
        scores.extend((img * txt).sum(-1).cpu().tolist())
        if head is not None:
            aesthetic.extend(head(img).cpu().tolist())
        images.clear()
        texts.clear()

    with tarfile.open(tar_path) as tar:
        for member in tar:
            stem, _, suffix = member.name.rpartition(".")
            if stem not in wanted or f".{suffix.lower()}" not in IMAGE_SUFFIXES:
                continue
            with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                images.append(preprocess(im.convert("RGB")))
            row_id, text = wanted[stem]
            ids.append(row_id)
            texts.append(text)
            if len(images) >= batch_size:
                flush()
        flush()
    frame = pl.DataFrame({"row_id": ids, "clip_score_computed": scores},
                         schema={"row_id": pl.String, "clip_score_computed": pl.Float64})
    return frame.with_columns(aesthetic_computed=pl.Series(aesthetic, dtype=pl.Float64)) if head is not None else frame


def _device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                        ("cpu" if name == "auto" else name))


class Scorer:
    """The model loaded once; then shard after shard scored and cached. Here, or as a Ray actor."""

    def __init__(self, s: ClipSettings, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.device = _device(s.device)
        self.clip, self.preprocess, self.tokenizer, _ = load_model(s.model, s.pretrained, self.device)
        self.head = AestheticHead(Path(s.aesthetic_head), self.clip.visual.output_dim) if s.aesthetic_head else None
        self.batch_size = s.batch_size

    def score(self, tar_path: Path, rows: pl.DataFrame, cache: Path) -> int:
        part = score_shard(self.clip, self.preprocess, self.tokenizer, self.device, tar_path, rows, self.batch_size,
                           self.head)
        storage.write_parquet(cache, part.to_arrow())
        return part.height


def _score_here(s: ClipSettings, jobs: list[tuple], engine: EngineSettings) -> Iterator[int]:
    scorer = Scorer(s)
    for job in jobs:
        yield scorer.score(*job)


def _score_on_ray(s: ClipSettings, jobs: list[tuple], engine: EngineSettings) -> Iterator[int]:
    """An actor pool over the shards: one actor a GPU where the cluster has GPUs, else one a CPU
    (``engine.workers`` of them at most). A model that fails to load in an actor is one error."""
    from ray.exceptions import RayError
    from ray.util import ActorPool

    from qvl.common.engines import RayEngine

    if not jobs:
        return
    with RayEngine(engine.address, engine.workers) as ray:
        gpus = int(ray.resources().get("GPU", 0))
        count = min(gpus or int(ray.resources().get("CPU", 1)), engine.workers or len(jobs), len(jobs))
        actor = ray.ray.remote(num_cpus=1, num_gpus=1 if gpus else 0)(Scorer)
        actors = [actor.remote(s, None if gpus else 1) for _ in range(max(1, count))]
        try:
            yield from ActorPool(actors).map_unordered(lambda a, job: a.score.remote(*job), jobs)
        except RayError as e:
            cause = getattr(e, "cause", None) or e
            raise ClipScoreError(f"clip-score on Ray: {str(cause).strip().splitlines()[-1][:500]}") from None
        finally:
            for a in actors:
                ray.ray.kill(a)


SCORERS = {"local": _score_here, "ray": _score_on_ray}


def run_clip_score(images: str | Path, s: ClipSettings, show_progress: bool = True,
                   engine: EngineSettings | None = None) -> dict:
    engine = engine or EngineSettings()
    f = Folders(Path(images))
    if not f.state.is_file() or not (f.ledger / "download.parquet").is_file():
        raise ClipScoreError(f"{images}: not the --out of a finished `qvl curate download`")
    state = f.read_state()
    name = model_name(s.model, s.pretrained)
    kept, base_report = dl.read_curated(Path(state["from"]))
    ledger = pl.read_parquet(f.ledger / "download.parquet")
    scorable = (ledger.filter((pl.col("download_status") == "success") & pl.col("image_error").is_null())
                .join(kept.select("row_id", "text"), on="row_id"))
    cache = f.out / "_qvl" / "clip" / _fingerprint(s)
    shards = scorable.partition_by("image_tar", as_dict=True, maintain_order=True)
    paths = {tar: cache / (tar.replace("/", "_").removesuffix(".tar") + ".parquet") for (tar,) in shards}
    jobs = [(f.out / tar, rows.rename({"image_key": "key"}), paths[tar]) for (tar,), rows in shards.items()
            if not paths[tar].exists()]
    with progress_bar(disable=not show_progress) as bar:
        task = bar.add_task("clip-score", total=scorable.height, completed=scorable.height - sum(
            job[1].height for job in jobs), unit="images")
        for scored in SCORERS[engine.engine](s, jobs, engine):
            bar.advance(task, scored)
    parts = [pl.read_parquet(paths[tar]) for (tar,) in shards]  # shard order, whichever engine finished first
    scores = (pl.concat(parts) if parts else pl.DataFrame(schema={"row_id": pl.String, "clip_score_computed": pl.Float64}))
    storage.write_parquet(f.ledger / "clip.parquet", scores.with_columns(clip_model=pl.lit(name)).to_arrow())
    storage.write_json(f.state, {**state, "clip": {"model": name, "pretrained": str(s.pretrained),
                                                   "thresholds": s.thresholds, "default": s.threshold_default}})
    settings = dl.DownloadSettings(**state.get("settings", {}))
    return dl.derive(f, kept, base_report, settings)
