"""Scoring a test gallery: encode every image and caption once, then fill the similarity matrix block by block.

Fixes for what makes SCAN's evaluation slow (methods.md §4.1): fp32 (or fp16 autocast on a GPU) instead of float64,
padded and masked batches instead of a Python loop over captions, and the image side encoded once and kept on the
device while caption chunks stream past it. Every (image, caption) score depends on that pair only, so chunking is
exact (kuanghuei/SCAN#44).

The encoded galleries live on the CPU (a COCO 5K caption side is gigabytes at E = 1024); `score_matrix` moves the
image side to the device once and each caption chunk once. The matcher must already be on `device`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from itm.data.loaders import CaptionTable, pad_captions
from itm.data.pixels import ImageStore
from itm.evaluate.completion import ConceptCompletion
from itm.models.base import Captions, Encoded, Matcher, Pixels, Regions


@dataclass(frozen=True)
class TimedEncoded(Encoded):
    """An encoded gallery (on the CPU) with the wall-clock seconds its encoding took (reading features included)."""

    seconds: float = 0.0


@dataclass(frozen=True)
class Scored:
    """A similarity matrix and what it cost.

    `score_seconds` is the wall time of `score_matrix` (CUDA synchronised at both ends); `encode_seconds` is the sum
    of the two galleries' encoding times when both came from `encode_images` / `encode_captions`, else None.
    """

    matrix: Tensor  # [n_images, n_captions] float32 on the CPU
    score_seconds: float
    encode_seconds: float | None
    completion_seconds: float | None = None  # transductive concept completion (first pass and re-encoding)


def encode_images(
    matcher: Matcher, store: ImageStore, image_ids: Sequence[int], *, batch_size: int, device: torch.device
) -> TimedEncoded:
    """Encode the images `image_ids` (rows in that order), `batch_size` at a time, in eval mode without gradients.

    Each batch is padded to its largest region count with a mask (as in training); the result is padded to the
    largest count overall, so `local` is [n, N_max, E] and `mask` [n, N_max] is False on padding.
    """
    missing = [image_id for image_id in image_ids if image_id not in store]
    if missing:
        raise ValueError(f"{len(missing)} images are not in the region store {store.folder}, e.g. {missing[0]}")

    def batches() -> Iterator[Regions | Pixels]:
        for start in range(0, len(image_ids), batch_size):
            yield store.collate([store.features_of(image_id) for image_id in image_ids[start : start + batch_size]])

    return _encode(matcher, matcher.encode_image, batches(), _n_batches(len(image_ids), batch_size), device, "images")


def encode_captions(
    matcher: Matcher,
    token_ids: Sequence[Sequence[int]],
    *,
    batch_size: int,
    device: torch.device,
    concept_ids: Sequence[Sequence[int]] | None = None,
) -> TimedEncoded:
    """Encode token-id sequences (rows in input order), in eval mode without gradients; a concept-aware matcher
    also gets each caption's `concept_ids`.

    Captions are batched longest first so a batch holds similar lengths (less padding), then put back in input
    order; `local` is padded to the longest caption overall and `mask` is False on padding.
    """
    order = sorted(range(len(token_ids)), key=lambda index: -len(token_ids[index]))  # stable: ties keep input order

    def batches() -> Iterator[Captions]:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            concepts = None if concept_ids is None else [concept_ids[index] for index in rows]
            yield pad_captions([token_ids[index] for index in rows], concepts, matcher.n_concepts)

    encoded = _encode(matcher, matcher.encode_text, batches(), _n_batches(len(order), batch_size), device, "captions")
    inverse = torch.empty(len(order), dtype=torch.int64)
    inverse[torch.tensor(order, dtype=torch.int64)] = torch.arange(len(order))  # input row -> encoded row
    return _take(encoded, inverse)


def score_matrix(
    matcher: Matcher,
    images: Encoded,
    captions: Encoded,
    *,
    image_chunk: int,
    caption_chunk: int,
    device: torch.device,
    amp: bool,
) -> Scored:
    """Every image against every caption with `matcher.score`, in image_chunk × caption_chunk blocks.

    fp16 autocast only when `amp` and `device` is CUDA (as in training); the matrix comes back in float32 on the CPU.
    """
    n_img, n_cap = len(images), len(captions)
    matrix = torch.empty(n_img, n_cap, dtype=torch.float32)
    precision = (
        torch.autocast("cuda", dtype=torch.float16) if amp and device.type == "cuda" else contextlib.nullcontext()
    )
    n_blocks = _n_batches(n_img, image_chunk) * _n_batches(n_cap, caption_chunk)
    with _evaluating(matcher), tqdm(total=n_blocks, desc="scoring", unit="block", mininterval=5) as bar:
        _synchronize(device)
        started = time.perf_counter()
        gallery = _to(images, device)  # the image side is cached on the device
        for c in range(0, n_cap, caption_chunk):
            queries = _to(captions.slice(c, c + caption_chunk), device)
            strip = torch.empty(n_img, len(queries), dtype=torch.float32, device=device)  # [n_img, chunk]
            for i in range(0, n_img, image_chunk):
                with precision:
                    block = matcher.score(gallery.slice(i, i + image_chunk), queries)  # [<=image_chunk, chunk]
                expected = (min(image_chunk, n_img - i), len(queries))
                if block.shape != expected:
                    raise ValueError(f"matcher.score returned {tuple(block.shape)} for a block of {expected}")
                strip[i : i + image_chunk] = block.float()
                bar.update()
            matrix[:, c : c + caption_chunk] = strip.cpu()
        _synchronize(device)
        seconds = time.perf_counter() - started
    encode_seconds = None
    if isinstance(images, TimedEncoded) and isinstance(captions, TimedEncoded):
        encode_seconds = images.seconds + captions.seconds
    return Scored(matrix, seconds, encode_seconds)


def score_split(
    matcher: Matcher,
    store: ImageStore,
    captions: CaptionTable,
    *,
    batch_size: int,
    device: torch.device,
    amp: bool,
    completion: ConceptCompletion | None = None,
) -> tuple[Scored, list[int], Tensor]:
    """Every image of `captions` (rows in first-appearance order) against every caption (columns in file order).

    With `completion` (for a concept-aware matcher), the captions' concept labels are completed transductively from
    a first scoring pass, the captions re-encoded and scored again. Returns the scored matrix, the image id of each
    row, and each caption's row [n_captions].
    """
    image_ids = list(dict.fromkeys(int(i) for i in captions.image_ids))
    row = {image_id: index for index, image_id in enumerate(image_ids)}
    images = encode_images(matcher, store, image_ids, batch_size=batch_size, device=device)

    def encode(concept_ids: Sequence[Sequence[int]] | None) -> TimedEncoded:
        return encode_captions(matcher, captions.token_ids, batch_size=batch_size, device=device,
                               concept_ids=concept_ids)  # fmt: skip

    def score(texts: TimedEncoded) -> Scored:
        return score_matrix(matcher, images, texts, image_chunk=256, caption_chunk=1024, device=device, amp=amp)

    texts = encode(captions.concept_ids)
    scored = score(texts)
    if completion is not None and matcher.n_concepts > 0:
        if captions.concept_ids is None or texts.pooled is None:
            raise ValueError("concept completion needs the captions' concept labels and pooled caption vectors")
        started = time.perf_counter()
        completed = completion.complete(scored.matrix, texts.pooled, captions.concept_ids)
        texts = encode(completed)
        spent = scored.score_seconds + (time.perf_counter() - started)
        scored = dataclasses.replace(score(texts), completion_seconds=spent)
    caption_image = torch.tensor([row[int(i)] for i in captions.image_ids])
    return scored, image_ids, caption_image


def retrieval_timing(scored: Scored, n_queries: int | None = None) -> dict[str, float]:
    """The retrieval cost figures of one matcher on one gallery (so UARDA's skipping compares with SCAN's).

    `seconds_per_query` = scoring seconds / text→image queries (default: every caption of the matrix); also
    `score_seconds` and, when known, `encode_seconds` (the one-off cost of embedding both galleries).
    """
    queries = scored.matrix.shape[1] if n_queries is None else n_queries
    if queries <= 0:
        raise ValueError(f"n_queries must be positive, got {queries}")
    figures = {"seconds_per_query": scored.score_seconds / queries, "score_seconds": scored.score_seconds}
    if scored.encode_seconds is not None:
        figures["encode_seconds"] = scored.encode_seconds
    if scored.completion_seconds is not None:
        figures["completion_seconds"] = scored.completion_seconds
    return figures


def _encode(
    matcher: Matcher,
    encode: Callable[[Any], Encoded],
    batches: Iterable[Regions | Captions],
    n_batches: int,
    device: torch.device,
    label: str,
) -> TimedEncoded:
    """Run `encode` on every batch (on `device`), gather the outputs on the CPU and time the whole pass."""
    parts: list[Encoded] = []
    with _evaluating(matcher):
        _synchronize(device)
        started = time.perf_counter()
        for batch in tqdm(batches, total=n_batches, desc=f"encoding {label}", unit="batch", mininterval=5):
            parts.append(_to(encode(batch.to(device)), torch.device("cpu")))
        _synchronize(device)
        seconds = time.perf_counter() - started
    if not parts:
        raise ValueError(f"no {label} to encode")
    return _concatenate(parts, seconds)


def _concatenate(parts: Sequence[Encoded], seconds: float) -> TimedEncoded:
    """Stack batches along dim 0, padding dim 1 (fragments; and any extras whose dim 1 varies) to its maximum."""
    return TimedEncoded(
        local=_cat_padded([part.local for part in parts]),  # [n, N_max, E], zeros on padding
        mask=_cat_padded([part.mask for part in parts]),  # [n, N_max], False on padding
        pooled=None if parts[0].pooled is None else torch.cat([part.pooled for part in parts]),
        extras={key: _cat_padded([part.extras[key] for part in parts]) for key in parts[0].extras},
        seconds=seconds,
    )


def _cat_padded(tensors: Sequence[Tensor]) -> Tensor:
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


def _take(encoded: TimedEncoded, rows: Tensor) -> TimedEncoded:
    """The items `rows` [n] of an encoded gallery, in that order."""
    return TimedEncoded(
        local=encoded.local[rows],
        mask=encoded.mask[rows],
        pooled=None if encoded.pooled is None else encoded.pooled[rows],
        extras={key: value[rows] for key, value in encoded.extras.items()},
        seconds=encoded.seconds,
    )


def _to(encoded: Encoded, device: torch.device) -> Encoded:
    """`encoded` with every tensor on `device`."""
    return Encoded(
        encoded.local.to(device),
        encoded.mask.to(device),
        None if encoded.pooled is None else encoded.pooled.to(device),
        {key: value.to(device) for key, value in encoded.extras.items()},
    )


@contextlib.contextmanager
def _evaluating(matcher: Matcher) -> Iterator[None]:
    """Eval mode (scorers may update statistics in training mode) and no gradients; the previous mode comes back."""
    was_training = matcher.training
    matcher.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        matcher.train(was_training)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _n_batches(n: int, size: int) -> int:
    if size <= 0:
        raise ValueError(f"batch and chunk sizes must be positive, got {size}")
    return -(-n // size)
