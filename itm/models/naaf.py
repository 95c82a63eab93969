"""NAAF (Zhang, Mao, Wang, Zhang; CVPR 2022, "Negative-Aware Attention Framework for Image-Text Matching"), as the
authors' code computes it (CrossmodalGroup/NAAF `model.py`, `train.py`, `evaluation.py`).

Text-to-image only. For an image with unit region vectors v_r and a caption with unit word vectors e_j,
s_rj = v_r·e_j, and a threshold t, each word j scores (`model.py` `xattn_score`, "Neg-Pos Branch Matching"):

- negative: N_j = m_j·[m_j < 0] with m_j = max_r s_rj − t, on every word (`Row_max * attn_neg`);
- positive, aggregated: α_rj = exp(λ(s_rj − t))·[s_rj > t] / (Σ_r' exp(λ(s_r'j − t))·[s_r'j > t] + 1e-8)
  (`get_mask_attention`: −1e9 below t, exp, `l1norm`), a_j = Σ_r α_rj v_r, P_j = e_j·a_j / max(‖a_j‖, 1e-8)
  (`cosine_similarity`, which divides by ‖a_j‖ alone);
- positive, relevance: β_rj = softmax_r(λ·ŝ_rj) with SCAN's clipped L2 norm of the raw (unthresholded)
  similarities, ŝ_rj = LeakyReLU_0.1(s_rj) / (‖LeakyReLU_0.1(s_r·)‖ + 1e-8) over the caption's words
  (`inter_relations`), Q_j = Σ_r β_rj s_rj;

and the pair scores S = mean_j (N_j + P_j + Q_j), λ = `lambda_softmax` = 20. At retrieval (`xattn_score_test`) t
is the "safe" threshold and the negative indicator of a word is read off its caption's smoothed shortfalls:
N_j = m_j·[Σ_k w_jk m_k < 0], w_jk = softmax_k(5·e_j·e_k) over the caption's words (`intra_relation`).

Thresholds (`xattn_score`, "Discriminative Mismatch Mining", run inside the scoring loop over a training batch's
captions): after scoring caption c (with the threshold current at that moment), if its matched image ranks first,
the best region similarity max_r s_rj of each of its words with the matched image joins the matched pool and with
the batch's least similar image (`sim.sort(0)[1][0]`, an ascending sort) the unmatched pool; once the pools hold
more than 200 words, Gaussians (μ+, σ+), (μ−, σ−) are fitted and
    A = σ+² − σ−²,  B = 2(μ+σ−² − μ−σ+²),  C = (μ−σ+)² − (μ+σ−)² + 2(σ+σ−)²·ln(σ−/(α·σ+) + 1e-8),
and where B² − 4AC > 0 the training threshold becomes (−B + √(B² − 4AC)) / (2A + 1e-10) and the safe one
μ+ − 3σ+; each is set to 0 outside [0, 1] and then moved by t ← 0.7·t_new + 0.3·t. While the pools of the batch
hold fewer than 200 words, both thresholds are reset to 0 after every caption. The pools live for one batch, so a
batch's first caption is scored with the previous batch's threshold, the next ones with 0 until 200 matched words
are collected, and from then on the threshold moves after every correctly ranked caption. Defaults: `train.py`.

Everything else is SCAN's (`EncoderImagePrecomp`, the bi-GRU `EncoderText` with averaged directions, the summed
hardest-negative hinge loss), hence `itm.models.encoders` and `itm.models.losses`. Where this differs from NAAF:
- padded regions (NAAF's images all have 36) are left out of every maximum, attention and Gram matrix;
- NAAF's default text encoder starts its word embeddings from GloVe 840B vectors of its own vocabulary
  (`GloveRNNEncoder`, then trained); here they start uniform in ±0.1, as NAAF's `basic` encoder does;
- the threshold sequence of a batch is found without a Python loop over captions (`_scores_and_thresholds`), and
  the pool statistics are kept as running sums in float64 (NAAF: torch fp32 mean and std of the pools);
- `threshold_schedule: per_batch` (not NAAF's) scores a whole batch at the batch's starting threshold and runs the
  same update sequence afterwards (`observe`), which several training processes need: NAAF's schedule needs every
  image of the batch in the process that scores it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itm.config import NaafParams
from itm.errors import UserError
from itm.models.base import Encoded, Matcher
from itm.models.encoders import EPS, RegionEncoder, TextEncoder
from itm.models.losses import ContrastiveLoss
from itm.models.registry import MatcherInputs, register_matcher
from itm.models.similarity import LEAKY_SLOPE, LENGTH_GROUP, default_max_elements

Schedule = Literal["per_caption", "per_batch"]

L1_EPS = 1e-8  # NAAF `l1norm` eps, in the denominator of the thresholded attention
LOG_EPS = 1e-8  # NAAF adds it inside the logarithm of C
DENOMINATOR_EPS = 1e-10  # NAAF adds it to 2A


@dataclass(frozen=True)
class ThresholdRule:
    """NAAF's estimator settings (`xattn_score`; defaults `train.py` and constants in `model.py`)."""

    alpha: float = 2.0  # weight of the unmatched Gaussian (`--alpha`)
    momentum: float = 0.7  # weight of a new estimate in the moving average
    min_words: int = 200  # matched words a batch must have pooled before an estimate ("N_POS_WORD > 200")
    safe_stds: float = 3.0  # the retrieval threshold is μ+ − safe_stds·σ+


@dataclass(frozen=True)
class Thresholds:
    """NAAF's two thresholds: `train` scores training batches (`opt.thres`), `safe` scores at retrieval
    (`opt.thres_safe`)."""

    train: float
    safe: float


def naaf_boundary(mean_pos: float, std_pos: float, mean_neg: float, std_neg: float, alpha: float) -> float | None:
    """NAAF's crossing of N(μ+, σ+) and α·N(μ−, σ−) (formula in the module docstring), or None where NAAF keeps the
    thresholds (B² − 4AC not > 0; NaN for σ+ = 0). IEEE arithmetic as in NAAF's torch tensors."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mp, sp, mn, sn = (np.float64(x) for x in (mean_pos, std_pos, mean_neg, std_neg))
        a = sp**2 - sn**2
        b = 2 * (mp * sn**2 - mn * sp**2)
        c = (mn * sp) ** 2 - (mp * sn) ** 2 + 2 * (sp * sn) ** 2 * np.log(sn / (alpha * sp) + LOG_EPS)
        discriminant = b**2 - 4 * a * c
        if not discriminant > 0:
            return None
        return float((-b + np.sqrt(discriminant)) / (2 * a + DENOMINATOR_EPS))


class _Pool:
    """Running count, sum and sum of squares (float64) of a batch's pooled word similarities."""

    def __init__(self) -> None:
        self.count, self.total, self.total_sq = 0, 0.0, 0.0

    def add(self, samples: np.ndarray) -> None:
        self.count += len(samples)
        self.total += float(samples.sum())
        self.total_sq += float(np.square(samples).sum())

    def mean_std(self) -> tuple[float, float]:
        """Mean and unbiased standard deviation (torch's `std`)."""
        mean = self.total / self.count
        variance = max(self.total_sq - self.total * mean, 0.0) / (self.count - 1) if self.count > 1 else np.nan
        return mean, float(np.sqrt(variance))


def walk_thresholds(
    start: Thresholds,
    matched: Sequence[bool],
    positive: Sequence[np.ndarray],
    negative: Sequence[np.ndarray],
    rule: ThresholdRule,
) -> tuple[list[float], Thresholds]:
    """NAAF's threshold updates over one training batch's captions, in order (`xattn_score`).

    `matched[c]`: caption c's matched image ranks first in its column; `positive[c]` / `negative[c]`: the best
    region similarity of each of its words with the matched / the least similar image. Returns the training
    threshold each caption is scored with, and the thresholds after the batch.
    """
    train, safe = start.train, start.safe
    used = []
    matched_pool, unmatched_pool = _Pool(), _Pool()
    for c, ranked_first in enumerate(matched):
        used.append(train)
        if ranked_first:
            matched_pool.add(positive[c])
            unmatched_pool.add(negative[c])
            if matched_pool.count > rule.min_words:
                train, safe = _update(train, safe, matched_pool, unmatched_pool, rule)
        if matched_pool.count < rule.min_words:
            train = safe = 0.0
    return used, Thresholds(train, safe)


def _update(train: float, safe: float, matched: _Pool, unmatched: _Pool, rule: ThresholdRule) -> tuple[float, float]:
    """One re-estimate from the pools and its moving average (NAAF keeps both values where there is no crossing;
    either goes to 0 outside [0, 1] before the average)."""
    mean_pos, std_pos = matched.mean_std()
    mean_neg, std_neg = unmatched.mean_std()
    boundary = naaf_boundary(mean_pos, std_pos, mean_neg, std_neg, rule.alpha)
    new_train, new_safe = (train, safe) if boundary is None else (boundary, mean_pos - rule.safe_stds * std_pos)
    new_train, new_safe = (0.0 if value < 0 or value > 1 else value for value in (new_train, new_safe))
    keep = 1 - rule.momentum
    return rule.momentum * new_train + keep * train, rule.momentum * new_safe + keep * safe


# --- scores ---------------------------------------------------------------------------------------------------------


def naaf_scores(
    images: Encoded,
    captions: Encoded,
    thresholds: Tensor,
    *,
    lambda_softmax: float,
    intra_lambda: float | None,
    max_elements: int | None = None,
) -> Tensor:
    """NAAF's score of every image with every caption, [n_images, n_captions] fp32; caption c is scored with the
    threshold `thresholds[c]` ([n_captions]). `intra_lambda`: smooth the negative indicator across the caption's
    words as NAAF does at retrieval (its λ, 5); None: each word's own indicator, as in training. Chunked like
    `itm.models.similarity.cross_attention_scores`; differentiable except through the thresholds."""
    captions = Encoded(captions.local, captions.mask, extras={"threshold": thresholds.detach().float()})

    def block(img: Encoded, cap: Encoded) -> Tensor:
        return _naaf_block(img, cap, lambda_softmax, intra_lambda)

    if max_elements is None:
        max_elements = default_max_elements(images.local.device)
    return _chunked(images.fragments(), captions, block, max_elements)


def _chunked(
    images: Encoded, captions: Encoded, block: Callable[[Encoded, Encoded], Tensor], max_elements: int
) -> Tensor:
    """`block` over image chunk × caption chunk pieces of at most `max_elements` [ki, R, ci, L] elements, captions
    grouped by length and trimmed to each group's longest (`itm.models.similarity._chunked`, keeping the captions'
    extras: their thresholds)."""
    images = images.trimmed(max(int(_extents(images.mask).max()), 1))
    n_img, n_regions = images.local.shape[:2]
    extents = _extents(captions.mask)  # [n_cap]
    order = torch.argsort(extents, descending=True, stable=True)
    sorted_extents = extents[order].tolist()
    columns, start = [], 0
    while start < len(sorted_extents):
        n_words = max(sorted_extents[start], 1)
        pairs = max(1, max_elements // (n_regions * n_words))
        image_step = min(n_img, pairs)
        caption_step = max(1, min(pairs // image_step, LENGTH_GROUP))
        chunk = captions.take(order[start : start + caption_step]).trimmed(n_words)
        columns.append(torch.cat([block(images.slice(i, i + image_step), chunk) for i in range(0, n_img, image_step)]))
        start += caption_step
    return torch.cat(columns, dim=1)[:, torch.argsort(order)]


def _extents(mask: Tensor) -> Tensor:
    """[B] index of the last True position + 1 (0 for none) of a [B, N] mask."""
    return (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).amax(dim=1)


def _naaf_block(images: Encoded, captions: Encoded, lambda_softmax: float, intra_lambda: float | None) -> Tensor:
    """Scores [ki, ci] of an image chunk against a caption chunk (formulas in the module docstring)."""
    ki, n_regions, dim = images.local.shape
    ci, n_words, _ = captions.local.shape
    sims = images.local.reshape(ki * n_regions, dim) @ captions.local.reshape(ci * n_words, dim).T  # autocast dtype
    sims = sims.view(ki, n_regions, ci, n_words).float()  # s [ki, R, ci, L]
    with torch.autocast(device_type=sims.device.type, enabled=False):
        # padded regions are masked only where the chunk has any (a pass over s saved for fixed region counts)
        padding = None if bool(images.mask.all()) else ~images.mask[:, :, None, None]  # [ki, R, 1, 1]
        words_real = captions.mask  # [ci, L]
        threshold = captions.extras["threshold"]  # [ci]

        best = (sims if padding is None else sims.masked_fill(padding, float("-inf"))).amax(dim=1)  # [ki, ci, L]
        shortfall = best - threshold[None, :, None]  # m_j = max_r s_rj − t, NAAF `Row_max`
        indicator = shortfall if intra_lambda is None else _smoothed(shortfall, captions, intra_lambda)
        negative = shortfall * (indicator < 0)  # N_j

        # aggregated positive: softmax of λ(s − t) over the regions above t, with l1norm's eps; shifted by the
        # largest s − t above t (max(m_j, 0)) so that exp cannot overflow
        shifted = sims - threshold[None, None, :, None]  # s − t [ki, R, ci, L]
        below = shifted <= 0 if padding is None else (shifted <= 0) | padding
        peak = shortfall.clamp_min(0)[:, None]  # [ki, 1, ci, L]
        weights = torch.exp((lambda_softmax * (shifted - peak)).masked_fill_(below, float("-inf")))
        del shifted, below
        weights = weights / (weights.sum(dim=1, keepdim=True) + L1_EPS * torch.exp(-lambda_softmax * peak))  # α
        gram = images.local.float() @ images.local.float().transpose(1, 2)  # [ki, R, R]
        spread = torch.bmm(gram, weights.view(ki, n_regions, ci * n_words)).view_as(weights)  # G α
        norm_sq = (weights * spread).sum(dim=1)  # ‖a_j‖² = αᵀ G α [ki, ci, L]
        del spread
        aggregated = (weights * sims).sum(dim=1) / norm_sq.clamp_min(EPS**2).sqrt().clamp_min(EPS)  # P_j
        del weights

        # relevance positive: SCAN's t-i attention (clipped L2 norm over the words) weighting the raw similarities
        clipped = F.leaky_relu(sims, LEAKY_SLOPE).masked_fill_(~words_real, 0)
        logits = clipped * (lambda_softmax / (torch.linalg.vector_norm(clipped, dim=3, keepdim=True) + EPS))
        del clipped
        if padding is not None:
            logits = logits.masked_fill_(padding, torch.finfo(logits.dtype).min)
        relevance = (torch.softmax(logits, dim=1) * sims).sum(dim=1)  # Q_j = Σ_r β_rj s_rj [ki, ci, L]

        per_word = (negative + aggregated + relevance) * words_real
        return per_word.sum(dim=2) / words_real.sum(dim=1).clamp_min(1)  # [ki, ci]


def _smoothed(shortfall: Tensor, captions: Encoded, intra_lambda: float) -> Tensor:
    """[ki, ci, L] Σ_k w_jk m_k with w_jk = softmax_k(λ e_j·e_k) over the caption's words (NAAF `intra_relation`)."""
    words = captions.local.float()  # [ci, L, E]
    logits = intra_lambda * (words @ words.transpose(1, 2))  # [ci, L, L]
    logits = logits.masked_fill(~captions.mask[:, None, :], float("-inf"))
    weights = torch.softmax(logits, dim=2)
    return torch.einsum("cjk,ick->icj", weights, shortfall.masked_fill(~captions.mask, 0))


def best_region(images: Encoded, captions: Encoded) -> Tensor:
    """[n, L] max over each image's real regions of s_rj for aligned rows (image n with caption n), fp32."""
    with torch.autocast(device_type=images.local.device.type, enabled=False):
        sims = torch.bmm(captions.local.float(), images.local.float().transpose(1, 2))  # [n, L, R]
        return sims.masked_fill(~images.mask[:, None, :], float("-inf")).amax(dim=2)


# --- the scorer -----------------------------------------------------------------------------------------------------


class NaafScorer(nn.Module):
    """NAAF's scores [n_images, n_captions] and its two thresholds (buffers, saved with the weights).

    Training mode assumes an aligned batch (image c matches caption c). `per_caption` (NAAF): the forward scores
    each caption with the threshold NAAF's loop would have at that caption and leaves the thresholds where NAAF's
    loop ends; `per_batch`: the forward scores every caption with the current threshold and `observe` updates it.
    Eval mode scores with the safe threshold and the smoothed negative indicator.
    """

    threshold: Tensor  # [] float64, NAAF `opt.thres`
    safe_threshold: Tensor  # [] float64, NAAF `opt.thres_safe`

    def __init__(
        self,
        lambda_softmax: float,
        rule: ThresholdRule,
        *,
        intra_lambda: float | None,
        schedule: Schedule,
        max_elements: int | None = None,
    ) -> None:
        super().__init__()
        if schedule not in ("per_caption", "per_batch"):
            raise ValueError(f"schedule must be 'per_caption' or 'per_batch', got {schedule!r}")
        # not `lambda_softmax`: that attribute marks SCAN-style scorers whose attention itm.pair_attention draws
        self.attention_lambda, self.rule, self.intra_lambda = lambda_softmax, rule, intra_lambda
        self.schedule, self.max_elements = schedule, max_elements
        self.register_buffer("threshold", torch.tensor(0.0, dtype=torch.float64))  # NAAF starts both at 0
        self.register_buffer("safe_threshold", torch.tensor(0.0, dtype=torch.float64))

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds(float(self.threshold), float(self.safe_threshold))

    def forward(self, images: Encoded, captions: Encoded) -> Tensor:
        if not self.training:
            return self._scores(images, captions, [self.thresholds.safe] * len(captions), self.intra_lambda)
        if self.schedule == "per_batch":
            return self._scores(images, captions, [self.thresholds.train] * len(captions), None)
        if len(images) != len(captions):
            raise UserError(
                f"naaf threshold_schedule 'per_caption' scores a whole aligned batch in one process, got "
                f"{len(images)} images x {len(captions)} captions; with several processes use 'per_batch'"
            )
        scores, after = self._scores_and_thresholds(images, captions)
        self._set(after)
        return scores

    def observe(self, images: Encoded, captions: Encoded, scores: Tensor) -> None:
        """`per_batch`: NAAF's updates over the aligned batch, decided on `scores` (called by `Matcher`)."""
        if self.schedule == "per_batch":
            _, after = self._walk(images, captions, scores, self.thresholds, best_region(images, captions))
            self._set(after)

    def _scores(self, images: Encoded, captions: Encoded, thresholds: list[float], intra: float | None) -> Tensor:
        per_caption = torch.tensor(thresholds, dtype=torch.float32, device=captions.local.device)
        return naaf_scores(images, captions, per_caption, lambda_softmax=self.attention_lambda, intra_lambda=intra,
                           max_elements=self.max_elements)  # fmt: skip

    def _scores_and_thresholds(self, images: Encoded, captions: Encoded) -> tuple[Tensor, Thresholds]:
        """NAAF's training scores [n, n] and the thresholds after the batch, without a loop over captions.

        The threshold of caption c depends on the decisions at captions < c, which depend on their scores. Guess a
        sequence ([t, 0, 0, ...]: no update in this batch), score, replay NAAF's updates on those scores
        (`walk_thresholds`), and rescore from the first caption whose threshold the replay changed, keeping the
        earlier columns: they were scored with their true thresholds, so that first mismatch moves right on every
        round and at most n rounds end at NAAF's sequence (a few in practice: a slightly different threshold rarely
        changes which image ranks first or last). The first round is differentiable and is the answer when the
        guess holds; otherwise one differentiable pass at the final sequence follows.
        """
        n, start = len(captions), self.thresholds
        guess = [start.train] + [0.0] * (n - 1)
        scores = self._scores(images, captions, guess, None)
        settled = True
        with torch.no_grad():
            positive = best_region(images, captions)  # [n, L] the matched image's best region per word
            columns = scores.detach().clone()
            for _ in range(n + 1):
                used, after = self._walk(images, captions, columns, start, positive)
                first = next((c for c in range(n) if used[c] != guess[c]), None)
                if first is None:
                    break
                guess, settled = used, False
                columns[:, first:] = self._scores(images, captions.slice(first, n), guess[first:], None)
            else:
                raise RuntimeError("NAAF's threshold sequence did not settle within n rounds")
        if not settled and torch.is_grad_enabled():
            scores = self._scores(images, captions, guess, None)
        elif not settled:
            scores = columns
        return scores, after

    def _walk(
        self, images: Encoded, captions: Encoded, scores: Tensor, start: Thresholds, positive: Tensor
    ) -> tuple[list[float], Thresholds]:
        """`walk_thresholds` on an aligned batch's scores [n, n]."""
        n = scores.shape[1]
        matched = (scores.argmax(dim=0) == torch.arange(n, device=scores.device)).tolist()
        least = scores.argmin(dim=0)  # each caption's least similar image
        negative = best_region(images.fragments().take(least), captions.fragments())
        mask = captions.mask.cpu().numpy()
        positive_np, negative_np = positive.double().cpu().numpy(), negative.double().cpu().numpy()
        return walk_thresholds(
            start, matched, [p[m] for p, m in zip(positive_np, mask, strict=True)],
            [q[m] for q, m in zip(negative_np, mask, strict=True)], self.rule,
        )  # fmt: skip

    def _set(self, thresholds: Thresholds) -> None:
        self.threshold.fill_(thresholds.train)
        self.safe_threshold.fill_(thresholds.safe)


@register_matcher("naaf")
def build_naaf(params: NaafParams, inputs: MatcherInputs) -> Matcher:
    """SCAN's region and bi-GRU text encoders and hinge loss (NAAF `EncoderImagePrecomp`, `EncoderText`,
    `ContrastiveLoss`) with NAAF's scorer."""
    rule = ThresholdRule(
        alpha=params.threshold_alpha,
        momentum=params.threshold_momentum,
        min_words=params.threshold_min_words,
        safe_stds=params.safe_threshold_stds,
    )
    return Matcher(
        image_encoder=RegionEncoder(inputs.feature_dim, params.embed_dim, pool_first=False),
        text_encoder=TextEncoder(
            inputs.vocab_size, params.word_dim, params.embed_dim, bidirectional=params.bidirectional
        ),
        scorer=NaafScorer(
            params.lambda_softmax, rule, intra_lambda=params.intra_lambda, schedule=params.threshold_schedule
        ),
        loss=ContrastiveLoss(params.margin, params.max_violation),
    )
