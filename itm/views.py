"""What each view of a multi-view matcher (MVAM) looks at for one image-caption pair, for visualisations.

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

from itm.models.base import Captions, Matcher, Pixels, Regions


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


def pair_views(matcher: Matcher, image: Regions | Pixels, caption: Captions) -> PairViews:
    """Per-view attention and cosines for a batch of one image and a batch of one caption (eval mode, no grad)."""
    if not (hasattr(matcher.image_encoder, "view_attention") and hasattr(matcher.text_encoder, "view_attention")):
        raise ValueError("not a multi-view matcher: its encoders have no view_attention")
    if len(caption.tokens) != 1 or _batch_size(image) != 1:
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


def _batch_size(image: Regions | Pixels) -> int:
    return len(image.images) if isinstance(image, Pixels) else len(image.features)
