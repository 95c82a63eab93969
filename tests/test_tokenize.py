"""Tokenizer, train-only vocabulary, caption Parquet files and CVSE concepts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from itm.data.captions import CAPTION_SCHEMA, write_captions
from itm.data.concepts import build_concepts, concept_labels
from itm.data.records import ImageRecord, Sentence, read_dataset_json
from itm.data.text import tokenize
from itm.data.vocab import SPECIALS, build_vocab, load_vocab


def test_tokenize_lowercases_and_drops_punctuation() -> None:
    assert tokenize("A man's T-shirt, RED; two dogs!") == ["a", "man's", "t-shirt", "red", "two", "dogs"]
    assert tokenize("Café au lait 3 times") == ["café", "au", "lait", "3", "times"]
    assert tokenize("  ...  ") == []


def test_vocab_counts_threshold_and_order() -> None:
    vocab = build_vocab([["b", "a", "b"], ["c", "b", "a"], ["d"]], min_count=2)
    assert vocab.words == (*SPECIALS, "b", "a")
    assert vocab.encode(["a", "zebra", "b"]) == [1, 5, 3, 4, 2]  # <start> a <unk> b <end>
    assert vocab.decode(vocab.encode(["b"])) == ["<start>", "b", "<end>"]


def _record(imgid: int, split: str, *texts: str) -> ImageRecord:
    return ImageRecord(imgid, f"{imgid}.jpg", split, tuple(Sentence(imgid * 10 + i, t) for i, t in enumerate(texts)))


def test_vocabulary_comes_from_train_only(tmp_path: Path) -> None:
    records = [
        _record(0, "train", "a red dog runs", "the red dog"),
        _record(1, "train", "a dog sits", "red dog sitting"),
        _record(2, "test", "a purple zebra", "the dog"),
        _record(3, "val", "a red cat", "dog"),
    ]
    write_captions(records, tmp_path / "captions", min_count=2, concept_top_k=2, stop_words="english")
    vocab = load_vocab(tmp_path / "captions" / "vocab.json")
    assert "zebra" not in vocab.words and "purple" not in vocab.words
    assert set(vocab.words) == {*SPECIALS, "a", "red", "dog"}

    test = pq.read_table(tmp_path / "captions" / "test.parquet")
    assert test.schema.equals(CAPTION_SCHEMA)
    rows = test.to_pylist()
    assert [r["caption_id"] for r in rows] == [20, 21] and [r["image_id"] for r in rows] == [2, 2]
    assert vocab.decode(rows[0]["token_ids"]) == ["<start>", "a", "<unk>", "<unk>", "<end>"]
    assert rows[0]["n_tokens"] == 5 and rows[1]["text"] == "the dog"

    concepts = json.loads((tmp_path / "captions" / "concepts.json").read_text())
    assert concepts["concepts"] == ["dog", "red"]  # "a"/"the" are stop words; dog in 4 captions, red in 3
    assert concepts["caption_counts"] == [4, 3]
    labels = pq.read_table(tmp_path / "captions" / "concept_labels" / "val.parquet").to_pylist()
    assert labels == [{"caption_id": 30, "concept_ids": [1]}, {"caption_id": 31, "concept_ids": [0]}]


def test_concept_statistics_are_consistent(tiny_synthetic: Path) -> None:
    records = read_dataset_json(tiny_synthetic / "dataset.json")
    train = [s.tokens for r in records if r.split == "train" for s in r.sentences]
    concepts = build_concepts(train, top_k=12, stop_words="english")
    assert len(concepts.words) == 12
    cooccurrence = concepts.cooccurrence
    assert cooccurrence.shape == (12, 12) and np.array_equal(cooccurrence, cooccurrence.T)
    assert list(np.diag(cooccurrence)) == list(concepts.caption_counts)
    assert list(concepts.caption_counts) == sorted(concepts.caption_counts, reverse=True)
    labels = concept_labels(train, concepts.words)
    for i, j in [(0, 1), (2, 5), (3, 3)]:
        both = sum(i in caption and j in caption for caption in labels)
        assert cooccurrence[i, j] == both
    for tokens, ids in zip(train[:50], labels[:50], strict=True):
        assert {concepts.words[k] for k in ids} == set(tokens) & set(concepts.words)


@pytest.mark.parametrize("stop_words", ["english", "none"])
def test_stop_words_option(stop_words: str) -> None:
    concepts = build_concepts([["the", "dog"], ["the", "cat"]], top_k=5, stop_words=stop_words)
    assert ("the" in concepts.words) == (stop_words == "none")
