"""The matcher contract: a matcher is composed from an image encoder, a text encoder, a scorer and a loss.

Every variant (VSE++, SCAN, UARDA, ...) is a builder that picks these four parts; the training loop and the
evaluator only ever see `Matcher`. Shapes: B images or captions in a batch, R regions, L words, D region feature
size, E joint embedding size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Self

import torch
from torch import Tensor, nn

from itm import distributed
from itm.data.batches import Captions, ConceptLabeller, Images, PixelSpec, Tokenizer
from itm.data.splits import Reads
from itm.data.vocab import Vocab
from itm.distributed import Context


@dataclass(frozen=True)
class Encoded:
    """One modality in the joint space: its fragments (regions or words) and, where a matcher has one, a global
    vector. Scorers read what they need; `extras` carries variant-specific tensors (e.g. concept scores).

    The helpers below index every tensor alike (dim 0 is the item); a subclass keeps its other fields, except in
    `slice`.
    """

    local: Tensor  # [B, N, E] fragments
    mask: Tensor  # [B, N] bool
    pooled: Tensor | None = None  # [B, E]
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.local.shape[0])

    def _map(self, each: Callable[[Tensor], Tensor]) -> Self:
        return dataclasses.replace(
            self,
            local=each(self.local),
            mask=each(self.mask),
            pooled=None if self.pooled is None else each(self.pooled),
            extras={key: each(value) for key, value in self.extras.items()},
        )

    def take(self, rows: Tensor) -> Self:
        """The items `rows` [n], in that order."""
        return self._map(lambda tensor: tensor[rows])

    def slice(self, start: int, stop: int) -> Encoded:
        """Items start..stop-1 (for scoring a gallery in chunks), as a plain `Encoded`: what a subclass says of the
        whole (e.g. its encoding time) does not hold for a part."""
        part = self._map(lambda tensor: tensor[start:stop])
        return Encoded(part.local, part.mask, part.pooled, part.extras)

    def to(self, device: torch.device) -> Self:
        """Every tensor on `device`."""
        return self._map(lambda tensor: tensor.to(device))

    def fragments(self) -> Encoded:
        """The fragments alone (`local` and `mask`, what cross attention reads), without pooled vectors or extras."""
        return Encoded(self.local, self.mask)

    def trimmed(self, n: int) -> Self:
        """The fragments 0..n-1 of every item (`local` and `mask` cut along dim 1; the rest as it is)."""
        return dataclasses.replace(self, local=self.local[:, :n], mask=self.mask[:, :n])

    def gathered(self, context: Context) -> Self:
        """The whole batch of every process (rank order), differentiable towards this process's own items;
        fragments padded to the longest over the processes."""
        return self._map(lambda tensor: distributed.gather_with_grad(tensor, context))

    @staticmethod
    def concatenate(parts: Sequence[Encoded]) -> Encoded:
        """Items of `parts` stacked along dim 0, dim 1 (fragments, and any extras whose dim 1 varies) zero-padded
        (False for the mask) to the largest."""
        return Encoded(
            local=cat_padded([part.local for part in parts]),  # [n, N_max, E]
            mask=cat_padded([part.mask for part in parts]),  # [n, N_max]
            pooled=None if parts[0].pooled is None else torch.cat([part.pooled for part in parts]),
            extras={key: cat_padded([part.extras[key] for part in parts]) for key in parts[0].extras},
        )


def cat_padded(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate along dim 0; when dim 1 differs between tensors, zero-pad (False for bool) it to the largest."""
    if tensors[0].dim() < 2 or len({t.shape[1] for t in tensors}) == 1:
        return torch.cat(list(tensors))
    longest = max(t.shape[1] for t in tensors)
    padded = []
    for t in tensors:
        out = t.new_zeros((t.shape[0], longest, *t.shape[2:]))
        out[:, : t.shape[1]] = t
        padded.append(out)
    return torch.cat(padded)


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
    loaders attach them: the tokenize stage's labels, or with `labeller` the ones it gives the token ids.
    `pixels` declares that the image encoder reads `Pixels` (prepared as the spec says) instead of bottom-up
    `Regions`; `tokenizer` that the text encoder reads its own token ids of the caption text instead of the
    pipeline vocabulary's; `vocab` (set by `use_vocabulary`) that its word ids are those of its
    own vocabulary (a published model's), which tokenises the caption text as the model was trained. A loss may
    define `end_epoch() -> {name: value}`, called after each training epoch (e.g. to re-weight its terms); what it
    returns is logged with the epoch's metrics.
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
        labeller: ConceptLabeller | None = None,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.scorer = scorer
        self.loss = loss
        self.n_concepts = n_concepts
        self.pixels = pixels
        self.tokenizer = tokenizer
        self.labeller = labeller
        self.vocab: Vocab | None = None

    def use_vocabulary(self, vocab: Vocab) -> None:
        """Read captions through `vocab` (a published model's own), tokenised as it says, instead of the pipeline's."""
        if self.tokenizer is not None and self.vocab is None:
            raise ValueError("this matcher reads its own tokenizer's ids; it has no word vocabulary to replace")
        self.vocab, self.tokenizer = vocab, vocab.encode_text

    @property
    def reads(self) -> Reads:
        """What the matcher reads of a split (itm.data.splits): regions or pixels, which token ids, concepts."""
        return Reads(pixels=self.pixels, tokenizer=self.tokenizer, n_concepts=self.n_concepts, labeller=self.labeller)

    def encode_image(self, images: Images) -> Encoded:
        return self.image_encoder(images)

    def encode_text(self, captions: Captions) -> Encoded:
        return self.text_encoder(captions)

    def score(self, images: Encoded, captions: Encoded) -> Tensor:
        """[n_images, n_captions] similarity of every image with every caption."""
        return self.scorer(images, captions)

    def forward(self, images: Images, captions: Captions, context: Context | None = None) -> dict[str, Tensor]:
        """Training step on an aligned batch: the named loss terms, total under "loss".

        With several processes (`context`), each encodes its share of the global batch; the encodings are gathered
        (differentiably), each process scores its own images against every caption of the global batch, and the
        score rows are gathered, so every process computes the loss of the whole global batch: hardest negatives
        come from all of it. Averaged over the processes (DDP), the gradients equal one process's on that batch.
        """
        encoded_images, encoded_captions = self.encode_image(images), self.encode_text(captions)
        if context is not None and context.distributed:
            own = len(encoded_images)
            encoded_images, encoded_captions = encoded_images.gathered(context), encoded_captions.gathered(context)
            start = context.rank * own
            own_rows = self.score(encoded_images.slice(start, start + own), encoded_captions)
            scores = distributed.gather_with_grad(own_rows, context)
        else:
            scores = self.score(encoded_images, encoded_captions)
        observe = getattr(self.scorer, "observe", None)
        if observe is not None and self.training:
            observe(encoded_images, encoded_captions, scores.detach())
        return self.loss(scores, encoded_images, encoded_captions)

    def end_epoch(self) -> dict[str, float]:
        """Tell the loss an epoch of training is over; the metrics it reports (none for most losses)."""
        hook = getattr(self.loss, "end_epoch", None)
        return hook() if hook is not None else {}
