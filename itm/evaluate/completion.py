"""CVSE's transductive completion of test concept labels (BruceW91/CVSE `evaluation.py`, `label_complete` and
`construct_N_with_KNN`): each test caption's concepts are joined with those of test captions that look like it.

This uses the other test queries, so it is a protocol difference, off by default (`evaluate.transductive_concepts`).
For caption c:
1. text neighbours: the `text_neighbours` captions whose pooled embeddings are nearest to c's (c itself included);
2. image window: c's best image j*, its ranking of every caption, and the `image_window` captions around c's place
   in it (a window centred on c, moved inwards at either end of the ranking);
3. the neighbours are the text neighbours that are also in the window; when fewer than `min_shared` are, the first
   `fallback_text` text neighbours plus the window instead (CVSE's Flickr30K rule `a[:3] + b`);
4. c's completed labels are the union of its own and its neighbours' labels.
CVSE ranks with the fused embeddings' cosine; here both the caption embeddings (`pooled`, the fused ones for CVSE)
and the matcher's own score matrix (CVSE's 0.95 fused + 0.05 consensus mix) are used. Neighbours come from the whole
test split (for COCO, across the 1K folds), as CVSE computes them over `testall`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

TEXT_CHUNK = 1024  # captions per block of the caption-caption similarity


@dataclass(frozen=True)
class ConceptCompletion:
    """The completion's neighbourhood sizes (CVSE: K = 10 text neighbours, a window of 3, fallback a[:3] + b)."""

    text_neighbours: int = 10
    image_window: int = 3
    min_shared: int = 3
    fallback_text: int = 3

    def complete(self, scores: Tensor, caption_vectors: Tensor, labels: Sequence[Sequence[int]]) -> list[list[int]]:
        """Completed concept ids per caption, from the first-pass `scores` [n_images, n_captions], the captions'
        unit vectors [n_captions, E] and their own `labels`."""
        n_captions = scores.shape[1]
        if len(labels) != n_captions or len(caption_vectors) != n_captions:
            raise ValueError(f"{len(labels)} labels and {len(caption_vectors)} vectors for {n_captions} captions")
        text = text_neighbours(caption_vectors, self.text_neighbours)
        window = image_windows(scores, self.image_window)
        completed = []
        for caption in range(n_captions):
            near, around = text[caption], window[caption]
            shared = [other for other in near if other in around]
            if len(shared) < self.min_shared:
                shared = near[: self.fallback_text] + around
            merged = set(labels[caption]).union(*(labels[other] for other in shared))
            completed.append(sorted(merged))
        return completed


def text_neighbours(vectors: Tensor, k: int) -> list[list[int]]:
    """For each row of `vectors` [n, E], the `k` rows with the largest dot product, nearest first."""
    vectors = vectors.float()
    k = min(k, len(vectors))
    nearest = [(vectors[start : start + TEXT_CHUNK] @ vectors.T).topk(k, dim=1).indices for start in
               range(0, len(vectors), TEXT_CHUNK)]  # fmt: skip
    return torch.cat(nearest).tolist()


def image_windows(scores: Tensor, size: int) -> list[list[int]]:
    """For each caption (column of `scores`), the `size` captions around it in its best image's ranking of all
    captions (best first), the window centred on it and moved inwards at the ends."""
    n_captions = scores.shape[1]
    size = min(size, n_captions)
    best_image = scores.argmax(dim=0)  # [n_captions]
    windows: list[list[int]] = [[] for _ in range(n_captions)]
    for image in best_image.unique().tolist():
        ranking = scores[image].argsort(descending=True, stable=True)  # captions, best first
        place = torch.empty_like(ranking)
        place[ranking] = torch.arange(n_captions)
        for caption in (best_image == image).nonzero().flatten().tolist():
            start = min(max(int(place[caption]) - size // 2, 0), n_captions - size)
            windows[caption] = ranking[start : start + size].tolist()
    return windows
