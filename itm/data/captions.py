"""Captions to Parquet: per-split token ids over a train-only vocabulary, plus CVSE concept files.

Layout of the output folder (the contract read by training and evaluation):
- `<split>.parquet`: caption_id, image_id, text, token_ids (list<int32>, framed by <start>/<end>), n_tokens;
- `vocab.json`: the vocabulary (see itm.data.vocab);
- `concepts.json`, `concept_cooccurrence.npy` and `concept_labels/<split>.parquet` (caption_id, concept_ids):
  the CVSE concept vocabulary, its train co-occurrence counts and each caption's concepts (see itm.data.concepts).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from itm.atomic import staged_dir
from itm.data.concepts import Concepts, build_concepts, concept_labels
from itm.data.records import SPLITS, ImageRecord
from itm.data.text import tokenize
from itm.data.vocab import build_vocab, save_vocab
from itm.errors import UserError
from itm.formatting import format_figures

log = logging.getLogger(__name__)

VOCAB_FILE = "vocab.json"
CONCEPTS_FILE = "concepts.json"
COOCCURRENCE_FILE = "concept_cooccurrence.npy"
CONCEPT_LABELS_DIR = "concept_labels"

CAPTION_SCHEMA = pa.schema(
    [
        ("caption_id", pa.int64()),
        ("image_id", pa.int64()),
        ("text", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
    ]
)
CONCEPT_LABEL_SCHEMA = pa.schema([("caption_id", pa.int64()), ("concept_ids", pa.list_(pa.int16()))])


@dataclass(frozen=True)
class _Caption:
    caption_id: int
    image_id: int
    text: str
    tokens: list[str]


def captions_file(captions_dir: Path, split: str) -> Path:
    return captions_dir / f"{split}.parquet"


def write_captions(
    records: Sequence[ImageRecord], out_dir: Path, *, min_count: int, concept_top_k: int, stop_words: str
) -> dict[str, int]:
    """Tokenize every caption of `records` into `out_dir` (atomically); returns counts for logging."""
    captions = {split: _split_captions(records, split) for split in SPLITS}
    train_tokens = [caption.tokens for caption in captions["train"]]
    if not train_tokens:
        raise UserError("the dataset has no train captions to build a vocabulary from")
    vocab = build_vocab(train_tokens, min_count)
    concepts = build_concepts(train_tokens, concept_top_k, stop_words)
    if len(concepts.words) < concept_top_k:
        log.warning("only %d content words in the train captions; concept_top_k=%d", len(concepts.words), concept_top_k)

    with staged_dir(out_dir) as staging:
        save_vocab(vocab, staging / VOCAB_FILE)
        _write_concepts(staging, concepts.words, concepts.caption_counts, concepts.n_captions, stop_words)
        np.save(staging / COOCCURRENCE_FILE, concepts.cooccurrence)
        (staging / CONCEPT_LABELS_DIR).mkdir()
        for split, rows in captions.items():
            token_ids = [vocab.encode(caption.tokens) for caption in rows]
            table = pa.table(
                {
                    "caption_id": [caption.caption_id for caption in rows],
                    "image_id": [caption.image_id for caption in rows],
                    "text": [caption.text for caption in rows],
                    "token_ids": token_ids,
                    "n_tokens": [len(ids) for ids in token_ids],
                },
                schema=CAPTION_SCHEMA,
            )
            pq.write_table(table, captions_file(staging, split))
            labels = concept_labels([caption.tokens for caption in rows], concepts.words)
            label_table = pa.table(
                {"caption_id": table.column("caption_id"), "concept_ids": labels}, schema=CONCEPT_LABEL_SCHEMA
            )
            pq.write_table(label_table, staging / CONCEPT_LABELS_DIR / f"{split}.parquet")

    summary = {f"captions/{split}": len(rows) for split, rows in captions.items()}
    summary |= {"vocab_size": len(vocab), "concepts": len(concepts.words)}
    unknown = _unknown_share(captions, vocab.words)
    summary |= {f"unk_rate/{split}": share for split, share in unknown.items()}
    log.info("captions: %s", format_figures(summary))
    return summary


def _split_captions(records: Sequence[ImageRecord], split: str) -> list[_Caption]:
    return [
        _Caption(sentence.sentid, record.imgid, sentence.raw, tokenize(sentence.raw))
        for record in records
        if record.split == split
        for sentence in record.sentences
    ]


def _write_concepts(
    out_dir: Path, words: Sequence[str], counts: Sequence[int], n_captions: int, stop_words: str
) -> None:
    document = {"concepts": list(words), "caption_counts": list(counts), "train_captions": n_captions}
    document["stop_words"] = stop_words
    (out_dir / CONCEPTS_FILE).write_text(json.dumps(document, ensure_ascii=False, indent=1))


def _unknown_share(captions: dict[str, list[_Caption]], words: Sequence[str]) -> dict[str, float]:
    """Share of tokens outside the vocabulary, per split."""
    known = set(words)
    shares = {}
    for split, rows in captions.items():
        total = sum(len(caption.tokens) for caption in rows)
        unknown = sum(token not in known for caption in rows for token in caption.tokens)
        shares[split] = unknown / total if total else 0.0
    return shares


def read_concepts(captions_dir: Path) -> Concepts:
    """The concept vocabulary and its train co-occurrence counts written by `write_captions`."""
    path, matrix_path = captions_dir / CONCEPTS_FILE, captions_dir / COOCCURRENCE_FILE
    for required in (path, matrix_path):
        if not required.is_file():
            raise UserError(f"{required}: not found (run the tokenize stage first)")
    document = json.loads(path.read_text(encoding="utf-8"))
    cooccurrence = np.load(matrix_path)
    words = tuple(document["concepts"])
    if cooccurrence.shape != (len(words), len(words)):
        raise UserError(f"{matrix_path}: shape {cooccurrence.shape} does not fit the {len(words)} concepts of {path}")
    return Concepts(words, tuple(document["caption_counts"]), cooccurrence, int(document["train_captions"]))


def read_concept_labels(captions_dir: Path, split: str) -> dict[int, list[int]]:
    """caption_id -> the ids of the concepts the caption mentions, for one split."""
    path = captions_dir / CONCEPT_LABELS_DIR / f"{split}.parquet"
    if not path.is_file():
        raise UserError(f"{path}: not found (run the tokenize stage first)")
    table = pq.read_table(path)
    return dict(zip(table.column("caption_id").to_pylist(), table.column("concept_ids").to_pylist(), strict=True))
