"""VSE∞ (Chen et al., CVPR 2021, "Learning the Best Pooling Strategy for Visual Semantic Embedding"): one vector
per image and per caption, each pooled from its fragments by the Generalized Pooling Operator (GPO); cosine
similarity, so retrieval is one matrix product.

Transcribed from woodfrog/vse_infty, branch `bigru` (BUTD regions + bi-GRU, the configuration of its released
region models):

- image (`lib/encoders.py` `EncoderImageAggr`, precomp_enc_type 'basic'): each region x ↦ fc(x) + MLP(x), the MLP
  (`lib/modules/mlp.py` `MLP(img_dim, embed_size // 2, embed_size, 2)`) being Linear → BatchNorm1d → ReLU → Linear;
  the fc is Xavier-uniform with zero bias, the MLP keeps torch's default initialisation;
- text (`EncoderText`): word embedding (uniform ±0.1) → one-layer bi-GRU, the two directions averaged;
- pooling (`lib/modules/aggr/gpo.py` `GPO(32, 32)`): for a set of n fragments, the sinusoidal position encodings of
  positions 0..n-1 run through a small bi-GRU (directions averaged) and a bias-free linear layer to one score per
  position; θ = softmax(score / 0.1) over the n positions; each feature dimension's values are sorted in descending
  order over the n fragments and v = Σ_k θ_k · sorted_k. Padded positions get score -10000 and are sorted last as
  -10000, then zeroed;
- both pooled vectors are L2-normalised (`l2norm`, eps 1e-8); the loss is VSE++'s hinge (`lib/loss.py`), summed.

Training augmentations, which VSE∞ applies in its data loader (`lib/datasets/image_caption.py`), are done here inside
the encoders with torch's RNG, in training mode only, so the data loaders stay generic:

- regions (`PrecompRegionDataset.__getitem__`): each region is kept when u > 0.2, u ~ U(0, 1) (`region_drop`); the
  kept regions move to the front and the batch is zero-padded to its largest kept count, as `collate_fn` pads;
- words (`process_caption(vocab, caption, drop=True)`): every token of the framed caption (<start> and <end>
  included) is picked with probability 0.2 (`word_augment`); a picked token becomes <mask> with probability 0.5,
  a uniformly random id (any row of the embedding, <pad> and <mask> included: `random.randrange(len(vocab))`)
  with probability 0.1, and is deleted with probability 0.4. <mask> is the row VSE∞ appends to its vocabulary
  (`train.py`: `vocab.add_word('<mask>')`): the embedding has vocab_size + 1 rows, <mask> the last.

Where VSE∞'s code would fail we keep going: an image or caption whose every fragment was dropped keeps one (the
region with the largest draw, the first token). Its unidirectional GRU would average the two halves of one direction's
state; ours then uses the state itself (`bidirectional: false`). The MLP's BatchNorm normalises, in training, every
row of the padded region batch (`batchnorm_rows: padded`, VSE∞'s code: its padding rows are zeros, so the batch
statistics depend on how much padding the batch holds) or the real regions only (`regions`); in evaluation both
use the running statistics and give the same vectors.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itm.config import VseInftyParams
from itm.data.batches import Captions, Regions
from itm.models.base import Encoded, Matcher
from itm.models.encoders import l2norm
from itm.models.losses import ContrastiveLoss
from itm.models.registry import MatcherInputs, register_matcher
from itm.models.similarity import CosineScorer

GPO_TEMPERATURE = 0.1  # gpo.py: torch.softmax(scores / 0.1, 1)
GPO_PADDING = -10000.0  # gpo.py: the score of a padded position, and a padded feature's value while sorting
# process_caption: of the picked tokens, [0, 0.5) become <mask>, [0.5, 0.6) a random id, [0.6, 1) are deleted
WORD_MASK_SHARE, WORD_RANDOM_SHARE = 0.5, 0.1
BatchNormRows = Literal["padded", "regions"]


def positional_encoding_1d(dim: int, length: int) -> Tensor:
    """[length, dim] sinusoidal encodings of positions 0..length-1 (gpo.py `positional_encoding_1d`, fp32 on the
    CPU): even columns sin(p · 10000^(-2i/dim)), odd columns cos of the same."""
    if dim % 2:
        raise ValueError(f"sin/cos position encodings need an even size, got {dim}")
    encoding = torch.zeros(length, dim)
    position = torch.arange(0, length).unsqueeze(1).float()  # [length, 1]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float) * -(math.log(10000.0) / dim))  # [dim / 2]
    encoding[:, 0::2] = torch.sin(position * frequency)
    encoding[:, 1::2] = torch.cos(position * frequency)
    return encoding


def _average_directions(states: Tensor, bidirectional: bool) -> Tensor:
    """[B, N, dirs * H] GRU outputs to [B, N, H]: the mean of the two directions (VSE∞ `EncoderText` and `GPO`)."""
    if not bidirectional:
        return states
    half = states.shape[-1] // 2
    return (states[..., :half] + states[..., half:]) / 2


def length_mask(lengths: Tensor, n: int) -> Tensor:
    """[B, n] True at positions below each length."""
    return torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]


class GeneralizedPooling(nn.Module):
    """VSE∞'s GPO (gpo.py): a learned weighting of each dimension's sorted values, [B, N, D] -> [B, D].

    The weights depend only on the number of fragments n (position encodings through a bi-GRU), so one set serves
    every dimension; features must be packed at the front (fragment k < n real), as `lengths` [B] says.
    """

    def __init__(self, pe_dim: int, hidden_dim: int) -> None:
        super().__init__()
        if pe_dim % 2:
            raise ValueError(f"the GPO's position encoding size must be even, got {pe_dim}")
        self.pe_dim, self.hidden_dim = pe_dim, hidden_dim
        self.gru = nn.GRU(pe_dim, hidden_dim, 1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(hidden_dim, 1, bias=False)
        self._encodings: dict[int, Tensor] = {}  # length -> [length, pe_dim] on the CPU (gpo.py `pe_database`)

    def encodings(self, length: int) -> Tensor:
        """[length, pe_dim] position encodings, computed once per length."""
        if length not in self._encodings:
            self._encodings[length] = positional_encoding_1d(self.pe_dim, length)
        return self._encodings[length]

    def pool_weights(self, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """θ [B, n, 1] (each row's weights sum to 1 over its real positions, 0 beyond) and the mask [B, n, 1], with
        n the longest length (gpo.py `compute_pool_weights`)."""
        n = int(lengths.max())
        mask = length_mask(lengths, n).unsqueeze(-1)  # [B, n, 1]
        encodings = self.encodings(n).to(lengths.device).expand(len(lengths), n, self.pe_dim)
        encodings = encodings.masked_fill(~mask, 0)  # [B, n, pe_dim]
        packed = pack_padded_sequence(encodings, lengths.cpu(), batch_first=True, enforce_sorted=False)
        states, _ = self.gru(packed)
        states, _ = pad_packed_sequence(states, batch_first=True, total_length=n)  # [B, n, 2 * hidden]
        scores = self.linear(_average_directions(states, bidirectional=True)).masked_fill(~mask, GPO_PADDING)
        return torch.softmax(scores / GPO_TEMPERATURE, dim=1), mask

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """The pooled vectors [B, D] of `features` [B, N, D] with `lengths` [B] (each ≥ 1), and θ [B, n, 1]."""
        weights, mask = self.pool_weights(lengths)
        features = features[:, : mask.shape[1]]  # [B, n, D]
        ranked = features.masked_fill(~mask, GPO_PADDING).sort(dim=1, descending=True).values
        ranked = ranked.masked_fill(~mask, 0)  # [B, n, D] each dimension's values, largest first
        return (ranked * weights).sum(dim=1), weights


class RegionMlp(nn.Module):
    """VSE∞ `MLP(img_dim, embed_size // 2, embed_size, num_layers=2)` on [M, D] rows: Linear → BatchNorm1d → ReLU →
    Linear. (Their module also builds a BatchNorm1d after the last layer that its forward never applies; a
    converted checkpoint leaves it out.)"""

    def __init__(self, feature_dim: int, hidden_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(feature_dim, hidden_dim), nn.Linear(hidden_dim, embed_dim)])
        self.norm = nn.BatchNorm1d(hidden_dim)

    def forward(self, rows: Tensor) -> Tensor:
        return self.layers[1](torch.relu(self.norm(self.layers[0](rows))))


def drop_regions(mask: Tensor, draws: Tensor, probability: float) -> Tensor:
    """[B, R] the regions kept by size augmentation: real ones whose draw (U(0, 1)) is above `probability`
    (VSE∞ `PrecompRegionDataset`: `image[np.where(rand_list > 0.20)]`); an image with real regions but none kept
    keeps the one with the largest draw."""
    keep = mask & (draws > probability)
    emptied = ~keep.any(dim=1) & mask.any(dim=1)  # [B]
    if bool(emptied.any()):
        best = draws.masked_fill(~mask, -1.0).argmax(dim=1)  # [B]
        keep = keep | (emptied[:, None] & (torch.arange(mask.shape[1], device=mask.device)[None, :] == best[:, None]))
    return keep


def compact(values: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """The kept entries of `values` [B, N, ...] moved to the front in their order, cut to the largest kept count
    (at least 1), the rest zero; and their mask [B, n]. As VSE∞'s loader drops entries and `collate_fn` pads."""
    counts = keep.sum(dim=1)  # [B]
    n = max(int(counts.max()), 1)
    order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :n]  # kept first, in order: [B, n]
    index = order.reshape(*order.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    mask = length_mask(counts, n)  # [B, n]
    kept = values.gather(1, index)
    return kept.masked_fill(~mask.reshape(*mask.shape, *([1] * (values.dim() - 2))), 0), mask


def augment_words(
    tokens: Tensor, lengths: Tensor, draws: Tensor, random_ids: Tensor, probability: float, mask_id: int
) -> tuple[Tensor, Tensor]:
    """VSE∞'s word augmentation (`process_caption(..., drop=True)`) of token ids [B, L] with `lengths` [B], given
    one draw u ~ U(0, 1) [B, L] and one random id [B, L] per position: a real token with u < p is picked; with
    v = u / p it becomes `mask_id` (v < 0.5), its random id (v < 0.6), or is deleted. Returns the new ids, packed
    at the front and zero-padded, and their lengths; a caption that loses every token keeps its first."""
    real = length_mask(lengths, tokens.shape[1])  # [B, L]
    picked = real & (draws < probability)
    share = draws / probability
    masked = picked & (share < WORD_MASK_SHARE)
    replaced = picked & (share >= WORD_MASK_SHARE) & (share < WORD_MASK_SHARE + WORD_RANDOM_SHARE)
    deleted = picked & (share >= WORD_MASK_SHARE + WORD_RANDOM_SHARE)
    tokens = torch.where(replaced, random_ids, tokens).masked_fill(masked, mask_id)
    keep = real & ~deleted
    keep[:, 0] |= real[:, 0] & ~keep.any(dim=1)
    packed, _ = compact(tokens, keep)
    return packed, keep.sum(dim=1)


class AggregatedRegionEncoder(nn.Module):
    """VSE∞ `EncoderImageAggr` ('basic'): regions [B, R, D] to fc(x) + MLP(x) per region, GPO-pooled, normalised.

    Returns the unit region vectors (the kept ones, packed at the front) and the unit pooled vector [B, E].
    """

    def __init__(
        self,
        feature_dim: int,
        embed_dim: int,
        *,
        pe_dim: int,
        hidden_dim: int,
        region_drop: float,
        batchnorm_rows: BatchNormRows,
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(feature_dim, embed_dim)
        self.mlp = RegionMlp(feature_dim, embed_dim // 2, embed_dim)
        self.gpool = GeneralizedPooling(pe_dim, hidden_dim)
        self.region_drop, self.batchnorm_rows = region_drop, batchnorm_rows
        # EncoderImageAggr.init_weights: Xavier uniform r = sqrt(6) / sqrt(in + out), bias 0
        bound = math.sqrt(6.0) / math.sqrt(feature_dim + embed_dim)
        nn.init.uniform_(self.fc.weight, -bound, bound)
        nn.init.zeros_(self.fc.bias)

    def forward(self, regions: Regions) -> Encoded:
        keep = regions.mask  # [B, R]
        if self.training and self.region_drop > 0:
            keep = drop_regions(keep, torch.rand(keep.shape, device=keep.device), self.region_drop)
        return self.encode(regions.features, keep)

    def encode(self, features: Tensor, keep: Tensor) -> Encoded:
        """Encode the regions `keep` [B, R] of `features` [B, R, D] (packed at the front, zero-padded)."""
        features, mask = compact(features.to(self.fc.weight.dtype), keep)  # [B, n, D], [B, n]
        embedded = self.embed(features, mask)  # [B, n, E]
        pooled, _ = self.gpool(embedded, mask.sum(dim=1).clamp_min(1))
        local = l2norm(embedded).masked_fill(~mask[..., None], 0)
        return Encoded(local, mask, l2norm(pooled))

    def embed(self, features: Tensor, mask: Tensor) -> Tensor:
        """fc(x) + MLP(x) per region; in training, the BatchNorm's statistics over `batchnorm_rows`."""
        if self.batchnorm_rows == "regions":
            rows = features[mask]  # [M, D] the real regions
            embedded = features.new_zeros(*mask.shape, self.fc.out_features)
            embedded[mask] = (self.fc(rows) + self.mlp(rows)).to(embedded.dtype)
            return embedded
        flat = features.reshape(-1, features.shape[-1])  # [B * n, D] every row of the padded batch
        return (self.fc(flat) + self.mlp(flat)).reshape(*mask.shape, -1)


class GpoTextEncoder(nn.Module):
    """VSE∞ `EncoderText` (branch bigru): word embedding → GRU (directions averaged) → GPO → L2 norm.

    The embedding has `vocab_size + 1` rows: the last is VSE∞'s <mask> token, used by the word augmentation.
    Returns the unit word vectors (after augmentation) and the unit pooled vector [B, E].
    """

    def __init__(
        self,
        vocab_size: int,
        word_dim: int,
        embed_dim: int,
        *,
        bidirectional: bool,
        pe_dim: int,
        hidden_dim: int,
        word_augment: float,
    ) -> None:
        super().__init__()
        self.mask_id = vocab_size
        self.embed = nn.Embedding(vocab_size + 1, word_dim)
        self.gru = nn.GRU(word_dim, embed_dim, 1, batch_first=True, bidirectional=bidirectional)
        self.gpool = GeneralizedPooling(pe_dim, hidden_dim)
        self.word_augment = word_augment
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)  # EncoderText.init_weights

    def forward(self, captions: Captions) -> Encoded:
        tokens, lengths = captions.tokens, captions.lengths  # [B, L], [B]
        if self.training and self.word_augment > 0:
            draws = torch.rand(tokens.shape, device=tokens.device)
            random_ids = torch.randint(0, self.embed.num_embeddings, tokens.shape, device=tokens.device)
            tokens, lengths = augment_words(tokens, lengths, draws, random_ids, self.word_augment, self.mask_id)
        return self.encode(tokens, lengths)

    def encode(self, tokens: Tensor, lengths: Tensor) -> Encoded:
        """Encode token ids [B, L] of `lengths` [B] (each ≥ 1)."""
        words = self.embed(tokens)  # [B, L, W]
        packed = pack_padded_sequence(words, lengths.cpu(), batch_first=True, enforce_sorted=False)
        output, _ = self.gru(packed)
        states, _ = pad_packed_sequence(output, batch_first=True)  # [B, n, dirs * E], n = longest
        states = _average_directions(states, self.gru.bidirectional)  # [B, n, E]
        pooled, _ = self.gpool(states, lengths.to(states.device))
        mask = length_mask(lengths.to(states.device), states.shape[1])
        local = l2norm(states).masked_fill(~mask[..., None], 0)
        return Encoded(local, mask, l2norm(pooled))


@register_matcher("vse_infty")
def build_vse_infty(params: VseInftyParams, inputs: MatcherInputs) -> Matcher:
    """VSE∞ on bottom-up regions with a bi-GRU (woodfrog/vse_infty branch bigru `lib/vse.py` `VSEModel`)."""
    return Matcher(
        image_encoder=AggregatedRegionEncoder(
            inputs.feature_dim,
            params.embed_dim,
            pe_dim=params.gpo_pe_dim,
            hidden_dim=params.gpo_hidden_dim,
            region_drop=params.region_drop,
            batchnorm_rows=params.batchnorm_rows,
        ),
        text_encoder=GpoTextEncoder(
            inputs.vocab_size,
            params.word_dim,
            params.embed_dim,
            bidirectional=params.bidirectional,
            pe_dim=params.gpo_pe_dim,
            hidden_dim=params.gpo_hidden_dim,
            word_augment=params.word_augment,
        ),
        scorer=CosineScorer(),
        loss=ContrastiveLoss(params.margin, params.max_violation),
    )
