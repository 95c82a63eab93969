"""Encoders shared by the matchers: bottom-up regions and GRU captions into the joint space, plus masked helpers.

Both follow kuanghuei/SCAN `model.py` (`EncoderImagePrecomp`, `EncoderText`) and fartashf/vsepp `model.py`: one
linear layer per region with Xavier-uniform weights, a word embedding initialised uniformly in ±0.1 feeding a
one-layer GRU, and every output L2-normalised so that dot products are cosines.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itm.data.batches import Captions, Regions
from itm.models.base import Encoded

EPS = 1e-8  # SCAN's eps in l2norm and cosine_similarity


def l2norm(x: Tensor, dim: int = -1, eps: float = EPS) -> Tensor:
    """x / (‖x‖ + eps) along `dim` (SCAN `l2norm`); the norm is taken in at least fp32, so zero (padding) vectors
    stay zero under fp16 instead of becoming NaN. Returns `x`'s dtype."""
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    return (x / (norm + eps)).to(x.dtype)


def masked_mean(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Mean of `x` over `dim` counting only positions where `mask` (x's shape without the trailing feature axis,
    or x's shape) is True; an all-False slice gives 0."""
    weights = mask.to(x.dtype)
    if weights.dim() < x.dim():
        weights = weights.unsqueeze(-1)
    return (x * weights).sum(dim) / weights.sum(dim).clamp_min(1)


class RegionEncoder(nn.Module):
    """Bottom-up region features [B, R, D] to unit region vectors [B, R, E] and a unit image vector [B, E].

    `pool_first`: the image vector is the projection of the mean region feature (VSE++ on BUTD features:
    mean-pool the 36 regions, then project); otherwise it is the normalised mean of the region vectors.
    Padded regions come out as zero vectors.
    """

    def __init__(self, feature_dim: int, embed_dim: int, *, pool_first: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(feature_dim, embed_dim)
        self.pool_first = pool_first
        # SCAN EncoderImagePrecomp.init_weights: Xavier uniform r = sqrt(6) / sqrt(in + out), bias 0
        bound = math.sqrt(6.0) / math.sqrt(feature_dim + embed_dim)
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def forward(self, regions: Regions) -> Encoded:
        features = regions.features.to(self.fc.weight.dtype)  # [B, R, D]; the store holds fp16
        mask = regions.mask  # [B, R]
        local = l2norm(self.fc(features)).masked_fill(~mask[..., None], 0)  # [B, R, E]
        if self.pool_first:
            pooled = l2norm(self.fc(masked_mean(features, mask, dim=1)))  # [B, E]
        else:
            pooled = l2norm(masked_mean(local, mask, dim=1))  # [B, E]
        return Encoded(local, mask, pooled)


class TextEncoder(nn.Module):
    """Token ids [B, L] to unit word vectors [B, L, E] and a unit caption vector [B, E] with a one-layer GRU.

    Bidirectional: each word is the average of its forward and backward states (SCAN `EncoderText`), and the
    caption vector averages the forward state at the last word with the backward state at the first word.
    Unidirectional: the caption vector is the state at the last word (VSE++). Padded words come out as zeros.
    """

    def __init__(
        self, vocab_size: int, word_dim: int, embed_dim: int, *, bidirectional: bool, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.dropout = nn.Dropout(dropout)  # on the word embeddings, in training only (CVSE: 0.4; SCAN: none)
        self.gru = nn.GRU(word_dim, embed_dim, num_layers=1, batch_first=True, bidirectional=bidirectional)
        self.embed_dim = embed_dim
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, captions: Captions) -> Encoded:
        tokens, mask = captions.tokens, captions.mask  # [B, L], [B, L]
        words = self.dropout(self.embed(tokens))  # [B, L, W]
        packed = pack_padded_sequence(words, captions.lengths.cpu(), batch_first=True, enforce_sorted=False)
        output, last = self.gru(packed)  # last: [directions, B, E], in input order
        states, _ = pad_packed_sequence(output, batch_first=True, total_length=tokens.shape[1])  # [B, L, dirs * E]
        if self.gru.bidirectional:
            states = (states[..., : self.embed_dim] + states[..., self.embed_dim :]) / 2  # [B, L, E]
            # the backward direction's final state is its output at the first word
            final = (last[0] + last[1]) / 2  # [B, E]
        else:
            final = last[0]  # [B, E] = output at the last real word (VSE++ gathers it at lengths - 1)
        local = l2norm(states).masked_fill(~mask[..., None], 0)
        return Encoded(local, mask, l2norm(final))
