"""MVAM (Cui, Cheng, Guo, Cheng; arXiv 2402.17237): multi-view attention for two-stream matchers.

Each modality's token states H [B, N, d] (regions or words) are pooled m times, once per learnable view code:

    A = softmax_N(Q (W_K H)ᵀ / √d)  (masked),   r_k = A_k (W_V H),   z_k = l2norm(P_k r_k),
    z = [z_1; ...; z_m] / √m

so z_v · z_t is the mean over views of the per-view cosines and retrieval stays one dot product per pair. A
diversity term pushes the views of one item apart: ‖A Aᵀ − I‖²_F (`full`), or only its off-diagonal entries
(`off_diagonal`, which leaves each view free to stay spread), weighted by `diversity_weight`.

The paper's full text was not available (methods.md §2.6: abstract and reviews). Its choices here:
- view codes are d-dimensional, initialised N(0, 1/d); keys and values are linear maps of the token states;
- each view has its own projection P_k to `view_dim` (default embed_dim // m, so the joint size does not depend
  on m), then L2 normalisation; the 1/√m scale makes the concatenation a unit vector;
- objectives: symmetric InfoNCE with a learnable logit scale (CLIP: initialised at 1/0.07, clamped at 100, the
  mean of the image→text and text→image cross-entropies), or the VSE++ hinge of the other matchers for a
  like-for-like comparison; the diversity term is reduced like the objective (mean for InfoNCE, sum for the
  hinge, which is summed over the batch);
- the backbone is this project's two-stream encoders: projected bottom-up regions, bi-GRU words.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itm.config import MvamParams
from itm.models.base import Captions, Encoded, Matcher, Regions
from itm.models.encoders import RegionEncoder, TextEncoder, l2norm
from itm.models.losses import ContrastiveLoss
from itm.models.registry import MatcherInputs, register_matcher
from itm.models.similarity import CosineScorer

Diversity = Literal["full", "off_diagonal"]


class MultiViewAttention(nn.Module):
    """m view codes attending over token states [B, N, d] (masked); returns the joint vector [B, m·view_dim] and
    the attention [B, m, N] (zero on padding)."""

    def __init__(self, dim: int, views: int, view_dim: int) -> None:
        super().__init__()
        self.codes = nn.Parameter(torch.randn(views, dim) / math.sqrt(dim))  # [m, d]
        self.keys = nn.Linear(dim, dim)
        self.values = nn.Linear(dim, dim)
        bound = 1.0 / math.sqrt(dim)
        self.projections = nn.Parameter(torch.empty(views, dim, view_dim).uniform_(-bound, bound))  # [m, d, v]
        self.projection_bias = nn.Parameter(torch.zeros(views, view_dim))

    @property
    def views(self) -> int:
        return int(self.codes.shape[0])

    def attention(self, states: Tensor, mask: Tensor) -> Tensor:
        """[B, m, N] softmax over the real tokens of each item, one row per view."""
        logits = torch.einsum("md,bnd->bmn", self.codes, self.keys(states)).float() / math.sqrt(states.shape[-1])
        return F.softmax(logits.masked_fill(~mask[:, None, :], float("-inf")), dim=-1)

    def forward(self, states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        weights = self.attention(states, mask)  # [B, m, N]
        pooled = weights.to(states.dtype) @ self.values(states)  # [B, m, d]
        views = torch.einsum("bmd,mdv->bmv", pooled, self.projections) + self.projection_bias  # [B, m, v]
        joint = l2norm(views).flatten(1) / math.sqrt(self.views)  # [B, m·v], unit length
        return joint, weights


def diversity_penalty(attention: Tensor, mode: Diversity) -> Tensor:
    """Per item ‖A Aᵀ − I‖²_F (`full`) or the squared off-diagonal entries of A Aᵀ (`off_diagonal`), [B]."""
    gram = attention.float() @ attention.float().transpose(1, 2)  # [B, m, m]
    identity = torch.eye(gram.shape[-1], device=gram.device)
    if mode == "full":
        return ((gram - identity) ** 2).sum(dim=(1, 2))
    if mode == "off_diagonal":
        return ((gram * (1 - identity)) ** 2).sum(dim=(1, 2))
    raise ValueError(f"diversity must be 'full' or 'off_diagonal', got {mode!r}")


class MultiViewImageEncoder(nn.Module):
    """Bottom-up regions → unit region vectors → m views; the attention travels in `extras` in training only."""

    def __init__(self, regions: RegionEncoder, views: MultiViewAttention) -> None:
        super().__init__()
        self.regions, self.views = regions, views

    def forward(self, regions: Regions) -> Encoded:
        encoded = self.regions(regions)
        joint, attention = self.views(encoded.local, encoded.mask)
        return Encoded(encoded.local, encoded.mask, joint, {"view_attention": attention} if self.training else {})

    def view_attention(self, regions: Regions) -> Tensor:
        """[B, m, R] attention of every view over the regions (for visualisation)."""
        encoded = self.regions(regions)
        return self.views.attention(encoded.local, encoded.mask)


class MultiViewTextEncoder(nn.Module):
    """Captions → unit word vectors (bi-GRU) → m views; the attention travels in `extras` in training only."""

    def __init__(self, words: TextEncoder, views: MultiViewAttention) -> None:
        super().__init__()
        self.words, self.views = words, views

    def forward(self, captions: Captions) -> Encoded:
        encoded = self.words(captions)
        joint, attention = self.views(encoded.local, encoded.mask)
        return Encoded(encoded.local, encoded.mask, joint, {"view_attention": attention} if self.training else {})

    def view_attention(self, captions: Captions) -> Tensor:
        """[B, m, L] attention of every view over the words (for visualisation)."""
        encoded = self.words(captions)
        return self.views.attention(encoded.local, encoded.mask)


class InfoNceLoss(nn.Module):
    """Symmetric InfoNCE on cosine scores [B, B] with a learnable logit scale (CLIP, Radford et al. 2021): the mean
    of the image→text and text→image cross-entropies of scale·S, the scale kept as its log and clamped."""

    def __init__(self, temperature_init: float, max_scale: float) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature_init)))
        self.max_log_scale = math.log(max_scale)

    def forward(self, scores: Tensor, *_encodings: Encoded) -> dict[str, Tensor]:
        scale = self.log_scale.clamp(max=self.max_log_scale).exp()
        logits = scale * scores.float()  # [B, B]
        targets = torch.arange(len(logits), device=logits.device)
        loss_i2t, loss_t2i = F.cross_entropy(logits, targets), F.cross_entropy(logits.T, targets)
        return {"loss": (loss_i2t + loss_t2i) / 2, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i,
                "logit_scale": scale.detach()}  # fmt: skip


class MultiViewLoss(nn.Module):
    """The matching objective plus `weight` × the views' diversity penalty of both modalities, reduced like the
    objective (`reduction`: "mean" for InfoNCE, "sum" for the summed hinge)."""

    def __init__(self, objective: nn.Module, diversity: Diversity, weight: float, reduction: str) -> None:
        super().__init__()
        self.objective, self.diversity, self.weight, self.reduction = objective, diversity, weight, reduction

    def forward(self, scores: Tensor, images: Encoded, captions: Encoded) -> dict[str, Tensor]:
        terms = self.objective(scores)
        penalty = sum(
            diversity_penalty(side.extras["view_attention"], self.diversity) for side in (images, captions)
        )  # [B]
        penalty = penalty.mean() if self.reduction == "mean" else penalty.sum()
        return terms | {"loss": terms["loss"] + self.weight * penalty, "loss_diversity": penalty}


@register_matcher("mvam")
def build_mvam(params: MvamParams, inputs: MatcherInputs) -> Matcher:
    """MVAM over the project's two-stream encoders (projected regions, bi-GRU words)."""
    view_dim = params.view_dim or params.embed_dim // params.views
    if params.objective == "infonce":
        objective: nn.Module = InfoNceLoss(params.temperature_init, params.max_logit_scale)
        reduction = "mean"
    else:
        objective, reduction = ContrastiveLoss(params.margin, params.max_violation), "sum"
    return Matcher(
        image_encoder=MultiViewImageEncoder(
            RegionEncoder(inputs.feature_dim, params.embed_dim, pool_first=False),
            MultiViewAttention(params.embed_dim, params.views, view_dim),
        ),
        text_encoder=MultiViewTextEncoder(
            TextEncoder(inputs.vocab_size, params.word_dim, params.embed_dim, bidirectional=params.bidirectional),
            MultiViewAttention(params.embed_dim, params.views, view_dim),
        ),
        scorer=CosineScorer(),
        loss=MultiViewLoss(objective, params.diversity, params.diversity_weight, reduction),
    )
