"""NAAF against a transcription of its authors' code (tests/naaf_original.py): retrieval and training scores, the
threshold updates over several batches, the encoders and the loss; its thresholds travel with the weights; and
the documented differences from our UARDA show in the scores."""

from __future__ import annotations

import io
import typing

import numpy as np
import pytest
import torch
from pydantic import TypeAdapter
from torch import Tensor

from itm.config import MatcherParams
from itm.data.batches import Captions, Regions
from itm.errors import UserError
from itm.models import Matcher, MatcherInputs, build_matcher
from itm.models import naaf as naaf_module
from itm.models.base import Encoded
from itm.models.encoders import l2norm
from itm.models.naaf import NaafScorer, ThresholdRule, Thresholds, naaf_boundary, naaf_scores, walk_thresholds
from itm.models.similarity import cross_attention_scores
from itm.models.uarda import gaussian_crossing
from tests import naaf_original as original

FEATURE_DIM, VOCAB = 12, 30


def _matcher(**overrides: object) -> Matcher:
    params = TypeAdapter(MatcherParams).validate_python({"kind": "naaf", "embed_dim": 32, "word_dim": 16, **overrides})
    return build_matcher(params, MatcherInputs(FEATURE_DIM, VOCAB))


def _scorer(schedule: typing.Literal["per_caption", "per_batch"] = "per_caption") -> NaafScorer:
    return NaafScorer(20.0, ThresholdRule(), intra_lambda=5.0, schedule=schedule)


def _aligned(n: int, *, regions: int, words: int, noise: float, unrelated: float, seed: int) -> tuple[Encoded, Encoded]:
    """Image c's unit regions and caption c's words: each word a noisy copy of one of image c's regions, or with
    probability `unrelated` a random direction; caption lengths words // 2 .. words, padding zero."""
    generator = torch.Generator().manual_seed(seed)
    dim = 32
    images = l2norm(torch.randn(n, regions, dim, generator=generator))
    lengths = torch.randint(words // 2, words + 1, (n,), generator=generator)
    lengths[0] = words
    picked = images[torch.arange(n)[:, None], torch.randint(0, regions, (n, words), generator=generator)]
    copies = picked + noise / dim**0.5 * torch.randn(n, words, dim, generator=generator)
    random = torch.rand(n, words, generator=generator) < unrelated
    local = l2norm(torch.where(random[..., None], torch.randn(n, words, dim, generator=generator), copies))
    mask = torch.arange(words)[None] < lengths[:, None]
    return Encoded(images, torch.ones(n, regions, dtype=torch.bool)), Encoded(
        local.masked_fill(~mask[..., None], 0), mask
    )


def _lengths(captions: Encoded) -> list[int]:
    return captions.mask.sum(dim=1).tolist()


def _close(actual: Tensor, expected: Tensor, atol: float) -> None:
    assert actual.shape == expected.shape
    difference = (actual.double() - expected.double()).abs().max()
    assert difference <= atol, difference


# --- scores ---------------------------------------------------------------------------------------------------------


def test_retrieval_scores_equal_naafs() -> None:
    """Eval mode: the safe threshold and the smoothed negative indicator (`xattn_score_test`), 5 images x 7
    padded captions."""
    images, _ = _aligned(5, regions=9, words=8, noise=1.0, unrelated=0.3, seed=1)
    _, captions = _aligned(7, regions=9, words=8, noise=1.0, unrelated=0.3, seed=2)
    scorer = _scorer().eval()
    scorer.threshold.fill_(0.9)  # not used at retrieval
    scorer.safe_threshold.fill_(0.35)
    with torch.no_grad():
        ours = scorer(images, captions)
    theirs = original.xattn_score_test(
        images.local, captions.local, _lengths(captions), original.options(thres_safe=0.35)
    )
    _close(ours, theirs, atol=1e-6)
    one_pair_at_a_time = NaafScorer(20.0, ThresholdRule(), intra_lambda=5.0, schedule="per_caption", max_elements=1)
    one_pair_at_a_time.load_state_dict(scorer.state_dict())
    with torch.no_grad():
        _close(one_pair_at_a_time.eval()(images, captions), theirs, atol=1e-6)
    # the smoothing and the threshold matter on these inputs
    unsmoothed = naaf_scores(images, captions, torch.full((7,), 0.35), lambda_softmax=20.0, intra_lambda=None)
    assert (unsmoothed - ours).abs().max() > 1e-3
    scorer.safe_threshold.fill_(0.0)
    assert (scorer(images, captions) - ours).abs().max() > 1e-2


# Each batch: (size, noise, unrelated fraction, seed). Strong batches pool over 200 matched words and move the
# thresholds after every correctly ranked caption; the small one never does, so its first caption is scored with
# the previous batch's threshold and both thresholds end at 0; the noisy one has captions that do not rank first.
BATCHES = [(40, 0.4, 0.1, 11), (12, 0.4, 0.1, 12), (40, 0.3, 0.05, 13), (48, 2.5, 0.3, 14), (40, 0.5, 0.1, 15)]


def test_training_scores_and_threshold_updates_equal_naafs_over_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Train mode (`xattn_score`): every batch's scores, and both thresholds after it, equal NAAF's, whose loop
    rewrites the threshold between captions."""
    rounds = []
    scores_of = naaf_module.naaf_scores

    def counted(*args: typing.Any, **kwargs: typing.Any) -> Tensor:
        rounds[-1] += 1
        return scores_of(*args, **kwargs)

    monkeypatch.setattr(naaf_module, "naaf_scores", counted)
    scorer, opt = _scorer().train(), original.options()
    history = []
    for n, noise, unrelated, seed in BATCHES:
        images, captions = _aligned(n, regions=8, words=12, noise=noise, unrelated=unrelated, seed=seed)
        theirs = original.xattn_score(images.local, captions.local, _lengths(captions), opt)
        rounds.append(0)
        ours = scorer(images, captions)
        _close(ours, theirs, atol=2e-6)
        assert float(scorer.threshold) == pytest.approx(opt.thres, abs=1e-5)
        assert float(scorer.safe_threshold) == pytest.approx(opt.thres_safe, abs=1e-5)
        history.append((opt.thres, opt.thres_safe, int((theirs.argmax(dim=0) == torch.arange(n)).sum())))
    thresholds, safe, ranked_first = zip(*history, strict=True)
    assert min(thresholds[0], safe[0], thresholds[2], safe[2], thresholds[4]) > 0.2  # updated
    assert thresholds[1] == safe[1] == 0  # reset: too few matched words
    assert ranked_first[3] < BATCHES[3][0]  # some captions of the noisy batch do not rank first
    assert max(rounds) >= 3  # the threshold sequence took several rounds to settle


def test_training_ignores_padded_regions() -> None:
    """Extra region slots behind the mask change neither the training scores nor the threshold updates."""
    images, captions = _aligned(40, regions=8, words=12, noise=0.4, unrelated=0.1, seed=21)
    noise = torch.randn(40, 3, images.local.shape[2], generator=torch.Generator().manual_seed(0))
    padded = Encoded(
        torch.cat([images.local, noise], dim=1), torch.cat([images.mask, torch.zeros(40, 3, dtype=torch.bool)], 1)
    )
    plain_scorer, padded_scorer = _scorer().train(), _scorer().train()
    _close(padded_scorer(padded, captions), plain_scorer(images, captions), atol=1e-6)
    assert float(plain_scorer.threshold) > 0.2
    # the padded batch's wider tensors may sum in another order: equal up to float32 rounding
    assert float(padded_scorer.threshold) == pytest.approx(float(plain_scorer.threshold), abs=1e-6)
    assert float(padded_scorer.safe_threshold) == pytest.approx(float(plain_scorer.safe_threshold), abs=1e-6)


def _naaf_encoders(matcher: Matcher, seed: int) -> tuple[original.EncoderImagePrecomp, original.EncoderText]:
    """NAAF's encoders with `matcher`'s weights."""
    torch.manual_seed(seed)
    image_encoder = original.EncoderImagePrecomp(FEATURE_DIM, 32)
    text_encoder = original.EncoderText(VOCAB, 16, 32, 1)
    image_encoder.fc.load_state_dict(matcher.image_encoder.fc.state_dict())
    text_encoder.embed.load_state_dict(matcher.text_encoder.embed.state_dict())
    text_encoder.rnn.load_state_dict(matcher.text_encoder.gru.state_dict())
    return image_encoder, text_encoder


def test_training_loss_and_gradients_equal_naafs() -> None:
    """A training step from token ids and region features: NAAF's encoders, `xattn_score` and `ContrastiveLoss`
    (margin 0.2, hardest negatives, summed) against the matcher's, starting from a carried-over threshold."""
    torch.manual_seed(0)
    matcher = _matcher().train()
    matcher.scorer.threshold.fill_(0.2)
    image_encoder, text_encoder = _naaf_encoders(matcher, seed=1)
    generator = torch.Generator().manual_seed(3)
    n = 6
    features = torch.rand(n, 7, FEATURE_DIM, generator=generator) * 4
    lengths = torch.sort(torch.randint(3, 9, (n,), generator=generator), descending=True).values  # NAAF's order
    tokens = torch.randint(1, VOCAB, (n, int(lengths[0])), generator=generator)
    tokens = tokens.masked_fill(torch.arange(tokens.shape[1])[None] >= lengths[:, None], 0)

    opt = original.options(thres=0.2)
    cap_emb, cap_lens = text_encoder(tokens, lengths.tolist())
    scores = original.xattn_score(image_encoder(features), cap_emb, cap_lens.tolist(), opt)
    theirs = original.ContrastiveLoss(opt, margin=0.2)(scores, n)
    theirs.backward()
    ours = matcher(Regions(features, torch.ones(n, 7, dtype=torch.bool)), Captions(tokens, lengths))["loss"]
    ours.backward()

    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), abs=1e-5)
    assert float(ours.detach()) > 0
    pairs = [
        (matcher.image_encoder.fc.weight, image_encoder.fc.weight),
        (matcher.text_encoder.embed.weight, text_encoder.embed.weight),
        (matcher.text_encoder.gru.weight_hh_l0_reverse, text_encoder.rnn.weight_hh_l0_reverse),
    ]
    for mine, naafs in pairs:
        _close(mine.grad, naafs.grad, atol=1e-5)
    assert float(matcher.scorer.threshold) == opt.thres == 0  # fewer than 200 matched words: reset


# --- state ------------------------------------------------------------------------------------------------------------


def test_thresholds_survive_a_state_dict_round_trip() -> None:
    matcher = _matcher().train()
    images, captions = _aligned(40, regions=8, words=12, noise=0.4, unrelated=0.1, seed=11)
    matcher.scorer(images, captions)
    saved = matcher.state_dict()
    assert saved["scorer.threshold"].dtype == torch.float64 and float(saved["scorer.threshold"]) > 0.2
    assert float(saved["scorer.safe_threshold"]) > 0.2

    buffer = io.BytesIO()
    torch.save(saved, buffer)
    restored = _matcher()
    assert float(restored.scorer.threshold) == float(restored.scorer.safe_threshold) == 0.0  # NAAF starts at 0
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert restored.scorer.thresholds == matcher.scorer.thresholds
    matcher.eval(), restored.eval()
    with torch.no_grad():
        _close(restored.scorer(images, captions), matcher.scorer(images, captions), atol=0)


# --- schedules --------------------------------------------------------------------------------------------------------


def test_per_caption_schedule_needs_the_aligned_batch() -> None:
    images, captions = _aligned(6, regions=8, words=10, noise=0.4, unrelated=0.1, seed=4)
    with pytest.raises(UserError, match="per_batch"):
        _scorer().train()(images.slice(0, 3), captions)


def test_per_batch_schedule_scores_at_the_current_threshold_and_updates_in_observe() -> None:
    """`per_batch` scores the batch (or a process's share of its images) at one threshold and leaves it; `observe`
    replays NAAF's rules (`walk_thresholds`, held to NAAF above) on the aligned batch's scores: decisions from
    those scores, each word's best region with the matched and with the least similar image."""
    images, captions = _aligned(40, regions=8, words=12, noise=0.3, unrelated=0.05, seed=13)
    scorer = _scorer("per_batch").train()
    scorer.threshold.fill_(0.3)
    share = scorer(images.slice(0, 10), captions)
    at_threshold = naaf_scores(images, captions, torch.full((40,), 0.3), lambda_softmax=20.0, intra_lambda=None)
    _close(share, at_threshold[:10], atol=1e-6)
    scores = scorer(images, captions)
    _close(scores, at_threshold, atol=1e-6)
    assert scorer.thresholds == Thresholds(0.3, 0.0)

    scorer.observe(images, captions, scores.detach())
    lengths, least = _lengths(captions), scores.argmin(dim=0)

    def best(image: int, caption: int) -> np.ndarray:
        words = captions.local[caption, : lengths[caption]]
        return (words @ images.local[image].T).amax(dim=1).double().numpy()

    expected = walk_thresholds(
        Thresholds(0.3, 0.0),
        (scores.argmax(dim=0) == torch.arange(40)).tolist(),
        [best(c, c) for c in range(40)],
        [best(int(least[c]), c) for c in range(40)],
        ThresholdRule(),
    )[1]
    assert expected.train > 0.2 and expected.safe > 0.2
    assert float(scorer.threshold) == pytest.approx(expected.train, abs=1e-6)
    assert float(scorer.safe_threshold) == pytest.approx(expected.safe, abs=1e-6)


# --- the estimator ----------------------------------------------------------------------------------------------------


def test_boundary_is_the_gaussian_crossing() -> None:
    """NAAF's formula (with its 1e-8 inside the logarithm) gives the α-weighted Gaussians' crossing; none where
    σ+ = 0 (NaN in NAAF) or the discriminant is not positive (equal Gaussians)."""
    assert naaf_boundary(0.6, 0.15, 0.2, 0.1, 2.0) == pytest.approx(
        gaussian_crossing(0.6, 0.15, 0.2, 0.1, 2.0), abs=1e-6
    )
    assert naaf_boundary(0.6, 0.0, 0.2, 0.1, 2.0) is None
    assert naaf_boundary(0.5, 0.1, 0.5, 0.1, 2.0) is None


def test_walk_resets_keeps_and_averages() -> None:
    """Hand-checked sequences of `xattn_score`'s rules: the reset while fewer than `min_words` words are pooled,
    no change at exactly `min_words`, the moving average of a kept value where there is no crossing, and an
    estimate outside [0, 1] counted as 0."""
    rule = ThresholdRule(min_words=4)
    words = [np.array([0.9, 0.8]), np.array([0.7, 0.95])]
    used, after = walk_thresholds(Thresholds(0.3, 0.2), [True, True], words, words, rule)
    assert used == [0.3, 0.0] and after == Thresholds(0.0, 0.0)  # 2 words: reset; 4 words: neither update nor reset

    same = [np.array([0.9, 0.8, 0.7]), np.array([0.6, 0.95, 0.85])]  # identical pools: no crossing, values kept
    used, after = walk_thresholds(Thresholds(0.3, 0.2), [True, True], same, same, ThresholdRule(min_words=2))
    assert used == [0.3, 0.3]
    assert after.train == pytest.approx(0.3, abs=1e-15) and after.safe == pytest.approx(0.2, abs=1e-15)

    low = [np.array([0.2, 0.25, 0.3])]  # matched words below the unmatched ones: the crossing is negative
    high = [np.array([0.8, 0.9, 0.7])]
    mean_pos, std_pos = 0.25, 0.05
    assert naaf_boundary(mean_pos, std_pos, 0.8, 0.1, 2.0) < 0
    _, after = walk_thresholds(Thresholds(0.5, 0.5), [True], low, high, ThresholdRule(min_words=2))
    safe = 0.7 * (mean_pos - 3 * std_pos) + 0.3 * 0.5
    assert after.train == pytest.approx(0.3 * 0.5) and after.safe == pytest.approx(safe)


# --- UARDA ------------------------------------------------------------------------------------------------------------


def test_uarda_scores_differ_from_naafs_at_the_same_threshold() -> None:
    """docs/matchers.md lists where `uarda` departs from NAAF. At one threshold on the same inputs: NAAF's two
    positive terms let a matched pair score above 1, which UARDA's cosine cannot; and the scores differ even with
    NAAF's λ (20) given to UARDA, i.e. not through λ alone."""
    images, captions = _aligned(12, regions=8, words=10, noise=0.5, unrelated=0.2, seed=31)
    naafs = naaf_scores(images, captions, torch.full((12,), 0.3), lambda_softmax=20.0, intra_lambda=None)
    for lambda_softmax in (9.0, 20.0):
        uardas = cross_attention_scores(images, captions, direction="t2i", pooling="avg",
                                        lambda_softmax=lambda_softmax, lambda_lse=6.0, threshold=0.3)  # fmt: skip
        assert (naafs - uardas).abs().max() > 0.3
        assert uardas.max() <= 1.0 < naafs.diagonal().min()
