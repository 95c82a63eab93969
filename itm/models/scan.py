"""SCAN (Lee et al., ECCV 2018): per-region and per-word embeddings scored by stacked cross attention."""

from __future__ import annotations

from itm.config import ScanParams
from itm.models.base import Matcher
from itm.models.encoders import RegionEncoder, TextEncoder
from itm.models.losses import ContrastiveLoss
from itm.models.registry import MatcherInputs, register_matcher
from itm.models.similarity import CrossAttentionScorer


@register_matcher("scan")
def build_scan(params: ScanParams, inputs: MatcherInputs) -> Matcher:
    """SCAN t-i or i-t with AVG or LSE pooling (kuanghuei/SCAN `model.py`); the bi-GRU averages its directions."""
    return Matcher(
        image_encoder=RegionEncoder(inputs.feature_dim, params.embed_dim, pool_first=False),
        text_encoder=TextEncoder(
            inputs.vocab_size, params.word_dim, params.embed_dim, bidirectional=params.bidirectional
        ),
        scorer=CrossAttentionScorer(params.direction, params.pooling, params.lambda_softmax, params.lambda_lse),
        loss=ContrastiveLoss(params.margin, params.max_violation),
    )
