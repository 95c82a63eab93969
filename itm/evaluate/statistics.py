"""How much the test figures owe to the particular test queries: bootstrap intervals, paired tests, and groups.

Intervals. Every R@K (K = 1, 5, 10) of both directions and rSum gets a percentile bootstrap interval (Efron &
Tibshirani 1993, *An Introduction to the Bootstrap*, §13.3): the queries are resampled with replacement, the image
queries for i2t and the caption queries for t2i, both in every replicate so that a replicate's rSum is the sum of
its six recalls; the interval is the replicates' (1 - c)/2 and (1 + c)/2 quantiles (numpy's linear interpolation,
as `scipy.stats.bootstrap(method="percentile")`). A protocol of several folds (COCO 5-fold 1K) resamples within each
fold and averages the folds' values per replicate, so the interval is that of the reported mean.

Paired test. Two models ranked on the same test queries are resampled together: every replicate draws one set of
queries and scores both models on it (Koehn 2004, "Statistical significance tests for machine translation
evaluation", EMNLP: paired bootstrap resampling). With d*_1..d*_B the replicates' rSum differences a - b, the
two-sided p-value is the percentile-interval one (Efron & Tibshirani 1993, §15.4: the test that rejects exactly
when the percentile interval of the difference leaves out 0), with the add-one rule that keeps a Monte-Carlo
p-value valid and never 0 (Phipson & Smyth 2010, "Permutation p-values should never be zero", SAGMB 9(1)):

    p = min(1, 2 * (1 + min(#{d*_b <= 0}, #{d*_b >= 0})) / (B + 1))

Two identical models give p = 1; the smallest attainable p is 2 / (B + 1), so B must reach 2m/alpha - 1 for m
Holm-corrected pairs to be told apart at all (`smallest_adjusted_p`).

Groups. Within one protocol every pair of models is tested, the p-values are adjusted over all its pairs (Holm
1979, "A simple sequentially rejective multiple test procedure", Scand. J. Statist. 6: the step-down adjustment,
by default; Bonferroni, or none), and a pair differs significantly when its adjusted p <= alpha. The compact letter
display (`compact_letters`) gives every model one or more letters such that two models share a letter exactly when
their difference is not significant; it is Piepho's insert-and-absorb algorithm with its sweep (Piepho 2004, "An
algorithm for a letter-based representation of all-pairwise comparisons", J. Comput. Graph. Stat. 13(2)), the
letters ordered by the best model that carries them, so "a" is the group of the highest rSum.

What this measures: the sampling noise of the test queries for one trained model (another test set of the same
size, drawn from the same data). It says nothing of the spread over training seeds, initialisations or region
detectors. Captions of one image are resampled as independent queries, as SCAN's per-query figures treat them.

Speed: the resampled query indices are drawn in blocks of replicates, one block at a time. Every query carries its
three hits (rank below 1, 5, 10) packed into one int64, 21 bits each, so one gather and one sum per replicate count
all three for a model; about 0.05 s for 1,000 images, 5,000 captions and 1,000 resamples.
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from torch import Tensor

from itm.evaluate.metrics import RSUM_KS, query_ranks
from itm.evaluate.protocols import Protocol, protocols_for
from itm.evaluate.score_file import SplitScores

SIDES = ("i2t", "t2i")
RECALL_KEYS = tuple(f"{side}_r{k}" for side in SIDES for k in RSUM_KS)  # the six recalls whose sum is rSum
INTERVAL_KEYS = (*RECALL_KEYS, "rsum")  # the figures that get an interval
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"  # `<protocol>/<figure>_ci_low` and `_ci_high` in the metrics files
Correction = Literal["holm", "bonferroni", "none"]
CORRECTIONS: tuple[Correction, ...] = ("holm", "bonferroni", "none")
_CHUNK_ELEMENTS = 1 << 18  # resampled query indices drawn at once (2 MiB of int64: a cache-sized block)
_TIE = 1e-9  # rSum differences closer to 0 than this count as 0 (float noise of equal hit counts)


@dataclass(frozen=True)
class Bootstrap:
    """Settings of the percentile bootstrap intervals (params.yaml `evaluate.bootstrap`)."""

    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resamples < 1:
            raise ValueError(f"resamples must be at least 1, got {self.resamples}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie strictly between 0 and 1, got {self.confidence}")


DEFAULT_BOOTSTRAP = Bootstrap()  # params.yaml's defaults


@dataclass(frozen=True)
class Significance:
    """Settings of the pairwise tests and groups (params.yaml `compare.significance`)."""

    alpha: float = 0.05
    resamples: int = 10000
    seed: int = 0
    correction: Correction = "holm"

    def __post_init__(self) -> None:
        if self.resamples < 1:
            raise ValueError(f"resamples must be at least 1, got {self.resamples}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must lie strictly between 0 and 1, got {self.alpha}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, got {self.correction!r}")


DEFAULT_SIGNIFICANCE = Significance()  # params.yaml's defaults


def ci_keys(key: str) -> tuple[str, str]:
    """The names of the interval bounds of figure `key`: `rsum` -> (`rsum_ci_low`, `rsum_ci_high`)."""
    return f"{key}{CI_LOW}", f"{key}{CI_HIGH}"


# --- ranks ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FoldRanks:
    """The 0-based rank of every query of one gallery (`itm.evaluate.metrics.query_ranks`)."""

    i2t: np.ndarray  # [n_img] int64, an image's best-ranked caption
    t2i: np.ndarray  # [n_cap] int64

    @classmethod
    def of(cls, scores: Tensor, caption_image: Tensor) -> FoldRanks:
        """The ranks of a similarity matrix [n_img, n_cap] with each caption's image row [n_cap]."""
        i2t, t2i = query_ranks(scores, caption_image)
        return cls(i2t.cpu().numpy(), t2i.cpu().numpy())


def protocol_ranks(scores: Tensor, caption_image: Tensor, protocol: Protocol) -> tuple[FoldRanks, ...]:
    """The ranks of each fold of `protocol` on the whole test matrix [n_img, n_cap] (a fold's own block)."""
    return tuple(FoldRanks.of(*fold.select(scores, caption_image)) for fold in protocol.folds)


def observed_recalls(folds: Sequence[FoldRanks]) -> np.ndarray:
    """The six recalls of RECALL_KEYS [6] in percent, each the mean over the folds (as the metrics files hold)."""
    per_fold = [[100.0 * np.mean(getattr(fold, side) < k) for side in SIDES for k in RSUM_KS] for fold in folds]
    return np.mean(per_fold, axis=0)


# --- bootstrap ------------------------------------------------------------------------------------------------------


def bootstrap_recalls(models: Sequence[Sequence[FoldRanks]], resamples: int, seed: int) -> np.ndarray:
    """The six recalls of RECALL_KEYS in every replicate [n_models, resamples, 6], percent, averaged over folds.

    `models` holds each model's ranks per fold, on the same queries: every replicate resamples one set of queries
    and scores every model on it (paired). Each (fold, direction) has its own random stream, spawned from `seed`
    (`np.random.SeedSequence(seed).spawn`, fold-major, i2t before t2i), and draws its replicates in order, one
    `rng.integers(0, n, n)` each; so the same seed and query counts give the same resampled queries whichever
    models are compared, and the per-replicate loop of the tests draws exactly these.
    """
    n_folds = _check_same_queries(models)
    recalls = np.zeros((len(models), resamples, len(RECALL_KEYS)))  # [M, B, 6]
    streams = np.random.SeedSequence(seed).spawn(len(SIDES) * n_folds)
    for fold in range(n_folds):
        for side_index, side in enumerate(SIDES):
            rng = np.random.default_rng(streams[len(SIDES) * fold + side_index])
            hits = [_packed_hits(getattr(model[fold], side)) for model in models]  # [n] each
            n = len(hits[0])
            columns = slice(side_index * len(RSUM_KS), (side_index + 1) * len(RSUM_KS))
            block = max(1, _CHUNK_ELEMENTS // n)
            for start in range(0, resamples, block):
                count = min(block, resamples - start)
                drawn = rng.integers(0, n, size=(count, n))  # [count, n] the resampled queries of each replicate
                for index, model_hits in enumerate(hits):
                    below = _unpack(model_hits[drawn].sum(axis=1))  # [count, 3] queries ranked below each K
                    recalls[index, start : start + count, columns] += below * (100.0 / n / n_folds)
    return recalls


_FIELD_BITS = 21  # bits per K in a packed hit count: up to 2,097,151 queries per fold and direction


def _packed_hits(ranks: np.ndarray) -> np.ndarray:
    """[n] int64: bit field j (of _FIELD_BITS bits) holds whether the query ranks below RSUM_KS[j], so a sum over
    queries holds the three counts at once."""
    if len(ranks) >= 1 << _FIELD_BITS:
        raise ValueError(f"{len(ranks)} queries in one fold: the packed counts hold at most {(1 << _FIELD_BITS) - 1}")
    return sum((ranks < k).astype(np.int64) << (_FIELD_BITS * j) for j, k in enumerate(RSUM_KS))


def _unpack(totals: np.ndarray) -> np.ndarray:
    """[count, 3] the three counts of packed sums [count]."""
    mask = (1 << _FIELD_BITS) - 1
    return np.stack([(totals >> (_FIELD_BITS * j)) & mask for j in range(len(RSUM_KS))], axis=1)


def _check_same_queries(models: Sequence[Sequence[FoldRanks]]) -> int:
    """The number of folds, after checking that every model has the same folds with the same query counts."""
    if not models or not models[0]:
        raise ValueError("the bootstrap needs at least one model with at least one fold")
    sizes = [tuple((len(fold.i2t), len(fold.t2i)) for fold in model) for model in models]
    if any(size != sizes[0] for size in sizes):
        raise ValueError(f"the models were not ranked on the same test queries: (images, captions) per fold {sizes}")
    if any(n == 0 for fold in sizes[0] for n in fold):
        raise ValueError("a fold without image or caption queries cannot be resampled")
    return len(sizes[0])


def with_rsum(recalls: np.ndarray) -> np.ndarray:
    """The figures of INTERVAL_KEYS [..., 7]: the six recalls [..., 6] and their sum."""
    return np.concatenate([recalls, recalls.sum(axis=-1, keepdims=True)], axis=-1)


def percentile_interval(replicates: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval of replicates [B, ...] along the first axis: their (1 - c)/2 and (1 + c)/2 quantiles."""
    low, high = np.quantile(replicates, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    return low, high


def interval_metrics(folds: Sequence[FoldRanks], bootstrap: Bootstrap) -> dict[str, float]:
    """`<figure>_ci_low` and `<figure>_ci_high` of every figure of INTERVAL_KEYS for one model's folds."""
    replicates = with_rsum(bootstrap_recalls([folds], bootstrap.resamples, bootstrap.seed)[0])  # [B, 7]
    low, high = percentile_interval(replicates, bootstrap.confidence)
    metrics = {}
    for index, key in enumerate(INTERVAL_KEYS):
        low_key, high_key = ci_keys(key)
        metrics[low_key], metrics[high_key] = float(low[index]), float(high[index])
    return metrics


def protocol_intervals(test: SplitScores, dataset_kind: str, bootstrap: Bootstrap) -> dict[str, float]:
    """`<protocol>/<figure>_ci_low` and `_ci_high` for the dataset's protocols (itm/evaluate/protocols.py)."""
    metrics = {}
    for protocol in protocols_for(dataset_kind, len(test.image_ids)):
        folds = protocol_ranks(test.scores, test.caption_image, protocol)
        metrics |= {f"{protocol.name}/{key}": value for key, value in interval_metrics(folds, bootstrap).items()}
    return metrics


def with_intervals(metrics: Mapping[str, float], intervals: Mapping[str, float]) -> dict[str, float]:
    """`metrics` with each figure's interval bounds placed right after it (then any bounds without a figure)."""
    merged: dict[str, float] = {}
    for key, value in metrics.items():
        merged[key] = value
        merged |= {bound: intervals[bound] for bound in ci_keys(key) if bound in intervals}
    return merged | {key: value for key, value in intervals.items() if key not in merged}


# --- paired tests ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedTest:
    """The rSum difference a - b of two models on the same test queries, its interval and two-sided p-value."""

    difference: float  # observed rSum of a - rSum of b
    ci_low: float  # percentile interval of the difference
    ci_high: float
    p_value: float  # before any correction for multiple pairs


def paired_test(
    observed_a: float, observed_b: float, replicates_a: np.ndarray, replicates_b: np.ndarray, confidence: float
) -> PairedTest:
    """The paired test of rSum a against rSum b from their replicates [B] on the same resampled queries (module
    docstring: p = min(1, 2 (1 + min(#{d* <= 0}, #{d* >= 0})) / (B + 1)))."""
    if replicates_a.shape != replicates_b.shape or replicates_a.ndim != 1:
        raise ValueError(f"replicates must be two [B] arrays, got {replicates_a.shape} and {replicates_b.shape}")
    differences = replicates_a - replicates_b  # [B]
    differences = np.where(np.abs(differences) < _TIE, 0.0, differences)
    extreme = min(np.count_nonzero(differences <= 0), np.count_nonzero(differences >= 0))
    p_value = min(1.0, 2 * (1 + extreme) / (len(differences) + 1))
    low, high = percentile_interval(differences, confidence)
    return PairedTest(float(observed_a - observed_b), float(low), float(high), float(p_value))


def paired_bootstrap(
    folds_a: Sequence[FoldRanks], folds_b: Sequence[FoldRanks], *, resamples: int, seed: int, confidence: float
) -> PairedTest:
    """The paired test of two models' rSum, both resampled on the same queries."""
    replicates = with_rsum(bootstrap_recalls([folds_a, folds_b], resamples, seed))[..., -1]  # [2, B]
    observed = [float(with_rsum(observed_recalls(folds))[-1]) for folds in (folds_a, folds_b)]
    return paired_test(observed[0], observed[1], replicates[0], replicates[1], confidence)


def adjust_p_values(p_values: Sequence[float], correction: Correction) -> np.ndarray:
    """p-values adjusted for testing them all [m]: Holm's step-down (Holm 1979: the i-th smallest times m - i + 1,
    made non-decreasing, at most 1), Bonferroni's (times m, at most 1), or unchanged ("none")."""
    p = np.asarray(p_values, dtype=float)  # [m]
    if correction == "none" or len(p) == 0:
        return p.copy()
    if correction == "bonferroni":
        return np.minimum(1.0, p * len(p))
    if correction != "holm":
        raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p)))))
    adjusted = np.empty_like(p)
    adjusted[order] = stepped
    return adjusted


def smallest_adjusted_p(n_pairs: int, significance: Significance) -> float:
    """The smallest p-value a pair can reach after the correction: 2 / (B + 1), times m for Holm and Bonferroni."""
    smallest = 2 / (significance.resamples + 1)
    return min(1.0, smallest * (n_pairs if significance.correction != "none" else 1))


def resamples_needed(n_pairs: int, significance: Significance) -> int:
    """The fewest resamples with which `n_pairs` corrected pairs can reach `alpha` (`smallest_adjusted_p`)."""
    factor = n_pairs if significance.correction != "none" else 1
    return max(1, math.ceil(2 * factor / significance.alpha - 1 - 1e-9))  # 1e-9: 2m/alpha may land a hair above


# --- groups ---------------------------------------------------------------------------------------------------------


def compact_letters(order: Sequence[str], significant: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Letters per model such that two models share a letter exactly when their pair is not in `significant`.

    Piepho (2004) insert-and-absorb: start with one letter for all; for each significant pair, split every letter
    holding both into one without the first and one without the second, then drop letters whose models are all
    in another letter (absorb). Then sweep: a model leaves a letter when it keeps another letter and every partner
    of that letter shares another letter with it; letters left empty disappear. Letters are named in the order of
    the best-placed model (position in `order`, highest rSum first) that carries them, so the top model has "a".
    """
    position = {name: index for index, name in enumerate(order)}
    if len(position) != len(order):
        raise ValueError(f"model names repeat in {list(order)}")
    letters: list[set[str]] = [set(order)] if order else []
    for first, second in significant:
        if first not in position or second not in position or first == second:
            raise ValueError(f"significant pair ({first!r}, {second!r}) must name two different models of {order}")
        split: list[set[str]] = []
        for letter in letters:
            split += [letter - {second}, letter - {first}] if {first, second} <= letter else [letter]
        letters = _absorb(split)
    letters = _absorb(_sweep(letters))
    letters.sort(key=lambda members: sorted(position[name] for name in members))
    names = string.ascii_lowercase + string.ascii_uppercase
    if len(letters) > len(names):
        raise ValueError(f"{len(letters)} groups need more than the {len(names)} letters a-z, A-Z")
    return {model: "".join(names[i] for i, letter in enumerate(letters) if model in letter) for model in order}


def _absorb(letters: Sequence[set[str]]) -> list[set[str]]:
    """Letters without those contained in another one (of two equal letters the first stays)."""
    kept = []
    for index, letter in enumerate(letters):
        inside = any(
            letter < other or (letter == other and other_index < index)
            for other_index, other in enumerate(letters)
            if other_index != index
        )
        if letter and not inside:
            kept.append(letter)
    return kept


def _sweep(letters: list[set[str]]) -> list[set[str]]:
    """Piepho's sweep: remove a model from a letter when no pair needs that letter to share one."""
    letters = [set(letter) for letter in letters]
    for index, letter in enumerate(letters):
        for model in sorted(letter):
            others = [other for other_index, other in enumerate(letters) if other_index != index and model in other]
            covered = all(any(partner in other for other in others) for partner in letter - {model})
            if others and covered:
                letter.discard(model)
    return [letter for letter in letters if letter]


@dataclass(frozen=True)
class Pair:
    """One pairwise test: `better` has the higher observed rSum, the difference is better - worse."""

    better: str
    worse: str
    test: PairedTest
    p_adjusted: float
    significant: bool  # p_adjusted <= alpha


@dataclass(frozen=True)
class PairwiseComparison:
    """Every pair of models of one protocol, and the groups they form."""

    order: tuple[str, ...]  # models by observed rSum, highest first (ties in the given order)
    rsum: dict[str, float]  # observed rSum of each model, from its ranks
    pairs: tuple[Pair, ...]  # in `order`: (1st, 2nd), (1st, 3rd), ..., (2nd, 3rd), ...
    groups: dict[str, str]  # model -> its letters (compact_letters)


def compare_models(models: Mapping[str, Sequence[FoldRanks]], significance: Significance) -> PairwiseComparison:
    """Test every pair of `models` (each model's ranks per fold, all on the same queries) with the paired bootstrap,
    adjust the p-values over all pairs, and group the models; the differences' intervals are at level 1 - alpha
    (per pair, not adjusted)."""
    names = list(models)
    recalls = bootstrap_recalls([models[name] for name in names], significance.resamples, significance.seed)
    replicates = dict(zip(names, with_rsum(recalls)[..., -1], strict=True))  # name -> [B] rSum per replicate
    rsum = {name: float(with_rsum(observed_recalls(models[name]))[-1]) for name in names}
    order = tuple(sorted(names, key=lambda name: -rsum[name]))  # stable: ties keep the given order
    pairs = [(a, b) for index, a in enumerate(order) for b in order[index + 1 :]]
    tests = [paired_test(rsum[a], rsum[b], replicates[a], replicates[b], 1 - significance.alpha) for a, b in pairs]
    adjusted = adjust_p_values([test.p_value for test in tests], significance.correction)
    results = tuple(
        Pair(a, b, test, float(p), bool(p <= significance.alpha))
        for (a, b), test, p in zip(pairs, tests, adjusted, strict=True)
    )
    groups = compact_letters(order, [(pair.better, pair.worse) for pair in results if pair.significant])
    return PairwiseComparison(order, rsum, results, groups)
