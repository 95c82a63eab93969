"""CVSE's transductive completion of test concept labels (BruceW91/CVSE at 94c2191, `evaluation.py`:
`label_complete`, with `construct_H_with_KNN` from `util/utils.py` for the text side and `calculate_sim` and
`construct_N_with_KNN` for the image side; the labels are joined in `encode_data_KNN_rerank`): each test caption's
concepts are joined with those of test captions that look like it.

This uses the other test queries, so it is a protocol difference, off by default (`evaluate.transductive_concepts`).
Both sides read CVSE's fused embeddings (`pooled` for CVSE and MH-CVSE), encoded with each caption's own concepts.
For caption c:
1. text neighbours a: the `text_neighbours` captions (CVSE: 10) with the largest cosine to c after c's own cosine is
   set to 0 (`construct_H_with_KNN_from_distance`), nearest first. c is not its own neighbour unless fewer than that
   many other captions have a positive cosine with it;
2. image window b: c's best image j* (the largest fused cosine, `calculate_sim`; not the 0.95 fused + 0.05 consensus
   retrieval score) ranks every caption, best first; c sits at place p of n. With K = `image_window` (CVSE: 3), b is
   the ranking's slice [p - 1, p + 2) for K = 3, [p - K//2, p + K//2) for an even K > 3, [p - K//2 - 1, p + K//2)
   for an odd K > 3, its first K for K < 3, and its last K whenever p ≥ n - K (`construct_N_with_KNN`). Where a
   slice would start before the ranking CVSE takes the first K for K = 3 (p ≤ 1) and crashes for K > 3 (an empty
   numpy slice); here it is the first K for every K;
3. neighbours: the text neighbours that are also in the window (in a's order); when fewer than 3 are, the dataset's
   rule instead, `a[:3] + b[:4]` for Flickr30K (and the synthetic set) or `a[:2] + b[:1]` for COCO. With CVSE's
   sizes the window holds c itself and at most 2 text neighbours, so the rule is what CVSE nearly always applies;
4. c's completed labels are the union of its own and its neighbours' labels (the max of multi-hot rows in CVSE).
Neighbours come from the whole test split (for COCO, across the 1K folds), as CVSE computes them over `testall`.
CVSE's `Cos_dis` also takes max(S, Sᵀ) of the caption cosines, which only evens out rounding; it is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

TEXT_CHUNK = 1024  # captions per block of the caption-caption similarity


@dataclass(frozen=True)
class CompletionRule:
    """CVSE's neighbours of a caption when fewer than `min_shared` text neighbours are in its image window: the first
    `text` text neighbours followed by the first `window` captions of the window (`label_complete`, per dataset)."""

    name: str
    text: int
    window: int


FLICKR30K_RULE = CompletionRule("flickr30k", text=3, window=4)  # CVSE: tmp = a[:3] + b[:4] ('f30k' in data_name)
COCO_RULE = CompletionRule("coco", text=2, window=1)  # CVSE: tmp = a[:2] + b[:1] ('coco' in data_name)
DATASET_RULES = {"flickr30k": FLICKR30K_RULE, "coco": COCO_RULE, "synthetic": FLICKR30K_RULE}


def rule_for(dataset_kind: str) -> CompletionRule:
    """The completion rule CVSE uses for a dataset kind (the synthetic set follows Flickr30K)."""
    if dataset_kind not in DATASET_RULES:
        raise ValueError(
            f"no concept completion rule for dataset kind {dataset_kind!r}; known: {sorted(DATASET_RULES)}"
        )
    return DATASET_RULES[dataset_kind]


@dataclass(frozen=True)
class ConceptCompletion:
    """The completion's sizes and rule (CVSE: 10 text neighbours, a window of 3, at least 3 shared, else the rule)."""

    text_neighbours: int = 10
    image_window: int = 3
    rule: CompletionRule = FLICKR30K_RULE
    min_shared: int = 3

    def neighbours(self, scores: Tensor, caption_vectors: Tensor) -> list[list[int]]:
        """Each caption's neighbours (CVSE's `ind_cap_complete`, repeats kept), from the image-caption `scores`
        [n_images, n_captions] that pick the window (CVSE: the fused embeddings' cosine, `window_scores`) and the
        captions' unit vectors [n_captions, E]."""
        n_captions = scores.shape[1]
        if len(caption_vectors) != n_captions:
            raise ValueError(f"{len(caption_vectors)} caption vectors for {n_captions} captions")
        text = text_neighbours(caption_vectors, self.text_neighbours)
        window = image_windows(scores, self.image_window)
        chosen = []
        for near, around in zip(text, window, strict=True):
            shared = [other for other in near if other in around]
            if len(shared) < self.min_shared:
                shared = near[: self.rule.text] + around[: self.rule.window]
            chosen.append(shared)
        return chosen

    def complete(self, scores: Tensor, caption_vectors: Tensor, labels: Sequence[Sequence[int]]) -> list[list[int]]:
        """Completed concept ids per caption (sorted): its own `labels` and those of its `neighbours`."""
        if len(labels) != scores.shape[1]:
            raise ValueError(f"{len(labels)} labels for {scores.shape[1]} captions")
        chosen = self.neighbours(scores, caption_vectors)
        joined = zip(labels, chosen, strict=True)
        return [sorted(set(own).union(*(labels[other] for other in others))) for own, others in joined]


def window_scores(image_vectors: Tensor, caption_vectors: Tensor) -> Tensor:
    """The scores CVSE picks image windows by (`calculate_sim`): the dot products [n_images, n_captions] of the
    images' and captions' fused unit vectors [n_images, E] and [n_captions, E]."""
    return image_vectors.float() @ caption_vectors.float().T


def text_neighbours(vectors: Tensor, k: int) -> list[list[int]]:
    """For each row of `vectors` [n, E], the `k` rows with the largest dot product, nearest first, its own dot
    product counted as 0 (CVSE `construct_H_with_KNN_from_distance`)."""
    vectors = vectors.float()
    k = min(k, len(vectors))
    nearest = []
    for start in range(0, len(vectors), TEXT_CHUNK):
        block = vectors[start : start + TEXT_CHUNK] @ vectors.T  # [chunk, n]
        rows = torch.arange(len(block))
        block[rows, start + rows] = 0.0  # CVSE: dis_mat[center_idx, center_idx] = 0
        nearest.append(block.topk(k, dim=1).indices)
    return torch.cat(nearest).tolist()


def image_windows(scores: Tensor, size: int) -> list[list[int]]:
    """For each caption (column of `scores` [n_images, n_captions]), the `size` captions around it in its best
    image's ranking of all captions (best first), as CVSE's `construct_N_with_KNN` cuts them."""
    n_captions = scores.shape[1]
    size = min(size, n_captions)
    best_image = scores.argmax(dim=0)  # [n_captions]
    windows: list[list[int]] = [[] for _ in range(n_captions)]
    for image in best_image.unique().tolist():
        ranking = scores[image].argsort(descending=True, stable=True)  # captions, best first
        place = torch.empty_like(ranking)
        place[ranking] = torch.arange(n_captions)
        for caption in (best_image == image).nonzero().flatten().tolist():
            start = window_start(int(place[caption]), n_captions, size)
            windows[caption] = ranking[start : start + size].tolist()
    return windows


def window_start(place: int, n: int, size: int) -> int:
    """Where CVSE's window of `size` starts in a ranking of `n` captions whose query caption is at `place`
    (`construct_N_with_KNN`: interval = K // 2)."""
    if place >= n - size:
        return n - size  # cand_nearest_i2t[-K_neigs:]
    if size < 3:
        return 0  # cand_nearest_i2t[:K_neigs]
    odd_extra = 1 if size > 3 and size % 2 else 0  # K > 3 odd: [p - interval - 1, p + interval)
    # K = 3 and p ≤ 1: CVSE takes cand_nearest_i2t[:3]; K > 3: its slice would be empty and crash CVSE
    return max(place - size // 2 - odd_extra, 0)
