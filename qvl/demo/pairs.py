"""Synthetic web image-text pairs that look like alt-text scraped at scale.

Deterministic (a seed, no network). Clean English and Chinese captions, plus the noise
the stage-1 rules exist for, each at a known rate: HTML and entities, URLs, e-mails and
camera file names, emoji, other scripts and other Latin-script languages, dataset
placeholder tags, too-short and too-long captions, tiny and oddly shaped images, low CLIP
scores, missing captions, and duplicate URLs with different captions. Written in three
real layouts (LAION parquet, DataComp parquet, a headerless CC3M TSV).
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

EN_ADJ = ["a small", "a large", "an old", "a red", "a blue", "a happy", "a wooden", "a modern", "a golden",
          "a white", "a black", "a vintage", "a colorful", "a quiet", "a busy"]
EN_NOUN = ["dog", "cat", "house", "car", "bicycle", "tree", "bridge", "boat", "chair", "table", "horse",
           "train", "lighthouse", "garden", "kitchen", "mountain", "guitar", "coffee cup"]
EN_PLACE = ["on the beach", "in the park", "near the river", "in the snow", "at sunset", "in the city",
            "on a wooden table", "under a blue sky", "in the forest", "by the lake", "on the street"]
EN_TAIL = ["", " with a view of the hills", " during the summer festival", " in the morning light",
           " next to a stone wall", " surrounded by flowers"]
ZH_ADJ = ["一只小", "一只大", "一辆红色的", "一座古老的", "一张木制的", "一只可爱的", "一棵高大的", "一艘白色的"]
ZH_NOUN = ["狗", "猫", "汽车", "房子", "桌子", "树", "船", "自行车", "马", "火车"]
ZH_PLACE = ["在海滩上", "在公园里", "在河边", "在雪地里", "在城市中", "在森林里", "在湖边", "在街道上"]
ZH_VERB = ["玩耍", "休息", "停着", "矗立", "奔跑", "等待"]
OTHER_SCRIPTS = ["Красивый дом у реки летом", "منزل جميل بالقرب من النهر", "川の近くの美しい家です",
                 "강 근처의 아름다운 집", "Όμορφο σπίτι κοντά στο ποτάμι", "सुंदर घर नदी के पास"]
OTHER_LATIN = ["une belle maison près de la rivière en été", "ein schönes Haus am Fluss im Sommer",
               "una casa hermosa cerca del río en verano", "una bella casa vicino al fiume d'estate",
               "een mooi huis bij de rivier in de zomer"]
EMOJI = ["😀", "🐶", "🌅", "❤️", "🇨🇳", "👍🏽", "👨‍👩‍👧"]


def _english(rng: random.Random) -> str:
    return (f"{rng.choice(EN_ADJ)} {rng.choice(EN_NOUN)} {rng.choice(EN_PLACE)}{rng.choice(EN_TAIL)}").capitalize()


def _chinese(rng: random.Random) -> str:
    return f"{rng.choice(ZH_ADJ)}{rng.choice(ZH_NOUN)}{rng.choice(ZH_PLACE)}{rng.choice(ZH_VERB)}"


def _noisy(rng: random.Random, caption: str) -> tuple[str | None, str]:
    """Apply at most one kind of noise; returns (text, what was done)."""
    r = rng.random()
    if r < 0.06:
        return f"<p><b>{caption}</b> &amp; more&nbsp;photos</p>", "html"
    if r < 0.10:
        extra = rng.choice(["https://www.example.com/photos/123?ref=alt", "contact me@example.com",
                            "IMG_4821.JPG", "DSC_0042"])
        return f"{caption} {extra}!!!!!!", "irregular"
    if r < 0.13:
        return f"{caption} {rng.choice(EMOJI)}", "emoji"
    if r < 0.18:
        return rng.choice(OTHER_SCRIPTS), "non_en_zh_chars"
    if r < 0.24:
        return rng.choice(OTHER_LATIN), "lang"
    if r < 0.26:
        return f"Portrait of <PERSON> {caption.lower()}", "dataset_tag"
    if r < 0.29:
        return rng.choice(["dog", "photo", "image 1", "sale"]), "length"
    if r < 0.30:
        return " ".join([caption] * 30), "length"
    if r < 0.31:
        return rng.choice([None, "", "   ", "<br/>"]), "empty_text"
    return caption, "clean"


def generate_rows(n: int, seed: int, zh_share: float = 0.25) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        caption = _chinese(rng) if rng.random() < zh_share else _english(rng)
        text, _ = _noisy(rng, caption)
        r = rng.random()
        if r < 0.05:
            width, height = rng.randint(40, 190), rng.randint(40, 190)
        elif r < 0.09:
            width, height = rng.randint(900, 2000), rng.randint(200, 280)
        else:
            width, height = rng.randint(220, 1600), rng.randint(220, 1600)
            if max(width, height) / min(width, height) > 3:
                width = height
        score = round(rng.uniform(0.15, 0.27) if rng.random() < 0.08 else rng.uniform(0.28, 0.42), 4)
        rows.append({"url": f"https://img.example.com/{seed}/{i:07d}.jpg", "text": text,
                     "width": width, "height": height, "clip": score})
    for i in range(0, n, 25):  # ~4%: the same image scraped again with another caption
        j = rng.randrange(n)
        rows[j]["url"] = rows[i]["url"]
    return rows


def write_demo_pairs(folder: Path, rows_per_shard: int = 4000, seed: int = 0) -> list[Path]:
    """LAION, DataComp and CC3M-shaped shards of synthetic pairs; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(2):
        rows = generate_rows(rows_per_shard, seed + k)
        path = folder / f"laion-{k:03d}.parquet"
        scores = random.Random(f"{seed + k}-published")  # LAION's NSFW and watermark probabilities: ~2% / ~3% high
        pq.write_table(pa.table({
            "URL": [r["url"] for r in rows], "TEXT": [r["text"] for r in rows],
            "WIDTH": pa.array([float(r["width"]) for r in rows]),
            "HEIGHT": pa.array([float(r["height"]) for r in rows]),
            "similarity": [r["clip"] for r in rows],
            "punsafe": [round(scores.uniform(0.55, 1.0) if scores.random() < 0.02 else scores.uniform(0, 0.3), 4)
                        for _ in rows],
            "pwatermark": [round(scores.uniform(0.85, 1.0) if scores.random() < 0.03 else scores.uniform(0, 0.5), 4)
                           for _ in rows],
        }), path)
        paths.append(path)
    rows = generate_rows(rows_per_shard, seed + 10)
    path = folder / "datacomp-000.parquet"
    pq.write_table(pa.table({
        "uid": [f"{seed:02d}{i:030x}" for i in range(len(rows))],
        "url": [r["url"] for r in rows], "text": [r["text"] for r in rows],
        "original_width": [r["width"] for r in rows], "original_height": [r["height"] for r in rows],
        "clip_b32_similarity_score": [r["clip"] + 0.02 for r in rows],
        "clip_l14_similarity_score": [r["clip"] - 0.037 for r in rows],
    }), path)
    paths.append(path)
    rows = generate_rows(rows_per_shard // 2, seed + 20, zh_share=0.0)
    path = folder / "cc3m-000.tsv"
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            text = (r["text"] or "").replace("\t", " ").replace("\n", " ")
            f.write(f"{text}\t{r['url']}\n")
    paths.append(path)
    return paths
