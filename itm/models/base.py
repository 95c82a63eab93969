"""The matcher contract: a matcher is composed from an image encoder, a text encoder, a scorer and a loss.

Every variant (VSE++, SCAN, UARDA, ...) is a builder that picks these four parts; the training loop and the
evaluator only ever see `Matcher`. Shapes: B images or captions in a batch, R regions, L words, D region feature
size, E joint embedding size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from itm import distributed
from itm.distributed import Context


@dataclass(frozen=True)
class Regions:
    """A batch of images as bottom-up region features (padded to the batch's largest region count)."""

    features: Tensor  # [B, R, D]
    mask: Tensor  # [B, R] bool, True for real regions

    def to(self, device: torch.device) -> Regions:
        return Regions(self.features.to(device, non_blocking=True), self.mask.to(device, non_blocking=True))


@dataclass(frozen=True)
class Pixels:
    """A batch of whole images as normalised pixels, for backbones that see the image itself (e.g. CLIP)."""

    images: Tensor  # [B, 3, H, W] float

    def to(self, device: torch.device) -> Pixels:
        return Pixels(self.images.to(device, non_blocking=True))


@dataclass(frozen=True)
class PixelSpec:
    """How a pixel-reading matcher wants its images: square `size`, per-channel `mean` and `std` after scaling to
    [0, 1] (resize the shorter side, centre crop, normalise)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


Tokenizer = Callable[[Sequence[str]], list[list[int]]]


@dataclass(frozen=True)
class Captions:
    """A batch of token-id sequences (padded with id 0, framed by <start> and <end>), with multi-hot concept labels
    for matchers that read them (`Matcher.n_concepts` > 0)."""

    tokens: Tensor  # [B, L] int64
    lengths: Tensor  # [B] int64, true lengths
    concepts: Tensor | None = None  # [B, K] float32, 1 for each concept the caption (or its image) mentions

    @property
    def mask(self) -> Tensor:
        """[B, L] bool, True for real tokens."""
        positions = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return positions[None, :] < self.lengths[:, None]

    def to(self, device: torch.device) -> Captions:
        concepts = None if self.concepts is None else self.concepts.to(device, non_blocking=True)
        return Captions(self.tokens.to(device, non_blocking=True), self.lengths.to(device, non_blocking=True), concepts)


@dataclass(frozen=True)
class Encoded:
    """One modality in the joint space: its fragments (regions or words) and, where a matcher has one, a global
    vector. Scorers read what they need; `extras` carries variant-specific tensors (e.g. concept scores)."""

    local: Tensor  # [B, N, E] fragments
    mask: Tensor  # [B, N] bool
    pooled: Tensor | None = None  # [B, E]
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.local.shape[0])

    def slice(self, start: int, stop: int) -> Encoded:
        """Items start..stop-1 (for scoring a gallery in chunks)."""
        return Encoded(
            self.local[start:stop],
            self.mask[start:stop],
            None if self.pooled is None else self.pooled[start:stop],
            {key: value[start:stop] for key, value in self.extras.items()},
        )

    def gathered(self, context: Context) -> Encoded:
        """The whole batch of every process (rank order), differentiable towards this process's own items;
        fragments padded to the longest over the processes."""
        return Encoded(
            distributed.gather_with_grad(self.local, context),
            distributed.gather_with_grad(self.mask, context),
            None if self.pooled is None else distributed.gather_with_grad(self.pooled, context),
            {key: distributed.gather_with_grad(value, context) for key, value in self.extras.items()},
        )


class Matcher(nn.Module):
    """Image-text matcher assembled from its parts.

    - `image_encoder(Regions or Pixels) -> Encoded` and `text_encoder(Captions) -> Encoded` embed each side
      independently, so a gallery is encoded once;
    - `scorer(images: Encoded, captions: Encoded) -> [n_images, n_captions]` scores every pair (higher = better);
      in training mode it may assume the batch is aligned (image i matches caption i), e.g. to update statistics;
    - `loss(scores [B, B], images, captions) -> {"loss": total, ...named terms}` with the matches on the diagonal;
      the encodings are there for losses with terms beyond the scores (CVSE's per-level rankings and KL term).
    A scorer may define `observe(images, captions, scores)`, called in training with the aligned batch and its
    detached scores (e.g. UARDA's threshold statistics).

    `n_concepts` > 0 declares that the text encoder reads `Captions.concepts` over that many concepts, so data
    loaders attach them. `pixels` declares that the image encoder reads `Pixels` (prepared as the spec says)
    instead of bottom-up `Regions`; `tokenizer` that the text encoder reads its own token ids of the caption
    text instead of the pipeline vocabulary's. A loss may define `end_epoch() -> {name: value}`, called after each
    training epoch (e.g. to re-weight its terms); what it returns is logged with the epoch's figures.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        text_encoder: nn.Module,
        scorer: nn.Module,
        loss: nn.Module,
        *,
        n_concepts: int = 0,
        pixels: PixelSpec | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.scorer = scorer
        self.loss = loss
        self.n_concepts = n_concepts
        self.pixels = pixels
        self.tokenizer = tokenizer

    def encode_image(self, images: Regions | Pixels) -> Encoded:
        return self.image_encoder(images)

    def encode_text(self, captions: Captions) -> Encoded:
        return self.text_encoder(captions)

    def score(self, images: Encoded, captions: Encoded) -> Tensor:
        """[n_images, n_captions] similarity of every image with every caption."""
        return self.scorer(images, captions)

    def forward(
        self, image_batch: Regions | Pixels, captions: Captions, context: Context | None = None
    ) -> dict[str, Tensor]:
        """Training step on an aligned batch: the named loss terms, total under "loss".

        With several processes (`context`), each encodes its share of the global batch; the encodings are gathered
        (differentiably), each process scores its own images against every caption of the global batch, and the
        score rows are gathered, so every process computes the loss of the whole global batch: hardest negatives
        come from all of it. Averaged over the processes (DDP), the gradients equal one process's on that batch.
        """
        images, texts = self.encode_image(image_batch), self.encode_text(captions)
        if context is not None and context.distributed:
            own = len(images)
            images, texts = images.gathered(context), texts.gathered(context)
            start = context.rank * own
            scores = distributed.gather_with_grad(self.score(images.slice(start, start + own), texts), context)
        else:
            scores = self.score(images, texts)
        observe = getattr(self.scorer, "observe", None)
        if observe is not None and self.training:
            observe(images, texts, scores.detach())
        return self.loss(scores, images, texts)

    def end_epoch(self) -> dict[str, float]:
        """Tell the loss an epoch of training is over; the figures it reports (none for most losses)."""
        hook = getattr(self.loss, "end_epoch", None)
        return hook() if hook is not None else {}
