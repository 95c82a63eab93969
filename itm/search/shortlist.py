"""The shortlist of a cross-attention search: the cheap scores that rank the whole gallery, and the ranking that
re-scores only the best of them with the full score.

Cross-attention matchers (SCAN, UARDA) score a pair by attending every word over every region; a search first ranks
the whole gallery with a cheap score computed from the same fragment embeddings and re-ranks only a shortlist with
the full score. The cheap scores:

- `hard`: SCAN's stacked cross attention in the limit λ1 → ∞ of its softmax α_ij = exp(λ1 s̄_ij) / Σ_i exp(λ1 s̄_ij)
  (Lee et al., "Stacked Cross Attention for Image-Text Matching", ECCV 2018, Sec. 3.1, eq. (1); λ1 is the inverse
  temperature). The attention becomes hard: each word attends to one region only, its most similar, so the attended
  vector is that region and the word's relevance R_j = cos(e_j, a_j) is max_i cos(v_i, e_j); AVG pooling makes the
  score the mean over the caption's words (t2i). With the roles swapped (i2t): the mean over the image's regions of
  max_j cos(v_i, e_j). The clipped L2 normalisation of s̄ (over the caption's words) is left out: it couples each
  word to the rest of its caption, costs a pass over the pair's similarities, and the shortlist only needs an order.
  Which side attends (`hard_direction`) was measured with bench/search_shortlist.py on the synthetic test split
  (1K images, 5K captions): for a text query the words attend (t2i) whatever the matcher's direction (with SCAN i-t
  LSE, a shortlist of 100 keeps 75% of the true images with t2i against 54% with i2t, and R@10 46.3 against 41.8,
  full scoring 46.0); for an image query the matcher's own direction is better (SCAN i-t: 87% against 72% kept).
- `pooled`: the cosine of the two modalities' pooled vectors (`Encoded.pooled`), one dot product per pair.

Other matchers (VSE++, CVSE, MH-CVSE, MVAM) already score by one dot product of two vectors: every item is scored.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from itm.errors import UserError
from itm.models.base import Encoded, Matcher
from itm.search.options import SHORTLIST_BY, QueryKind, ShortlistBy

# The hard-attention score builds [images, R, captions, L] similarities; at most this many elements at a time.
HARD_MAX_ELEMENTS = 2**24


# --- cheap scores ---------------------------------------------------------------------------------------------------


def hard_attention_scores(
    images: Encoded, captions: Encoded, direction: str, *, max_elements: int = HARD_MAX_ELEMENTS
) -> Tensor:
    """[n_images, n_captions] SCAN's score with hard attention (λ1 → ∞) and AVG pooling, from unit fragments.

    t2i: mean over each caption's words of the best region similarity; i2t: mean over each image's regions of the
    best word similarity. Captions are processed in chunks so no [n_images, R, chunk, L] block exceeds
    `max_elements`.
    """
    if direction not in ("t2i", "i2t"):
        raise ValueError(f"direction must be 't2i' or 'i2t', got {direction!r}")
    n_img, n_regions = images.local.shape[:2]
    n_words = captions.local.shape[1]
    step = max(1, max_elements // max(1, n_img * n_regions * n_words))
    columns = [
        _hard_block(images, captions.slice(start, start + step), direction) for start in range(0, len(captions), step)
    ]
    return torch.cat(columns, dim=1)


def _hard_block(images: Encoded, captions: Encoded, direction: str) -> Tensor:
    """Hard-attention scores of every image against a chunk of captions, [n_images, chunk]."""
    n_img, n_regions, dim = images.local.shape
    n_cap, n_words, _ = captions.local.shape
    sims = images.local.float().reshape(n_img * n_regions, dim) @ captions.local.float().reshape(-1, dim).T
    sims = sims.view(n_img, n_regions, n_cap, n_words)  # [I, R, C, L]  s_ij = v_i·e_j
    if direction == "t2i":
        best = _masked_max(sims, images.mask[:, :, None, None], dim=1)  # [I, C, L]  each word's best region
        weights = captions.mask[None].float()  # [1, C, L]
        return (best * weights).sum(dim=2) / weights.sum(dim=2).clamp_min(1)  # [I, C]
    best = _masked_max(sims, captions.mask[None, None], dim=3)  # [I, R, C]  each region's best word
    weights = images.mask[:, :, None].float()  # [I, R, 1]
    return (best * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)  # [I, C]


def _masked_max(sims: Tensor, mask: Tensor, dim: int) -> Tensor:
    """The max over `dim` of the real fragments (`mask` broadcasts to `sims`); the masking pass is skipped when
    there is no padding (fixed region counts, a single query)."""
    if bool(mask.all()):
        return sims.amax(dim=dim)
    return sims.masked_fill(~mask, torch.finfo(sims.dtype).min).amax(dim=dim)


def pooled_scores(images: Encoded, captions: Encoded) -> Tensor:
    """[n_images, n_captions] cosine of the pooled vectors (unit vectors: a dot product)."""
    if images.pooled is None or captions.pooled is None:
        raise UserError("this matcher's encoders give no pooled vectors: use --shortlist-by hard")
    return images.pooled.float() @ captions.pooled.float().T


def cheap_scores(matcher: Matcher, images: Encoded, captions: Encoded, by: ShortlistBy, query: QueryKind) -> Tensor:
    """[n_images, n_captions] the shortlist score `by` of a cross-attention matcher, for `query` ("text": the
    captions are the queries; "image": the images are)."""
    if by == "pooled":
        return pooled_scores(images, captions)
    if by == "hard":
        return hard_attention_scores(images, captions, hard_direction(matcher, query))
    raise UserError(f"--shortlist-by {by!r} is not one of {', '.join(SHORTLIST_BY)}")


def hard_direction(matcher: Matcher, query: QueryKind) -> str:
    """Which side attends in the hard score: the words ('t2i') for a text query, the matcher's own direction for an
    image query (measured: see the module docstring)."""
    return "t2i" if query == "text" else scorer_direction(matcher)


def scorer_direction(matcher: Matcher) -> str:
    """Which side attends in a cross-attention matcher: 't2i' (SCAN t-i, UARDA) or 'i2t'."""
    return getattr(matcher.scorer, "direction", "t2i")  # UARDA's scorer is t2i only and has no attribute


# --- ranking --------------------------------------------------------------------------------------------------------


def shortlist_rank(
    cheap: Tensor | None, score_rows: Callable[[Tensor], Tensor], n: int, *, shortlist: int, top: int
) -> tuple[Tensor, Tensor]:
    """The best `top` of `n` gallery items: (rows [k], full scores [k]), best first.

    With `cheap` [n] and `shortlist` > 0, only the best max(shortlist, top) items by `cheap` get the full score
    (`score_rows(rows [m]) -> [m]`); otherwise every item does. Equal full scores keep gallery order, so a shortlist
    that holds the whole gallery gives exactly the full ranking.
    """
    if cheap is None or shortlist <= 0 or shortlist >= n:
        rows = torch.arange(n)
    else:
        keep = min(n, max(shortlist, top))
        rows = torch.topk(cheap, keep).indices.sort().values  # [keep] in gallery order
    scores = score_rows(rows).float().cpu()  # [m]
    order = torch.sort(scores, descending=True, stable=True).indices[:top]
    return rows[order], scores[order]
