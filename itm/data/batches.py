"""The batches a matcher reads: images as bottom-up regions or as pixels, and captions as token ids.

Shapes: B images or captions in a batch, R regions, L tokens, D region feature size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Regions:
    """A batch of images as bottom-up region features (padded to the batch's largest region count)."""

    features: Tensor  # [B, R, D]
    mask: Tensor  # [B, R] bool, True for real regions

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def to(self, device: torch.device) -> Regions:
        return Regions(self.features.to(device, non_blocking=True), self.mask.to(device, non_blocking=True))


@dataclass(frozen=True)
class Pixels:
    """A batch of whole images as normalised pixels, for backbones that see the image itself (e.g. CLIP)."""

    images: Tensor  # [B, 3, H, W] float

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device) -> Pixels:
        return Pixels(self.images.to(device, non_blocking=True))


Images = Regions | Pixels  # a batch of images, in whichever form the matcher reads them


@dataclass(frozen=True)
class PixelSpec:
    """How a pixel-reading matcher wants its images: square `size`, per-channel `mean` and `std` after scaling to
    [0, 1] (resize the shorter side, centre crop, normalise)."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


Tokenizer = Callable[[Sequence[str]], list[list[int]]]  # caption texts -> token-id lists (a backbone's own tokenizer)
# token-id lists -> each caption's concept ids, ascending (a matcher that labels captions by their words itself)
ConceptLabeller = Callable[[Sequence[Sequence[int]]], list[list[int]]]


@dataclass(frozen=True)
class Captions:
    """A batch of token-id sequences (padded with id 0, framed by <start> and <end>), with multi-hot concept labels
    for matchers that read them."""

    tokens: Tensor  # [B, L] int64
    lengths: Tensor  # [B] int64, true lengths
    concepts: Tensor | None = None  # [B, K] float32, 1 for each concept the caption (or its image) mentions

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def mask(self) -> Tensor:
        """[B, L] bool, True for real tokens."""
        positions = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return positions[None, :] < self.lengths[:, None]

    def to(self, device: torch.device) -> Captions:
        concepts = None if self.concepts is None else self.concepts.to(device, non_blocking=True)
        return Captions(self.tokens.to(device, non_blocking=True), self.lengths.to(device, non_blocking=True), concepts)
