"""Reading the test items a figure shows: the dataset's image files and the images themselves, a test caption as a
matcher reads it (a one-caption batch, a label per token), the region boxes scaled to an image's pixels, and a
matcher's display name. Matchers are loaded on the CPU."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from itm.data.batches import Captions
from itm.data.loaders import CaptionTable, pad_captions
from itm.data.records import DATASET_JSON, IMAGES_DIR, read_dataset_json
from itm.data.regions import RegionStore
from itm.data.splits import DataFolders
from itm.errors import UserError
from itm.models.base import Matcher

CPU = torch.device("cpu")


def image_files(dataset_dir: Path) -> dict[int, Path]:
    return {record.imgid: dataset_dir / IMAGES_DIR / record.filename
            for record in read_dataset_json(dataset_dir / DATASET_JSON)}  # fmt: skip


def read_image(files: dict[int, Path], image_id: int) -> np.ndarray:
    """[H, W, 3] uint8 RGB."""
    if image_id not in files:
        raise UserError(f"image {image_id} is not in the dataset's {DATASET_JSON}: scored on another dataset?")
    path = files[image_id]
    if not path.is_file():
        raise UserError(f"{path}: image not found (run the download stage first)")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as error:
        raise UserError(f"{path}: cannot read the image ({error})") from None


def caption_batch(matcher: Matcher, table: CaptionTable, row: int) -> Captions:
    concepts = None if table.concept_ids is None else [table.concept_ids[row]]
    return pad_captions([table.token_ids[row]], concepts, matcher.n_concepts)


def token_labels(matcher: Matcher, card: dict, data: DataFolders, token_ids: Sequence[int]) -> list[str]:
    """One label per token id: the pipeline vocabulary's words, the matcher's own vocabulary's (a published model's),
    or its own (open_clip) tokens."""
    if matcher.vocab is not None:
        return matcher.vocab.decode(token_ids)
    if matcher.tokenizer is None:
        return data.vocab.decode(token_ids)
    import open_clip  # only a matcher with its own tokenizer (open_clip backbone) gets here

    tokenizer = open_clip.get_tokenizer(card["params"]["clip_model"])
    return [tokenizer.decode([token]).strip() for token in token_ids]


def box_image(store: RegionStore, image_id: int, image: np.ndarray) -> np.ndarray:
    """[R, 4] region boxes in the pixels of `image` (the store keeps them in the original image's pixels)."""
    regions = store.regions_of(image_id)
    if np.isnan(regions.boxes).any():
        raise UserError(f"{store.folder}: image {image_id}'s regions have no boxes (precomputed features?); "
                        "region attention cannot be drawn on the image")  # fmt: skip
    scale = np.array([image.shape[1] / regions.width, image.shape[0] / regions.height] * 2, dtype=np.float32)
    return regions.boxes * scale


def matcher_name(model_dir: Path, card: dict) -> str:
    return f"{card.get('name', model_dir.name)} ({card['kind']})"
