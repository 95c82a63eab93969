"""UARDA (Zhang, Mao, Liu, Zhang; IEEE TMM 2022): SCAN t-i with an estimated word-region relevance threshold.

The paper's full text was not reachable (methods.md §2.3). Following its abstract, the threshold t replaces SCAN's
fixed zero cut: regions with s_ij ≤ t are left out of word j's attention, words with no region above t are left
out of the pooling, and at retrieval those words' attention is skipped altogether. t is estimated as in NAAF
(same authors, CVPR 2022; CrossmodalGroup/NAAF `model.py` `xattn_score`): the crossing point of Gaussians fitted
to the best word-region similarities of matched and of unmatched pairs, smoothed by a moving average.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from itm.config import UardaParams
from itm.models.base import Encoded, Matcher
from itm.models.encoders import RegionEncoder, TextEncoder
from itm.models.losses import ContrastiveLoss
from itm.models.registry import MatcherInputs, register_matcher
from itm.models.similarity import Pooling, cross_attention_scores


def gaussian_crossing(mean_pos: float, std_pos: float, mean_neg: float, std_neg: float, alpha: float) -> float | None:
    """Where N(x; μ+, σ+) = α·N(x; μ−, σ−), the root NAAF takes; None when there is none to take.

    Taking logs and multiplying by 2σ+²σ−² gives A x² + B x + C = 0 with (NAAF `xattn_score`)
        A = σ+² − σ−²,  B = 2(μ+σ−² − μ−σ+²),  C = (μ−σ+)² − (μ+σ−)² + 2(σ+σ−)²·ln(σ−/(α·σ+)),
    and NAAF keeps t = (−B + √(B² − 4AC)) / (2A). With α > 1 the unmatched side weighs more and t moves up
    towards μ+. Equal variances (A ≈ 0), a negative discriminant or a zero spread have no such root: None.
    """
    var_pos, var_neg = std_pos**2, std_neg**2
    if not (std_pos > 0 and std_neg > 0 and alpha > 0):
        return None
    a = var_pos - var_neg
    b = 2 * (mean_pos * var_neg - mean_neg * var_pos)
    c = (mean_neg * std_pos) ** 2 - (mean_pos * std_neg) ** 2
    c += 2 * (std_pos * std_neg) ** 2 * math.log(std_neg / (alpha * std_pos))
    discriminant = b * b - 4 * a * c
    if abs(a) <= 1e-6 * (var_pos + var_neg) or discriminant <= 0:
        return None
    return (-b + math.sqrt(discriminant)) / (2 * a)


class RelevanceThreshold(nn.Module):
    """The relevance threshold t (a buffer, saved with the weights) and its estimator.

    `gaussian`: `observe` pools best-similarity samples of relevant (matched) and irrelevant words; once both pools
    hold `min_samples`, the Gaussian crossing t_new is computed (`gaussian_crossing`), an estimate outside [0, 1]
    becomes 0, t ← m·t_new + (1 − m)·t with m = `momentum`, and the pools are emptied. Without a crossing t stays.
    (NAAF resets an out-of-range estimate before the moving average, as here, but pools within one batch only; here
    the pools carry over batches until they are large enough, and are saved in the state dict.) `fixed`: t stays
    at `init`.
    """

    value: Tensor

    def __init__(
        self,
        init: float,
        *,
        estimator: Literal["gaussian", "fixed"],
        alpha: float,
        momentum: float,
        min_samples: int,
    ) -> None:
        super().__init__()
        if estimator not in ("gaussian", "fixed"):
            raise ValueError(f"estimator must be 'gaussian' or 'fixed', got {estimator!r}")
        self.register_buffer("value", torch.tensor(float(init)))
        self.learns = estimator == "gaussian"
        self.alpha, self.momentum, self.min_samples = alpha, momentum, min_samples
        self._relevant: list[Tensor] = []
        self._irrelevant: list[Tensor] = []

    def observe(self, relevant: Tensor, irrelevant: Tensor) -> None:
        """Add 1-D similarity samples to the pools; update t when both are large enough."""
        if not self.learns:
            return
        self._relevant.append(relevant.detach().float().flatten())
        self._irrelevant.append(irrelevant.detach().float().flatten())
        if min(_count(self._relevant), _count(self._irrelevant)) >= self.min_samples:
            self._update()

    def get_extra_state(self) -> dict[str, Tensor]:
        """The pooled samples travel with the weights, so a resumed training run updates t as an uninterrupted
        one would."""
        return {"relevant": self._joined(self._relevant), "irrelevant": self._joined(self._irrelevant)}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self._relevant = [state["relevant"]] if state["relevant"].numel() else []
        self._irrelevant = [state["irrelevant"]] if state["irrelevant"].numel() else []

    def _joined(self, pool: list[Tensor]) -> Tensor:
        """One tensor on t's device (pools restored from a checkpoint may sit elsewhere)."""
        return torch.cat([samples.to(self.value.device) for samples in pool]) if pool else self.value.new_zeros(0)

    def _update(self) -> None:
        relevant, irrelevant = self._joined(self._relevant), self._joined(self._irrelevant)
        self._relevant, self._irrelevant = [], []
        estimate = gaussian_crossing(
            float(relevant.mean()), float(relevant.std()), float(irrelevant.mean()), float(irrelevant.std()),
            self.alpha,
        )  # fmt: skip
        if estimate is None:
            return
        if not 0.0 <= estimate <= 1.0:
            estimate = 0.0
        self.value.fill_(self.momentum * estimate + (1 - self.momentum) * float(self.value))


def _count(pool: list[Tensor]) -> int:
    return sum(int(samples.numel()) for samples in pool)


def threshold_samples(images: Encoded, captions: Encoded, scores: Tensor) -> tuple[Tensor, Tensor]:
    """NAAF's samples from an aligned batch (image c matches caption c) and its scores [B, B].

    For each caption whose matched image scores highest: every real word's best region similarity with the matched
    image (relevant) and with the batch's least similar image for that caption (irrelevant; NAAF's ascending
    `sim.sort(0)[1][0]`). Returns two 1-D tensors of equal length.
    """
    with torch.no_grad():
        batch = torch.arange(scores.shape[1], device=scores.device)
        chosen = batch[scores.argmax(dim=0) == batch]  # captions whose match ranks first
        least = scores.argmin(dim=0)[chosen]  # [m]
        words, word_mask = captions.local[chosen], captions.mask[chosen]  # [m, L, E], [m, L]
        relevant = _best_region(images.local[chosen], images.mask[chosen], words)[word_mask]
        irrelevant = _best_region(images.local[least], images.mask[least], words)[word_mask]
    return relevant, irrelevant


def _best_region(regions: Tensor, region_mask: Tensor, words: Tensor) -> Tensor:
    """[m, L] max over real regions of s_ij for aligned (image, caption) rows."""
    sims = torch.bmm(words.float(), regions.float().transpose(1, 2))  # [m, L, R]
    return sims.masked_fill(~region_mask[:, None, :], float("-inf")).amax(dim=2)


class UardaScorer(nn.Module):
    """SCAN t2i with UARDA's relevance threshold, [n_images, n_captions].

    `observe` feeds the threshold estimator from an aligned training batch. In eval mode with
    `skip_queries` the words without a region above t are compacted away before the attention.
    """

    def __init__(
        self,
        threshold: RelevanceThreshold,
        pooling: Pooling,
        lambda_softmax: float,
        lambda_lse: float,
        *,
        skip_queries: bool,
        max_elements: int | None = None,
    ) -> None:
        super().__init__()
        self.threshold = threshold
        self.pooling, self.lambda_softmax, self.lambda_lse = pooling, lambda_softmax, lambda_lse
        self.skip_queries, self.max_elements = skip_queries, max_elements

    def forward(self, images: Encoded, captions: Encoded) -> Tensor:
        scores = cross_attention_scores(
            images,
            captions,
            direction="t2i",
            pooling=self.pooling,
            lambda_softmax=self.lambda_softmax,
            lambda_lse=self.lambda_lse,
            threshold=self.threshold.value,
            compact=self.skip_queries and not self.training,
            max_elements=self.max_elements,
        )
        return scores

    def observe(self, images: Encoded, captions: Encoded, scores: Tensor) -> None:
        """Feed the threshold estimator from an aligned training batch and its scores (called by `Matcher`)."""
        if self.threshold.learns:
            self.threshold.observe(*threshold_samples(images, captions, scores))


@register_matcher("uarda")
def build_uarda(params: UardaParams, inputs: MatcherInputs) -> Matcher:
    """SCAN t-i encoders and loss with the thresholded scorer."""
    threshold = RelevanceThreshold(
        params.threshold_init,
        estimator=params.threshold_estimator,
        alpha=params.threshold_alpha,
        momentum=params.threshold_momentum,
        min_samples=params.threshold_min_samples,
    )
    return Matcher(
        image_encoder=RegionEncoder(inputs.feature_dim, params.embed_dim, pool_first=False),
        text_encoder=TextEncoder(
            inputs.vocab_size, params.word_dim, params.embed_dim, bidirectional=params.bidirectional
        ),
        scorer=UardaScorer(
            threshold, params.pooling, params.lambda_softmax, params.lambda_lse, skip_queries=params.skip_queries
        ),
        loss=ContrastiveLoss(params.margin, params.max_violation),
    )
