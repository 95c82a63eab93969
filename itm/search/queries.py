"""Queries, encoded as the index's own items were: a text through the tokenize stage's framing (or the matcher's
own tokenizer) with its concepts, an image from the index when it is one of the split's, else through the same
detector and region selection as the `regions` stage (or the pixel preparation of `itm.data.pixels.PixelStore`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from itm.data.concepts import concept_labels
from itm.data.loaders import pad_captions
from itm.data.pixels import PixelStore
from itm.data.regions import RegionStore
from itm.data.text import tokenize
from itm.data.vocab import UNK, Vocab
from itm.errors import UserError
from itm.models.base import Encoded
from itm.search.index import SearchIndex

log = logging.getLogger(__package__)  # "itm.search", the logger name the log lines always had


def text_query(index: SearchIndex, text: str) -> Encoded:
    """One caption, encoded as the tokenize stage frames the stored ones (or by the matcher's own tokenizer)."""
    tokens = tokenize(text)
    if not tokens:
        raise UserError(f"the query {text!r} has no words")
    if index.matcher.tokenizer is not None:
        token_ids = index.matcher.tokenizer([text])[0]
    else:
        words = index.vocab.tokenize(text)
        token_ids = index.vocab.encode(words)  # <start> ... <end>, unknown words as <unk>
        _check_vocabulary(words, index.vocab)
    concept_ids = None
    if index.matcher.n_concepts > 0:  # labelled as the stored captions: by the matcher's own labeller, or tokenize's
        labeller = index.matcher.labeller
        concept_ids = labeller([token_ids]) if labeller else [query_concepts(tokens, index.concept_words)]
    batch = pad_captions([token_ids], concept_ids, index.matcher.n_concepts)
    with torch.no_grad():
        return index.matcher.encode_text(batch.to(index.device))


def _check_vocabulary(tokens: Sequence[str], vocab: Vocab) -> None:
    """Refuse a query with no known word; warn about the unknown ones (they are read as <unk>)."""
    known = set(vocab.words) - {UNK}
    unknown = list(dict.fromkeys(token for token in tokens if token not in known))
    if len(unknown) == len(set(tokens)):
        raise UserError(f"none of the query's words is in the vocabulary ({len(vocab)} words): {', '.join(unknown)}")
    if unknown:
        log.warning("words outside the vocabulary, read as %s: %s", UNK, ", ".join(unknown))


def query_concepts(tokens: Sequence[str], concept_words: Sequence[str]) -> list[int]:
    """The ids of the concepts a query mentions, ascending, labelled as the tokenize stage labels captions."""
    return concept_labels([tokens], concept_words)[0]


@dataclass(frozen=True)
class ImageQuery:
    """A query image: its encoding, and its id when it is an image of the indexed split."""

    encoded: Encoded
    image_id: int | None


def image_query(index: SearchIndex, path: Path, detector_dir: Path) -> ImageQuery:
    """An image file, encoded: from the index when it is one of the split's images, else through the detector
    (or the pixel preparation of a matcher that reads pixels)."""
    if not path.is_file():
        raise UserError(f"{path}: image not found")
    image_id = indexed_image_id(index, path)
    if image_id is not None:
        log.info("%s is image %d of the %s split: using its stored %s", path, image_id, index.split,
                 "pixels" if index.matcher.pixels else "regions")  # fmt: skip
        array = index.store.features_of(image_id)
    elif isinstance(index.store, PixelStore):
        array = index.store.prepare(path)
        log.info("%s is not in the %s index: prepared its pixels", path, index.split)
    else:
        array = detect_regions(path, index.store, detector_dir, index.device)
        log.info("%s is not in the %s index: the detector %s found %d regions", path, index.split, detector_dir,
                 len(array))  # fmt: skip
    batch = index.store.collate([np.asarray(array)])
    with torch.no_grad():
        return ImageQuery(index.matcher.encode_image(batch.to(index.device)), image_id)


def indexed_image_id(index: SearchIndex, path: Path) -> int | None:
    """The id of the split image stored at `path` (resolved, so relative paths and links match), or None."""
    resolved = path.resolve()
    for image_id, file in index.files.items():
        if file.resolve() == resolved and image_id in index.store:
            return image_id
    return None


def detect_regions(path: Path, store: RegionStore, detector_dir: Path, device: torch.device) -> np.ndarray:
    """[n, D] float16 region features of an image file, selected as the store's own were (same detector,
    selection and precision). Every check comes before any output, so a mistake is reported alone."""
    from itm.detect.extract import Selection, regions_of_batch  # the detector is only needed here
    from itm.detect.images import UnreadableImageError, load_bgr
    from itm.detect.saved import load_detector

    try:
        image = load_bgr(path)
    except UnreadableImageError as error:
        raise UserError(f"{path}: cannot read the image ({error})") from None
    source = store.info.get("source")
    if source != "detector":
        raise UserError(
            f"{store.folder}: its regions come from {source!r}, not from a detector, so an image outside the index "
            "cannot be described the same way; search with one of the split's images or with --text"
        )
    model, card = load_detector(detector_dir, device)
    if card["sha256"] != store.info.get("detector_sha256"):
        raise UserError(
            f"{detector_dir}: detector sha256 {card['sha256'][:12]}… is not the one that made {store.folder} "
            f"({str(store.info.get('detector_sha256'))[:12]}…); re-run the regions stage or pass --detector"
        )
    selection = Selection(**store.info["selection"])
    with torch.no_grad():
        (regions,) = regions_of_batch(model, [image.to(device)], [-1], selection, store.info["precision"])
    return regions.features
