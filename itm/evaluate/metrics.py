"""Recall@K, median and mean rank in both directions, as kuanghuei/SCAN `evaluation.i2t` / `evaluation.t2i` define them.

- image→text (i2t): every image is a query; its rank is the best (smallest) rank of any of its ground-truth captions.
- text→image (t2i): every caption is a query with exactly one ground-truth image.
- R@K = percentage of queries whose 0-based rank is < K; medr = floor(median(rank)) + 1 and meanr = mean(rank) + 1
  (1-based, as SCAN prints them); rSum = R@1 + R@5 + R@10 of both directions.

Ties. SCAN ranks with `np.argsort(d)[::-1]`, whose order among equal scores is unspecified. Here a tie counts against
the ground truth: a competitor with a score *greater than or equal to* the ground truth's ranks above it. A
degenerate matcher (constant scores, e.g. a collapsed embedding) therefore gets the worst rank instead of R@1 = 100.
Other ground-truth captions of the same image are not competitors of its best one (i2t).

`recall_metrics` is vectorised (whole-matrix comparisons in blocks of rows, no loop over queries) and runs where the
scores are (CPU or GPU); `query_ranks` gives the per-query ranks behind it (what `itm.evaluate.statistics`
resamples); `naive_recall_metrics` is the per-query loop of SCAN kept as the reference for tests.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from itm.evaluate.score_file import SplitScores

RSUM_KS = (1, 5, 10)
_BLOCK_ELEMENTS = 1 << 24  # scores compared at once when counting ranks (16M: a 64 MiB float32 block)


def recall_metrics(scores: Tensor, caption_image: Tensor, ks: Iterable[int] = RSUM_KS) -> dict[str, float]:
    """R@K (percent), medr, meanr of both directions and rSum for a similarity matrix (higher = more similar).

    `scores` [n_img, n_cap]; `caption_image` [n_cap] gives the row of each caption's image (any number of captions
    per image, in any order). Keys: `i2t_r{k}`, `i2t_medr`, `i2t_meanr`, the same for `t2i`, and `rsum`; R@1, R@5
    and R@10 are always included because rSum needs them.
    """
    ks = sorted(set(ks) | set(RSUM_KS))
    i2t_ranks, t2i_ranks = query_ranks(scores, caption_image)
    i2t, t2i = _summarise(i2t_ranks, ks), _summarise(t2i_ranks, ks)
    metrics = {f"i2t_{key}": value for key, value in i2t.items()} | {f"t2i_{key}": value for key, value in t2i.items()}
    metrics["rsum"] = sum(metrics[f"{side}_r{k}"] for side in ("i2t", "t2i") for k in RSUM_KS)
    return metrics


def query_ranks(scores: Tensor, caption_image: Tensor) -> tuple[Tensor, Tensor]:
    """The 0-based rank of every query: i2t [n_img] (an image's best-ranked caption) and t2i [n_cap], int64 on the
    scores' device, ties counted against the ground truth; R@K is the share of ranks below K. The bootstrap of
    `itm.evaluate.statistics` resamples these."""
    return _ranks(scores, _check(scores, caption_image))


def _check(scores: Tensor, caption_image: Tensor) -> Tensor:
    """`caption_image` as int64 on the scores' device, after checking shapes, indices and NaNs."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [n_images, n_captions], got shape {tuple(scores.shape)}")
    n_img, n_cap = scores.shape
    if caption_image.shape != (n_cap,):
        raise ValueError(
            f"caption_image must be [{n_cap}] (one image row per caption), got {tuple(caption_image.shape)}"
        )
    caption_image = caption_image.to(scores.device, torch.int64)
    if n_cap and (int(caption_image.min()) < 0 or int(caption_image.max()) >= n_img):
        raise ValueError(f"caption_image must index the {n_img} image rows")
    captions_per_image = torch.bincount(caption_image, minlength=n_img)  # [n_img]
    if n_img == 0 or bool((captions_per_image == 0).any()):
        raise ValueError("every image needs at least one caption (i2t ranks are undefined otherwise)")
    if bool(torch.isnan(scores).any()):
        nans = int(torch.isnan(scores).sum())
        raise ValueError(f"scores contain {nans} NaN values; the matcher diverged or a block was not filled")
    return caption_image


def _ranks(scores: Tensor, caption_image: Tensor) -> tuple[Tensor, Tensor]:
    """0-based i2t ranks [n_img] and t2i ranks [n_cap], counting ties against the ground truth.

    i2t: best_i = max over image i's captions; rank_i = #captions of *other* images scoring >= best_i (SCAN: the first
    ground-truth caption in the image's sorted row). Image i's own captions scoring >= best_i are exactly the ones
    at best_i, so they are subtracted from the count over the whole row.
    t2i: rank_c = #images scoring >= the ground truth on caption c, minus the ground truth itself.
    Both counts are taken in blocks of rows (bounded memory; one pass over the matrix), not per query.
    """
    n_img, n_cap = scores.shape
    columns = torch.arange(n_cap, device=scores.device)
    own = scores[caption_image, columns]  # [n_cap] score of each caption with its own image
    best = torch.full((n_img,), -torch.inf, dtype=scores.dtype, device=scores.device)
    best = best.scatter_reduce(0, caption_image, own, reduce="amax")  # [n_img]
    own_at_best = torch.zeros(n_img, dtype=torch.int64, device=scores.device)
    own_at_best = own_at_best.scatter_add(0, caption_image, (own == best[caption_image]).long())  # [n_img]

    i2t = torch.empty(n_img, dtype=torch.int64, device=scores.device)
    t2i = torch.zeros(n_cap, dtype=torch.int64, device=scores.device)
    step = max(1, _BLOCK_ELEMENTS // max(n_cap, 1))
    for start in range(0, n_img, step):
        block = scores[start : start + step]  # [rows, n_cap]
        i2t[start : start + step] = (block >= best[start : start + step, None]).sum(dim=1)
        t2i += (block >= own[None, :]).sum(dim=0)
    return i2t - own_at_best, t2i - 1  # the ground-truth image itself is always >= on its caption


def _summarise(ranks: Tensor, ks: list[int]) -> dict[str, float]:
    """R@K in percent, medr and meanr (1-based) of 0-based ranks, with numpy's median (mean of the middle pair)."""
    n = len(ranks)
    metrics = {f"r{k}": 100.0 * int((ranks < k).sum()) / n for k in ks}
    ordered = ranks.sort().values
    middle = (int(ordered[(n - 1) // 2]) + int(ordered[n // 2])) // 2  # floor(np.median(ranks))
    metrics["medr"] = float(middle + 1)
    metrics["meanr"] = float(ranks.double().mean()) + 1.0
    return metrics


def naive_recall_metrics(scores: Tensor, caption_image: Tensor, ks: Iterable[int] = RSUM_KS) -> dict[str, float]:
    """The same metrics by SCAN's per-query loops (`evaluation.i2t` / `t2i`), generalised from "captions
    5i..5i+4 belong to image i" to `caption_image`; slow, the reference for tests.

    SCAN sorts with `np.argsort(d)[::-1]`; here the sort key is (score descending, ground truth last), which is
    SCAN's order with its unspecified tie order fixed to the rule documented in this module.
    """
    sims = scores.detach().cpu().double().numpy()
    owner = caption_image.detach().cpu().numpy()
    n_img, n_cap = sims.shape
    ks = sorted(set(ks) | set(RSUM_KS))

    i2t = np.zeros(n_img)
    for index in range(n_img):
        is_gt = owner == index
        inds = np.lexsort((is_gt, -sims[index]))  # primary key last: score descending, then ground truth last
        rank = 1e20
        for i in np.flatnonzero(is_gt):
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        i2t[index] = rank

    t2i = np.zeros(n_cap)
    for index in range(n_cap):
        is_gt = np.arange(n_img) == owner[index]
        inds = np.lexsort((is_gt, -sims[:, index]))
        t2i[index] = np.where(inds == owner[index])[0][0]

    metrics = {}
    for side, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            metrics[f"{side}_r{k}"] = 100.0 * len(np.where(ranks < k)[0]) / len(ranks)
        metrics[f"{side}_medr"] = float(np.floor(np.median(ranks)) + 1)
        metrics[f"{side}_meanr"] = float(ranks.mean() + 1)
    metrics["rsum"] = sum(metrics[f"{side}_r{k}"] for side in ("i2t", "t2i") for k in RSUM_KS)
    return metrics


def recall_curve(test: SplitScores, ks: tuple[int, ...] = tuple(range(1, 21))) -> list[dict[str, float]]:
    """Recall@K for K = 1..20 in both directions, over the whole test split (a DVC plot)."""
    metrics = recall_metrics(test.scores, test.caption_image, ks=ks)
    return [{"k": k, "i2t": metrics[f"i2t_r{k}"], "t2i": metrics[f"t2i_r{k}"]} for k in ks]
