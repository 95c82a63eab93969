"""Batches for matchers: captions paired with their image's bottom-up regions, padded, with masks."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from itm.data.captions import captions_file
from itm.data.regions import RegionStore
from itm.errors import UserError
from itm.models.base import Captions, Regions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionTable:
    """The captions of one split, in file order."""

    caption_ids: np.ndarray  # [N] int64
    image_ids: np.ndarray  # [N] int64
    token_ids: list[list[int]]


def read_captions(captions_dir: Path, split: str) -> CaptionTable:
    path = captions_file(captions_dir, split)
    if not path.is_file():
        raise UserError(f"{path}: not found (run the tokenize stage first)")
    table = pq.read_table(path, columns=["caption_id", "image_id", "token_ids"])
    return CaptionTable(
        caption_ids=table.column("caption_id").to_numpy(),
        image_ids=table.column("image_id").to_numpy(),
        token_ids=table.column("token_ids").to_pylist(),
    )


def with_regions(captions: CaptionTable, store: RegionStore, split: str) -> CaptionTable:
    """The captions whose image has regions (images that failed extraction are left out, with a warning)."""
    keep = np.array([int(image_id) in store for image_id in captions.image_ids], dtype=bool)
    if not keep.any():
        raise UserError(f"{split}: none of the captions' images is in the region store {store.folder}")
    if not keep.all():
        missing = len(np.unique(captions.image_ids[~keep]))
        log.warning("%s: %d images have no regions (see failures.parquet); their captions are left out", split, missing)
    return CaptionTable(
        captions.caption_ids[keep],
        captions.image_ids[keep],
        [tokens for tokens, kept in zip(captions.token_ids, keep, strict=True) if kept],
    )


def pad_regions(features: Sequence[np.ndarray]) -> Regions:
    """Stack per-image [n_i, D] region features into [B, R, D] with a [B, R] mask (R = max n_i)."""
    longest = max(len(f) for f in features)
    batch = np.zeros((len(features), longest, features[0].shape[1]), dtype=np.float16)
    mask = torch.zeros(len(features), longest, dtype=torch.bool)
    for row, f in enumerate(features):
        batch[row, : len(f)] = f
        mask[row, : len(f)] = True
    return Regions(torch.from_numpy(batch), mask)


def pad_captions(token_ids: Sequence[Sequence[int]]) -> Captions:
    """Stack token-id lists into [B, L] (padded with 0, the <pad> id) with their lengths."""
    lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.int64)
    tokens = torch.zeros(len(token_ids), int(lengths.max()), dtype=torch.int64)
    for row, ids in enumerate(token_ids):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return Captions(tokens, lengths)


class CaptionRegionPairs(Dataset):
    """Every caption with its image's regions: the training items of SCAN and VSE++ (one per caption)."""

    def __init__(self, captions: CaptionTable, store: RegionStore) -> None:
        self.captions = captions
        self.store = store

    def __len__(self) -> int:
        return len(self.captions.token_ids)

    def __getitem__(self, index: int) -> tuple[np.ndarray, list[int]]:
        image_id = int(self.captions.image_ids[index])
        return np.asarray(self.store.features_of(image_id)), self.captions.token_ids[index]


def collate_pairs(items: list[tuple[np.ndarray, list[int]]]) -> tuple[Regions, Captions]:
    """An aligned batch: image i matches caption i."""
    features, tokens = zip(*items, strict=True)
    return pad_regions(features), pad_captions(tokens)
