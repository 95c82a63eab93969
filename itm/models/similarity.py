"""Scorers: cosine of global vectors (VSE++) and stacked cross attention (SCAN; UARDA's thresholded text-to-image).

Stacked cross attention (SCAN, Lee et al. ECCV 2018, Sec. 3, text-image and image-text formulations; kuanghuei/SCAN
`model.py` `func_attention`, `xattn_score_t2i`, `xattn_score_i2t`), for one image with unit region vectors v_i and
one caption with unit word vectors e_j, with s_ij = v_i·e_j:

- t2i (words attend to regions): s̄_ij = LeakyReLU_0.1(s_ij) / ‖LeakyReLU_0.1(s_i·)‖ over the caption's words
  ("clipped_l2norm"); α_ij = softmax_i(λ1·s̄_ij); a_j = Σ_i α_ij v_i; R_j = cos(e_j, a_j);
  S = mean_j R_j (AVG) or (1/λ2)·log Σ_j exp(λ2·R_j) (LSE).
- i2t (regions attend to words): the same with the roles swapped: normalise over regions for each word, softmax
  over words, R_i = cos(v_i, a_i), pool over regions.

The fast path scores every (image, caption) pair at once from the raw similarities, without building an attended
vector per (pair, query): with a_j = Σ_i α_ij v_i,
    e_j·a_j = Σ_i α_ij s_ij          and          ‖a_j‖² = α_·jᵀ G α_·j,  G = V Vᵀ (the image's region Gram matrix),
so R_j needs the [R, L] similarities and an [R, R] Gram matrix per image instead of an [L, E] attended block per
pair (i2t uses the caption's [L, L] word Gram matrix). Pairs are processed in chunks of whole images × whole
captions so that no [images, R, captions, L] intermediate exceeds `max_elements`; captions are grouped by length
so that each chunk is padded only to its own longest caption. The similarities are computed under the caller's
autocast (the big matrix product); the attention arithmetic runs in fp32.

UARDA (Zhang et al., IEEE TMM 2022) moves SCAN's zero cut to a threshold t: clipped_l2norm is applied to s − t,
and regions with s_ij ≤ t are left out of word j's softmax. A word with no region above t (max_i s_ij ≤ t) is an
irrelevant query: no attended context is formed for it, and it enters the pooling with its shortfall
R_j = max_i s_ij − t ≤ 0 instead of a relevance (NAAF's negative term min(0, max_i(s_ij − t)), CrossmodalGroup/NAAF
`model.py` `xattn_score`). Dropping such words from the pooling altogether would let a mismatched pair score as
high as a matched one on the strength of one shared word; the shortfall keeps SCAN's penalty for unmatched words,
is differentiable, and costs only the row maximum that decides the skip. With `compact`, only the kept
(pair, word) entries go through the softmax and the relevance computation, which is where the skipped queries save
retrieval time.

`reference_cross_attention_scores` and `reference_uarda_scores` are direct transcriptions of the formulas (a loop
over captions as in kuanghuei/SCAN, attended vectors materialised): the ground truth for tests and benchmarks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itm.models.base import Encoded
from itm.models.encoders import EPS, l2norm

Direction = Literal["t2i", "i2t"]
Pooling = Literal["avg", "lse"]

# One [images, regions, captions, words] fp32 intermediate holds at most this many elements; the fast path keeps about
# ten of them alive. A GPU wants large blocks (2**26: 256 MiB each, a few GiB in all); on a CPU the elementwise passes
# are bound by memory traffic and blocks that stay in cache run 2-3x faster (2**20: 4 MiB each; measured with
# SCAN t-i on 256 images x 1,024 captions, 2 cores: 0.37 s at 2**20 against 1.2 s at 2**26).
MAX_ELEMENTS = {"cuda": 2**26, "cpu": 2**20}


def default_max_elements(device: torch.device) -> int:
    """The block size for scoring on `device` (MAX_ELEMENTS; other devices get the GPU's)."""
    return MAX_ELEMENTS.get(device.type, MAX_ELEMENTS["cuda"])


MIN_SCORE = -1.0  # the lowest cosine-based AVG or LSE score; pairs with no relevant word (UARDA) score below it
# Captions are scored in groups of at most this many, sorted by length, each padded to its own longest caption only
# (a 1,024-caption chunk padded to its longest caption is half padding on Flickr30K-like lengths).
LENGTH_GROUP = 256
# `compact` gathers the kept queries only while they are at most this fraction of the chunk's (pair, word) entries:
# above it, the sort and gathers cost more than computing and masking every entry (measured on CPU, 256 x 1024 chunk).
COMPACT_MAX_KEPT = 0.75
LEAKY_SLOPE = 0.1  # SCAN clipped_l2norm uses LeakyReLU(0.1) where the paper writes [.]+


class CosineScorer(nn.Module):
    """VSE++: the dot product of the unit global vectors, [n_images, n_captions]."""

    def forward(self, images: Encoded, captions: Encoded) -> Tensor:
        if images.pooled is None or captions.pooled is None:
            raise ValueError("CosineScorer needs pooled vectors on both sides; the encoders produced none")
        return images.pooled @ captions.pooled.T


class CrossAttentionScorer(nn.Module):
    """SCAN stacked cross attention, [n_images, n_captions]; see the module docstring for the formulas."""

    def __init__(
        self,
        direction: Direction,
        pooling: Pooling,
        lambda_softmax: float,
        lambda_lse: float,
        *,
        max_elements: int | None = None,
    ) -> None:
        super().__init__()
        _check_choice("direction", direction, ("t2i", "i2t"))
        _check_choice("pooling", pooling, ("avg", "lse"))
        self.direction, self.pooling = direction, pooling
        self.lambda_softmax, self.lambda_lse = lambda_softmax, lambda_lse
        self.max_elements = max_elements

    def forward(self, images: Encoded, captions: Encoded) -> Tensor:
        return cross_attention_scores(
            images,
            captions,
            direction=self.direction,
            pooling=self.pooling,
            lambda_softmax=self.lambda_softmax,
            lambda_lse=self.lambda_lse,
            max_elements=self.max_elements,
        )


def cross_attention_scores(
    images: Encoded,
    captions: Encoded,
    *,
    direction: Direction,
    pooling: Pooling,
    lambda_softmax: float,
    lambda_lse: float,
    threshold: Tensor | float | None = None,
    compact: bool = False,
    max_elements: int | None = None,
) -> Tensor:
    """Every image against every caption, [n_images, n_captions] in fp32 (fast path).

    `threshold` (t2i only) applies UARDA's relevance threshold; `compact` then computes the attention only for the
    words that have a region above it. Differentiable except through `threshold`.
    """
    if threshold is not None and direction != "t2i":
        raise ValueError(f"a relevance threshold is defined for direction 't2i' only, got {direction!r}")

    def block(img: Encoded, cap: Encoded) -> Tensor:  # [ki, ci]
        if direction == "t2i":
            return _attention_block(cap, img, pooling, lambda_softmax, lambda_lse, threshold, compact)
        return _attention_block(img, cap, pooling, lambda_softmax, lambda_lse, None, False).T

    if max_elements is None:
        max_elements = default_max_elements(images.local.device)
    return _chunked(images, captions, block, max_elements)


# --- chunking -------------------------------------------------------------------------------------------------------


def _chunked(
    images: Encoded, captions: Encoded, block: Callable[[Encoded, Encoded], Tensor], max_elements: int
) -> Tensor:
    """Apply `block` to image chunk × caption chunk pieces whose [ki, R, ci, L] size stays within `max_elements`
    (at least one pair per piece), captions sorted by length and trimmed to each chunk's longest."""
    images, captions = _autocast_dtype(images.fragments()), _autocast_dtype(captions.fragments())
    images = images.trimmed(int(_extents(images.mask).max()))  # drop region slots no image uses
    n_img, n_regions = images.local.shape[:2]
    extents = _extents(captions.mask)  # [n_cap] last real word + 1
    order = torch.argsort(extents, descending=True, stable=True)
    sorted_extents = extents[order].tolist()
    columns, start = [], 0
    while start < len(sorted_extents):
        n_words = max(sorted_extents[start], 1)  # the chunk's longest caption
        pairs = max(1, max_elements // (n_regions * n_words))
        image_step = min(n_img, pairs)
        caption_step = max(1, min(pairs // image_step, LENGTH_GROUP))
        rows = order[start : start + caption_step]
        chunk = captions.take(rows).trimmed(n_words)
        pieces = [block(images.slice(i, i + image_step), chunk) for i in range(0, n_img, image_step)]
        columns.append(torch.cat(pieces, dim=0))  # [n_img, ci]
        start += caption_step
    return torch.cat(columns, dim=1)[:, torch.argsort(order)]  # back to the input caption order


def _autocast_dtype(encoded: Encoded) -> Encoded:
    """Under autocast, the fragments cast once to its dtype (instead of once per chunk by each matrix product)."""
    device = encoded.local.device.type
    if not torch.is_autocast_enabled(device):
        return encoded
    return dataclasses.replace(encoded, local=encoded.local.to(torch.get_autocast_dtype(device)))


def _extents(mask: Tensor) -> Tensor:
    """[B] index of the last True position + 1 (0 for none) of a [B, N] mask."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask * positions).amax(dim=1)


# --- fast path ------------------------------------------------------------------------------------------------------


def _full_precision(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


def _attention_block(
    query: Encoded,
    context: Encoded,
    pooling: Pooling,
    lambda_softmax: float,
    lambda_lse: float,
    threshold: Tensor | float | None,
    compact: bool,
) -> Tensor:
    """Scores [nc, nq] of every context item against every query item (t2i: images against captions; i2t:
    captions against images), in the layout [nc, C, nq, Q]: context fragments on axis 1, query fragments last."""
    sims = _pairwise(context.local, query.local)  # [nc, C, nq, Q]
    nc, n_context, nq, n_query = sims.shape
    with _full_precision(sims.device):
        context_mask, query_mask = context.mask[:, :, None, None], query.mask  # [nc, C, 1, 1], [nq, Q]
        shifted = sims if threshold is None else sims - threshold
        # clipped_l2norm: LeakyReLU, then L2 over the query axis (the real query fragments) per context fragment
        clipped = F.leaky_relu(shifted, LEAKY_SLOPE).masked_fill_(~query_mask, 0)  # in place: a fresh tensor
        # λ1 folded into the normaliser: [nc, C, nq, 1]
        scale = lambda_softmax / (torch.linalg.vector_norm(clipped, dim=3, keepdim=True) + EPS)
        gram = _gram(context.local)  # [nc, C, C]
        query_norm = torch.linalg.vector_norm(query.local.float(), dim=-1)  # [nq, Q]
        padding = ~context_mask  # [nc, C, 1, 1]
        if threshold is None:
            blocked = padding
            keep = query_mask.expand(nc, nq, n_query)
        else:
            best = _best_over_real(sims, context.mask)  # [nc, nq, Q] max_i s_ij over the real context fragments
            keep = query_mask & (best > threshold)  # queries with some context fragment above t
            if compact and int(keep.sum()) <= COMPACT_MAX_KEPT * nc * int(query_mask.sum()):
                return _compact_block(sims, scale, gram, query_norm, context.mask, query_mask, keep, threshold,
                                      best - threshold, pooling, lambda_lse)  # fmt: skip
            blocked = (shifted <= 0) | padding  # [nc, C, nq, Q]: fragments at or below t leave the attention
        weights = _masked_softmax_(clipped * scale, blocked, dim=1)  # α [nc, C, nq, Q]
        dot = (weights * sims).sum(dim=1)  # [nc, nq, Q]  q·a = Σ α s
        spread = torch.bmm(gram, weights.view(nc, n_context, nq * n_query)).view_as(weights)  # G α
        context_sq = (weights * spread).sum(dim=1)  # [nc, nq, Q]  ‖a‖² = αᵀ G α
        relevance = _cosine(dot, query_norm, context_sq)  # [nc, nq, Q]  R = cos(q, a)
        if threshold is not None:  # irrelevant queries count their shortfall max_i s_ij − t
            relevance = torch.where(keep, relevance, best - threshold)
        return _pool(relevance, query_mask.expand(nc, nq, n_query), dim=2, pooling=pooling, lambda_lse=lambda_lse)


def _best_over_real(sims: Tensor, context_mask: Tensor) -> Tensor:
    """[nc, nq, Q] the largest similarity over each context item's real fragments (padding masked only when the
    chunk has any, which saves a pass over `sims` for fixed region counts)."""
    if bool(context_mask.all()):
        return sims.amax(dim=1)
    return sims.masked_fill(~context_mask[:, :, None, None], float("-inf")).amax(dim=1)


def _pairwise(context_local: Tensor, query_local: Tensor) -> Tensor:
    """s = c·q for every fragment pair of every item pair: [nc, C, nq, Q] fp32, from one matrix product (in the
    autocast dtype when autocast is on)."""
    nc, n_context, dim = context_local.shape
    nq, n_query, _ = query_local.shape
    sims = context_local.reshape(nc * n_context, dim) @ query_local.reshape(nq * n_query, dim).T
    return sims.view(nc, n_context, nq, n_query).float()


def _gram(local: Tensor) -> Tensor:
    """[B, N, N] dot products of each item's fragments, fp32."""
    local = local.float()
    return local @ local.transpose(1, 2)


def _masked_softmax_(logits: Tensor, blocked: Tensor, dim: int) -> Tensor:
    """Softmax over `dim` with the `blocked` entries at weight 0. `logits` must be a fresh tensor: it is
    overwritten. Blocked entries get the lowest finite value rather than -inf, so an all-blocked slice (a query
    with nothing to attend to, dropped later by the pooling) stays finite, and so do its gradients."""
    return torch.softmax(logits.masked_fill_(blocked, torch.finfo(logits.dtype).min), dim=dim)


def _cosine(dot: Tensor, query_norm: Tensor, context_sq: Tensor) -> Tensor:
    """cos(query, context) from q·a, ‖q‖ and ‖a‖², with SCAN `cosine_similarity`'s eps clamp."""
    return dot / (query_norm * context_sq.clamp_min(EPS**2).sqrt()).clamp_min(EPS)


def _compact_block(
    sims: Tensor,
    scale: Tensor,
    gram: Tensor,
    query_norm: Tensor,
    context_mask: Tensor,
    query_mask: Tensor,
    keep: Tensor,
    threshold: Tensor | float,
    shortfall: Tensor,
    pooling: Pooling,
    lambda_lse: float,
) -> Tensor:
    """Thresholded attention on the kept (query item, query fragment) entries only, scores [nc, nq].

    For each context item (an image, for UARDA's t2i), its kept (caption, word) entries are moved to the front (a
    stable sort of the keep mask) and only the first `width` of them, `width` being the largest kept count of any
    context item in the chunk, go through the softmax and the relevance: the skipped word queries are never
    touched beyond their `shortfall` [nc, nq, Q] (max_i s_ij − t, ≤ 0 where not kept). `scale` [nc, C, nq, 1] is λ1
    over the clipped_l2norm normaliser, computed over all the caption's words.
    """
    nc, n_context, nq, n_query = sims.shape
    skipped = query_mask & ~keep  # [nc, nq, Q] real queries without a fragment above t
    n_words = query_mask.sum(dim=1).to(sims.dtype)  # [nq]
    keep = keep.reshape(nc, nq * n_query)
    counts = keep.sum(dim=1)  # [nc]
    width = int(counts.max())
    columns = torch.sort(keep.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :width]  # [nc, W]
    valid = torch.arange(width, device=sims.device) < counts[:, None]  # [nc, W] kept, not filler
    query_item = torch.div(columns, n_query, rounding_mode="floor")  # [nc, W]
    s = sims.reshape(nc, n_context, nq * n_query).gather(2, columns[:, None].expand(nc, n_context, width))
    row_scale = scale.reshape(nc, n_context, nq).gather(2, query_item[:, None].expand(nc, n_context, width))
    shifted = s - threshold  # [nc, C, W]
    blocked = (shifted <= 0) | ~context_mask[:, :, None]
    weights = _masked_softmax_(F.leaky_relu(shifted, LEAKY_SLOPE) * row_scale, blocked, dim=1)  # α [nc, C, W]
    dot = (weights * s).sum(dim=1)  # [nc, W]
    context_sq = (weights * torch.bmm(gram, weights)).sum(dim=1)  # [nc, W]
    relevance = _cosine(dot, query_norm.reshape(-1)[columns], context_sq)  # [nc, W]
    # pool each query item's words: the kept ones scattered back onto their query item, the skipped ones' shortfalls
    totals = torch.zeros(nc, nq, dtype=relevance.dtype, device=sims.device)
    if pooling == "avg":
        totals.scatter_add_(1, query_item, relevance * valid)
        return (totals + (shortfall * skipped).sum(dim=2)) / n_words.clamp_min(1)
    # LSE, shifted by λ2 (R ≤ 1, shortfall ≤ 0) so that exp never overflows
    totals.scatter_add_(1, query_item, torch.exp(lambda_lse * (relevance - 1)) * valid)
    totals += (torch.exp(lambda_lse * (shortfall - 1)) * skipped).sum(dim=2)
    return 1 + torch.log(totals.clamp_min(torch.finfo(totals.dtype).tiny)) / lambda_lse


def _pool(relevance: Tensor, keep: Tensor, *, dim: int, pooling: Pooling, lambda_lse: float) -> Tensor:
    """AVG or LSE of `relevance` over `dim`, counting only `keep`; MIN_SCORE where nothing is kept."""
    n_kept = keep.sum(dim=dim)
    if pooling == "avg":
        scores = (relevance * keep).sum(dim=dim) / n_kept.clamp_min(1)
    else:
        lowest = torch.finfo(relevance.dtype).min  # finite, so an empty slice keeps finite gradients
        scores = torch.logsumexp((lambda_lse * relevance).masked_fill(~keep, lowest), dim=dim) / lambda_lse
    return scores.masked_fill(n_kept == 0, MIN_SCORE)


# --- references -----------------------------------------------------------------------------------------------------


def reference_cross_attention_scores(
    images: Encoded,
    captions: Encoded,
    *,
    direction: Direction,
    pooling: Pooling,
    lambda_softmax: float,
    lambda_lse: float,
) -> Tensor:
    """The reference for the fast path: SCAN's formulas transcribed directly, [n_images, n_captions].

    A Python loop over captions, each against every image at once, with the attended vectors materialised, as
    kuanghuei/SCAN `xattn_score_t2i` / `xattn_score_i2t`; padded regions and words are masked. Slow by design.
    """
    return _reference_scores(images, captions, direction, pooling, lambda_softmax, lambda_lse, threshold=None)


def reference_uarda_scores(
    images: Encoded, captions: Encoded, threshold: float, *, pooling: Pooling, lambda_softmax: float, lambda_lse: float
) -> Tensor:
    """The reference for UARDA's thresholded t2i scores (same loop as `reference_cross_attention_scores`)."""
    return _reference_scores(images, captions, "t2i", pooling, lambda_softmax, lambda_lse, threshold=threshold)


def _reference_scores(
    images: Encoded,
    captions: Encoded,
    direction: Direction,
    pooling: Pooling,
    lambda_softmax: float,
    lambda_lse: float,
    threshold: float | None,
) -> Tensor:
    n_img = len(images)
    columns = []
    for c in range(len(captions)):
        words = captions.local[c][captions.mask[c]]  # [n_word, E] the caption's real words
        words = words.expand(n_img, *words.shape)  # [n_img, n_word, E]
        all_words = torch.ones(words.shape[:2], dtype=torch.bool, device=words.device)
        if direction == "t2i":
            attended, keep = _reference_attention(
                words, images.local, all_words, images.mask, lambda_softmax, threshold
            )  # [n_img, n_word, E]
            relevance = _reference_cosine(words, attended)  # [n_img, n_word]
            if threshold is not None:  # a word with no region above t counts its shortfall max_i s_ij − t
                sims = torch.bmm(images.local, words.transpose(1, 2)).masked_fill(~images.mask[:, :, None], -torch.inf)
                relevance = torch.where(keep, relevance, sims.amax(dim=1) - threshold)  # [n_img, n_word]
                keep = all_words
        else:
            attended, _ = _reference_attention(images.local, words, images.mask, all_words, lambda_softmax, None)
            relevance = _reference_cosine(images.local, attended)  # [n_img, R]
            keep = images.mask
        columns.append(_reference_pool(relevance, keep, pooling, lambda_lse))
    return torch.stack(columns, dim=1)


def _reference_attention(
    query: Tensor,
    context: Tensor,
    query_mask: Tensor,
    context_mask: Tensor,
    lambda_softmax: float,
    threshold: float | None,
) -> tuple[Tensor, Tensor]:
    """SCAN `func_attention` with masks (and UARDA's threshold): the attended context of every query,
    [n, Lq, E], and which queries have any context to attend to, [n, Lq]."""
    weights, usable = attention_weights(query, context, query_mask, context_mask, lambda_softmax, threshold)
    return torch.bmm(weights, context), usable


def attention_weights(
    query: Tensor,
    context: Tensor,
    query_mask: Tensor,
    context_mask: Tensor,
    lambda_softmax: float,
    threshold: float | None = None,
) -> tuple[Tensor, Tensor]:
    """SCAN's attention of each query fragment over the context fragments (kuanghuei/SCAN `func_attention`, with
    masks and UARDA's threshold): weights α [n, Lq, Lc], each real query's row summing to 1 over the usable context
    (0 elsewhere), and which queries have any usable context, [n, Lq]. t2i: query = words, context = regions."""
    attn = torch.bmm(context, query.transpose(1, 2))  # [n, Lc, Lq]
    if threshold is not None:
        attn = attn - threshold
    usable = context_mask[:, :, None].expand_as(attn)  # [n, Lc, Lq]
    if threshold is not None:
        usable = usable & (attn > 0)
    attn = F.leaky_relu(attn, LEAKY_SLOPE) * query_mask[:, None, :]
    attn = l2norm(attn, dim=2).transpose(1, 2)  # [n, Lq, Lc], normalised over the queries
    attn = torch.softmax((lambda_softmax * attn).masked_fill(~usable.transpose(1, 2), float("-inf")), dim=2)
    has_context = usable.any(dim=1)  # [n, Lq]
    weights = torch.where((has_context & query_mask)[:, :, None], attn, 0.0)  # no NaN rows from empty softmaxes
    return weights, has_context


def _reference_cosine(x1: Tensor, x2: Tensor) -> Tensor:
    """SCAN `cosine_similarity` along the last axis."""
    return (x1 * x2).sum(-1) / (x1.norm(dim=-1) * x2.norm(dim=-1)).clamp(min=EPS)


def _reference_pool(relevance: Tensor, keep: Tensor, pooling: Pooling, lambda_lse: float) -> Tensor:
    """SCAN's AVG or LSE (`row_sim.mul_(lambda_lse).exp_()...log()/lambda_lse`) over the kept entries, [n]."""
    n_kept = keep.sum(dim=1)
    if pooling == "avg":
        scores = torch.where(keep, relevance, 0).sum(dim=1) / n_kept
    else:
        scores = torch.log(torch.where(keep, torch.exp(lambda_lse * relevance), 0).sum(dim=1)) / lambda_lse
    return torch.where(n_kept > 0, scores, MIN_SCORE)


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
