"""CVSE (Wang et al., ECCV 2020) and MH-CVSE (Chen, arXiv 2412.19184): consensus-aware visual-semantic embedding.

Each modality gets an instance embedding (its regions or words pooled by attention guided by their mean, the
"memory") and a consensus embedding (a mixture of GCN concept embeddings weighted by the concept scores the
instance predicts); the two are fused. Training ranks the fused, instance and consensus embeddings with the VSE++
hinge and pulls the visual concept distribution towards the textual one (KL); the textual one mixes in the caption's
ground-truth concepts with weight β (image-level labels in training, the caption's own words at retrieval).
Retrieval scores S = w cos(fused) + (1 − w) cos(consensus). Formulas and defaults: BruceW91/CVSE (methods.md §2.4).

Where this differs from CVSE's code, on purpose:
- CVSE's visual attention normalises with BatchNorm1d(36) over region *slots* (hard-wired to 36 regions); here, by
  default (`region_norm: features`), BatchNorm runs over the embedding features of the real regions only, so any
  region count works and padding is ignored. `region_norm: slots` is CVSE's layout (a BatchNorm1d over
  `region_slots` slots; an image with another number of regions is refused), which CVSE's weights need;
- CVSE averages word vectors over the padded length for the textual memory and softmaxes over padding; here both
  are masked. Neither changes a score: the memory is L2-normalised, so its scale does not matter, and padded words
  are zero vectors, so their softmax weights only shrink every real word's weight by one factor per caption, which
  the L2 normalisation of the pooled vector removes;
- the `concat` and `adap_sum` fusions work (itm.models.consensus.Fusion);
- the GCN's inputs are fixed random vectors unless `glove_path` names a GloVe file (CVSE ships GloVe vectors),
  read by the caller (`itm.models.registry.inputs_for_training`);
  word embeddings start random as in SCAN (CVSE loads GloVe for them too);
- one learning rate for every part (CVSE decays the GCN's by 0.2 instead of 0.1 at its step);
- a caption's concepts are the data's labels (`caption_concepts: labels`: the tokenize stage's concept vocabulary,
  image-level in training, the caption's own words at retrieval); `caption_concepts: words` is CVSE's test loader
  for a converted checkpoint: the caption's word ids through the model's own word → concept table (its vocabulary's
  words and its concept words matched by WordNet noun lemma, itm/train/published/cvse.py), no labels read.
Everything else at retrieval is CVSE's computation: the region and word encoders, the attention (dropout off),
`gen_adj`'s D^-½ Aᵀ D^-½ graph, the GCN, the concept scores (BatchNorm with running statistics), the consensus
embeddings, the weight_sum fusion with the test α, and S = 0.95 cos(fused) + 0.05 cos(consensus); tests/
test_published_cvse.py checks a converted checkpoint's scores against a transcription of CVSE's code.

MH-CVSE's full text was not available (methods.md §2.5: abstract and a review only). Its choices here:
- instance attention: `nn.MultiheadAttention` with `heads` heads, each with its own Q/K/V projections, the memory
  vector as the query and the fragments as keys and values, padding masked: CVSE's single-head memory-guided
  attention (which CVSE calls self-attention) widened to several heads, followed by the output projection and
  L2 normalisation;
- dynamic loss weights: Dynamic Weight Average (Liu, Johns, Davison, CVPR 2019, Eq. 7). After each epoch t,
  λ_k = K exp(r_k / T) / Σ_i exp(r_i / T) with r_k = L_k(t) / L_k(t − 1), the ratio of term k's epoch-mean loss
  to the previous epoch's (λ = 1 for the first two epochs); term k's weight is its CVSE weight × λ_k. A term
  whose loss falls slowly gains weight, one that falls fast loses it. Chosen because it is computed from the loss
  values alone, as the abstract describes, costs no extra backward pass (GradNorm needs per-term gradients), and
  uses ratios, so the summed hinge's dependence on batch size does not matter; the λ average to 1, so CVSE's
  weights keep setting the overall balance. `loss_weighting: fixed` keeps CVSE's weights;
- learning rate: cosine annealing to 0 over the matcher's epochs (`schedule: cosine`, the shared loop's schedule);
- everything else (graph, GCN, concept scores, fusion, KL, retrieval score) is CVSE's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itm.config import CvseParams, MhCvseParams
from itm.data.batches import Captions, Regions
from itm.data.concepts import Concepts
from itm.errors import UserError
from itm.models.base import Encoded, Matcher
from itm.models.consensus import (
    ConceptGCN,
    ConceptPredictor,
    Fusion,
    concept_adjacency,
    concept_kl,
    consensus_embedding,
    label_distribution,
)
from itm.models.encoders import RegionEncoder, TextEncoder, l2norm, masked_mean
from itm.models.losses import ContrastiveLoss
from itm.models.registry import MatcherInputs, register_matcher

log = logging.getLogger(__name__)

CONCEPT_INPUT_SEED = 0  # random concept inputs are the same for every run


# --- instance level --------------------------------------------------------------------------------------------------


class MemoryAttention(nn.Module):
    """CVSE's single-modal attention (`V_single_modal_atten`, `T_single_modal_atten`): fragments x [B, N, E]
    pooled with weights guided by a memory vector m [B, E]:

        W_x = Drop(tanh(BN(fc_x x))),  W_m = Drop(tanh(BN(fc_m m))),  a = softmax_N(fc_a(W_x ⊙ W_m)),
        x_inst = l2norm(Σ_n a_n x_n)

    BatchNorm only with `batch_norm` (CVSE: visual side only): over the real fragments' features, or with `slots`
    CVSE's `BatchNorm1d(36)` over the fragment slots (one mean and variance per slot, every item exactly `slots`
    fragments).
    """

    def __init__(self, embed_dim: int, *, dropout: float, batch_norm: bool, slots: int | None = None) -> None:
        super().__init__()
        self.fragment = nn.Linear(embed_dim, embed_dim)
        self.memory = nn.Linear(embed_dim, embed_dim)
        self.score = nn.Linear(embed_dim, 1)
        self.slots = slots if batch_norm else None
        self.fragment_norm = nn.BatchNorm1d(self.slots or embed_dim) if batch_norm else None
        self.memory_norm = nn.BatchNorm1d(embed_dim) if batch_norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)

    def forward(self, fragments: Tensor, mask: Tensor, memory: Tensor) -> Tensor:
        projected = self.fragment(fragments)  # [B, N, E]
        if self.fragment_norm is not None and self.slots is not None:
            _check_slots(mask, self.slots)
            projected = self.fragment_norm(projected)  # [B, slots, E], normalised per slot (CVSE)
        elif self.fragment_norm is not None:
            normalised = torch.zeros_like(projected)
            normalised[mask] = self.fragment_norm(projected[mask]).to(projected.dtype)
            projected = normalised
        keys = self.dropout(torch.tanh(projected))  # [B, N, E]
        query = self.dropout(torch.tanh(self.memory_norm(self.memory(memory))))  # [B, E]
        logits = self.score(keys * query[:, None, :]).squeeze(-1).float()  # [B, N]
        weights = F.softmax(logits.masked_fill(~mask, float("-inf")), dim=1)  # [B, N]
        return l2norm((weights[..., None].to(fragments.dtype) * fragments).sum(dim=1))


def _check_slots(mask: Tensor, slots: int) -> None:
    """Refuse a batch whose items do not all have exactly `slots` regions (CVSE's region-slot BatchNorm)."""
    counts = mask.sum(dim=1)  # [B]
    wrong = (counts != slots).nonzero()
    if mask.shape[1] != slots or len(wrong):
        count = int(counts[wrong[0, 0]]) if len(wrong) else mask.shape[1]
        raise UserError(
            f"region_norm 'slots' normalises each of {slots} region slots, but an image has {count} regions: extract "
            f"exactly {slots} per image (regions.min_boxes = regions.max_boxes = {slots}) or use region_norm 'features'"
        )


class MultiHeadMemoryAttention(nn.Module):
    """MH-CVSE's instance attention: the memory vector queries the fragments through `heads` attention heads, each
    with its own Q/K/V projections (`nn.MultiheadAttention`), padding masked; the heads' outputs are concatenated,
    projected and L2-normalised."""

    def __init__(self, embed_dim: int, *, heads: int, dropout: float) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(embed_dim, heads, dropout=dropout, batch_first=True)

    def forward(self, fragments: Tensor, mask: Tensor, memory: Tensor) -> Tensor:
        attended, _ = self.attention(
            memory[:, None, :], fragments, fragments, key_padding_mask=~mask, need_weights=False
        )  # [B, 1, E]
        return l2norm(attended[:, 0])


InstanceAttention = MemoryAttention | MultiHeadMemoryAttention


# --- the two encoders ------------------------------------------------------------------------------------------------


class ConsensusImageEncoder(nn.Module):
    """Regions → instance, consensus and fused embeddings; `pooled` is the fused one, `extras` hold the instance
    and consensus embeddings and the visual concept log-probabilities."""

    def __init__(
        self, regions: RegionEncoder, attention: InstanceAttention, graph: ConceptGCN, predictor: ConceptPredictor,
        fusion: Fusion,
    ) -> None:  # fmt: skip
        super().__init__()
        self.regions, self.attention, self.graph = regions, attention, graph
        self.predictor, self.fusion = predictor, fusion

    def forward(self, regions: Regions) -> Encoded:
        encoded = self.regions(regions)  # unit region vectors [B, R, E]
        memory = masked_mean(encoded.local, encoded.mask, dim=1)  # CVSE: the plain mean of the region vectors
        instance = self.attention(encoded.local, encoded.mask, memory)  # [B, E]
        concepts = self.graph()  # [K, E]
        log_probs = self.predictor(instance, concepts)  # [B, K]
        consensus = consensus_embedding(log_probs.exp(), concepts)
        extras = {"instance": instance, "consensus": consensus, "concept_log_probs": log_probs}
        return Encoded(encoded.local, encoded.mask, self.fusion(instance, consensus), extras)


class ConsensusTextEncoder(nn.Module):
    """Captions (with their concept labels) → instance, consensus and fused embeddings; the textual concept
    distribution is β softmax(s y) + (1 − β) p, the predicted p mixed with the labels y (CVSE `input_modal ==
    'textual'`).

    With `word_concepts` [V] (each word id's concept id, −1 for none), `concept_ids` labels captions by their own
    words, looked up there: the matcher's labeller (`Matcher.labeller`), whose labels the data loaders attach as
    `Captions.concepts` instead of the tokenize stage's, so that CVSE's transductive completion can complete them
    as it completes any labels (a converted CVSE checkpoint: CVSE labels a test caption by its words' WordNet lemmas,
    itm/train/published/cvse.py).
    """

    word_concepts: Tensor | None

    def __init__(
        self, words: TextEncoder, attention: InstanceAttention, graph: ConceptGCN, predictor: ConceptPredictor,
        fusion: Fusion, *, label_ratio: float, word_concepts: Tensor | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.words, self.attention, self.graph = words, attention, graph
        self.predictor, self.fusion = predictor, fusion
        self.label_ratio = label_ratio
        self.register_buffer("word_concepts", word_concepts)

    def forward(self, captions: Captions) -> Encoded:
        if captions.concepts is None:
            raise ValueError("a consensus-aware matcher needs the captions' concept labels (Captions.concepts)")
        encoded = self.words(captions)  # unit word vectors [B, L, E]
        memory = l2norm(masked_mean(encoded.local, encoded.mask, dim=1))  # CVSE: the normalised mean of the words
        instance = self.attention(encoded.local, encoded.mask, memory)  # [B, E]
        concepts = self.graph()  # [K, E]
        predicted = self.predictor(instance, concepts).exp()  # [B, K]
        labels = label_distribution(captions.concepts, self.predictor.smoothing)
        probs = self.label_ratio * labels + (1 - self.label_ratio) * predicted
        consensus = consensus_embedding(probs, concepts)
        extras = {"instance": instance, "consensus": consensus, "concept_probs": probs}
        return Encoded(encoded.local, encoded.mask, self.fusion(instance, consensus), extras)

    def concept_ids(self, token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """Each caption's concepts, ascending: those of its words in `word_concepts` (words of none left out)."""
        if self.word_concepts is None:
            raise ValueError("this text encoder has no word -> concept table; its captions carry their labels")
        table = self.word_concepts.cpu().tolist()
        return [sorted({table[token] for token in tokens} - {-1}) for tokens in token_ids]


# --- scoring and loss ------------------------------------------------------------------------------------------------


class ConsensusScorer(nn.Module):
    """S = w cos(fused_v, fused_t) + (1 − w) cos(consensus_v, consensus_t), [n_images, n_captions] (CVSE
    `i2t_sep_sim` / `t2i_sep_sim`, `weight_fused` 0.95)."""

    def __init__(self, fused_weight: float) -> None:
        super().__init__()
        self.fused_weight = fused_weight

    def forward(self, images: Encoded, captions: Encoded) -> Tensor:
        fused = images.pooled @ captions.pooled.T
        consensus = images.extras["consensus"] @ captions.extras["consensus"].T
        return self.fused_weight * fused + (1 - self.fused_weight) * consensus


LOSS_TERMS = ("fused", "instance", "consensus", "kl")


class ConsensusLoss(nn.Module):
    """w_f L_rank(fused) + w_i L_rank(instance) + w_c L_rank(consensus) + w_kl KL(p_t ‖ p_v) (CVSE `forward_loss`,
    weights [3, 5, 1, 2]); L_rank is the VSE++ hinge on cosine similarities.

    `weighting`: `fixed` keeps `weights`; `dwa` multiplies them by Dynamic Weight Average factors recomputed after
    each epoch (see the module docstring). The epoch's running sums, the last two epoch means and the current
    weights are buffers, so they are saved with the model and a resumed run continues with them.
    """

    weights: Tensor
    prior: Tensor
    running: Tensor
    history: Tensor
    epochs: Tensor

    def __init__(
        self, margin: float, max_violation: bool, weights: tuple[float, ...], *, weighting: str, temperature: float
    ) -> None:
        super().__init__()
        if weighting not in ("fixed", "dwa"):
            raise ValueError(f"loss weighting must be 'fixed' or 'dwa', got {weighting!r}")
        self.ranking = ContrastiveLoss(margin, max_violation)
        self.weighting, self.temperature = weighting, temperature
        self.register_buffer("prior", torch.tensor(weights, dtype=torch.float32))
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))
        self.register_buffer("running", torch.zeros(len(LOSS_TERMS) + 1, dtype=torch.float64))  # sums, batches
        self.register_buffer("history", torch.zeros(2, len(LOSS_TERMS), dtype=torch.float64))  # [previous, last]
        self.register_buffer("epochs", torch.zeros((), dtype=torch.int64))

    def forward(self, scores: Tensor, images: Encoded, captions: Encoded) -> dict[str, Tensor]:
        fused = self.ranking(images.pooled @ captions.pooled.T)
        terms = {
            "fused": fused["loss"],
            "instance": self.ranking(images.extras["instance"] @ captions.extras["instance"].T)["loss"],
            "consensus": self.ranking(images.extras["consensus"] @ captions.extras["consensus"].T)["loss"],
            "kl": concept_kl(images.extras["concept_log_probs"], captions.extras["concept_probs"]),
        }
        values = torch.stack([terms[name] for name in LOSS_TERMS])  # [4]
        if self.training:
            with torch.no_grad():
                self.running[:-1] += values.detach().double()
                self.running[-1] += 1
        total = (self.weights.to(values.dtype) * values).sum()
        named = {f"loss_{name}": value for name, value in terms.items()}
        return {"loss": total, **named, "loss_i2t": fused["loss_i2t"], "loss_t2i": fused["loss_t2i"]}

    @torch.no_grad()
    def end_epoch(self) -> dict[str, float]:
        """Close the epoch's running means; under `dwa` set the next epoch's weights. Returns the weights in use."""
        if self.running[-1] > 0:
            means = self.running[:-1] / self.running[-1]
            self.history[0], self.history[1] = self.history[1].clone(), means
            self.epochs += 1
        self.running.zero_()
        if self.weighting == "dwa" and self.epochs >= 2:
            self.weights.copy_(self.prior * dwa_factors(self.history[1], self.history[0], self.temperature).float())
        return {f"weight_{name}": float(weight) for name, weight in zip(LOSS_TERMS, self.weights, strict=True)}


def dwa_factors(last: Tensor, previous: Tensor, temperature: float) -> Tensor:
    """Dynamic Weight Average (Liu et al., CVPR 2019, Eq. 7): K softmax(r / T) with r_k = last_k / previous_k."""
    ratios = last / previous.clamp_min(torch.finfo(previous.dtype).tiny)
    return len(ratios) * F.softmax(ratios / temperature, dim=0)


# --- builders --------------------------------------------------------------------------------------------------------


def concept_inputs(concepts: Concepts, dim: int, word_vectors: Mapping[str, np.ndarray]) -> Tensor:
    """[K, dim] GCN inputs: the pretrained (GloVe) vector of each concept in `word_vectors`, a fixed random
    N(0, 1) vector for the others (all of them when there are no word vectors)."""
    generator = torch.Generator().manual_seed(CONCEPT_INPUT_SEED)
    inputs = torch.randn(len(concepts), dim, generator=generator)
    if not word_vectors:
        return inputs
    for row, word in enumerate(concepts.words):
        if word in word_vectors:
            inputs[row] = torch.from_numpy(np.asarray(word_vectors[word], dtype=np.float32))
    missing = sum(word not in word_vectors for word in concepts.words)
    if missing:
        log.warning("%d of %d concepts have no pretrained vector; they keep random inputs", missing, len(concepts))
    return inputs


def _build(params: CvseParams, inputs: MatcherInputs, attention: Callable[[bool], InstanceAttention]) -> Matcher:
    """A consensus-aware matcher; `attention(batch_norm)` makes one modality's instance attention."""
    concepts = inputs.concepts
    if concepts is None or len(concepts) == 0:
        raise UserError(f"{params.kind} needs the concept vocabulary of the tokenize stage, and it is empty")
    adjacency = concept_adjacency(
        concepts.cooccurrence,
        threshold=params.graph_threshold,
        rescale_base=params.graph_rescale_base,
        rescale_shift=params.graph_rescale_shift,
        reweight=params.graph_reweight,
    )
    graph_inputs = concept_inputs(concepts, params.concept_input_dim, inputs.word_vectors)
    graph = ConceptGCN(adjacency, graph_inputs, params.embed_dim)  # shared by both modalities
    alpha_test = params.fusion_alpha if params.fusion_alpha_test is None else params.fusion_alpha_test

    def fusion() -> Fusion:
        return Fusion(params.fusion, params.embed_dim, alpha=params.fusion_alpha, alpha_test=alpha_test)

    image_encoder = ConsensusImageEncoder(
        RegionEncoder(inputs.feature_dim, params.embed_dim, pool_first=False),
        attention(True),
        graph,
        ConceptPredictor(params.embed_dim, params.concept_smoothing),
        fusion(),
    )
    words = TextEncoder(
        inputs.vocab_size, params.word_dim, params.embed_dim, bidirectional=params.bidirectional,
        dropout=params.dropout,
    )  # fmt: skip
    # caption_concepts 'words': the table is the converted checkpoint's (a buffer, loaded with the weights)
    own_labels = params.caption_concepts == "words"
    word_concepts = torch.full((inputs.vocab_size,), -1, dtype=torch.int64) if own_labels else None
    text_encoder = ConsensusTextEncoder(
        words, attention(False), graph, ConceptPredictor(params.embed_dim, params.concept_smoothing), fusion(),
        label_ratio=params.label_ratio, word_concepts=word_concepts,
    )  # fmt: skip
    loss = ConsensusLoss(
        params.margin, params.max_violation, params.loss_weights, weighting=params.loss_weighting,
        temperature=params.dwa_temperature,
    )  # fmt: skip
    # with its own word -> concept table the matcher labels the captions itself, from their token ids
    return Matcher(image_encoder, text_encoder, ConsensusScorer(params.fused_score_weight), loss,
                   n_concepts=len(concepts), labeller=text_encoder.concept_ids if own_labels else None)  # fmt: skip


@register_matcher("cvse")
def build_cvse(params: CvseParams, inputs: MatcherInputs) -> Matcher:
    """CVSE with its single-head memory-guided attention (BatchNorm on the visual side, as CVSE; over region slots
    with `region_norm: slots`)."""
    slots = params.region_slots if params.region_norm == "slots" else None

    def attention(batch_norm: bool) -> MemoryAttention:
        return MemoryAttention(params.embed_dim, dropout=params.dropout, batch_norm=batch_norm, slots=slots)

    return _build(params, inputs, attention)


@register_matcher("mh_cvse")
def build_mh_cvse(params: MhCvseParams, inputs: MatcherInputs) -> Matcher:
    """MH-CVSE: CVSE with multi-head memory-guided attention on both modalities."""

    def attention(batch_norm: bool) -> MultiHeadMemoryAttention:
        return MultiHeadMemoryAttention(params.embed_dim, heads=params.heads, dropout=params.dropout)

    return _build(params, inputs, attention)
