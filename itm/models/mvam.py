"""MVAM (Cui, Cheng, Guo, Cheng; arXiv 2402.17237): multi-view attention for two-stream matchers.

Each modality's token states H [B, N, d] (regions or words) are pooled m times, once per learnable view code:

    A = softmax_N(Q (W_K H)ᵀ / √d)  (masked),   r_k = A_k (W_V H),   z_k = l2norm(P_k r_k),
    z = [z_1; ...; z_m] / √m

so z_v · z_t is the mean over views of the per-view cosines and retrieval stays one dot product per pair. A
diversity term pushes the views of one item apart: ‖A Aᵀ − I‖²_F (`full`), or only its off-diagonal entries
(`off_diagonal`, which leaves each view free to stay spread), weighted by `diversity_weight`.

The paper's full text was not available (methods.md §2.6: abstract and reviews). Its choices here:
- view codes are d-dimensional, initialised N(0, 1/d); keys and values are linear maps of the token states;
- each view has its own projection P_k to `view_dim` (default embed_dim // m, so the joint size does not depend
  on m), then L2 normalisation; the 1/√m scale makes the concatenation a unit vector;
- objectives: symmetric InfoNCE with a learnable logit scale (CLIP: initialised at 1/0.07, clamped at 100, the
  mean of the image→text and text→image cross-entropies), or the VSE++ hinge of the other matchers for a
  like-for-like comparison; the diversity term is reduced like the objective (mean for InfoNCE, sum for the
  hinge, which is summed over the batch);
- backbones (`backbone`): this project's two-stream encoders (projected bottom-up regions, bi-GRU words), or an
  open_clip model, whose vision transformer's patch tokens and text transformer's token states (its own
  tokenizer; states up to the end-of-text token) the views attend over. The open_clip model starts from random
  weights unless `clip_checkpoint` names a local file; its own projection heads and logit scale are unused;
- at retrieval only the joint vector is kept (no per-token states), so a COCO-sized gallery stays small.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itm.config import MvamParams
from itm.data.batches import Captions, Pixels, PixelSpec, Regions, Tokenizer
from itm.errors import UserError
from itm.models.base import Encoded, Matcher
from itm.models.encoders import RegionEncoder, TextEncoder, l2norm
from itm.models.losses import ContrastiveLoss
from itm.models.registry import MatcherInputs, register_matcher
from itm.models.similarity import CosineScorer

Diversity = Literal["full", "off_diagonal"]


class MultiViewAttention(nn.Module):
    """m view codes attending over token states [B, N, d] (masked); returns the joint vector [B, m·view_dim] and
    the attention [B, m, N] (zero on padding)."""

    def __init__(self, dim: int, views: int, view_dim: int) -> None:
        super().__init__()
        self.codes = nn.Parameter(torch.randn(views, dim) / math.sqrt(dim))  # [m, d]
        self.keys = nn.Linear(dim, dim)
        self.values = nn.Linear(dim, dim)
        bound = 1.0 / math.sqrt(dim)
        self.projections = nn.Parameter(torch.empty(views, dim, view_dim).uniform_(-bound, bound))  # [m, d, v]
        self.projection_bias = nn.Parameter(torch.zeros(views, view_dim))

    @property
    def views(self) -> int:
        return int(self.codes.shape[0])

    def attention(self, states: Tensor, mask: Tensor) -> Tensor:
        """[B, m, N] softmax over the real tokens of each item, one row per view."""
        logits = torch.einsum("md,bnd->bmn", self.codes, self.keys(states)).float() / math.sqrt(states.shape[-1])
        return F.softmax(logits.masked_fill(~mask[:, None, :], float("-inf")), dim=-1)

    def forward(self, states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        weights = self.attention(states, mask)  # [B, m, N]
        pooled = weights.to(states.dtype) @ self.values(states)  # [B, m, d]
        views = torch.einsum("bmd,mdv->bmv", pooled, self.projections) + self.projection_bias  # [B, m, v]
        joint = l2norm(views).flatten(1) / math.sqrt(self.views)  # [B, m·v], unit length
        return joint, weights


def diversity_penalty(attention: Tensor, mode: Diversity) -> Tensor:
    """Per item ‖A Aᵀ − I‖²_F (`full`) or the squared off-diagonal entries of A Aᵀ (`off_diagonal`), [B]."""
    gram = attention.float() @ attention.float().transpose(1, 2)  # [B, m, m]
    identity = torch.eye(gram.shape[-1], device=gram.device)
    if mode == "full":
        return ((gram - identity) ** 2).sum(dim=(1, 2))
    if mode == "off_diagonal":
        return ((gram * (1 - identity)) ** 2).sum(dim=(1, 2))
    raise ValueError(f"diversity must be 'full' or 'off_diagonal', got {mode!r}")


def _views_only(joint: Tensor, attention: Tensor, training: bool) -> Encoded:
    """An encoding that carries the joint vector only (and, in training, the views' attention for the loss)."""
    empty_mask = torch.zeros(len(joint), 0, dtype=torch.bool, device=joint.device)
    extras = {"view_attention": attention} if training else {}
    return Encoded(joint.new_zeros(len(joint), 0, 1), empty_mask, joint, extras)


class MultiViewEncoder(nn.Module):
    """One modality of the own backbone: a `RegionEncoder` or `TextEncoder` gives unit token vectors, m views pool
    them; the attention travels in `extras` in training only."""

    def __init__(self, tokens: RegionEncoder | TextEncoder, views: MultiViewAttention) -> None:
        super().__init__()
        self.tokens, self.views = tokens, views

    def forward(self, batch: Regions | Captions) -> Encoded:
        encoded = self.tokens(batch)
        return _views_only(*self.views(encoded.local, encoded.mask), self.training)

    def view_attention(self, batch: Regions | Captions) -> Tensor:
        """[B, m, tokens] attention of every view over the regions or words (for visualisation)."""
        encoded = self.tokens(batch)
        return self.views.attention(encoded.local, encoded.mask)


class ClipImageEncoder(nn.Module):
    """An open_clip vision tower's patch tokens [B, N, w] → m views."""

    def __init__(self, visual: nn.Module, views: MultiViewAttention) -> None:
        super().__init__()
        visual.output_tokens = True  # open_clip VisionTransformer: forward returns (pooled, tokens)
        visual.proj = None  # CLIP's projection of the pooled token is not used
        self.visual, self.views = visual, views

    def tokens(self, pixels: Pixels) -> tuple[Tensor, Tensor]:
        _, tokens = self.visual(pixels.images)  # [B, N, w]
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)

    def forward(self, pixels: Pixels) -> Encoded:
        return _views_only(*self.views(*self.tokens(pixels)), self.training)

    def view_attention(self, pixels: Pixels) -> Tensor:
        """[B, m, N] attention of every view over the patches (for visualisation)."""
        return self.views.attention(*self.tokens(pixels))


class ClipTextEncoder(nn.Module):
    """An open_clip text transformer's token states [B, L, w] (causal, as CLIP's) → m views over the real tokens
    (start-of-text to end-of-text). Token ids come from the model's own tokenizer."""

    attn_mask: Tensor

    def __init__(self, clip: nn.Module, views: MultiViewAttention) -> None:
        super().__init__()
        if not hasattr(clip, "token_embedding"):
            raise UserError("open_clip models with a custom (e.g. Hugging Face) text tower are not supported")
        self.token_embedding, self.positional_embedding = clip.token_embedding, clip.positional_embedding
        self.transformer, self.ln_final = clip.transformer, clip.ln_final
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        self.views = views

    def tokens(self, captions: Captions) -> tuple[Tensor, Tensor]:
        context = self.positional_embedding.shape[0]
        ids = F.pad(captions.tokens[:, :context], (0, max(context - captions.tokens.shape[1], 0)))  # [B, ctx]
        states = self.token_embedding(ids) + self.positional_embedding  # as open_clip CLIP.encode_text
        states = self.ln_final(self.transformer(states, attn_mask=self.attn_mask))  # [B, ctx, w]
        length = min(captions.tokens.shape[1], context)
        return states[:, :length], captions.mask[:, :length]

    def forward(self, captions: Captions) -> Encoded:
        return _views_only(*self.views(*self.tokens(captions)), self.training)

    def view_attention(self, captions: Captions) -> Tensor:
        """[B, m, L] attention of every view over the tokens (for visualisation)."""
        return self.views.attention(*self.tokens(captions))


def open_clip_parts(params: MvamParams, *, read_pretrained: bool) -> tuple[nn.Module, PixelSpec, Tokenizer]:
    """The open_clip model `params.clip_model` (random, or `clip_checkpoint`'s weights when `read_pretrained`),
    the pixel preparation it expects, and its tokenizer as token-id lists up to the end-of-text token."""
    import open_clip  # imported here: only this backbone needs it

    if params.clip_config is not None:
        config = Path(params.clip_config)
        if not config.is_file():
            raise UserError(f"{config}: open_clip model config not found")
        open_clip.add_model_config(config)
    if params.clip_model not in open_clip.list_models():
        raise UserError(f"clip_model {params.clip_model!r} is not an open_clip model (open_clip.list_models())")
    checkpoint = params.clip_checkpoint if read_pretrained else None
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UserError(f"{checkpoint}: clip_checkpoint not found")
    model = open_clip.create_model(params.clip_model, pretrained=checkpoint)
    preprocess = model.visual.preprocess_cfg
    size = preprocess["size"]
    spec = PixelSpec(
        int(size if isinstance(size, int) else size[0]), tuple(preprocess["mean"]), tuple(preprocess["std"])
    )
    clip_tokenizer = open_clip.get_tokenizer(params.clip_model)

    def tokenize(texts: Sequence[str]) -> list[list[int]]:
        ids = clip_tokenizer(list(texts))  # [N, ctx], zero-padded after the end-of-text token
        lengths = (ids != 0).sum(dim=1).tolist()
        return [row[:length].tolist() for row, length in zip(ids, lengths, strict=True)]

    return model, spec, tokenize


class InfoNceLoss(nn.Module):
    """Symmetric InfoNCE on cosine scores [B, B] with a learnable logit scale (CLIP, Radford et al. 2021): the mean
    of the image→text and text→image cross-entropies of scale·S, the scale kept as its log and clamped."""

    def __init__(self, temperature_init: float, max_scale: float) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature_init)))
        self.max_log_scale = math.log(max_scale)

    def forward(self, scores: Tensor, *_encodings: Encoded) -> dict[str, Tensor]:
        scale = self.log_scale.clamp(max=self.max_log_scale).exp()
        logits = scale * scores.float()  # [B, B]
        targets = torch.arange(len(logits), device=logits.device)
        loss_i2t, loss_t2i = F.cross_entropy(logits, targets), F.cross_entropy(logits.T, targets)
        return {"loss": (loss_i2t + loss_t2i) / 2, "loss_i2t": loss_i2t, "loss_t2i": loss_t2i,
                "logit_scale": scale.detach()}  # fmt: skip


class MultiViewLoss(nn.Module):
    """The matching objective plus `weight` × the views' diversity penalty of both modalities, reduced like the
    objective (`reduction`: "mean" for InfoNCE, "sum" for the summed hinge)."""

    def __init__(self, objective: nn.Module, diversity: Diversity, weight: float, reduction: str) -> None:
        super().__init__()
        self.objective, self.diversity, self.weight, self.reduction = objective, diversity, weight, reduction

    def forward(self, scores: Tensor, images: Encoded, captions: Encoded) -> dict[str, Tensor]:
        terms = self.objective(scores)
        penalty = sum(
            diversity_penalty(side.extras["view_attention"], self.diversity) for side in (images, captions)
        )  # [B]
        penalty = penalty.mean() if self.reduction == "mean" else penalty.sum()
        return terms | {"loss": terms["loss"] + self.weight * penalty, "loss_diversity": penalty}


@register_matcher("mvam")
def build_mvam(params: MvamParams, inputs: MatcherInputs) -> Matcher:
    """MVAM over the project's two-stream encoders (projected regions, bi-GRU words) or an open_clip model."""
    view_dim = params.view_dim or params.embed_dim // params.views
    if params.objective == "infonce":
        objective: nn.Module = InfoNceLoss(params.temperature_init, params.max_logit_scale)
        reduction = "mean"
    else:
        objective, reduction = ContrastiveLoss(params.margin, params.max_violation), "sum"
    loss = MultiViewLoss(objective, params.diversity, params.diversity_weight, reduction)
    if params.backbone == "open_clip":
        clip, spec, tokenize = open_clip_parts(params, read_pretrained=inputs.read_pretrained)
        return Matcher(
            image_encoder=ClipImageEncoder(clip.visual, MultiViewAttention(clip.visual.transformer.width,
                                                                           params.views, view_dim)),
            text_encoder=ClipTextEncoder(clip, MultiViewAttention(clip.transformer.width, params.views, view_dim)),
            scorer=CosineScorer(),
            loss=loss,
            pixels=spec,
            tokenizer=tokenize,
        )  # fmt: skip
    return Matcher(
        image_encoder=MultiViewEncoder(
            RegionEncoder(inputs.feature_dim, params.embed_dim, pool_first=False),
            MultiViewAttention(params.embed_dim, params.views, view_dim),
        ),
        text_encoder=MultiViewEncoder(
            TextEncoder(inputs.vocab_size, params.word_dim, params.embed_dim, bidirectional=params.bidirectional),
            MultiViewAttention(params.embed_dim, params.views, view_dim),
        ),
        scorer=CosineScorer(),
        loss=loss,
    )
