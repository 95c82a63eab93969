"""Matchers: every registered variant trains and scores; the fast cross attention equals SCAN's loop; UARDA's
threshold estimator finds the Gaussian crossing; the hinge loss on a hand-computed example."""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter
from torch import Tensor, nn

from itm.config import MatcherParams
from itm.data.batches import Captions, Regions
from itm.data.concepts import Concepts
from itm.models import Matcher, MatcherInputs, build_matcher, list_matchers
from itm.models import similarity as similarity_module
from itm.models.base import Encoded
from itm.models.encoders import TextEncoder, l2norm
from itm.models.losses import ContrastiveLoss
from itm.models.similarity import (
    CrossAttentionScorer,
    cross_attention_scores,
    reference_cross_attention_scores,
    reference_uarda_scores,
)
from itm.models.uarda import RelevanceThreshold, UardaScorer, gaussian_crossing, threshold_samples

FEATURE_DIM, VOCAB, N_CONCEPTS = 12, 30, 6
SMALL = {"embed_dim": 32, "word_dim": 16}


def _concepts() -> Concepts:
    """Six concepts with co-occurrence counts of 40 random multi-hot captions."""
    labels = (np.random.default_rng(0).random((40, N_CONCEPTS)) < 0.4).astype(np.int64)
    cooccurrence = labels.T @ labels
    return Concepts(tuple(f"concept{i}" for i in range(N_CONCEPTS)), tuple(np.diag(cooccurrence)), cooccurrence, 40)


INPUTS = MatcherInputs(FEATURE_DIM, VOCAB, _concepts())


def _build(kind: str, **overrides: object) -> Matcher:
    return build_matcher(_params(kind, **overrides), INPUTS)


def _close(actual: Tensor, expected: Tensor, atol: float) -> None:
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, rtol=0, atol=atol), (actual - expected).abs().max()


def _schema_kinds() -> set[str]:
    union = typing.get_args(MatcherParams)[0]  # Annotated[A | B | C, Field(discriminator="kind")]
    return {
        kind for member in typing.get_args(union) for kind in typing.get_args(member.model_fields["kind"].annotation)
    }


def _params(kind: str, **overrides: object) -> typing.Any:
    return TypeAdapter(MatcherParams).validate_python({"kind": kind, **SMALL, **overrides})


def _batch(n: int, *, seed: int) -> tuple[Regions, Captions]:
    """n images with 3..6 regions and n captions of 2..7 tokens, padded to the longest."""
    generator = torch.Generator().manual_seed(seed)
    region_counts = torch.randint(3, 7, (n,), generator=generator)
    lengths = torch.randint(2, 8, (n,), generator=generator)
    lengths[0] = 7  # the longest caption sets L, so padding (as in a real batch) is present elsewhere
    features = torch.rand(n, 6, FEATURE_DIM, generator=generator) * 4
    mask = torch.arange(6)[None] < region_counts[:, None]
    tokens = torch.randint(1, VOCAB, (n, 7), generator=generator)
    tokens = tokens.masked_fill(torch.arange(7)[None] >= lengths[:, None], 0)
    concepts = (torch.rand(n, N_CONCEPTS, generator=generator) < 0.4).float()
    return Regions(features.masked_fill(~mask[..., None], 0).half(), mask), Captions(tokens, lengths, concepts)


def _with_padding(regions: Regions, captions: Captions, extra: int) -> tuple[Regions, Captions]:
    """The same batch with `extra` more region and word slots, and noise in every padded slot."""
    generator = torch.Generator().manual_seed(99)
    n, _, dim = regions.features.shape
    mask = torch.cat([regions.mask, torch.zeros(n, extra, dtype=torch.bool)], dim=1)
    features = torch.cat([regions.features, torch.zeros(n, extra, dim, dtype=regions.features.dtype)], dim=1)
    noise = (torch.rand(features.shape, generator=generator) * 4).to(features.dtype)
    tokens = torch.cat([captions.tokens, torch.zeros(n, extra, dtype=torch.int64)], dim=1)
    filler = torch.randint(1, VOCAB, tokens.shape, generator=generator)
    padding = torch.arange(tokens.shape[1])[None] >= captions.lengths[:, None]
    return Regions(torch.where(mask[..., None], features, noise), mask), Captions(
        torch.where(padding, filler, tokens), captions.lengths, captions.concepts
    )


def _encoded(n: int, slots: int, dim: int, *, low: int, seed: int, garbage: bool = False) -> Encoded:
    """Unit fragments with a random number (low..slots) of real ones; padding is zero, or noise if `garbage`."""
    generator = torch.Generator().manual_seed(seed)
    local = l2norm(torch.randn(n, slots, dim, generator=generator))
    counts = torch.randint(low, slots + 1, (n,), generator=generator)
    mask = torch.arange(slots)[None] < counts[:, None]
    if not garbage:
        local = local.masked_fill(~mask[..., None], 0)
    return Encoded(local, mask)


def _padded(encoded: Encoded, extra: int, seed: int) -> Encoded:
    """`encoded` with `extra` more padding slots holding noise (masked out)."""
    generator = torch.Generator().manual_seed(seed)
    n, _, dim = encoded.local.shape
    noise = torch.randn(n, extra, dim, generator=generator)
    return Encoded(
        torch.cat([encoded.local, noise], dim=1),
        torch.cat([encoded.mask, torch.zeros(n, extra, dtype=torch.bool)], dim=1),
    )


# --- registry and end-to-end -------------------------------------------------------------------------------------


def test_registered_kinds_are_the_schema_kinds() -> None:
    assert set(list_matchers()) == _schema_kinds()


@pytest.mark.parametrize("kind", list_matchers())
def test_every_matcher_trains_and_scores(kind: str) -> None:
    torch.manual_seed(0)
    matcher = _build(kind)
    regions, captions = _batch(5, seed=1)
    assert not regions.mask.all() and not captions.mask.all()

    matcher.train()
    losses = matcher(regions, captions)
    assert {"loss", "loss_i2t", "loss_t2i"} <= losses.keys()
    assert torch.isfinite(losses["loss"]) and losses["loss"] > 0
    losses["loss"].backward()
    for name, parameter in matcher.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
    assert any(parameter.grad.abs().sum() > 0 for parameter in matcher.parameters())

    matcher.eval()
    with torch.no_grad():
        images = matcher.encode_image(_batch(3, seed=2)[0])
        texts = matcher.encode_text(_batch(4, seed=3)[1])
        scores = matcher.score(images, texts)
    assert scores.shape == (3, 4)
    assert torch.isfinite(scores).all()


@pytest.mark.parametrize("kind", list_matchers())
def test_scores_ignore_padding(kind: str) -> None:
    """Extra padded regions and words (features and token ids behind the masks) leave every score unchanged."""
    torch.manual_seed(0)
    matcher = _build(kind).eval()
    regions, captions = _batch(4, seed=5)
    more_regions, more_captions = _with_padding(regions, captions, extra=3)
    with torch.no_grad():
        plain = matcher.score(matcher.encode_image(regions), matcher.encode_text(captions))
        padded = matcher.score(matcher.encode_image(more_regions), matcher.encode_text(more_captions))
    _close(padded, plain, atol=1e-6)


def test_uarda_threshold_is_saved_with_the_weights() -> None:
    matcher = _build("uarda", threshold_init=0.25)
    assert float(matcher.state_dict()["scorer.threshold.value"]) == 0.25


@pytest.mark.parametrize("bidirectional", [False, True])
def test_text_encoder_batch_equals_captions_alone(bidirectional: bool) -> None:
    """Packing makes each caption's words and global vector independent of the batch's padding; the global vector
    is the last state (and, bidirectional, the mean with the backward state at the first word)."""
    torch.manual_seed(0)
    encoder = TextEncoder(VOCAB, 8, 10, bidirectional=bidirectional).eval()
    _, captions = _batch(4, seed=7)
    with torch.no_grad():
        batch = encoder(captions)
        for row, length in enumerate(captions.lengths.tolist()):
            tokens = captions.tokens[row : row + 1, :length]
            alone = encoder(Captions(tokens, torch.tensor([length])))
            _close(batch.local[row, :length], alone.local[0], atol=1e-6)
            _close(batch.pooled[row], alone.pooled[0], atol=1e-6)
            states, _ = encoder.gru(encoder.embed(tokens))  # [1, length, dirs * E]
            final = states[0, -1] if not bidirectional else (states[0, -1, :10] + states[0, 0, 10:]) / 2
            _close(batch.pooled[row], l2norm(final), atol=1e-6)


# --- fast cross attention against SCAN's loop ----------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
@pytest.mark.parametrize("pooling", ["avg", "lse"])
def test_fast_cross_attention_matches_the_loop(direction: str, pooling: str, monkeypatch: pytest.MonkeyPatch) -> None:
    images = _encoded(9, 7, 24, low=2, seed=10, garbage=True)
    captions = _encoded(13, 9, 24, low=1, seed=11, garbage=True)
    lambdas = {"lambda_softmax": 9.0 if direction == "t2i" else 4.0, "lambda_lse": 6.0}
    calls = []
    similarities = similarity_module._pairwise
    monkeypatch.setattr(similarity_module, "_pairwise", lambda *a: calls.append(1) or similarities(*a))
    fast = CrossAttentionScorer(direction, pooling, **lambdas, max_elements=4 * 7 * 9)(images, captions)
    reference = reference_cross_attention_scores(images, captions, direction=direction, pooling=pooling, **lambdas)
    assert len(calls) > 3  # several chunks
    assert fast.dtype == torch.float32
    _close(fast, reference, atol=1e-4)


def test_fast_cross_attention_runs_under_autocast() -> None:
    images = _encoded(5, 6, 32, low=2, seed=12)
    captions = _encoded(6, 8, 32, low=2, seed=13)
    kwargs = {"direction": "t2i", "pooling": "lse", "lambda_softmax": 9.0, "lambda_lse": 6.0}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = cross_attention_scores(images, captions, **kwargs)
    assert mixed.dtype == torch.float32
    _close(mixed, cross_attention_scores(images, captions, **kwargs), atol=2e-2)


@pytest.mark.parametrize("pooling", ["avg", "lse"])
@pytest.mark.parametrize(("training", "compact_max_kept"), [(True, 1.0), (False, 1.0), (False, 0.0)])
def test_uarda_fast_matches_the_loop(
    pooling: str, training: bool, compact_max_kept: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training mode computes and masks; eval mode with skip_queries compacts the skipped words away (unless more
    than COMPACT_MAX_KEPT of the words are kept). All equal the loop, including pairs none of whose words passes the
    threshold (scored by their shortfalls alone)."""
    monkeypatch.setattr(similarity_module, "COMPACT_MAX_KEPT", compact_max_kept)
    images = _encoded(8, 7, 8, low=2, seed=20, garbage=True)
    captions = _encoded(11, 9, 8, low=1, seed=21, garbage=True)
    threshold = RelevanceThreshold(0.45, estimator="fixed", alpha=2.0, momentum=0.7, min_samples=200)
    scorer = UardaScorer(threshold, pooling, 9.0, 6.0, skip_queries=True, max_elements=3 * 7 * 9).train(training)
    fast = scorer(images, captions)
    reference = reference_uarda_scores(images, captions, 0.45, pooling=pooling, lambda_softmax=9.0, lambda_lse=6.0)
    best = torch.einsum("kre,cle->krcl", images.local, captions.local).masked_fill(~images.mask[:, :, None, None], -2)
    kept = (best.amax(dim=1) > 0.45) & captions.mask  # [images, captions, words]
    assert 0 < kept.sum() < captions.mask.sum() * len(images)  # some words are skipped, some kept
    assert (~kept.any(dim=2)).any() and kept.any(dim=2).any()  # pairs with no word kept, pairs with some
    _close(fast, reference, atol=1e-4)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_fast_cross_attention_ignores_padding_slots(direction: str) -> None:
    images = _encoded(4, 5, 16, low=2, seed=30)
    captions = _encoded(6, 6, 16, low=1, seed=31)
    kwargs = {"direction": direction, "pooling": "lse", "lambda_softmax": 4.0, "lambda_lse": 5.0}
    plain = cross_attention_scores(images, captions, **kwargs)
    padded = cross_attention_scores(_padded(images, 3, seed=32), _padded(captions, 5, seed=33), **kwargs)
    _close(padded, plain, atol=1e-6)


# --- loss -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_violation", "i2t", "t2i"), [(True, 0.3, 0.2), (False, 0.4, 0.3)])
def test_contrastive_loss_by_hand(max_violation: bool, i2t: float, t2i: float) -> None:
    # margin 0.2. Rows (image -> captions): row 1 violates with captions 0 (0.1) and 2 (0.3), others not.
    # Columns (caption -> images): column 1 violates with images 0 (0.1) and 2 (0.1), column 2 with image 1 (0.1).
    scores = torch.tensor([[0.9, 0.5, 0.1], [0.5, 0.6, 0.7], [0.2, 0.5, 0.8]])
    losses = ContrastiveLoss(margin=0.2, max_violation=max_violation)(scores)
    assert float(losses["loss_i2t"]) == pytest.approx(i2t, abs=1e-6)
    assert float(losses["loss_t2i"]) == pytest.approx(t2i, abs=1e-6)
    assert float(losses["loss"]) == pytest.approx(i2t + t2i, abs=1e-6)


# --- UARDA threshold estimator --------------------------------------------------------------------------------------


def _crossing_by_bisection(mean_pos: float, std_pos: float, mean_neg: float, std_neg: float, alpha: float) -> float:
    """The x between the means where N(x; μ+, σ+) = α·N(x; μ−, σ−), found without the closed form."""

    def gap(x: float) -> float:
        log_pos = -math.log(std_pos) - (x - mean_pos) ** 2 / (2 * std_pos**2)
        return log_pos - (math.log(alpha) - math.log(std_neg) - (x - mean_neg) ** 2 / (2 * std_neg**2))

    low, high = mean_neg, mean_pos
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if (gap(middle) > 0) == (gap(low) > 0) else (low, middle)
    return low


@pytest.mark.parametrize(
    "gaussians", [(0.6, 0.1, 0.2, 0.08, 2.0), (0.5, 0.05, 0.1, 0.1, 2.0), (0.4, 0.12, 0.05, 0.06, 0.5)]
)
def test_gaussian_crossing_is_the_analytic_crossing(gaussians: tuple[float, ...]) -> None:
    assert gaussian_crossing(*gaussians) == pytest.approx(_crossing_by_bisection(*gaussians), abs=1e-9)


def test_gaussian_crossing_degenerate_cases() -> None:
    assert gaussian_crossing(0.6, 0.1, 0.2, 0.1, 2.0) is None  # equal variances: A = 0
    assert gaussian_crossing(0.6, 0.0, 0.2, 0.1, 2.0) is None  # no spread
    assert gaussian_crossing(0.2, 0.05, 0.2, 0.3, 100.0) is None  # α·N− above N+ everywhere: no real root


def _samples(mean: float, std: float, n: int, seed: int) -> Tensor:
    return mean + std * torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_estimator_finds_the_crossing_of_sampled_gaussians() -> None:
    threshold = RelevanceThreshold(0.0, estimator="gaussian", alpha=2.0, momentum=1.0, min_samples=100_000)
    threshold.observe(_samples(0.6, 0.1, 60_000, seed=1), _samples(0.2, 0.08, 60_000, seed=2))
    assert float(threshold.value) == 0.0  # not enough samples yet
    threshold.observe(_samples(0.6, 0.1, 60_000, seed=3), _samples(0.2, 0.08, 60_000, seed=4))
    assert float(threshold.value) == pytest.approx(_crossing_by_bisection(0.6, 0.1, 0.2, 0.08, 2.0), abs=3e-3)


def test_estimator_moving_average_reset_and_fixed() -> None:
    relevant, irrelevant = _samples(0.6, 0.1, 400, seed=5), _samples(0.2, 0.08, 400, seed=6)
    estimate = gaussian_crossing(
        float(relevant.float().mean()), float(relevant.float().std()),
        float(irrelevant.float().mean()), float(irrelevant.float().std()), 2.0,
    )  # fmt: skip
    threshold = RelevanceThreshold(0.1, estimator="gaussian", alpha=2.0, momentum=0.7, min_samples=300)
    threshold.observe(relevant, irrelevant)
    expected = 0.7 * estimate + 0.3 * 0.1
    assert float(threshold.value) == pytest.approx(expected, abs=1e-6)

    threshold.observe(relevant[:200], irrelevant[:200])  # the pools were emptied: 200 < 300, no update
    assert float(threshold.value) == pytest.approx(expected, abs=1e-6)

    threshold.observe(_samples(1.6, 0.1, 400, seed=7), _samples(1.2, 0.05, 400, seed=8))  # crossing above 1: reset
    assert float(threshold.value) == pytest.approx(0.3 * expected, abs=1e-6)

    before = float(threshold.value)
    threshold.observe(_samples(0.6, 0.1, 400, seed=9), _samples(0.6, 0.1, 400, seed=9))  # same Gaussian: no root
    assert float(threshold.value) == before

    fixed = RelevanceThreshold(0.1, estimator="fixed", alpha=2.0, momentum=0.7, min_samples=2)
    fixed.observe(relevant, irrelevant)
    assert float(fixed.value) == pytest.approx(0.1)


def test_threshold_samples_follow_naaf() -> None:
    """Only captions whose matched image ranks first are sampled, against the least similar image."""
    images = _encoded(3, 4, 8, low=2, seed=40)
    captions = _encoded(3, 5, 8, low=2, seed=41)
    scores = torch.tensor([[0.9, 0.8, 0.3], [0.1, 0.2, 0.4], [0.5, 0.0, 0.6]])  # caption 1 ranks image 0 first
    relevant, irrelevant = threshold_samples(images, captions, scores)

    def best(image: int, caption: int) -> Tensor:
        words = captions.local[caption][captions.mask[caption]]
        return (words @ images.local[image][images.mask[image]].T).amax(dim=1)

    _close(relevant, torch.cat([best(0, 0), best(2, 2)]), atol=1e-6)
    _close(irrelevant, torch.cat([best(1, 0), best(0, 2)]), atol=1e-6)


class _Given(nn.Module):
    """An encoder that returns a fixed encoding, whatever the batch."""

    def __init__(self, encoded: Encoded) -> None:
        super().__init__()
        self.encoded = encoded

    def forward(self, _batch: object) -> Encoded:
        return self.encoded


def test_uarda_threshold_learns_from_training_steps_only() -> None:
    """Captions made of noisy copies of their image's regions: matches rank first, so a training step samples."""
    generator = torch.Generator().manual_seed(50)
    images = _encoded(6, 5, 16, low=5, seed=51)
    words = l2norm(images.local[:, :4] + 0.1 * torch.randn(6, 4, 16, generator=generator))
    captions = Encoded(words, torch.ones(6, 4, dtype=torch.bool))
    threshold = RelevanceThreshold(0.0, estimator="gaussian", alpha=2.0, momentum=1.0, min_samples=20)
    scorer = UardaScorer(threshold, "avg", 9.0, 6.0, skip_queries=True)
    matcher = Matcher(_Given(images), _Given(captions), scorer, ContrastiveLoss(0.2, True))

    scorer.train()(images, captions)  # scoring alone, even in training mode, leaves t
    matcher.eval()(None, None)
    assert float(threshold.value) == 0.0
    matcher.train()(None, None)
    relevant, irrelevant = threshold_samples(images, captions, scorer(images, captions))
    assert len(relevant) == 24  # every caption ranked its image first
    assert float(irrelevant.mean()) < float(threshold.value) < float(relevant.mean())


def test_estimator_pools_survive_a_state_dict_round_trip() -> None:
    """A training run resumed from a checkpoint updates t exactly as an uninterrupted one."""
    settings = {"estimator": "gaussian", "alpha": 2.0, "momentum": 0.7, "min_samples": 300}
    first, second = _samples(0.6, 0.1, 400, seed=10), _samples(0.2, 0.08, 400, seed=11)
    uninterrupted = RelevanceThreshold(0.1, **settings)
    uninterrupted.observe(first[:200], second[:200])
    resumed = RelevanceThreshold(0.1, **settings)
    resumed.load_state_dict(uninterrupted.state_dict())
    for threshold in (uninterrupted, resumed):
        threshold.observe(first[200:], second[200:])
    assert float(resumed.value) == float(uninterrupted.value) != 0.1
