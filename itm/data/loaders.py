"""Batches for matchers: captions paired with their image (regions or pixels), padded, with masks."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from itm.data.batches import Captions, Images, Tokenizer
from itm.data.captions import captions_file, read_concept_labels
from itm.data.pixels import ImageStore
from itm.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionTable:
    """The captions of one split, in file order, with the concepts each mentions when they were read."""

    caption_ids: np.ndarray  # [N] int64
    image_ids: np.ndarray  # [N] int64
    token_ids: list[list[int]]
    concept_ids: list[list[int]] | None = None  # per caption, ids into the concept vocabulary
    texts: list[str] | None = None  # the raw captions

    def __len__(self) -> int:
        return len(self.token_ids)

    def select(self, keep: np.ndarray) -> CaptionTable:
        """The captions where the boolean `keep` [N] is True, in order."""
        rows = np.flatnonzero(keep).tolist()

        def pick(values: list | None) -> list | None:
            return None if values is None else [values[row] for row in rows]

        return CaptionTable(
            self.caption_ids[keep], self.image_ids[keep], pick(self.token_ids), pick(self.concept_ids),
            pick(self.texts),
        )  # fmt: skip

    def of_first_images(self, n_images: int) -> CaptionTable:
        """The captions of the first `n_images` distinct images (in order of first appearance), in file order."""
        _, first_seen = np.unique(self.image_ids, return_index=True)
        kept = np.sort(first_seen)[:n_images]
        return self.select(np.isin(self.image_ids, self.image_ids[kept]))

    def with_concepts(self, concept_ids: list[list[int]]) -> CaptionTable:
        """The same captions with other concept labels (one list per caption)."""
        if len(concept_ids) != len(self):
            raise ValueError(f"{len(concept_ids)} concept lists for {len(self)} captions")
        return dataclasses.replace(self, concept_ids=concept_ids)

    def tokenized(self, tokenizer: Tokenizer) -> CaptionTable:
        """The same captions with token ids from `tokenizer` applied to their text (a backbone's own tokenizer)."""
        if self.texts is None:
            raise ValueError("the captions were read without their text")
        return dataclasses.replace(self, token_ids=tokenizer(self.texts))


def read_captions(captions_dir: Path, split: str, *, concepts: bool = False, texts: bool = False) -> CaptionTable:
    """One split's captions; with `concepts`, also the concepts each caption mentions (tokenize's labels); with
    `texts`, also the raw text (for a backbone's own tokenizer)."""
    path = captions_file(captions_dir, split)
    if not path.is_file():
        raise UserError(f"{path}: not found (run the tokenize stage first)")
    table = pq.read_table(path, columns=["caption_id", "image_id", "token_ids", *(["text"] if texts else [])])
    caption_ids = table.column("caption_id").to_numpy()
    concept_ids = None
    if concepts:
        labels = read_concept_labels(captions_dir, split)
        missing = [int(c) for c in caption_ids if int(c) not in labels]
        if missing:
            raise UserError(f"{captions_dir}: caption {missing[0]} of {split} has no concept labels; re-run tokenize")
        concept_ids = [labels[int(c)] for c in caption_ids]
    return CaptionTable(
        caption_ids=caption_ids,
        image_ids=table.column("image_id").to_numpy(),
        token_ids=table.column("token_ids").to_pylist(),
        concept_ids=concept_ids,
        texts=table.column("text").to_pylist() if texts else None,
    )


def image_concepts(captions: CaptionTable) -> CaptionTable:
    """Each caption labelled with the concepts of its whole image: the union over the image's captions in the
    table. CVSE trains on such image-level labels (BruceW91/CVSE `data.py`, `concept_labels` per image) and labels
    val/test captions by their own words."""
    if captions.concept_ids is None:
        raise ValueError("the captions were read without concepts")
    per_image: dict[int, set[int]] = {}
    for image_id, ids in zip(captions.image_ids.tolist(), captions.concept_ids, strict=True):
        per_image.setdefault(image_id, set()).update(ids)
    return captions.with_concepts([sorted(per_image[image_id]) for image_id in captions.image_ids.tolist()])


def with_stored_images(captions: CaptionTable, store: ImageStore, split: str) -> CaptionTable:
    """The captions whose image is in `store` (images that failed extraction are left out, with a warning)."""
    keep = np.array([int(image_id) in store for image_id in captions.image_ids], dtype=bool)
    if not keep.any():
        raise UserError(f"{split}: none of the captions' images is in the region store {store.folder}")
    if not keep.all():
        missing = len(np.unique(captions.image_ids[~keep]))
        log.warning("%s: %d images have no regions (see failures.parquet); their captions are left out", split, missing)
    return captions.select(keep)


def pad_captions(
    token_ids: Sequence[Sequence[int]], concept_ids: Sequence[Sequence[int]] | None = None, n_concepts: int = 0
) -> Captions:
    """Stack token-id lists into [B, L] (padded with 0, the <pad> id) with their lengths; with `concept_ids` and
    `n_concepts` > 0, also the [B, n_concepts] multi-hot concept labels."""
    lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.int64)
    tokens = torch.zeros(len(token_ids), int(lengths.max()), dtype=torch.int64)
    for row, ids in enumerate(token_ids):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    concepts = None
    if n_concepts > 0:
        if concept_ids is None:
            raise ValueError("the matcher reads concept labels, but the captions come without them")
        concepts = torch.zeros(len(token_ids), n_concepts, dtype=torch.float32)
        for row, ids in enumerate(concept_ids):
            concepts[row, list(ids)] = 1.0
    return Captions(tokens, lengths, concepts)


PairItem = tuple[np.ndarray, list[int], list[int]]


class CaptionImagePairs(Dataset):
    """Every caption with its image (regions or pixels) and its concept labels, when the table has them: the training
    items (one per caption)."""

    def __init__(self, captions: CaptionTable, store: ImageStore) -> None:
        self.captions = captions
        self.store = store

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> PairItem:
        image_id = int(self.captions.image_ids[index])
        concepts = [] if self.captions.concept_ids is None else self.captions.concept_ids[index]
        return np.asarray(self.store.features_of(image_id)), self.captions.token_ids[index], concepts


class PairCollator:
    """An aligned batch from dataset items: image i matches caption i, the images batched by their store's
    `collate` (padded regions, or stacked pixels); concept labels when `n_concepts` > 0."""

    def __init__(self, collate_images: Callable[[Sequence[np.ndarray]], Images], n_concepts: int = 0) -> None:
        self.collate_images = collate_images
        self.n_concepts = n_concepts

    def __call__(self, items: list[PairItem]) -> tuple[Images, Captions]:
        features, tokens, concepts = zip(*items, strict=True)
        return self.collate_images(features), pad_captions(tokens, concepts, self.n_concepts)
