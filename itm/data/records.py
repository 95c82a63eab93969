"""Image/caption records and their file format: Karpathy's `dataset.json`, shared by every dataset source.

Every source (synthetic, Flickr30K, COCO) writes the same normalised form: splits are `train`, `val` and `test`
(COCO's `restval` joins `train`), `filename` is relative to the `images/` folder beside the JSON, and every
caption carries tokens from `itm.data.text.tokenize`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from itm.atomic import staged_file
from itm.data.text import tokenize
from itm.errors import UserError

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = get_args(Split)

DATASET_JSON = "dataset.json"
IMAGES_DIR = "images"


@dataclass(frozen=True)
class Sentence:
    """One caption."""

    sentid: int
    raw: str

    @property
    def tokens(self) -> list[str]:
        return tokenize(self.raw)


@dataclass(frozen=True)
class ImageRecord:
    """One image and its captions."""

    imgid: int
    filename: str  # relative to images/
    split: Split
    sentences: tuple[Sentence, ...]
    source_id: int | None = None  # the id in the original collection (COCO id), when it has one


def to_karpathy(dataset: str, records: Iterable[ImageRecord]) -> dict:
    """The Karpathy-format dict for `records`."""
    images = []
    for record in records:
        entry = {
            "filename": record.filename,
            "imgid": record.imgid,
            "split": record.split,
            "sentids": [s.sentid for s in record.sentences],
            "sentences": [
                {"raw": s.raw, "tokens": s.tokens, "imgid": record.imgid, "sentid": s.sentid} for s in record.sentences
            ],
        }
        if record.source_id is not None:
            entry["source_id"] = record.source_id
        images.append(entry)
    return {"dataset": dataset, "images": images}


def write_dataset_json(path: Path, dataset: str, records: Sequence[ImageRecord]) -> None:
    """Write `records` as Karpathy JSON at `path` (atomically)."""
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(to_karpathy(dataset, records), ensure_ascii=False), encoding="utf-8")


def has_image_files(dataset_dir: Path) -> bool:
    """Whether the dataset's images are there (`images/` beside `dataset.json`). A captions-only download has none:
    the download stage fetches only the split file when the regions come precomputed and no image archive is set."""
    return (dataset_dir / IMAGES_DIR).is_dir()


def read_dataset_json(path: Path) -> list[ImageRecord]:
    """Read a normalised `dataset.json` written by `write_dataset_json`."""
    if not path.is_file():
        raise UserError(f"{path}: dataset file not found (run the download stage first)")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        return [
            ImageRecord(
                imgid=int(image["imgid"]),
                filename=str(image["filename"]),
                split=_checked_split(image["split"], path),
                sentences=tuple(Sentence(int(s["sentid"]), str(s["raw"])) for s in image["sentences"]),
                source_id=image.get("source_id"),
            )
            for image in document["images"]
        ]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: not a valid dataset.json ({type(error).__name__}: {error})") from None


def _checked_split(split: str, path: Path) -> Split:
    if split not in SPLITS:
        raise UserError(f"{path}: split {split!r} is not one of {', '.join(SPLITS)}")
    return split


def file_md5(path: Path) -> str:
    """The hex md5 of a file's bytes: identifies a dataset file in a fingerprint (not a security check)."""
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
