"""Bootstrap intervals, paired tests and letter groups: against scipy, a per-replicate loop, and hand-made cases."""

from __future__ import annotations

import time

import numpy as np
import pytest
import scipy.stats
import torch

from itm.evaluate.metrics import query_ranks, recall_metrics
from itm.evaluate.protocols import evaluate_protocols, protocols_for
from itm.evaluate.score_file import SplitScores
from itm.evaluate.statistics import (
    INTERVAL_KEYS,
    RECALL_KEYS,
    Bootstrap,
    FoldRanks,
    Significance,
    adjust_p_values,
    bootstrap_recalls,
    compact_letters,
    compare_models,
    interval_metrics,
    observed_recalls,
    paired_bootstrap,
    paired_test,
    percentile_interval,
    protocol_intervals,
    protocol_ranks,
    resamples_needed,
    smallest_adjusted_p,
    with_intervals,
    with_rsum,
)

KS = (1, 5, 10)


def _gallery(n_img: int, per_image: int, seed: int, signal: float = 2.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scores [n_img, n_img * per_image] with `signal` added on the ground-truth pairs."""
    generator = torch.Generator().manual_seed(seed)
    caption_image = torch.arange(n_img).repeat_interleave(per_image)
    scores = torch.randn(n_img, len(caption_image), generator=generator)
    scores[caption_image, torch.arange(len(caption_image))] += signal
    return scores, caption_image


def _ranks(n_img: int, per_image: int, seed: int, signal: float = 2.5) -> FoldRanks:
    return FoldRanks.of(*_gallery(n_img, per_image, seed, signal))


def _loop_recalls(models: list[list[FoldRanks]], resamples: int, seed: int) -> np.ndarray:
    """The reference: one replicate at a time, from the streams `bootstrap_recalls` documents (one per fold and
    direction, spawned from `seed`, fold-major, i2t first), each replicate `rng.integers(0, n, n)`."""
    n_folds = len(models[0])
    recalls = np.zeros((len(models), resamples, 6))
    streams = np.random.SeedSequence(seed).spawn(2 * n_folds)
    for fold in range(n_folds):
        for side_index, side in enumerate(("i2t", "t2i")):
            rng = np.random.default_rng(streams[2 * fold + side_index])
            n = len(getattr(models[0][fold], side))
            for replicate in range(resamples):
                drawn = rng.integers(0, n, size=n)
                for index, model in enumerate(models):
                    ranks = getattr(model[fold], side)[drawn]
                    for k_index, k in enumerate(KS):
                        recalls[index, replicate, 3 * side_index + k_index] += 100 * np.mean(ranks < k) / n_folds
    return recalls


# --- ranks ----------------------------------------------------------------------------------------------------------


def test_query_ranks_give_the_recall_metrics() -> None:
    scores, caption_image = _gallery(50, 3, seed=0, signal=1.5)
    i2t, t2i = query_ranks(scores, caption_image)
    assert i2t.shape == (50,) and t2i.shape == (150,) and i2t.dtype == t2i.dtype == torch.int64
    figures = recall_metrics(scores, caption_image)
    for k in KS:
        assert figures[f"i2t_r{k}"] == pytest.approx(100 * float((i2t < k).double().mean()))
        assert figures[f"t2i_r{k}"] == pytest.approx(100 * float((t2i < k).double().mean()))
    observed = with_rsum(observed_recalls([FoldRanks.of(scores, caption_image)]))
    assert observed.tolist() == pytest.approx([figures[key] for key in INTERVAL_KEYS])
    with pytest.raises(ValueError, match="NaN"):
        query_ranks(torch.full((2, 2), torch.nan), torch.tensor([0, 1]))


# --- intervals ------------------------------------------------------------------------------------------------------


def test_vectorised_replicates_equal_the_per_replicate_loop() -> None:
    # two models on the same two folds of uneven sizes; the second is the first with noise added
    folds = [_gallery(23, 3, seed=1, signal=1.0), _gallery(17, 4, seed=2, signal=1.0)]
    first = [FoldRanks.of(scores, caption_image) for scores, caption_image in folds]
    second = [FoldRanks.of(scores + torch.randn_like(scores), caption_image) for scores, caption_image in folds]
    fast = bootstrap_recalls([first, second], resamples=300, seed=4)
    assert fast.shape == (2, 300, 6)
    np.testing.assert_allclose(fast, _loop_recalls([first, second], 300, seed=4), rtol=0, atol=1e-9)
    # one model alone draws the same queries as in a pair
    np.testing.assert_allclose(bootstrap_recalls([second], 300, seed=4)[0], fast[1], rtol=0, atol=1e-12)


def test_intervals_agree_with_scipy_bootstrap_percentile() -> None:
    ranks = _ranks(1000, 5, seed=5)
    resamples = 2000
    ours = interval_metrics([ranks], Bootstrap(resamples=resamples, confidence=0.95, seed=0))
    rng = np.random.default_rng(123)  # another stream: agreement within Monte-Carlo error, not digit for digit
    for side in ("i2t", "t2i"):
        for k in KS:
            result = scipy.stats.bootstrap(
                (getattr(ranks, side),),
                lambda sample, axis, k=k: 100 * np.mean(sample < k, axis=axis),
                n_resamples=resamples,
                method="percentile",
                confidence_level=0.95,
                rng=rng,
            )
            interval = result.confidence_interval
            assert ours[f"{side}_r{k}_ci_low"] == pytest.approx(interval.low, abs=0.5), (side, k)
            assert ours[f"{side}_r{k}_ci_high"] == pytest.approx(interval.high, abs=0.5), (side, k)

    def rsum(i2t: np.ndarray, t2i: np.ndarray, axis: int) -> np.ndarray:
        return sum(100 * np.mean(i2t < k, axis=axis) + 100 * np.mean(t2i < k, axis=axis) for k in KS)

    # two samples, resampled independently (paired=False): image and caption queries, as ours
    result = scipy.stats.bootstrap((ranks.i2t, ranks.t2i), rsum, n_resamples=resamples, method="percentile", rng=rng)
    assert ours["rsum_ci_low"] == pytest.approx(result.confidence_interval.low, abs=1.2)
    assert ours["rsum_ci_high"] == pytest.approx(result.confidence_interval.high, abs=1.2)
    observed = with_rsum(observed_recalls([ranks]))
    for index, key in enumerate(INTERVAL_KEYS):
        assert ours[f"{key}_ci_low"] < observed[index] < ours[f"{key}_ci_high"], key
    # i2t has 1,000 queries, t2i 5,000: its intervals are about sqrt(5) times narrower
    widths = {key: ours[f"{key}_ci_high"] - ours[f"{key}_ci_low"] for key in ("i2t_r5", "t2i_r5")}
    assert 1.5 < widths["i2t_r5"] / widths["t2i_r5"] < 3.5


def test_folds_are_resampled_separately_and_averaged() -> None:
    per_image = 2
    scores, caption_image = _gallery(5000, per_image, seed=6, signal=3.0)
    test = SplitScores(scores, np.arange(5000), np.arange(len(caption_image)), caption_image)
    bootstrap = Bootstrap(resamples=300, seed=1)
    intervals = protocol_intervals(test, "coco", bootstrap)
    assert set(intervals) == {
        f"{protocol}/{key}{bound}"
        for protocol in ("test_5fold1k", "test_5k")
        for key in INTERVAL_KEYS
        for bound in ("_ci_low", "_ci_high")
    }
    five_fold, whole = protocols_for("coco", 5000)
    folds = protocol_ranks(scores, caption_image, five_fold)
    assert len(folds) == 5 and all(len(fold.i2t) == 1000 and len(fold.t2i) == 2000 for fold in folds)
    # the replicates are the folds' values averaged per replicate (the loop reference, fold by fold)
    np.testing.assert_allclose(
        bootstrap_recalls([folds], 40, seed=1), _loop_recalls([list(folds)], 40, seed=1), rtol=0, atol=1e-9
    )
    # the interval surrounds the reported mean over the folds
    figures = evaluate_protocols(scores, caption_image, [five_fold, whole])
    for protocol in ("test_5fold1k", "test_5k"):
        for key in INTERVAL_KEYS:
            low, high = intervals[f"{protocol}/{key}_ci_low"], intervals[f"{protocol}/{key}_ci_high"]
            assert low <= figures[f"{protocol}/{key}"] <= high, (protocol, key)
    # averaging 5 folds of 1,000 narrows the interval against one fold's by about sqrt(5)
    single = interval_metrics(folds[:1], bootstrap)
    width = intervals["test_5fold1k/rsum_ci_high"] - intervals["test_5fold1k/rsum_ci_low"]
    assert 1.6 < (single["rsum_ci_high"] - single["rsum_ci_low"]) / width < 3.0


def test_the_same_seed_gives_the_same_numbers() -> None:
    ranks = _ranks(200, 5, seed=7, signal=1.5)
    first = interval_metrics([ranks], Bootstrap(resamples=500, seed=3))
    assert interval_metrics([ranks], Bootstrap(resamples=500, seed=3)) == first
    assert interval_metrics([ranks], Bootstrap(resamples=500, seed=4)) != first
    other = _ranks(200, 5, seed=8, signal=1.5)
    pair = paired_bootstrap([ranks], [other], resamples=500, seed=3, confidence=0.95)
    assert paired_bootstrap([ranks], [other], resamples=500, seed=3, confidence=0.95) == pair


def test_a_thousand_resamples_of_a_5k_caption_gallery_take_well_under_a_second() -> None:
    ranks = _ranks(1000, 5, seed=9)
    interval_metrics([ranks], Bootstrap(resamples=10))  # warm up
    start = time.perf_counter()
    interval_metrics([ranks], Bootstrap(resamples=1000))
    assert time.perf_counter() - start < 1.0


def test_intervals_sit_beside_their_figures() -> None:
    merged = with_intervals({"test/rsum": 3.0, "test/images": 9.0}, {"test/rsum_ci_high": 4.0, "test/rsum_ci_low": 2})
    assert list(merged) == ["test/rsum", "test/rsum_ci_low", "test/rsum_ci_high", "test/images"]
    assert percentile_interval(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
    with pytest.raises(ValueError, match="confidence"):
        Bootstrap(confidence=1.0)
    with pytest.raises(ValueError, match="same test queries"):
        bootstrap_recalls([[_ranks(10, 2, 0)], [_ranks(11, 2, 0)]], 10, 0)


# --- paired tests ---------------------------------------------------------------------------------------------------


def test_paired_test_equals_the_per_replicate_loop() -> None:
    first = [_ranks(120, 5, seed=10, signal=1.5), _ranks(80, 5, seed=11, signal=1.5)]
    second = [_ranks(120, 5, seed=12, signal=1.7), _ranks(80, 5, seed=13, signal=1.7)]
    test = paired_bootstrap(first, second, resamples=400, seed=2, confidence=0.9)

    loop = _loop_recalls([first, second], 400, seed=2).sum(axis=2)  # [2, B] rSum per replicate
    differences = loop[0] - loop[1]
    below, above = int(np.sum(differences <= 0)), int(np.sum(differences >= 0))
    assert test.p_value == pytest.approx(min(1.0, 2 * (1 + min(below, above)) / 401), abs=1e-12)
    assert test.ci_low == pytest.approx(np.percentile(differences, 5), abs=1e-9)
    assert test.ci_high == pytest.approx(np.percentile(differences, 95), abs=1e-9)
    observed = [with_rsum(observed_recalls(folds))[-1] for folds in (first, second)]
    assert test.difference == pytest.approx(observed[0] - observed[1])


def test_identical_models_give_p_one_and_a_clearly_better_one_p_below_one_percent() -> None:
    ranks = [_ranks(300, 5, seed=14, signal=2.0)]
    same = paired_bootstrap(ranks, ranks, resamples=1000, seed=0, confidence=0.95)
    assert same.p_value == 1.0 and same.difference == same.ci_low == same.ci_high == 0.0

    better = [_ranks(300, 5, seed=15, signal=3.0)]
    clear = paired_bootstrap(better, ranks, resamples=1000, seed=0, confidence=0.95)
    assert clear.difference > 50 and clear.ci_low > 0 and clear.p_value < 0.01
    assert clear.p_value == pytest.approx(2 / 1001)  # the smallest a p-value with 1,000 resamples can be
    reverse = paired_bootstrap(ranks, better, resamples=1000, seed=0, confidence=0.95)
    assert reverse.p_value == clear.p_value and reverse.difference == pytest.approx(-clear.difference)


def test_pairing_detects_a_small_consistent_gain() -> None:
    # b = a with 4 % of the caption queries moved to rank 0: the gain is small beside each model's interval, but
    # every resample of the same queries shows it, which two unpaired resamples would not
    a = _ranks(400, 5, seed=16, signal=1.5)
    improved = a.t2i.copy()
    improved[np.flatnonzero(improved >= 10)[:80]] = 0
    b = FoldRanks(a.i2t, improved)
    test = paired_bootstrap([b], [a], resamples=1000, seed=0, confidence=0.95)
    alone = interval_metrics([a], Bootstrap())
    assert test.difference < alone["rsum_ci_high"] - alone["rsum_ci_low"]  # inside a's own interval width
    assert test.p_value < 0.01 and test.ci_low > 0
    apart = [with_rsum(bootstrap_recalls([[model]], 1000, seed))[0, :, -1] for model, seed in ((b, 1), (a, 2))]
    unpaired = paired_test(test.difference, 0.0, apart[0], apart[1], confidence=0.95)
    assert unpaired.p_value > 0.05


def test_holm_bonferroni_and_none() -> None:
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> non-decreasing: 0.06 for the last
    assert adjust_p_values(p, "holm").tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert adjust_p_values(p, "bonferroni").tolist() == pytest.approx([0.04, 0.16, 0.12, 0.02])
    assert adjust_p_values(p, "none").tolist() == p
    assert adjust_p_values([0.5, 0.9], "holm").tolist() == [1.0, 1.0]
    assert adjust_p_values([], "holm").tolist() == []
    with pytest.raises(ValueError, match="holm, bonferroni, none"):
        adjust_p_values(p, "sidak")  # type: ignore[arg-type]


def test_enough_resamples_for_the_pairs() -> None:
    significance = Significance(alpha=0.05, resamples=1000)
    assert smallest_adjusted_p(28, significance) == pytest.approx(28 * 2 / 1001)  # 8 models: 1,000 are too few
    assert smallest_adjusted_p(28, significance) > 0.05
    assert resamples_needed(28, significance) == 1119
    assert smallest_adjusted_p(28, Significance(resamples=1119)) <= 0.05 < smallest_adjusted_p(28, significance)
    assert smallest_adjusted_p(28, Significance(resamples=1000, correction="none")) == pytest.approx(2 / 1001)


# --- groups ---------------------------------------------------------------------------------------------------------


def _letters(order: list[str], p: dict[tuple[str, str], float], alpha: float = 0.05) -> dict[str, str]:
    """Letters from a hand-made matrix of adjusted p-values."""
    return compact_letters(order, [pair for pair, value in p.items() if value <= alpha])


def test_letters_of_hand_made_p_values() -> None:
    order = ["A", "B", "C", "D"]  # by rSum, highest first
    everything = {(a, b): 0.001 for i, a in enumerate(order) for b in order[i + 1 :]}
    assert _letters(order, everything) == {"A": "a", "B": "b", "C": "c", "D": "d"}
    assert _letters(order, {pair: 0.5 for pair in everything}) == dict.fromkeys(order, "a")
    # a staircase: A differs from C and D, B from D
    staircase = {pair: 0.2 for pair in everything} | {("A", "C"): 0.01, ("A", "D"): 0.001, ("B", "D"): 0.03}
    assert _letters(order, staircase) == {"A": "a", "B": "ab", "C": "bc", "D": "c"}
    # not a staircase: only A and B differ, C and D overlap with both
    assert _letters(order, {pair: 0.6 for pair in everything} | {("A", "B"): 0.04}) == {
        "A": "a", "B": "b", "C": "ab", "D": "ab"
    }  # fmt: skip
    # a p-value exactly at alpha is significant (Holm rejects p <= alpha)
    assert _letters(["A", "B"], {("A", "B"): 0.05}) == {"A": "a", "B": "b"}


def test_letters_share_exactly_when_not_significant() -> None:
    rng = np.random.default_rng(0)
    order = [f"m{i}" for i in range(7)]
    for _ in range(30):
        significant = {(a, b) for i, a in enumerate(order) for b in order[i + 1 :] if rng.random() < 0.5}
        letters = compact_letters(order, significant)
        assert "a" in letters["m0"]
        for i, a in enumerate(order):
            for b in order[i + 1 :]:
                assert bool(set(letters[a]) & set(letters[b])) == ((a, b) not in significant), (a, b, letters)


def test_models_are_grouped_from_their_pairwise_tests() -> None:
    strong, weak = [_ranks(300, 5, seed=17, signal=3.0)], [_ranks(300, 5, seed=18, signal=1.0)]
    result = compare_models({"weak": weak, "strong": strong, "twin": strong}, Significance(resamples=2000))
    assert result.order == ("strong", "twin", "weak")
    assert [(pair.better, pair.worse) for pair in result.pairs] == [
        ("strong", "twin"), ("strong", "weak"), ("twin", "weak")
    ]  # fmt: skip
    twins, *rest = result.pairs
    assert twins.test.p_value == twins.p_adjusted == 1.0 and not twins.significant
    assert all(pair.significant and pair.p_adjusted == pytest.approx(3 * 2 / 2001) for pair in rest)  # Holm: 3, 2, 1
    assert result.groups == {"strong": "a", "twin": "a", "weak": "b"}
    assert result.rsum["strong"] == pytest.approx(with_rsum(observed_recalls(strong))[-1])
    assert set(RECALL_KEYS) < set(INTERVAL_KEYS)
