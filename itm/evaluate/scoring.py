"""Scoring a test gallery: encode every image and caption once, then fill the similarity matrix block by block.

Fixes for what makes SCAN's evaluation slow (methods.md §4.1): fp32 (or bf16/fp16 autocast on a GPU) instead of float64,
padded and masked batches instead of a Python loop over captions, and the image side encoded once and kept on the
device while caption chunks stream past it. Every (image, caption) score depends on that pair only, so chunking is
exact (kuanghuei/SCAN#44).

The encoded galleries live on the CPU (a COCO 5K caption side is gigabytes at E = 1024); `score_matrix` moves the
image side to the device once and each caption chunk once. The matcher must already be on `device`.

Several processes (a `Context` of torchrun's, itm/distributed.py) share the work without changing the result. The
single-process batches (images in the given order, captions longest first) are the units of encoding: each rank
encodes a contiguous range of them (`shard_range` over batch indices) and the parts are all-gathered as padded
tensors, in rank order, which is batch order; every rank ends up with exactly the encodings one process computes.
No item is repeated (a `DistributedSampler` pads with duplicates). Scoring splits the caption chunks the same way:
each rank fills whole [n_images, chunk] strips, and the strips are gathered into the full matrix on every rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor
from tqdm import tqdm

from itm.data.batches import Captions, Images
from itm.data.loaders import CaptionTable, pad_captions
from itm.data.pixels import ImageStore
from itm.device import autocast, check_precision, running_precision
from itm.distributed import SINGLE_PROCESS, Context, all_gather_cat, all_gather_padded, broadcast_object, shard_range
from itm.evaluate.completion import ConceptCompletion, window_scores
from itm.models.base import Encoded, Matcher


@dataclass(frozen=True)
class TimedEncoded(Encoded):
    """An encoded gallery (on the CPU) with the wall-clock seconds its encoding took (reading features included)."""

    seconds: float = 0.0


@dataclass(frozen=True)
class Scored:
    """A similarity matrix and what it cost.

    `score_seconds` is the wall time of `score_matrix` (CUDA synchronised at both ends; with several processes, the
    slowest rank's, gathering the matrix included); `encode_seconds` is the sum of the two galleries' encoding times
    when both came from `encode_images` / `encode_captions`, else None.
    """

    matrix: Tensor  # [n_images, n_captions] float32 on the CPU
    score_seconds: float
    encode_seconds: float | None
    completion_seconds: float | None = None  # concept completion: the first caption encoding and the neighbours


IMAGE_CHUNK, CAPTION_CHUNK = 256, 1024  # `score_split`'s blocks: images x captions scored by one `matcher.score`
CPU = torch.device("cpu")
EXTRA = "extras/"  # prefix of an `Encoded.extras` tensor among the fields gathered from every rank


def encode_images(
    matcher: Matcher,
    store: ImageStore,
    image_ids: Sequence[int],
    *,
    batch_size: int,
    device: torch.device,
    context: Context | None = None,
) -> TimedEncoded:
    """Encode the images `image_ids` (rows in that order), `batch_size` at a time, in eval mode without gradients.

    Each batch is padded to its largest region count with a mask (as in training); the result is padded to the
    largest count overall, so `local` is [n, N_max, E] and `mask` [n, N_max] is False on padding. With several
    processes (`context`), each encodes its share of the batches and every rank gets the whole gallery.
    """
    missing = [image_id for image_id in image_ids if image_id not in store]
    if missing:
        raise ValueError(f"{len(missing)} images are not in the region store {store.folder}, e.g. {missing[0]}")

    def batch(index: int) -> Images:
        rows = image_ids[index * batch_size : (index + 1) * batch_size]
        return store.collate([store.features_of(image_id) for image_id in rows])

    n_batches = _n_batches(len(image_ids), batch_size)
    return _encode(matcher, matcher.encode_image, batch, n_batches, device, "images", context or SINGLE_PROCESS)


def encode_captions(
    matcher: Matcher,
    token_ids: Sequence[Sequence[int]],
    *,
    batch_size: int,
    device: torch.device,
    concept_ids: Sequence[Sequence[int]] | None = None,
    context: Context | None = None,
) -> TimedEncoded:
    """Encode token-id sequences (rows in input order), in eval mode without gradients; a concept-aware matcher
    also gets each caption's `concept_ids`.

    Captions are batched longest first so a batch holds similar lengths (less padding), then put back in input
    order; `local` is padded to the longest caption overall and `mask` is False on padding. With several processes
    (`context`), each encodes its share of those batches and every rank gets every caption.
    """
    order = sorted(range(len(token_ids)), key=lambda index: -len(token_ids[index]))  # stable: ties keep input order

    def batch(index: int) -> Captions:
        rows = order[index * batch_size : (index + 1) * batch_size]
        concepts = None if concept_ids is None else [concept_ids[row] for row in rows]
        return pad_captions([token_ids[row] for row in rows], concepts, matcher.n_concepts)

    n_batches = _n_batches(len(order), batch_size)
    encoded = _encode(matcher, matcher.encode_text, batch, n_batches, device, "captions", context or SINGLE_PROCESS)
    inverse = torch.empty(len(order), dtype=torch.int64)
    inverse[torch.tensor(order, dtype=torch.int64)] = torch.arange(len(order))  # input row -> encoded row
    return encoded.take(inverse)


def score_matrix(
    matcher: Matcher,
    images: Encoded,
    captions: Encoded,
    *,
    image_chunk: int,
    caption_chunk: int,
    device: torch.device,
    precision: str,
    context: Context | None = None,
) -> Scored:
    """Every image against every caption with `matcher.score`, in image_chunk × caption_chunk blocks.

    Autocast to `precision` only on CUDA (`running_precision`); the matrix comes back in float32 on the CPU. With
    several processes (`context`), each rank scores a contiguous range of the caption chunks (whole
    [n_images, chunk] strips) and every rank gets the whole matrix, the same as one process computes.
    """
    context = context or SINGLE_PROCESS
    casting = autocast(running_precision(precision, device), device)
    n_img, n_cap = len(images), len(captions)
    chunks = shard_range(_n_batches(n_cap, caption_chunk), context.rank, context.world_size)
    columns = range(min(chunks.start * caption_chunk, n_cap), min(chunks.stop * caption_chunk, n_cap))
    mine = torch.empty(n_img, len(columns), dtype=torch.float32)  # this rank's columns of the matrix
    n_blocks = len(chunks) * _n_batches(n_img, image_chunk)
    progress = {"unit": "block", "mininterval": 5, "leave": False, "disable": not context.is_main}
    with _evaluating(matcher), tqdm(total=n_blocks, desc="scoring", **progress) as bar:
        started = _start_clock(device, context)
        gallery = images.to(device) if columns else images  # the image side is cached on the device
        for c in range(columns.start, columns.stop, caption_chunk):
            queries = captions.slice(c, c + caption_chunk).to(device)
            strip = _score_strip(matcher, gallery, queries, image_chunk=image_chunk, casting=casting, bar=bar)
            mine[:, c - columns.start : c - columns.start + len(queries)] = strip
        matrix = _gather_columns(mine, context)
        seconds = _stop_clock(started, device, context)
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
    precision: str,
    completion: ConceptCompletion | None = None,
    context: Context | None = None,
    image_chunk: int = IMAGE_CHUNK,
    caption_chunk: int = CAPTION_CHUNK,
) -> tuple[Scored, list[int], Tensor]:
    """Every image of `captions` (rows in first-appearance order) against every caption (columns in file order).

    With `completion` (for a concept-aware matcher), the captions' concept labels are completed transductively from
    a first encoding of the captions (CVSE `label_complete`), the captions re-encoded and then scored; the extra
    cost (the first encoding and the neighbours) is `completion_seconds`. Returns the scored matrix, the image id of
    each row, and each caption's row [n_captions]. With several processes (`context`), every rank takes part in each
    step and returns the same results.
    """
    check_precision(precision)  # before the encoding, not after it
    context = context or SINGLE_PROCESS
    image_ids = list(dict.fromkeys(int(i) for i in captions.image_ids))
    row = {image_id: index for index, image_id in enumerate(image_ids)}
    images = encode_images(matcher, store, image_ids, batch_size=batch_size, device=device, context=context)

    def encode(concept_ids: Sequence[Sequence[int]] | None) -> TimedEncoded:
        return encode_captions(matcher, captions.token_ids, batch_size=batch_size, device=device,
                               concept_ids=concept_ids, context=context)  # fmt: skip

    def score(texts: TimedEncoded) -> Scored:
        return score_matrix(matcher, images, texts, image_chunk=image_chunk, caption_chunk=caption_chunk,
                            device=device, precision=precision, context=context)  # fmt: skip

    texts = encode(captions.concept_ids)
    if completion is None or matcher.n_concepts == 0:
        scored = score(texts)
    else:
        if captions.concept_ids is None or texts.pooled is None or images.pooled is None:
            raise ValueError("concept completion needs the captions' concept labels and pooled (fused) vectors")
        started = time.perf_counter()
        completed = _complete(completion, images.pooled, texts.pooled, captions.concept_ids, context)
        spent = texts.seconds + _slowest(time.perf_counter() - started, context)
        scored = dataclasses.replace(score(encode(completed)), completion_seconds=spent)
    caption_image = torch.tensor([row[int(i)] for i in captions.image_ids])
    return scored, image_ids, caption_image


def retrieval_timing(scored: Scored, n_queries: int | None = None) -> dict[str, float]:
    """The retrieval cost metrics of one matcher on one gallery (so UARDA's skipping compares with SCAN's).

    `seconds_per_query` = scoring seconds / text→image queries (default: every caption of the matrix); also
    `score_seconds` and, when known, `encode_seconds` (the one-off cost of embedding both galleries).
    """
    queries = scored.matrix.shape[1] if n_queries is None else n_queries
    if queries <= 0:
        raise ValueError(f"n_queries must be positive, got {queries}")
    metrics = {"seconds_per_query": scored.score_seconds / queries, "score_seconds": scored.score_seconds}
    if scored.encode_seconds is not None:
        metrics["encode_seconds"] = scored.encode_seconds
    if scored.completion_seconds is not None:
        metrics["completion_seconds"] = scored.completion_seconds
    return metrics


# --- encoding -------------------------------------------------------------------------------------------------------


def _encode(
    matcher: Matcher,
    encode: Callable[[Any], Encoded],
    batch: Callable[[int], Images | Captions],
    n_batches: int,
    device: torch.device,
    label: str,
    context: Context,
) -> TimedEncoded:
    """Run `encode` on this rank's share of the batches 0..n_batches-1 (`batch(index)` builds one) on `device`, and
    gather every rank's outputs on the CPU in batch order; timed over the whole pass, gathering included."""
    if n_batches == 0:
        raise ValueError(f"no {label} to encode")
    mine = shard_range(n_batches, context.rank, context.world_size)  # rank 0's share is never empty
    parts: list[Encoded] = []
    with _evaluating(matcher):
        started = _start_clock(device, context)
        bar = tqdm(
            mine, desc=f"encoding {label}", unit="batch", mininterval=5, leave=False, disable=not context.is_main
        )
        for index in bar:
            parts.append(encode(batch(index).to(device)).to(CPU))
        encoded = _gather_encoded(Encoded.concatenate(parts) if parts else None, context)
        seconds = _stop_clock(started, device, context)
    return TimedEncoded(encoded.local, encoded.mask, encoded.pooled, encoded.extras, seconds=seconds)


def _gather_encoded(mine: Encoded | None, context: Context) -> Encoded:
    """Every rank's encoded items (`mine`: None when this rank had no batch) concatenated in rank order, with dim 1
    zero-padded to the largest as `Encoded.concatenate` pads batches; the same on every rank.

    Ranks hold consecutive ranges of batches, so rank order is batch order. Each field travels as one padded tensor
    (not a pickled object: a caption gallery is gigabytes). A rank without batches sends empty tensors of the
    layout (dtype, number of dims) that rank 0, which always has a batch, announces.
    """
    if not context.distributed:
        if mine is None:
            raise ValueError("nothing was encoded")
        return mine
    own = {} if mine is None else _fields(mine)
    announced = broadcast_object({name: (value.dtype, value.dim()) for name, value in own.items()}, context)
    layout = cast(dict[str, tuple[torch.dtype, int]], announced)
    gathered = {}
    for name, (dtype, dims) in layout.items():
        tensor = own[name] if name in own else torch.zeros((0,) * dims, dtype=dtype)
        gathered[name] = all_gather_cat(tensor, context)  # dims beyond 0 zero-padded (False for bool)
    return Encoded(
        gathered["local"],
        gathered["mask"],
        gathered.get("pooled"),
        {name.removeprefix(EXTRA): value for name, value in gathered.items() if name.startswith(EXTRA)},
    )


def _fields(encoded: Encoded) -> dict[str, Tensor]:
    """The tensors of `encoded` by name: local, mask, pooled (when there is one) and `extras/<key>`."""
    fields = {"local": encoded.local, "mask": encoded.mask}
    if encoded.pooled is not None:
        fields["pooled"] = encoded.pooled
    return fields | {EXTRA + key: value for key, value in encoded.extras.items()}


# --- scoring --------------------------------------------------------------------------------------------------------


def _score_strip(
    matcher: Matcher,
    gallery: Encoded,
    queries: Encoded,
    *,
    image_chunk: int,
    casting: contextlib.AbstractContextManager[Any],
    bar: tqdm,
) -> Tensor:
    """[n_images, n_queries] float32 scores (on the CPU) of every image of `gallery` against `queries`, both on the
    matcher's device, `image_chunk` images at a time."""
    n_img = len(gallery)
    strip = torch.empty(n_img, len(queries), dtype=torch.float32, device=queries.local.device)
    for i in range(0, n_img, image_chunk):
        with casting:
            block = matcher.score(gallery.slice(i, i + image_chunk), queries)  # [<=image_chunk, n_queries]
        expected = (min(image_chunk, n_img - i), len(queries))
        if block.shape != expected:
            raise ValueError(f"matcher.score returned {tuple(block.shape)} for a block of {expected}")
        strip[i : i + image_chunk] = block.float()
        bar.update()
    return strip.cpu()


def _gather_columns(mine: Tensor, context: Context) -> Tensor:
    """The whole [n_images, n_captions] matrix from every rank's contiguous range of columns `mine` (rank order is
    column order); exact, as each entry comes from the one rank that scored it."""
    if not context.distributed:
        return mine
    return all_gather_cat(mine.T.contiguous(), context).T.contiguous()


def _complete(
    completion: ConceptCompletion,
    image_vectors: Tensor,
    caption_vectors: Tensor,
    labels: Sequence[Sequence[int]],
    context: Context,
) -> list[list[int]]:
    """The completed concept labels of every caption, its image window picked by the fused vectors' cosine as in
    CVSE (`window_scores`), computed by rank 0 and sent to the others, so that every rank re-encodes the very same
    labels (ranks with other thread counts might break a tie between neighbours otherwise)."""
    completed = None
    if context.is_main:
        completed = completion.complete(window_scores(image_vectors, caption_vectors), caption_vectors, labels)
    return cast(list[list[int]], broadcast_object(completed, context))


# --- running --------------------------------------------------------------------------------------------------------


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


def _start_clock(device: torch.device, context: Context) -> float:
    """Now, once the device's queued work is done and every rank has got here."""
    _synchronize(device)
    context.barrier()
    return time.perf_counter()


def _stop_clock(started: float, device: torch.device, context: Context) -> float:
    """Seconds since `started` once the device's queued work is done: the slowest rank's, on every rank."""
    _synchronize(device)
    return _slowest(time.perf_counter() - started, context)


def _slowest(seconds: float, context: Context) -> float:
    """The largest of every rank's `seconds` (the wall time of a pass shared by the ranks)."""
    if not context.distributed:
        return seconds
    return max(float(part) for part in all_gather_padded(torch.tensor([seconds], dtype=torch.float64), context))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _n_batches(n: int, size: int) -> int:
    if size <= 0:
        raise ValueError(f"batch and chunk sizes must be positive, got {size}")
    return -(-n // size)
