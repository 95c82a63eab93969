"""The test score file `data/scores/<matcher>.npz`: a matcher's test similarity matrix with the ids of its rows and
columns, written by `evaluate@` and read by `ensemble@`, `compare` and the figures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from itm.atomic import staged_file
from itm.errors import UserError


@dataclass(frozen=True)
class SplitScores:
    """A test-split similarity matrix and the ids of its rows and columns."""

    scores: torch.Tensor  # [n_images, n_captions] float32
    image_ids: np.ndarray  # [n_images]
    caption_ids: np.ndarray  # [n_captions]
    caption_image: torch.Tensor  # [n_captions] row of each caption's image
    run_id: str | None = None  # the MLflow run of the evaluation that scored it

    def save(self, path: Path) -> None:
        with staged_file(path) as tmp, tmp.open("wb") as stream:
            np.savez(
                stream,
                scores=self.scores.numpy(),
                image_ids=self.image_ids,
                caption_ids=self.caption_ids,
                caption_image=self.caption_image.numpy(),
                run_id=np.array(self.run_id or ""),
            )

    @classmethod
    def load(cls, path: Path) -> SplitScores:
        _check_exists(path)
        with np.load(path) as saved:
            return cls(
                torch.from_numpy(saved["scores"]),
                saved["image_ids"],
                saved["caption_ids"],
                torch.from_numpy(saved["caption_image"]),
                _run_id(saved),
            )

    @staticmethod
    def load_run_id(path: Path) -> str | None:
        """The evaluation run saved with the matrix at `path`, without reading the matrix."""
        _check_exists(path)
        with np.load(path) as saved:
            return _run_id(saved)


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path}: not found (run the evaluate stage of that matcher first)")


def _run_id(saved: np.lib.npyio.NpzFile) -> str | None:
    """The saved run id; None when it is empty or the file predates it."""
    return (str(saved["run_id"]) or None) if "run_id" in saved.files else None
