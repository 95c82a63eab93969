"""The test score file `data/scores/<matcher>/seed<seed>.npz`: a matcher's test similarity matrix with the ids of its
rows and columns, written by `evaluate@` and read by `ensemble@`, `compare` and the figures. The same matrix gives
the same bytes (`write_npz`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from itm.atomic import write_npz
from itm.errors import UserError


@dataclass(frozen=True)
class SplitScores:
    """A test-split similarity matrix and the ids of its rows and columns."""

    scores: torch.Tensor  # [n_images, n_captions] float32
    image_ids: np.ndarray  # [n_images]
    caption_ids: np.ndarray  # [n_captions]
    caption_image: torch.Tensor  # [n_captions] row of each caption's image

    def save(self, path: Path) -> None:
        arrays = {"scores": self.scores.numpy(), "image_ids": self.image_ids, "caption_ids": self.caption_ids,
                  "caption_image": self.caption_image.numpy()}  # fmt: skip
        write_npz(path, arrays)

    @classmethod
    def load(cls, path: Path) -> SplitScores:
        _check_exists(path)
        with np.load(path) as saved:
            return cls(
                torch.from_numpy(saved["scores"]),
                saved["image_ids"],
                saved["caption_ids"],
                torch.from_numpy(saved["caption_image"]),
            )


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path}: not found (run the evaluate stage of that matcher first)")
