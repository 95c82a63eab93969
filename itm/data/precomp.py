"""Import SCAN's precomputed bottom-up features (kuanghuei/SCAN `data/{f30k,coco}_precomp/`) into the region store.

A SCAN split is three files: `{split}_ims.npy` float32 [N_img, 36, D], `{split}_caps.txt` (5 consecutive captions
per image, in image order) and `{split}_ids.txt` (one id per image or per caption: COCO ids for COCO, indices into
Karpathy's `dataset_flickr30k.json` images, i.e. our `imgid`, for Flickr30K). Our `val` comes from SCAN's `dev` and
our `test` from `testall` when present (COCO's 5,000 test images; its `test` is only the first 1,000).

Every split is checked before anything is written, so a missing image fails in seconds rather than after the
33 GB of COCO train; features are then copied image by image from the memory-mapped array.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from itm.atomic import staged_dir
from itm.data.records import SPLITS, ImageRecord, Split, read_dataset_json
from itm.data.regions import ImageRegions, StoreWriter
from itm.data.text import tokenize
from itm.errors import UserError

log = logging.getLogger(__name__)

IdField = Literal["imgid", "source_id"]

CAPTIONS_PER_IMAGE = 5
# Our split <- the first SCAN split whose files exist.
SCAN_SPLITS: dict[Split, tuple[str, ...]] = {"train": ("train",), "val": ("dev",), "test": ("testall", "test")}
_EXAMPLES = 5  # ids quoted in an error message


@dataclass(frozen=True)
class SplitPlan:
    """How one of our splits is filled: which SCAN split, and the SCAN row of each of our records."""

    split: Split
    scan_split: str
    ims_path: Path
    records: list[ImageRecord]  # sorted by imgid: the order written
    rows: list[int]  # SCAN row of each record
    n_boxes: int
    feature_dim: int
    skipped: int  # SCAN images not in our split


def import_precomp(precomp_dir: Path, dataset_json: Path, out_dir: Path, *, id_field: IdField) -> dict[str, int]:
    """Write `out_dir/{train,val,test}/` from SCAN's precomputed features; returns image/box counts per split.

    `id_field` names the record attribute that SCAN's ids refer to: `source_id` (COCO ids) for COCO, `imgid`
    (Karpathy indices) for Flickr30K. Every record must be found in its SCAN split; SCAN images outside our split
    are skipped. Nothing is left under `out_dir` if any check fails.
    """
    records = sorted(read_dataset_json(dataset_json), key=lambda record: record.imgid)
    plans = [plan_split(precomp_dir, split, [r for r in records if r.split == split], id_field) for split in SPLITS]
    dims = {plan.feature_dim for plan in plans}
    if len(dims) > 1:
        found = ", ".join(f"{plan.scan_split}: {plan.feature_dim}" for plan in plans)
        raise UserError(f"{precomp_dir}: the SCAN splits have different feature dimensions ({found})")
    summary: dict[str, int] = {}
    with staged_dir(out_dir) as staging:
        for plan in plans:
            info = {"source": "precomp", "precomp_dir": str(precomp_dir), "scan_split": plan.scan_split}
            write_split(plan, staging / plan.split, info)
            summary |= {
                f"{plan.split}/images": len(plan.records),
                f"{plan.split}/boxes": len(plan.records) * plan.n_boxes,
                f"{plan.split}/skipped": plan.skipped,
            }
    return summary


def plan_split(precomp_dir: Path, split: Split, records: list[ImageRecord], id_field: IdField) -> SplitPlan:
    """Check one SCAN split against our records and find each record's SCAN row (reads ids and captions only)."""
    scan_split = _scan_split(precomp_dir, split)
    ims_path = precomp_dir / f"{scan_split}_ims.npy"
    ims = load_ims(ims_path)
    n_images = ims.shape[0]
    ids = read_ids(precomp_dir / f"{scan_split}_ids.txt", n_images)
    captions = read_captions(precomp_dir / f"{scan_split}_caps.txt", n_images)

    row_of: dict[int, int] = {}
    for row, scan_id in enumerate(ids):
        row_of.setdefault(scan_id, row)  # a repeated id keeps its first row
    keys = [_record_key(record, id_field, precomp_dir) for record in records]
    missing = [key for key in keys if key not in row_of]
    if missing:
        examples = ", ".join(str(key) for key in missing[:_EXAMPLES])
        raise UserError(
            f"{split}: {len(missing)} of {len(records)} images are not in SCAN's {scan_split} split "
            f"({precomp_dir / f'{scan_split}_ids.txt'}), e.g. {id_field} {examples}"
        )
    rows = [row_of[key] for key in keys]
    skipped = n_images - len(set(rows))
    if skipped:
        log.info("%s: %d images of SCAN's %s are not in our split; skipped", split, skipped, scan_split)
    _warn_caption_differences(split, scan_split, records, [captions[row] for row in rows])
    return SplitPlan(split, scan_split, ims_path, records, rows, int(ims.shape[1]), int(ims.shape[2]), skipped)


def write_split(plan: SplitPlan, folder: Path, info: dict[str, str]) -> None:
    """Copy the planned images, in record order, into a region store folder (one image in memory at a time)."""
    ims = load_ims(plan.ims_path)
    n = plan.n_boxes
    unknown_boxes = np.full((n, 4), np.nan, dtype=np.float32)
    unknown_ids = np.full(n, -1, dtype=np.int16)
    unknown_confidence = np.full(n, np.nan, dtype=np.float32)
    writer = StoreWriter(folder, len(plan.records) * n, plan.feature_dim, info)
    for record, row in zip(plan.records, plan.rows, strict=True):
        regions = ImageRegions(
            image_id=record.imgid,
            width=0,
            height=0,
            features=np.asarray(ims[row], dtype=np.float16),
            boxes=unknown_boxes,
            object_ids=unknown_ids,
            object_confidence=unknown_confidence,
            attribute_ids=unknown_ids,
            attribute_confidence=unknown_confidence,
        )
        writer.add(regions)
    writer.close()


def load_ims(path: Path) -> np.ndarray:
    """`{split}_ims.npy` memory-mapped, checked to be [N_img, n_boxes, D]."""
    if not path.is_file():
        raise UserError(f"{path}: not found")
    try:
        ims = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: not a readable .npy array ({error})") from None
    if ims.ndim != 3:
        raise UserError(f"{path}: expected an array of rank 3 [images, boxes, dim], found shape {ims.shape}")
    return ims


def read_ids(path: Path, n_images: int) -> list[int]:
    """One id per image from `{split}_ids.txt`, which holds one line per image or one per caption (5 equal lines)."""
    lines = _read_lines(path)
    try:
        ids = [int(line) for line in lines]
    except ValueError as error:
        raise UserError(f"{path}: not one integer id per line ({error})") from None
    if len(ids) == n_images:
        return ids
    if len(ids) == CAPTIONS_PER_IMAGE * n_images:
        groups = np.asarray(ids, dtype=np.int64).reshape(n_images, CAPTIONS_PER_IMAGE)
        unequal = np.flatnonzero((groups != groups[:, :1]).any(axis=1))
        if len(unequal):
            raise UserError(
                f"{path}: the {CAPTIONS_PER_IMAGE} caption ids of {len(unequal)} images are not all equal "
                f"(first at line {unequal[0] * CAPTIONS_PER_IMAGE + 1})"
            )
        return groups[:, 0].tolist()
    raise UserError(
        f"{path}: {len(ids)} ids for {n_images} images in the _ims.npy "
        f"(expected {n_images} or {CAPTIONS_PER_IMAGE * n_images})"
    )


def read_captions(path: Path, n_images: int) -> list[list[str]]:
    """The 5 captions of each image from `{split}_caps.txt`."""
    lines = _read_lines(path)
    if len(lines) != CAPTIONS_PER_IMAGE * n_images:
        raise UserError(
            f"{path}: {len(lines)} captions for {n_images} images in the _ims.npy "
            f"(expected {CAPTIONS_PER_IMAGE} per image, {CAPTIONS_PER_IMAGE * n_images})"
        )
    return [lines[i : i + CAPTIONS_PER_IMAGE] for i in range(0, len(lines), CAPTIONS_PER_IMAGE)]


def _read_lines(path: Path) -> list[str]:
    """The lines of a text file, split on newlines only (captions may hold other Unicode line separators)."""
    if not path.is_file():
        raise UserError(f"{path}: not found")
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _scan_split(precomp_dir: Path, split: Split) -> str:
    """The SCAN split that fills ours: the first candidate whose `_ims.npy` exists."""
    candidates = SCAN_SPLITS[split]
    for scan_split in candidates:
        if (precomp_dir / f"{scan_split}_ims.npy").is_file():
            return scan_split
    expected = " or ".join(f"{scan_split}_ims.npy" for scan_split in candidates)
    raise UserError(f"{precomp_dir}: no {expected} for our {split} split (expected SCAN's *_precomp layout)")


def _record_key(record: ImageRecord, id_field: IdField, precomp_dir: Path) -> int:
    key = getattr(record, id_field)
    if key is None:
        raise UserError(
            f"image {record.imgid} has no {id_field}, which SCAN's ids in {precomp_dir} refer to "
            "(COCO needs the COCO id in dataset.json)"
        )
    return int(key)


def _warn_caption_differences(
    split: Split, scan_split: str, records: list[ImageRecord], scan_captions: list[list[str]]
) -> None:
    """Log how many images have a SCAN caption that none of our captions matches after tokenization.

    Only a warning: SCAN's text preprocessing differs slightly, and images with more than 5 captions keep a subset.
    """
    differing = [
        record.imgid
        for record, captions in zip(records, scan_captions, strict=True)
        if not {tuple(tokenize(caption)) for caption in captions}
        <= {tuple(sentence.tokens) for sentence in record.sentences}
    ]
    if differing:
        log.warning(
            "%s: captions of %d of %d images differ from SCAN's %s_caps.txt after tokenization (e.g. imgid %s)",
            split,
            len(differing),
            len(records),
            scan_split,
            ", ".join(str(imgid) for imgid in differing[:_EXAMPLES]),
        )
