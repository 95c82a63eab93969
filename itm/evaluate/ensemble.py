"""SCAN's ensemble ("*" rows): rank by the mean of the similarity matrices of separately trained models.

The SCAN authors average "their predicted similarity scores" of two models trained separately (kuanghuei/SCAN#2);
kuanghuei/SCAN PR#29 (`evaluation_ensemble.py`), Paranioar/SGRAF#17 and VSE∞ `eval_ensemble.py` do the same:
`sims = (sims1 + sims2) / 2`, then the usual i2t / t2i ranking.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


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
