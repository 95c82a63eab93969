"""SCAN's ensemble ("*" rows): rank by the mean of the similarity matrices of separately trained models.

The SCAN authors average "their predicted similarity scores" of two models trained separately (kuanghuei/SCAN#2);
kuanghuei/SCAN PR#29 (`evaluation_ensemble.py`), Paranioar/SGRAF#17 and VSE∞ `eval_ensemble.py` do the same:
`sims = (sims1 + sims2) / 2`, then the usual i2t / t2i ranking.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from itm.errors import UserError
from itm.evaluate.protocols import protocol_metrics
from itm.evaluate.score_file import SplitScores
from itm.evaluate.statistics import Bootstrap, protocol_intervals, with_intervals


def average_scores(matrices: Sequence[Tensor]) -> Tensor:
    """The element-wise mean [n_images, n_captions] (float32) of same-shaped similarity matrices of one gallery."""
    if not matrices:
        raise ValueError("an ensemble needs at least one similarity matrix")
    shape = matrices[0].shape
    for index, matrix in enumerate(matrices):
        if matrix.dim() != 2 or matrix.shape != shape:
            raise ValueError(
                f"similarity matrix {index} has shape {tuple(matrix.shape)}, expected {tuple(shape)} "
                "(all members must score the same images and captions)"
            )
    total = torch.zeros(shape, dtype=torch.float32, device=matrices[0].device)  # [n_images, n_captions]
    for matrix in matrices:
        total += matrix.to(total.device, torch.float32)
    return total / len(matrices)


def ensemble_scores(member_scores: Sequence[Path]) -> SplitScores:
    """The mean of the members' test similarity matrices (saved by their evaluations), which must have scored the
    same gallery."""
    members = [SplitScores.load(path) for path in member_scores]
    first = members[0]
    for path, other in zip(member_scores[1:], members[1:], strict=True):
        same_gallery = np.array_equal(other.image_ids, first.image_ids) and np.array_equal(
            other.caption_ids, first.caption_ids
        )
        if not same_gallery:
            raise UserError(f"{path}: scored another test gallery than {member_scores[0]}; re-run its evaluation")
    averaged = average_scores([member.scores for member in members])
    return SplitScores(averaged, first.image_ids, first.caption_ids, first.caption_image)


def evaluate_ensemble(member_scores: Sequence[Path], dataset_kind: str, bootstrap: Bootstrap) -> dict[str, float]:
    """Protocol metrics of the mean of the members' test similarity matrices (`ensemble_scores`), each R@K and rSum
    with its `bootstrap` interval, as `evaluate@` writes them."""
    test = ensemble_scores(member_scores)
    return with_intervals(protocol_metrics(test, dataset_kind), protocol_intervals(test, dataset_kind, bootstrap))
