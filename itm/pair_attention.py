"""What a matcher looks at for one image-caption pair, for visualisations.

Cross attention (SCAN, UARDA): how much attention each word of the caption gives each region of the image.

matcher, _ = load_matcher(Path("models/scan_t2i_avg"), torch.device("cpu"))
attention = pair_attention(matcher, image_batch, caption_batch)  # one image, one caption
attention.weights  # [L, R]: word j's attention over the regions (t2i); region i's attention on word j (i2t)

Multi-view attention (MVAM): where each view looks.

matcher, _ = load_matcher(Path("models/mvam"), torch.device("cpu"))
views = pair_views(matcher, image_batch, caption_batch)  # one image, one caption
views.image_attention  # [m, regions or patches]: where each view looks in the image
views.caption_attention  # [m, tokens]: where it looks in the caption
views.view_cosines  # [m]: how well the pair agrees in each view; their mean is the pair's score
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from itm.data.batches import Captions, Images, Regions
from itm.models.base import Matcher
from itm.models.similarity import attention_weights


@dataclass(frozen=True)
class PairAttention:
    """The word-region attention of one image-caption pair under a cross-attention scorer.

    t2i (words attend to regions): row j is word j's softmax over the regions and sums to 1, unless the word has
    no region above UARDA's relevance threshold (`attending[j]` False, row of zeros: the word is skipped).
    i2t (regions attend to words): column i is region i's softmax over the words; row j says how much of each
    region's attention goes to word j.
    """

    weights: Tensor  # [L, R]
    direction: str  # "t2i" or "i2t"
    attending: Tensor  # [L] bool: the word takes part in the attention (False only for UARDA's skipped words)
    threshold: float | None  # UARDA's relevance threshold, None for SCAN


def is_cross_attention(matcher: Matcher) -> bool:
    """Whether `matcher` scores by word-region cross attention (SCAN, UARDA)."""
    return hasattr(matcher.scorer, "lambda_softmax")


def pair_attention(matcher: Matcher, image: Regions, caption: Captions) -> PairAttention:
    """The word-region attention weights for a batch of one image and a batch of one caption (eval mode, no grad),
    with the scorer's own λ1 (and threshold, for UARDA)."""
    if not is_cross_attention(matcher):
        raise ValueError("not a cross-attention matcher: its scorer has no lambda_softmax")
    if len(caption.tokens) != 1 or len(image) != 1:
        raise ValueError("pair_attention takes one image and one caption")
    scorer = matcher.scorer
    direction = getattr(scorer, "direction", "t2i")  # UARDA's scorer is t2i only
    threshold_module = getattr(scorer, "threshold", None)
    threshold = None if threshold_module is None else float(threshold_module.value)
    was_training = matcher.training
    matcher.eval()
    try:
        with torch.no_grad():
            regions, words = matcher.encode_image(image), matcher.encode_text(caption)
            if direction == "t2i":
                weights, attending = attention_weights(
                    words.local, regions.local, words.mask, regions.mask, scorer.lambda_softmax, threshold
                )
                weights, attending = weights[0], attending[0] & words.mask[0]  # [L, R], [L]
            else:
                weights, _ = attention_weights(
                    regions.local, words.local, regions.mask, words.mask, scorer.lambda_softmax, None
                )
                weights, attending = weights[0].T, words.mask[0]  # [L, R]
    finally:
        matcher.train(was_training)
    return PairAttention(weights.float(), direction, attending, threshold)


@dataclass(frozen=True)
class PairViews:
    """The per-view attention and agreement of one image-caption pair."""

    image_attention: Tensor  # [m, N] over the image's regions (own backbone) or patches (open_clip)
    caption_attention: Tensor  # [m, L] over the caption's tokens
    view_cosines: Tensor  # [m] cosine of the pair's k-th views

    @property
    def score(self) -> float:
        """The pair's retrieval score: the mean per-view cosine, i.e. the dot product of the joint vectors."""
        return float(self.view_cosines.mean())


def is_multi_view(matcher: Matcher) -> bool:
    """Whether `matcher` embeds each side as several attention views (MVAM)."""
    return hasattr(matcher.image_encoder, "view_attention") and hasattr(matcher.text_encoder, "view_attention")


def pair_views(matcher: Matcher, image: Images, caption: Captions) -> PairViews:
    """Per-view attention and cosines for a batch of one image and a batch of one caption (eval mode, no grad)."""
    if not is_multi_view(matcher):
        raise ValueError("not a multi-view matcher: its encoders have no view_attention")
    if len(caption.tokens) != 1 or len(image) != 1:
        raise ValueError("pair_views takes one image and one caption")
    was_training = matcher.training
    matcher.eval()
    try:
        with torch.no_grad():
            image_attention = matcher.image_encoder.view_attention(image)[0]  # [m, N]
            caption_attention = matcher.text_encoder.view_attention(caption)[0]  # [m, L]
            views = image_attention.shape[0]
            image_views = matcher.encode_image(image).pooled.view(views, -1)  # [m, v], rows of norm 1/sqrt(m)
            caption_views = matcher.encode_text(caption).pooled.view(views, -1)
            cosines = (image_views * caption_views).sum(dim=1) * views
    finally:
        matcher.train(was_training)
    return PairViews(image_attention, caption_attention, cosines)
