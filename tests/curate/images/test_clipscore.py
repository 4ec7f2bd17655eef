"""`qvl curate clip-score`: a tiny open_clip model built from a dict config, saved as
safetensors, scores the downloaded pairs with real forward passes; the clip_score rule
then thresholds the computed scores per source."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import open_clip
import polars as pl
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from qvl.curate.images.clipscore import ClipScoreError, ClipSettings, run_clip_score
from tests.conftest import needs_shared_data

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("clip")
    config = folder / "qvl-tiny-clip.json"
    config.write_text(json.dumps(TINY))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("qvl-tiny-clip")
    weights = folder / "tiny.safetensors"
    save_file(model.state_dict(), str(weights))
    return config, weights


@pytest.fixture
def images(tmp_path, downloaded) -> Path:
    copy = tmp_path / "images"
    shutil.copytree(downloaded, copy)  # scoring re-derives the outputs: work on a copy
    return copy


def _reference_score(config: Path, weights: Path, tar: Path, key: str, text: str) -> float:
    """The same pair scored directly with open_clip."""
    model, _, preprocess = open_clip.create_model_and_transforms("qvl-tiny-clip", pretrained=str(weights))
    tokenizer = open_clip.get_tokenizer("qvl-tiny-clip")
    with tarfile.open(tar) as t:
        image = Image.open(io.BytesIO(t.extractfile(f"{key}.jpg").read())).convert("RGB")
    with torch.no_grad():
        a = model.encode_image(preprocess(image)[None])
        b = model.encode_text(tokenizer([text]))
    return float(torch.nn.functional.cosine_similarity(a, b)[0])


def test_scores_are_the_models_cosine_similarity(images, tiny_clip):
    config, weights = tiny_clip
    run_clip_score(images, ClipSettings(model=str(config), pretrained=weights, batch_size=3), show_progress=False)
    scores = pl.read_parquet(images / "ledger" / "clip.parquet")
    ledger = pl.read_parquet(images / "ledger" / "download.parquet")
    decodable = ledger.filter((pl.col("download_status") == "success") & pl.col("image_error").is_null())
    assert sorted(scores["row_id"]) == sorted(decodable["row_id"]) and set(scores["clip_model"]) == {"qvl-tiny-clip"}
    kept = pl.read_parquet(images / "kept" / "*.parquet")
    row = kept.row(0, named=True)
    expected = _reference_score(config, weights, images / row["image_tar"], row["image_key"], row["text"])
    assert row["clip_score"] == pytest.approx(expected, abs=1e-5)
    assert "clip_score_dataset" in kept.columns


def test_thresholds_apply_to_the_computed_scores(images, tiny_clip):
    config, weights = tiny_clip
    run_clip_score(images, ClipSettings(model=str(config), pretrained=weights), show_progress=False)
    scores = pl.read_parquet(images / "ledger" / "clip.parquet").join(
        pl.read_parquet(images / "kept" / "*.parquet").select("row_id"), on="row_id")
    cut = float(scores["clip_score_computed"].max())  # the best kept pair sits exactly at the threshold
    report = run_clip_score(images, ClipSettings(model=str(config), pretrained=weights, thresholds={"pairs": cut}),
                            show_progress=False)
    rejected = pl.read_parquet(images / "rejected" / "*.parquet")
    assert report["kept_rows"] == 1 and report["accounted"]
    assert pl.read_parquet(images / "kept" / "*.parquet")["clip_score"].to_list() == [cut]
    below = rejected.filter(pl.col("drop_reason") == "clip_score_computed")["clip_score"]
    assert below.len() >= scores.height - 1 and (below < cut).all()  # a duplicate may now be scored in
    step = next(r for r in report["funnel"] if r["step"] == "clip_score_computed")
    assert "qvl-tiny-clip" in step["setting"]


def test_no_checkpoint_no_download(images, tiny_clip):
    config, _ = tiny_clip
    with pytest.raises(ClipScoreError, match="local checkpoint"):
        run_clip_score(images, ClipSettings(model=str(config), pretrained=images / "nope.safetensors"),
                       show_progress=False)
    with pytest.raises(ClipScoreError, match="not an open_clip model"):
        run_clip_score(images, ClipSettings(model="no-such-model", pretrained=images / "report.json"),
                       show_progress=False)


def test_an_aesthetic_head_scores_every_image(images, tiny_clip, tmp_path):
    config, weights = tiny_clip
    torch.manual_seed(3)
    head = {"weight": torch.randn(1, TINY["embed_dim"]), "bias": torch.tensor([5.0])}
    torch.save(head, tmp_path / "head.pth")
    run_clip_score(images, ClipSettings(model=str(config), pretrained=weights, aesthetic_head=tmp_path / "head.pth"),
                   show_progress=False)
    kept = pl.read_parquet(images / "kept" / "*.parquet")
    row = kept.row(0, named=True)
    model, _, preprocess = open_clip.create_model_and_transforms("qvl-tiny-clip", pretrained=str(weights))
    with tarfile.open(images / row["image_tar"]) as t:
        image = Image.open(io.BytesIO(t.extractfile(f"{row['image_key']}.jpg").read())).convert("RGB")
    with torch.no_grad():
        embedding = model.encode_image(preprocess(image)[None])[0]
    expected = float(embedding / embedding.norm() @ head["weight"][0] + head["bias"][0])
    assert row["aesthetic_computed"] == pytest.approx(expected, abs=1e-4)
    torch.save({"weight": torch.randn(1, 512), "bias": torch.zeros(1)}, tmp_path / "b32.pth")
    with pytest.raises(ClipScoreError, match="made for 512-d embeddings, the CLIP model gives 32-d"):
        run_clip_score(images, ClipSettings(model=str(config), pretrained=weights, aesthetic_head=tmp_path / "b32.pth"),
                       show_progress=False)


@needs_shared_data
def test_laion_aesthetic_heads_on_their_reference_embeddings(shared_data):
    """The published heads rank the published per-rating embeddings in order (B/32 and L/14)."""
    import numpy as np

    from qvl.curate.images.clipscore import AestheticHead

    folder = shared_data / "external" / "laion_aesthetic"
    for name, dim in (("vit_b_32", 512), ("vit_l_14", 768)):
        head = AestheticHead(folder / f"sa_0_4_{name}_linear.pth", dim)
        embeddings = torch.from_numpy(np.stack([np.load(folder / f"{name}_embeddings" / f"rating{r}.npy")[0]
                                                for r in range(10)]))
        scores = head(embeddings).tolist()
        assert scores == sorted(scores) and scores[0] < 0 < scores[2] and 10 < scores[9] < 12
