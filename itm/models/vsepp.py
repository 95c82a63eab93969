"""VSE++ (Faghri et al., BMVC 2018): one vector per image and per caption, cosine similarity, hardest negatives."""

from __future__ import annotations

from itm.config import VseppParams
from itm.models.base import Matcher
from itm.models.encoders import RegionEncoder, TextEncoder
from itm.models.losses import ContrastiveLoss
from itm.models.registry import MatcherInputs, register_matcher
from itm.models.similarity import CosineScorer


@register_matcher("vsepp")
def build_vsepp(params: VseppParams, inputs: MatcherInputs) -> Matcher:
    """fartashf/vsepp `model.py` on bottom-up features: the mean region feature projected, the GRU's last state."""
    return Matcher(
        image_encoder=RegionEncoder(inputs.feature_dim, params.embed_dim, pool_first=True),
        text_encoder=TextEncoder(
            inputs.vocab_size, params.word_dim, params.embed_dim, bidirectional=params.bidirectional
        ),
        scorer=CosineScorer(),
        loss=ContrastiveLoss(params.margin, params.max_violation),
    )
