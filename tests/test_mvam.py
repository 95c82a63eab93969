"""MVAM: the diversity penalty on hand-worked attention matrices, one view equal to plain attention pooling, the joint
vector's dot product as the mean per-view cosine, InfoNCE by hand, and the exported view attention."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from pydantic import TypeAdapter
from torch import Tensor

from itm.config import MatcherParams
from itm.data.batches import Captions, Pixels, Regions
from itm.data.loaders import pad_captions
from itm.errors import UserError
from itm.models import Matcher, MatcherInputs, build_matcher
from itm.models.encoders import l2norm
from itm.models.mvam import InfoNceLoss, MultiViewAttention, diversity_penalty
from itm.pair_attention import pair_views
from itm.train.run import warn_if_views_outnumber_tokens


def _close(actual: Tensor, expected: Tensor, atol: float = 1e-6) -> None:
    assert actual.shape == expected.shape
    assert torch.allclose(actual.float(), expected.float(), rtol=0, atol=atol), (actual - expected).abs().max()


@pytest.mark.parametrize(
    ("attention", "full", "off_diagonal"),
    [
        ([[1.0, 0.0], [0.0, 1.0]], 0.0, 0.0),  # two views on two different tokens: A Aᵀ = I
        ([[0.5, 0.5], [0.5, 0.5]], 1.0, 0.5),  # both spread evenly: A Aᵀ = 0.5 everywhere
        ([[1.0, 0.0], [1.0, 0.0]], 2.0, 2.0),  # both on the same token: A Aᵀ = all ones
        ([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], 0.25, 0.0),  # disjoint, one spread: diagonal 0.5 and 1
    ],
)
def test_diversity_penalty_by_hand(attention: list[list[float]], full: float, off_diagonal: float) -> None:
    a = torch.tensor([attention])
    assert float(diversity_penalty(a, "full")[0]) == pytest.approx(full)
    assert float(diversity_penalty(a, "off_diagonal")[0]) == pytest.approx(off_diagonal)
    with pytest.raises(ValueError, match="diversity must be"):
        diversity_penalty(a, "trace")  # type: ignore[arg-type]


def test_one_view_is_plain_attention_pooling() -> None:
    """m = 1: z = l2norm(P softmax(q·W_K h / √d) W_V h + b), a single learned query pooling the tokens."""
    torch.manual_seed(0)
    layer = MultiViewAttention(8, views=1, view_dim=5)
    states = torch.randn(3, 4, 8)
    mask = torch.tensor([[True, True, True, False], [True] * 4, [True, False, False, False]])
    joint, attention = layer(states, mask)
    with torch.no_grad():
        logits = (layer.keys(states) @ layer.codes[0]) / math.sqrt(8)  # [3, 4]
        weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)
        pooled = (weights[..., None] * layer.values(states)).sum(1)  # [3, 8]
        expected = l2norm(pooled @ layer.projections[0] + layer.projection_bias[0])
    _close(joint, expected, atol=1e-5)
    _close(attention[:, 0], weights, atol=1e-6)
    assert attention[0, 0, 3] == 0 and attention[2, 0, 1:].sum() == 0


def test_joint_dot_product_is_the_mean_view_cosine() -> None:
    torch.manual_seed(1)
    layer = MultiViewAttention(8, views=4, view_dim=3)
    mask = torch.ones(2, 5, dtype=torch.bool)
    first, _ = layer(torch.randn(2, 5, 8), mask)
    second, _ = layer(torch.randn(2, 5, 8), mask)
    assert first.shape == (2, 12)
    _close(first.norm(dim=1), torch.ones(2))
    per_view = F.cosine_similarity(first.view(2, 4, 3), second.view(2, 4, 3), dim=-1).mean(1)
    _close((first * second).sum(1), per_view, atol=1e-6)


def test_infonce_by_hand() -> None:
    scores = torch.tensor([[0.9, 0.1], [0.3, 0.8]])
    loss = InfoNceLoss(temperature_init=0.5, max_scale=100.0)  # scale 2
    with torch.no_grad():
        terms = loss(scores)
    i2t = (
        -(
            math.log(math.exp(1.8) / (math.exp(1.8) + math.exp(0.2)))
            + math.log(math.exp(1.6) / (math.exp(0.6) + math.exp(1.6)))
        )
        / 2
    )
    t2i = (
        -(
            math.log(math.exp(1.8) / (math.exp(1.8) + math.exp(0.6)))
            + math.log(math.exp(1.6) / (math.exp(0.2) + math.exp(1.6)))
        )
        / 2
    )
    assert float(terms["loss_i2t"]) == pytest.approx(i2t) and float(terms["loss_t2i"]) == pytest.approx(t2i)
    assert float(terms["loss"]) == pytest.approx((i2t + t2i) / 2)
    clamped = InfoNceLoss(temperature_init=0.001, max_scale=100.0)  # 1000 is clamped to 100
    assert float(clamped(scores)["logit_scale"]) == pytest.approx(100.0)


@pytest.mark.parametrize("objective", ["infonce", "hinge"])
def test_mvam_trains_exports_views_and_scores_by_one_product(objective: str) -> None:
    torch.manual_seed(0)
    params = TypeAdapter(MatcherParams).validate_python(
        {"kind": "mvam", "embed_dim": 32, "word_dim": 8, "views": 4, "objective": objective, "diversity_weight": 1.0}
    )
    matcher = build_matcher(params, MatcherInputs(6, 20))
    regions = Regions(torch.randn(5, 3, 6).half(), torch.ones(5, 3, dtype=torch.bool))
    captions = Captions(torch.randint(1, 20, (5, 6)), torch.tensor([6, 5, 4, 3, 2]))
    terms = matcher.train()(regions, captions)
    images, texts = matcher.encode_image(regions), matcher.encode_text(captions)  # no dropout: the same encodings
    penalties = [diversity_penalty(side.extras["view_attention"], "full") for side in (images, texts)]
    penalty = sum(p.mean() if objective == "infonce" else p.sum() for p in penalties)
    matching = matcher.loss.objective(images.pooled @ texts.pooled.T)["loss"]
    assert terms["loss_diversity"].item() == pytest.approx(penalty.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx((matching + penalty).item(), rel=1e-5)
    assert terms["loss_diversity"] > 0
    terms["loss"].backward()
    assert matcher.image_encoder.views.codes.grad.abs().sum() > 0  # the diversity and matching terms reach the codes
    matcher.eval()
    with torch.no_grad():
        images, texts = matcher.encode_image(regions), matcher.encode_text(captions)
        assert images.pooled.shape == (5, 32) and not images.extras  # nothing but the joint vector at retrieval
        _close(matcher.score(images, texts), images.pooled @ texts.pooled.T)
        region_views = matcher.image_encoder.view_attention(regions)
        word_views = matcher.text_encoder.view_attention(captions)
    assert region_views.shape == (5, 4, 3) and word_views.shape == (5, 4, 6)
    _close(word_views.sum(-1), torch.ones(5, 4), atol=1e-5)
    assert float(word_views[4, :, 2:].sum()) == 0  # caption 4 has 2 tokens


# --- the open_clip backbone ----------------------------------------------------------------------------------------

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 16, "image_size": 64},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 24, "heads": 2, "layers": 1},
}


@pytest.fixture
def tiny_clip(tmp_path: Path) -> dict[str, object]:
    """mvam params over a randomly initialised 1-layer open_clip model (config written as a JSON file)."""
    config = tmp_path / "itm-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    return {"kind": "mvam", "embed_dim": 32, "views": 4, "backbone": "open_clip", "clip_model": "itm-tiny-clip",
            "clip_config": str(config)}  # fmt: skip


def _mvam(params: dict[str, object], **inputs: object) -> Matcher:
    return build_matcher(TypeAdapter(MatcherParams).validate_python(params), MatcherInputs(6, 20, **inputs))


def test_open_clip_backbone_trains_on_pixels_and_its_own_tokens(tiny_clip: dict[str, object]) -> None:
    torch.manual_seed(0)
    matcher = _mvam(tiny_clip)
    assert matcher.pixels is not None and matcher.pixels.size == 64
    token_ids = matcher.tokenizer(["a red star left of a blue circle", "two shapes"])
    assert token_ids[1][0] == 49406 and token_ids[1][-1] == 49407 and len(token_ids[1]) == 4  # <sot> two shapes <eot>
    captions, pixels = pad_captions(token_ids), Pixels(torch.randn(2, 3, 64, 64))
    terms = matcher.train()(pixels, captions)
    terms["loss"].backward()
    for name, parameter in matcher.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    matcher.eval()
    with torch.no_grad():
        images, texts = matcher.encode_image(pixels), matcher.encode_text(captions)
        _close(matcher.score(images, texts), images.pooled @ texts.pooled.T)
        assert matcher.image_encoder.view_attention(pixels).shape == (2, 4, 16)  # 4 views over 4 x 4 patches
        word_views = matcher.text_encoder.view_attention(captions)
    assert word_views.shape == (2, 4, 10) and float(word_views[1, :, 4:].sum()) == 0


def test_open_clip_checkpoint_is_loaded_and_bad_paths_are_named(tiny_clip: dict[str, object], tmp_path: Path) -> None:
    import open_clip

    _mvam(tiny_clip)  # registers the fixture's config
    reference = open_clip.create_model("itm-tiny-clip")
    checkpoint = tmp_path / "weights.pt"
    torch.save(reference.state_dict(), checkpoint)
    loaded = _mvam({**tiny_clip, "clip_checkpoint": str(checkpoint)})
    _close(loaded.image_encoder.visual.conv1.weight, reference.visual.conv1.weight)
    _close(loaded.text_encoder.token_embedding.weight, reference.token_embedding.weight)
    rebuilt = _mvam({**tiny_clip, "clip_checkpoint": str(checkpoint)}, read_pretrained=False)  # a saved model
    assert not torch.equal(rebuilt.image_encoder.visual.conv1.weight, reference.visual.conv1.weight)
    with pytest.raises(UserError, match="clip_checkpoint not found"):
        _mvam({**tiny_clip, "clip_checkpoint": str(tmp_path / "missing.pt")})
    with pytest.raises(UserError, match="open_clip model config not found"):
        _mvam({**tiny_clip, "clip_config": str(tmp_path / "missing.json")})
    with pytest.raises(UserError, match="'no-such-model' is not an open_clip model"):
        _mvam({**tiny_clip, "clip_model": "no-such-model", "clip_config": None})


def test_pair_views_explain_the_score() -> None:
    torch.manual_seed(0)
    params = TypeAdapter(MatcherParams).validate_python({"kind": "mvam", "embed_dim": 32, "word_dim": 8, "views": 4})
    matcher = build_matcher(params, MatcherInputs(6, 20)).train()
    image = Regions(torch.randn(1, 3, 6).half(), torch.ones(1, 3, dtype=torch.bool))
    caption = Captions(torch.randint(1, 20, (1, 5)), torch.tensor([5]))
    views = pair_views(matcher, image, caption)
    assert matcher.training  # the mode comes back
    assert views.image_attention.shape == (4, 3) and views.caption_attention.shape == (4, 5)
    matcher.eval()
    with torch.no_grad():
        score = float(matcher.score(matcher.encode_image(image), matcher.encode_text(caption)))
    assert views.score == pytest.approx(score, abs=1e-6)
    assert ((views.view_cosines >= -1 - 1e-6) & (views.view_cosines <= 1 + 1e-6)).all()
    with pytest.raises(ValueError, match="one image and one caption"):
        pair_views(matcher, image, Captions(torch.ones(2, 3, dtype=torch.int64), torch.tensor([3, 3])))
    cosine_only = build_matcher(TypeAdapter(MatcherParams).validate_python({"kind": "vsepp"}), MatcherInputs(6, 20))
    with pytest.raises(ValueError, match="not a multi-view matcher"):
        pair_views(cosine_only, image, caption)


def test_more_views_than_regions_or_words_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    params = TypeAdapter(MatcherParams).validate_python({"kind": "mvam", "embed_dim": 64, "views": 16})
    store = SimpleNamespace(info={"images": 4, "boxes": 40})  # 10 regions per image
    captions = SimpleNamespace(token_ids=[[1] * 12, [1] * 20, [1] * 30])  # median 20 words
    with caplog.at_level(logging.WARNING):
        warn_if_views_outnumber_tokens("mvam", params, SimpleNamespace(store=store, captions=captions))
    assert [record.getMessage() for record in caplog.records] == [
        "mvam: its 16 views outnumber the regions per image (mean), 10.0: several views attend over the same tokens"
    ]
    caplog.clear()
    few = params.model_copy(update={"views": 8})
    warn_if_views_outnumber_tokens("mvam", few, SimpleNamespace(store=store, captions=captions))
    assert caplog.records == []
