"""The pure (numpy) parts of the figures: the fixed pick of test rows by seed that every figure and every matcher
shares (`pick_rows`), the ranked hits of a retrieval query with their ground-truth flags and the rank of the first
true match, the tokens a figure shows, and the shaping of weights for drawing (a ViT's patch grid, the heat of
weighted region boxes)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from itm.evaluate.score_file import SplitScores

SPECIAL_TOKENS = frozenset({"<pad>", "<start>", "<end>", "<start_of_text>", "<end_of_text>"})


def pick_rows(n: int, count: int, seed: int, usable: np.ndarray | None = None) -> np.ndarray:
    """`count` of the rows 0..n-1, the first usable ones of numpy `default_rng(seed).permutation(n)`: a fixed pick
    that does not depend on the matcher (rows it cannot use, `usable` [n] False, are passed over)."""
    order = np.random.default_rng(seed).permutation(n)
    if usable is not None:
        order = order[np.asarray(usable, dtype=bool)[order]]
    if len(order) < count:
        raise ValueError(f"asked for {count} rows, but only {len(order)} of {n} are usable")
    return order[:count]


@dataclass(frozen=True)
class Hit:
    """One retrieved item: its index (image row or caption column of the score matrix), 1-based rank, score, and
    whether it belongs to the query."""

    index: int
    rank: int
    score: float
    truth: bool


def top_hits(scores: np.ndarray, truth: np.ndarray, top: int) -> list[Hit]:
    """The `top` best of `scores` [n] (ties by index), each flagged with `truth` [n] bool."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:top]
    return [Hit(int(i), rank, float(scores[i]), bool(truth[i])) for rank, i in enumerate(order, start=1)]


def first_true_rank(scores: np.ndarray, truth: np.ndarray) -> int:
    """The 1-based rank of the best-scored true item (what recall@K counts); ties ranked in the query's favour."""
    best_true = np.max(np.asarray(scores)[truth])
    return int(np.sum(np.asarray(scores)[~truth] > best_true)) + 1


@dataclass(frozen=True)
class Query:
    """One retrieval example: the query (a caption's text, or an image id), its top hits, and the rank of its first
    true match (which may lie beyond the hits shown)."""

    query: str | int
    hits: list[Hit]
    true_rank: int


def text_to_image_queries(scores: SplitScores, captions: Sequence[str], count: int, top: int, seed: int) -> list[Query]:
    """`count` caption queries (score columns picked by `pick_rows(seed)`, `captions` [n_captions] their texts) with
    their top images; the truth is the caption's own image."""
    queries = []
    for column in pick_rows(scores.scores.shape[1], count, seed):
        truth = np.arange(scores.scores.shape[0]) == int(scores.caption_image[column])  # [n_images]
        ranked = scores.scores[:, column].numpy()
        queries.append(Query(captions[column], top_hits(ranked, truth, top), first_true_rank(ranked, truth)))
    return queries


def image_to_text_queries(scores: SplitScores, count: int, top: int, seed: int) -> list[Query]:
    """`count` image queries (score rows picked by `pick_rows(seed)`) with their top captions; the truth is the
    image's own captions."""
    queries = []
    for row in pick_rows(scores.scores.shape[0], count, seed):
        truth = scores.caption_image.numpy() == row  # [n_captions]
        ranked = scores.scores[row].numpy()
        queries.append(Query(int(scores.image_ids[row]), top_hits(ranked, truth, top), first_true_rank(ranked, truth)))
    return queries


def shown_tokens(labels: Sequence[str]) -> list[int]:
    """Positions of the tokens a figure shows: all but <start>, <end> and padding."""
    return [position for position, label in enumerate(labels) if label not in SPECIAL_TOKENS]


def patch_grid(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split per-token weights [m, N] of a ViT into the patch grid [m, s, s] and the weights [m, N - s²] of the
    tokens before the patches (a class token, when the backbone returns it; open_clip returns patches only)."""
    tokens = weights.shape[1]
    for prefix in (0, 1):
        side = math.isqrt(tokens - prefix)
        if side * side == tokens - prefix:
            return weights[:, prefix:].reshape(len(weights), side, side), weights[:, :prefix]
    raise ValueError(f"{tokens} image tokens are neither a square patch grid nor one with a class token")


def region_heat(boxes: np.ndarray, weights: np.ndarray, height: int, width: int) -> np.ndarray:
    """[height, width]: at each pixel the largest weight of a box [R, 4] (x1, y1, x2, y2) that covers it; 0 where
    none does. The largest (not the sum) keeps the heat on the weights' own scale."""
    heat = np.zeros((height, width), dtype=np.float32)
    for (x1, y1, x2, y2), weight in zip(boxes, weights, strict=True):
        top, left = max(math.floor(y1), 0), max(math.floor(x1), 0)
        rows, columns = slice(top, max(math.ceil(y2), top + 1)), slice(left, max(math.ceil(x2), left + 1))
        heat[rows, columns] = np.maximum(heat[rows, columns], weight)
    return heat
