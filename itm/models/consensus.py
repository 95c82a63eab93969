"""CVSE's consensus level (Wang et al., ECCV 2020; BruceW91/CVSE `util/util_C_GCN.py`, `util/C_GCN.py`,
`model_CVSE.py`): a concept graph from caption co-occurrence, a GCN over concept embeddings, concept scores per
modality, consensus embeddings, the fusion with instance embeddings, and the KL term between the two modalities'
concept distributions.

Shapes: B items, K concepts, E joint embedding size, I concept input size.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itm.models.encoders import l2norm

FusionMode = Literal["weight_sum", "concat", "adap_sum"]


def concept_adjacency(
    cooccurrence: np.ndarray,
    *,
    threshold: float = 0.3,
    rescale_base: float = 5.0,
    rescale_shift: float = 0.02,
    reweight: float = 0.25,
) -> Tensor:
    """The normalised concept graph [K, K] from train co-occurrence counts (diagonal: each concept's own count).

    CVSE `gen_A_concept` in its 'Complex' mode, then `gen_adj`:
    1. P_ij = cooc_ij / cooc_ii, the conditional probability P(c_j | c_i); the diagonal is set to 0 (the self-loops
       come from step 4 only, as in ML-GCN whose co-occurrence files count pairs of distinct labels);
    2. rescale against the long tail: f(x) = t^(x − p) − t^(−p) with t = `rescale_base`, p = `rescale_shift`;
    3. binarise: A_ij = 1 where f(P_ij) ≥ τ (`threshold`), else 0;
    4. re-weight: A ← `reweight` · A / (column sums of A + 1e-6), then A ← A + I;
    5. symmetric normalisation: Â = D^-½ Aᵀ D^-½ with D = diag(row sums of A).
    The graph is fixed: it is a buffer of the GCN, never trained (CVSE detaches it).
    """
    counts = np.asarray(cooccurrence, dtype=np.float64)
    own = np.diag(counts).copy()
    conditional = counts / np.maximum(own, 1.0)[:, None]
    np.fill_diagonal(conditional, 0.0)
    rescaled = np.power(rescale_base, conditional - rescale_shift) - np.power(rescale_base, -rescale_shift)
    edges = (rescaled >= threshold).astype(np.float64)
    adjacency = reweight * edges / (edges.sum(axis=0, keepdims=True) + 1e-6) + np.eye(len(counts))
    inverse_sqrt_degree = np.power(adjacency.sum(axis=1), -0.5)
    normalised = inverse_sqrt_degree[:, None] * adjacency.T * inverse_sqrt_degree[None, :]
    return torch.from_numpy(normalised).float()


class ConceptGCN(nn.Module):
    """Two graph convolutions over the concept inputs: [K, I] → [K, E/2] → LeakyReLU(0.2) → [K, E], no biases,
    each concept vector L2-normalised (CVSE `C_GCN`, `GraphConvolution` with weights uniform in ±1/√out).

    The graph and the inputs (GloVe vectors, or fixed random vectors, which a linear first layer can map anywhere
    as long as K ≤ I) are buffers; only the two weight matrices learn.
    """

    adjacency: Tensor
    inputs: Tensor

    def __init__(self, adjacency: Tensor, inputs: Tensor, embed_dim: int) -> None:
        super().__init__()
        self.register_buffer("adjacency", adjacency)  # [K, K]
        self.register_buffer("inputs", inputs)  # [K, I]
        hidden = embed_dim // 2
        self.weight_hidden = nn.Parameter(torch.empty(inputs.shape[1], hidden))
        self.weight_out = nn.Parameter(torch.empty(hidden, embed_dim))
        for weight in (self.weight_hidden, self.weight_out):
            bound = 1.0 / math.sqrt(weight.shape[1])
            nn.init.uniform_(weight, -bound, bound)

    def forward(self) -> Tensor:
        """[K, E] unit concept embeddings."""
        hidden = F.leaky_relu(self.adjacency @ (self.inputs @ self.weight_hidden), 0.2)  # [K, E/2]
        return l2norm(self.adjacency @ (hidden @ self.weight_out))  # [K, E]


class SetNorm(nn.BatchNorm1d):
    """BatchNorm over a fixed set that every process holds whole (the concept embeddings), not over the batch: its
    statistics are never shared between processes (itm/train/batch_norm.py converts plain BatchNorm1d only)."""


class ConceptPredictor(nn.Module):
    """Concept scores of an instance embedding (CVSE `Consensus_level_feature_learning`), as log-probabilities:

        h_k = tanh(BN(W_c c_k)) ⊙ tanh(BN(W_x x)),    a_k = w·h_k + b,    p = softmax(s · a)

    with s = `smoothing` (CVSE's `smooth_coef` 10). Since w·(u ⊙ v) = (u ⊙ w)·v, the [B, K, E] product is never
    formed: a = (tanh(BN(W_x x)) ⊙ w) @ tanh(BN(W_c C))ᵀ + b.
    """

    def __init__(self, embed_dim: int, smoothing: float) -> None:
        super().__init__()
        self.concept_branch = nn.Sequential(nn.Linear(embed_dim, embed_dim), SetNorm(embed_dim), nn.Tanh())
        self.instance_branch = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.BatchNorm1d(embed_dim), nn.Tanh())
        self.score = nn.Linear(embed_dim, 1)
        self.smoothing = smoothing

    def forward(self, instance: Tensor, concepts: Tensor) -> Tensor:
        """[B, K] log p from instance embeddings [B, E] and concept embeddings [K, E]."""
        weighted = self.instance_branch(instance) * self.score.weight[0]  # [B, E]
        logits = weighted @ self.concept_branch(concepts).T + self.score.bias  # [B, K]
        return F.log_softmax(self.smoothing * logits.float(), dim=1)


def label_distribution(labels: Tensor, smoothing: float) -> Tensor:
    """CVSE's ground-truth concept distribution softmax(s · y) of multi-hot labels y [B, K] (uniform when empty)."""
    return F.softmax(smoothing * labels.float(), dim=1)


def consensus_embedding(probabilities: Tensor, concepts: Tensor) -> Tensor:
    """l2norm(Σ_k p_k c_k): [B, E] from concept probabilities [B, K] and unit concept embeddings [K, E]."""
    return l2norm(probabilities.to(concepts.dtype) @ concepts)


def concept_kl(visual_log_probs: Tensor, textual_probs: Tensor) -> Tensor:
    """KL(p_t ‖ p_v) = Σ p_t (log p_t − log p_v), summed over concepts and the batch (CVSE `KL_loss_softmax`:
    `KLDivLoss(log p_v, p_t)`, summed). Gradients reach both distributions, as in CVSE."""
    textual = textual_probs.float()
    return (torch.xlogy(textual, textual) - textual * visual_log_probs.float()).sum()


class Fusion(nn.Module):
    """One modality's fused embedding from its instance and consensus embeddings [B, E] (CVSE
    `Multi_feature_fusing`), L2-normalised:

    - `weight_sum`: α x_inst + (1 − α) x_cons, with α = `alpha` in training and `alpha_test` in eval mode;
    - `concat`: a linear layer from [x_inst; x_cons] (2E) to E;
    - `adap_sum`: g x_inst + (1 − g) x_cons with a per-item gate g = σ(w·(x_inst + x_cons)/2 + b).
    CVSE's `concat` and `adap_sum` call layers that were never created and crash; here each modality owns its layer.
    Initialisation as CVSE: Xavier uniform, zero bias.
    """

    def __init__(self, mode: FusionMode, embed_dim: int, *, alpha: float, alpha_test: float) -> None:
        super().__init__()
        if mode not in ("weight_sum", "concat", "adap_sum"):
            raise ValueError(f"fusion must be 'weight_sum', 'concat' or 'adap_sum', got {mode!r}")
        self.mode, self.alpha, self.alpha_test = mode, alpha, alpha_test
        if mode == "concat":
            self.project = _xavier_linear(2 * embed_dim, embed_dim)
        elif mode == "adap_sum":
            self.gate = _xavier_linear(embed_dim, 1)

    def forward(self, instance: Tensor, consensus: Tensor) -> Tensor:
        if self.mode == "concat":
            return l2norm(self.project(torch.cat([instance, consensus], dim=1)))
        if self.mode == "adap_sum":
            share = torch.sigmoid(self.gate((instance + consensus) / 2))  # [B, 1]
        else:
            share = self.alpha if self.training else self.alpha_test
        return l2norm(share * instance + (1 - share) * consensus)


def _xavier_linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    bound = math.sqrt(6.0) / math.sqrt(in_features + out_features)
    nn.init.uniform_(layer.weight, -bound, bound)
    nn.init.zeros_(layer.bias)
    return layer
