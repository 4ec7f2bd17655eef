"""The batch reader of fastText models against fastText itself: lid.176 on real and crafted
captions, and small models written here in the layouts lid.176 does not use (dense,
unpruned, softmax) — each one loaded by fastText too and compared text by text."""

from __future__ import annotations

import struct

import fasttext
import numpy as np
import polars as pl
import pytest

from qvl.curate import fasttext_batch, langid
from tests.conftest import SHARED_DATA, needs_shared_data

CRAFTED = [
    "a dog playing on the beach at sunset", "une maison près de la rivière", "ein Haus am Fluss",
    "Телескоп Sky-Watcher на балконе", "日本語のテキストです", "한국어 문장입니다", "一只金毛犬在海滩上玩耍",
    "casa en la playa con perros", "", " ", "a\tb\x0bc\x0cd\re", "x\x00y", "é" * 3, "a" * 500, "😀 ok",
    "ünïcödé wörds ǅ ﬁ", "3 < 4 && 5 > 2", "IMG_1234.JPG", "Ελληνικά κείμενα", "עברית טקסט", "हिन्दी पाठ",
]


def reference(path, texts: list[str]) -> tuple[list[str], np.ndarray]:
    model = fasttext.load_model(str(path)).f
    out = [model.predict(t.replace("\n", " ") + "\n", 1, 0.0, "replace") for t in texts]
    return [o[0][1][9:] for o in out], np.array([o[0][0] for o in out], np.float32)


def assert_same(path, texts: list[str]) -> None:
    labels, probs = fasttext_batch.BatchModel(path).top1(pl.Series(texts, dtype=pl.String))
    want_labels, want_probs = reference(path, texts)
    assert labels == want_labels
    np.testing.assert_allclose(probs, want_probs, atol=1e-5)


def demo_captions() -> list[str]:
    from qvl.demo.pairs import generate_rows

    return [r["text"] for r in generate_rows(5000, 0) if r["text"] is not None]


def test_lid176_equals_fasttext_on_crafted_and_demo_captions():
    assert_same(langid.default_model_path(), CRAFTED + demo_captions())


@needs_shared_data
def test_lid176_equals_fasttext_on_real_captions():
    laion = pl.read_parquet(SHARED_DATA / "external/laion_img2dataset/test_10000.parquet").get_column("TEXT")
    cc3m = pl.read_csv(SHARED_DATA / "cc3m/Validation_GCC-1.1.0-Validation.tsv", separator="\t", has_header=False,
                       quote_char=None).to_series(0)
    assert_same(langid.default_model_path(), pl.concat([laion, cc3m]).drop_nulls().to_list())


def test_the_token_cache_gives_the_same_answers_when_it_starts_again(monkeypatch):
    texts = pl.Series(CRAFTED + demo_captions()[:500])
    unlimited = fasttext_batch.BatchModel(langid.default_model_path())
    whole = unlimited.top1(texts)
    monkeypatch.setattr(fasttext_batch, "CACHE_LIMIT", 40)  # far fewer than the tokens of a batch
    small = fasttext_batch.BatchModel(langid.default_model_path())
    parts = [small.top1(texts.slice(i, 50)) for i in range(0, texts.len(), 50)]
    assert len(small._index) < len(unlimited._index)  # it did start again
    assert [label for p in parts for label in p[0]] == whole[0]
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), whole[1], atol=1e-6)


def test_control_tokens_go_to_fasttext_itself():
    """fastText stops a line at a ``</s>`` token and skips ``__label__`` tokens: such texts are
    predicted by fastText line by line, the rest in the batch, answers in input order."""
    texts = ["foo </s> bar baz", "a dog on the beach", "__label__de a dog on the beach", "ein Hund am Strand"]
    ident = langid.LanguageIdentifier()
    labels, probs, _, _ = ident.predict(texts, k=1)
    want_labels, want_probs = reference(ident.path, texts)
    assert labels == want_labels
    np.testing.assert_allclose(probs, want_probs, atol=1e-6)


# ---------------------------------------------------------------- models written here


def write_model(path, *, loss: int, word_ngrams: int = 1, dim: int = 8, bucket: int = 500, seed: int = 0,
                minn: int = 2, maxn: int = 4, pruned: bool = False) -> None:
    """A supervised fastText model in the version-12 layout: dense input, unpruned n-grams,
    dense output, random weights; labels with unequal counts (an uneven hierarchical tree)."""
    rng = np.random.default_rng(seed)
    words = ["</s>", "the", "dog", "le", "chien", "der", "hund", "el", "perro"]
    labels = ["en", "fr", "de", "es", "it"]
    out = [struct.pack("<2i", fasttext_batch.MAGIC, 12),
           struct.pack("<12i", dim, 5, 5, 1, 5, word_ngrams, loss, 3, bucket, minn, maxn, 100), struct.pack("<d", 1e-4),
           struct.pack("<3i", len(words) + len(labels), len(words), len(labels)), struct.pack("<2q", 1000, 0 if pruned else -1)]
    for i, w in enumerate(words):
        out.append(w.encode() + b"\0" + struct.pack("<qb", 100 - i, 0))
    for i, label in enumerate(labels):
        out.append(f"__label__{label}".encode() + b"\0" + struct.pack("<qb", [50, 20, 10, 5, 1][i], 1))
    rows = len(words) + (0 if pruned else bucket)  # pruned to nothing: no n-gram rows (fastText loads
    # such a file only quantised; the reader is tested on it for its bucket table alone)
    out += [struct.pack("<?", False), struct.pack("<2q", rows, dim),
            rng.normal(0, 0.5, (rows, dim)).astype("<f4").tobytes(),
            struct.pack("<?", False), struct.pack("<2q", len(labels), dim),
            rng.normal(0, 1.0, (len(labels), dim)).astype("<f4").tobytes()]
    path.write_bytes(b"".join(out))


@pytest.mark.parametrize("loss", [fasttext_batch.HS, fasttext_batch.SOFTMAX])
def test_dense_unpruned_models_equal_fasttext(tmp_path, loss):
    path = tmp_path / "model.bin"
    write_model(path, loss=loss)
    texts = CRAFTED + ["the dog", "le chien", "der hund", "el perro", "the chien hund perro", "dogs doggy chiens"]
    assert_same(path, texts)


def test_models_it_does_not_run_fall_back_to_fasttext(tmp_path):
    path = tmp_path / "bigrams.bin"
    write_model(path, loss=fasttext_batch.SOFTMAX, word_ngrams=2)
    with pytest.raises(fasttext_batch.Unsupported):
        fasttext_batch.BatchModel(path)
    ident = langid.LanguageIdentifier(path)
    texts = ["the dog", "le chien", "der hund"]
    labels, probs, _, _ = ident.predict(texts, k=1)
    want_labels, want_probs = reference(path, texts)
    assert labels == want_labels
    np.testing.assert_allclose(probs, want_probs, atol=1e-6)


def test_damaged_and_hostile_model_files_are_refused_not_run(tmp_path):
    """Whatever the reader cannot run ends in one of the errors the identifier falls back on —
    truncated, padded, garbage, a huge bucket table — never a wrong answer or an 8 GB allocation."""
    good = langid.default_model_path().read_bytes()
    cases = {"truncated": good[: len(good) // 2], "padded": good + b"\0" * 16, "garbage": b"\x01" * 4096,
             "empty": b"", "header only": good[:60]}
    for name, data in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.ftz"
        path.write_bytes(data)
        with pytest.raises((fasttext_batch.Unsupported, ValueError, IndexError, struct.error)):
            fasttext_batch.BatchModel(path)
    huge = tmp_path / "huge.bin"
    write_model(huge, loss=fasttext_batch.SOFTMAX, bucket=2**31 - 1, pruned=True)
    with pytest.raises(fasttext_batch.Unsupported, match="buckets"):
        fasttext_batch.BatchModel(huge)
