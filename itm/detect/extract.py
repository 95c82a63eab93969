"""Extracting bottom-up regions for every image of a dataset, in resumable shards.

Each split's images are cut into shards of `shard_size` images (in image-id order). A finished shard is a file in
the work folder, written atomically, so an interrupted run redoes at most one shard. When every shard exists they
are merged into the region store (`itm.data.regions`). Images that cannot be decoded are recorded as failures and
skipped; the run still completes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from itm.atomic import staged_dir, staged_file
from itm.data.records import IMAGES_DIR, SPLITS, ImageRecord
from itm.data.regions import Failure, ImageRegions, StoreWriter
from itm.detect.images import UnreadableImageError, load_bgr
from itm.detect.model import BottomUpDetector
from itm.detect.selection import region_labels, select_regions

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Selection:
    """How regions are chosen among the proposals (see itm.detect.selection)."""

    nms_threshold: float = 0.3
    confidence_threshold: float = 0.2
    min_boxes: int = 10
    max_boxes: int = 100


@dataclass(frozen=True)
class Extraction:
    """How an extraction run goes: the selection, batching, precision, shards and devices."""

    selection: Selection
    batch_size: int = 4
    precision: str = "fp32"  # a key of PRECISIONS
    shard_size: int = 500  # images per resumable shard
    workers: int = 0  # image-decoding processes
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


# --- decoding ------------------------------------------------------------------------------------------------------


class _ImageFiles(Dataset):
    """(record, image or the reason it could not be read) for a list of records."""

    def __init__(self, records: Sequence[ImageRecord], images_dir: Path) -> None:
        self.records, self.images_dir = records, images_dir

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[ImageRecord, torch.Tensor | str]:
        record = self.records[index]
        try:
            return record, load_bgr(self.images_dir / record.filename)
        except UnreadableImageError as error:
            return record, str(error)


def _as_list(batch: list) -> list:
    return batch


# --- one batch ------------------------------------------------------------------------------------------------------


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def regions_of_batch(
    model: BottomUpDetector,
    images: list[torch.Tensor],
    image_ids: list[int],
    selection: Selection,
    precision: str,
) -> list[ImageRegions]:
    """Selected regions of a batch of BGR images (already on the model's device)."""
    device = images[0].device
    with _autocast(device, precision):
        outputs = model.extract(images)
    regions = []
    for image_id, image, output in zip(image_ids, images, outputs, strict=True):
        boxes, class_probs = output.boxes.float(), output.class_probs.float()
        keep = select_regions(
            boxes,
            class_probs,
            nms_threshold=selection.nms_threshold,
            confidence_threshold=selection.confidence_threshold,
            min_boxes=selection.min_boxes,
            max_boxes=selection.max_boxes,
        )
        labels = region_labels(class_probs[keep], output.attribute_probs[keep].float())
        regions.append(
            ImageRegions(
                image_id=image_id,
                width=int(image.shape[-1]),
                height=int(image.shape[-2]),
                features=output.features[keep].to(torch.float16).cpu().numpy(),
                boxes=boxes[keep].cpu().numpy(),
                object_ids=labels.object_ids.cpu().numpy().astype(np.int16),
                object_confidence=labels.object_confidence.cpu().numpy(),
                attribute_ids=labels.attribute_ids.cpu().numpy().astype(np.int16),
                attribute_confidence=labels.attribute_confidence.cpu().numpy(),
            )
        )
    return regions


@torch.no_grad()
def precision_agreement(model: BottomUpDetector, images: list[torch.Tensor], precision: str) -> dict[str, float]:
    """How close reduced precision comes to fp32 on the same proposals: mean/min feature cosine, label agreement."""
    reference = model.extract(images)
    with _autocast(images[0].device, precision):
        reduced = model.describe_boxes(images, [output.boxes for output in reference])
    cosines, agree = [], []
    for full, low in zip(reference, reduced, strict=True):
        cosines.append(F.cosine_similarity(full.features, low.features.float(), dim=1))
        agree.append((full.class_probs.argmax(1) == low.class_probs.float().argmax(1)).float())
    cosine = torch.cat(cosines)
    return {
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "label_agreement": float(torch.cat(agree).mean()),
    }


# --- shards ---------------------------------------------------------------------------------------------------------


def _shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.npz"


def _save_shard(path: Path, regions: list[ImageRegions], failures: list[Failure], feature_dim: int) -> None:
    def cat(name: str, dtype: Any, width: int | None = None) -> np.ndarray:
        parts = [getattr(r, name) for r in regions]
        empty = np.zeros((0, width) if width else (0,), dtype=dtype)
        return np.concatenate(parts).astype(dtype) if parts else empty

    arrays = {
        "image_ids": np.array([r.image_id for r in regions], dtype=np.int64),
        "widths": np.array([r.width for r in regions], dtype=np.int32),
        "heights": np.array([r.height for r in regions], dtype=np.int32),
        "n_boxes": np.array([len(r) for r in regions], dtype=np.int32),
        "features": cat("features", np.float16, feature_dim),
        "boxes": cat("boxes", np.float32, 4),
        "object_ids": cat("object_ids", np.int16),
        "object_confidence": cat("object_confidence", np.float32),
        "attribute_ids": cat("attribute_ids", np.int16),
        "attribute_confidence": cat("attribute_confidence", np.float32),
        "failure_json": np.array(json.dumps([vars(f) for f in failures])),
    }
    with staged_file(path) as tmp, tmp.open("wb") as stream:
        np.savez(stream, **arrays)


_PER_BOX = ("features", "boxes", "object_ids", "object_confidence", "attribute_ids", "attribute_confidence")


def _load_shard(path: Path) -> tuple[list[ImageRegions], list[Failure]]:
    with np.load(path) as shard:
        arrays = {name: shard[name] for name in shard.files}  # each access of an npz member reads it again
    starts = np.concatenate([[0], np.cumsum(arrays["n_boxes"])])
    regions = [
        ImageRegions(
            image_id=int(image_id),
            width=int(arrays["widths"][i]),
            height=int(arrays["heights"][i]),
            **{name: arrays[name][starts[i] : starts[i + 1]] for name in _PER_BOX},
        )
        for i, image_id in enumerate(arrays["image_ids"])
    ]
    failures = [Failure(**f) for f in json.loads(str(arrays["failure_json"]))]
    return regions, failures


def _shards(records: Sequence[ImageRecord], shard_size: int) -> Iterator[tuple[int, Sequence[ImageRecord]]]:
    for index, start in enumerate(range(0, len(records), shard_size)):
        yield index, records[start : start + shard_size]


def extract_split(
    model: BottomUpDetector,
    records: Sequence[ImageRecord],
    images_dir: Path,
    work_dir: Path,
    settings: Extraction,
    label: str,
) -> dict[str, float]:
    """Write every missing shard of `records` into `work_dir`; returns throughput figures of this run."""
    work_dir.mkdir(parents=True, exist_ok=True)
    feature_dim = model.roi_heads.box_head.out_channels
    shards = _shards(records, settings.shard_size)
    todo = [(i, shard) for i, shard in shards if not _shard_path(work_dir, i).is_file()]
    done_images = len(records) - sum(len(shard) for _, shard in todo)
    if done_images:
        log.info("%s: %d images already extracted, resuming", label, done_images)
    processed, started = 0, time.perf_counter()
    bar = tqdm(total=len(records), initial=done_images, desc=f"regions {label}", unit="img", mininterval=5)
    for index, shard in todo:
        loader = DataLoader(
            _ImageFiles(shard, images_dir),
            batch_size=settings.batch_size,
            num_workers=settings.workers,
            collate_fn=_as_list,
        )
        regions: list[ImageRegions] = []
        failures: list[Failure] = []
        for batch in loader:
            readable = [(record, image) for record, image in batch if not isinstance(image, str)]
            failures += [Failure(r.imgid, r.filename, image) for r, image in batch if isinstance(image, str)]
            if readable:
                images = [image.to(settings.device) for _, image in readable]
                ids = [r.imgid for r, _ in readable]
                regions += regions_of_batch(model, images, ids, settings.selection, settings.precision)
            processed += len(batch)
            bar.update(len(batch))
        _save_shard(_shard_path(work_dir, index), regions, failures, feature_dim)
    bar.close()
    elapsed = time.perf_counter() - started
    rate = processed / elapsed if processed else 0.0
    if processed:
        log.info("%s: %d images in %.1f s (%.1f images/s)", label, processed, elapsed, rate)
    return {f"{label}/images_per_second": rate} if processed else {}


def merge_shards(work_dir: Path, folder: Path, n_records: int, shard_size: int, feature_dim: int, info: dict) -> dict:
    """Write the split's region store from its shards; returns image, box and failure counts."""
    indices = range((n_records + shard_size - 1) // shard_size)
    total = 0
    for index in indices:
        with np.load(_shard_path(work_dir, index)) as shard:
            total += int(shard["n_boxes"].sum())
    writer = StoreWriter(folder, total, feature_dim, info)
    images = failed = 0
    for index in indices:
        regions, failures = _load_shard(_shard_path(work_dir, index))
        for region in regions:
            writer.add(region)
        for failure in failures:
            writer.fail(failure)
        images, failed = images + len(regions), failed + len(failures)
    writer.close()
    return {"images": images, "boxes": total, "failures": failed}


def work_fingerprint(**settings: Any) -> str:
    """Names the work folder: shards are reused only by a run with the same detector, data and settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def extract_dataset(
    model: BottomUpDetector,
    records: Sequence[ImageRecord],
    dataset_dir: Path,
    out_dir: Path,
    work_dir: Path,
    settings: Extraction,
    info: dict[str, Any],
) -> dict[str, float]:
    """Regions of every split into `out_dir/<split>/` (atomically); the work folder is removed when done."""
    feature_dim = model.roi_heads.box_head.out_channels
    summary: dict[str, float] = {}
    by_split = {split: [r for r in records if r.split == split] for split in SPLITS}
    for split, split_records in by_split.items():
        summary |= extract_split(model, split_records, dataset_dir / IMAGES_DIR, work_dir / split, settings, split)
    with staged_dir(out_dir) as staging:
        for split, split_records in by_split.items():
            counts = merge_shards(
                work_dir / split, staging / split, len(split_records), settings.shard_size, feature_dim, info
            )
            summary |= {f"{split}/{key}": value for key, value in counts.items()}
            if counts["failures"]:
                log.warning("%s: %d images could not be read (see failures.parquet)", split, counts["failures"])
    shutil.rmtree(work_dir)
    return summary
