"""The searches: a text against the split's images, an image against its captions. Each encodes the query, ranks
the gallery (a cheap-score shortlist re-ranked with the full score for a cross-attention matcher, the full score of
every item otherwise) and returns the hits with what the query cost."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from itm.search.index import SearchIndex
from itm.search.options import Options, QueryKind
from itm.search.queries import image_query, text_query
from itm.search.shortlist import cheap_scores, shortlist_rank

log = logging.getLogger(__package__)  # "itm.search", the logger name the log lines always had


@dataclass(frozen=True)
class Hit:
    """One result: an image (text query) or a caption (image query)."""

    rank: int
    score: float
    item_id: int  # image id or caption id
    path: Path | None = None  # the image file (text query)
    text: str | None = None  # the caption (image query)
    matches: bool = False  # the caption belongs to the query image


@dataclass(frozen=True)
class SearchResult:
    query: str  # the text, or the image path
    kind: QueryKind
    hits: list[Hit]
    scored: int  # gallery items that got the full score
    gallery: int
    seconds: float  # scoring time of the query (cheap score, shortlist and full score), encoding excluded
    query_image_id: int | None = None


def search_text(index: SearchIndex, text: str, options: Options) -> SearchResult:
    """The split's best images for `text`."""
    query = text_query(index, text)
    gallery = index.gallery_images().to(index.device)
    started = time.perf_counter()
    with torch.no_grad():
        cheap = None
        if index.cross_attention and options.shortlist > 0:
            cheap = cheap_scores(index.matcher, gallery, query, options.shortlist_by, "text")[:, 0]  # [n_images]

        def score_rows(rows: Tensor) -> Tensor:
            return index.matcher.score(gallery.take(rows.to(index.device)), query)[:, 0]  # [m]

        rows, scores = _rank(index, cheap, score_rows, len(gallery), options)
    seconds = time.perf_counter() - started
    hits = [
        Hit(rank + 1, float(score), index.image_ids[row], path=index.files.get(index.image_ids[row]))
        for rank, (row, score) in enumerate(zip(rows.tolist(), scores.tolist(), strict=True))
    ]
    return SearchResult(text, "text", hits, _scored(cheap, options, len(gallery)), len(gallery), seconds)


def search_image(index: SearchIndex, path: Path, options: Options, detector_dir: Path) -> SearchResult:
    """The split's best captions for the image at `path`; captions of that image (when indexed) are marked."""
    query = image_query(index, path, detector_dir)
    gallery = index.gallery_captions().to(index.device)
    started = time.perf_counter()
    with torch.no_grad():
        cheap = None
        if index.cross_attention and options.shortlist > 0:
            cheap = cheap_scores(index.matcher, query.encoded, gallery, options.shortlist_by, "image")[0]  # [n_cap]

        def score_rows(rows: Tensor) -> Tensor:
            return index.matcher.score(query.encoded, gallery.take(rows.to(index.device)))[0]  # [m]

        rows, scores = _rank(index, cheap, score_rows, len(gallery), options)
    seconds = time.perf_counter() - started
    texts = index.captions.texts or [""] * len(index.captions)
    hits = [
        Hit(
            rank + 1,
            float(score),
            int(index.captions.caption_ids[row]),
            text=texts[row],
            matches=query.image_id is not None and int(index.captions.image_ids[row]) == query.image_id,
        )
        for rank, (row, score) in enumerate(zip(rows.tolist(), scores.tolist(), strict=True))
    ]
    n = len(gallery)
    return SearchResult(str(path), "image", hits, _scored(cheap, options, n), n, seconds, query.image_id)


def _rank(
    index: SearchIndex, cheap: Tensor | None, score_rows: Callable[[Tensor], Tensor], n: int, options: Options
) -> tuple[Tensor, Tensor]:
    if cheap is not None:
        kept = min(n, max(options.shortlist, options.top))
        log.info("%s: %s shortlist of %d of %d re-ranked with the full score", index.name, options.shortlist_by,
                 kept, n)  # fmt: skip
    return shortlist_rank(
        None if cheap is None else cheap.cpu(), score_rows, n, shortlist=options.shortlist, top=options.top
    )


def _scored(cheap: Tensor | None, options: Options, n: int) -> int:
    """How many gallery items got the full score."""
    return n if cheap is None else min(n, max(options.shortlist, options.top))
