"""Whether a training run made progress, judged from its per-epoch history: a warning and a card field, not a failure.

A learning rate far too high can wreck a matcher without a non-finite loss: the hinge on normalised vectors stays
finite, the embeddings collapse, every score ties, and the run ends with exit 0 and a model card like any other. Its
history gives it away by either of two signs, each of which can also be left unjudged (None):

- rSum at chance: every epoch's validation rSum is at most `CHANCE_SPREADS` (3) spreads above the chance level of
  the validation split, what random scores get (`chance_level`: its mean, and its spread for the split's size, which
  the true standard deviation exceeds by about 20 %: 3 spreads are about 2.5 of them). A collapsed model lands below
  it: its ties count against the ground truth (itm/evaluate/metrics.py). The ceiling is 16.5 on the default 300
  validation images (chance 10.6), 5.0 on 1,000 (chance 3.2). Judged only on `MIN_JUDGED_IMAGES` (100) validation
  images or more: on fewer, luck alone moves rSum by tens of points (10 images: 281 +- 37 of 600), so a model that
  learns cannot be told from one that does not.
- flat loss: the epoch-mean training loss moves by at most `FLAT_LOSS_TOLERANCE` (0.1 %, relative) between every two
  consecutive epochs that compute the same loss, and there is at least one such pair. The hinge warm-up (every
  violation summed) and the hardest negative after it are different losses, so that step is not compared.

The verdict is "none" (no progress: warn) when a sign is present, "progress" when at least one sign was judged and
neither is present, and "unknown" when neither could be judged (a one-epoch run on a tiny validation split, as the
quick profile's).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from math import comb
from typing import Any

from itm.evaluate.metrics import RSUM_KS

CHANCE_SPREADS = 3.0  # "at chance": at most this many `ChanceLevel.spread` above the chance-level rSum
MIN_JUDGED_IMAGES = 100  # validation images below which rSum is not judged against chance
FLAT_LOSS_TOLERANCE = 1.0e-3  # "flat": an epoch-mean loss within 0.1 % of the epoch before
PROGRESS, NONE, UNKNOWN = "progress", "none", "unknown"


@dataclass(frozen=True)
class ChanceLevel:
    """The rSum of random scores on a split: its expected value and its spread (the standard deviation with the two
    directions taken as independent: about 20 % below the true one), both in rSum points."""

    rsum: float
    spread: float


def chance_level(captions_per_image: Sequence[int]) -> ChanceLevel:
    """The rSum of random scores on a split whose images have these caption counts (each caption of one image).

    Text-to-image, a caption's rank is uniform over the images: R@K = K / n_images. Image-to-text, an image's best
    caption is among the first K with probability 1 - C(others, K) / C(captions, K), `others` being the other
    images' captions. Each query's rank depends only on its own row or column of the scores, so the queries of a
    direction are independent; the spread treats the two directions as independent too, which they are not (they
    share the scores: a high ground-truth score helps both), so it falls about 20 % short of the sampled spread.
    """
    n_images, n_captions = len(captions_per_image), sum(captions_per_image)
    if n_images == 0:
        raise ValueError("the chance level of an empty split is undefined")
    caption_hits = [min(k, n_images) / n_images for k in RSUM_KS]  # P(rank < K) of every text query
    mean, variance = sum(caption_hits), _hits_variance(caption_hits) / n_captions
    for own, images in Counter(captions_per_image).items():
        others = n_captions - own
        image_hits = [1.0 - (comb(others, k) / comb(n_captions, k) if k <= others else 0.0) for k in RSUM_KS]
        mean += images * sum(image_hits) / n_images
        variance += images * _hits_variance(image_hits) / n_images**2
    return ChanceLevel(100.0 * mean, 100.0 * math.sqrt(variance))


def _hits_variance(hits: list[float]) -> float:
    """Variance of one query's count of R@K hits over RSUM_KS (ascending), from P(rank < K) per K: the hits are
    nested, so two of them happen together with the probability of the smaller K."""
    mean = sum(hits)
    together = sum(hits[min(i, j)] for i in range(len(hits)) for j in range(len(hits)))
    return together - mean**2


def loss_is_flat(history: Sequence[dict[str, float]]) -> bool | None:
    """Whether the epoch-mean training loss stayed within `FLAT_LOSS_TOLERANCE` between every two consecutive epochs
    of the same loss (same warm-up state); None when there is no such pair (one epoch, or one of each loss)."""
    pairs = [
        (before["train/loss"], after["train/loss"])
        for before, after in pairwise(history)
        if before.get("train/warmup") == after.get("train/warmup")
    ]
    if not pairs:
        return None
    return all(abs(after - before) <= FLAT_LOSS_TOLERANCE * abs(before) for before, after in pairs)


def rsum_at_chance(history: Sequence[dict[str, float]], chance: ChanceLevel, images: int) -> bool | None:
    """Whether no epoch's validation rSum rose above chance by more than `CHANCE_SPREADS` spreads; None on fewer
    than `MIN_JUDGED_IMAGES` validation images, or without an epoch."""
    if images < MIN_JUDGED_IMAGES or not history:
        return None
    ceiling = chance.rsum + CHANCE_SPREADS * chance.spread
    return all(epoch["val/rsum"] <= ceiling for epoch in history)


def training_progress(history: Sequence[dict[str, float]], captions_per_image: Sequence[int]) -> dict[str, Any]:
    """The card's `training.progress`: the verdict ("progress", "none" or "unknown"), the chance level of the
    validation split (its images' caption counts) and the two signs the verdict comes from (module docstring)."""
    chance = chance_level(captions_per_image)
    rsum, loss = rsum_at_chance(history, chance, len(captions_per_image)), loss_is_flat(history)
    verdict = NONE if rsum or loss else UNKNOWN if rsum is None and loss is None else PROGRESS
    return {"verdict": verdict, "chance_rsum": chance.rsum, "chance_spread": chance.spread, "rsum_at_chance": rsum,
            "loss_flat": loss}  # fmt: skip


def no_progress_warning(label: str, progress: dict[str, Any], learning_rate: float) -> str | None:
    """One line saying that `label` made no progress and what to change, or None unless the verdict is "none"."""
    if progress["verdict"] != NONE:
        return None
    signs = []
    if progress["rsum_at_chance"]:
        signs.append(f"validation rSum no better than chance ({progress['chance_rsum']:.1f}) in every epoch")
    if progress["loss_flat"]:
        signs.append("the training loss flat from epoch to epoch")
    return (
        f"{label}: training made no progress ({'; '.join(signs)}); check its learning rate {learning_rate:g} "
        f"(matchers.{label}.learning_rate, else train.learning_rate): too high collapses the embeddings, too low "
        "leaves them where they started (card.json: training.progress)"
    )
