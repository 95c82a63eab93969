"""Extracting bottom-up regions for every image of a dataset, in resumable shards, by one or several processes.

Each split's images are cut into shards of `shard_size` consecutive images (in dataset order). A finished shard is a
file in the work folder (`shard-00000.npz`, ...), written atomically, so an interrupted run redoes at most one shard
per process. A shard also records a fingerprint of the image files it read (their sha256): a resumed run extracts it
again when a file has changed since, e.g. a broken image fixed after a failed run, and reuses it otherwise. When every
shard exists they are merged into the region store (`itm.data.regions`). Images that cannot be decoded are recorded
as failures and skipped; the run still completes.

Under torchrun (`itm.distributed`) the ranks share the work: at the start of a split rank 0 lists the shards that
have no current file and every rank takes a contiguous range of that list (`shard_range`), so a resumed run divides
the work that is left evenly, whoever wrote the finished shards. Each rank writes only its own shard files, on its own
device (`Context.device`); the work folder must be one that every rank sees (a shared filesystem across nodes). Once
every rank is done, rank 0 alone merges the shards in dataset order, writes the store and removes the work folder;
the store is byte for byte the one a single process writes, as every shard holds the same images in the same
batches. Throughput is the whole job's: every rank's images over the slowest rank's time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from itm.atomic import remove_when_published, staged_dir, staged_file
from itm.data.records import IMAGES_DIR, SPLITS, ImageRecord
from itm.data.regions import Failure, ImageRegions, StoreWriter
from itm.detect.images import UnreadableImageError, decode_bgr, read_image_file
from itm.detect.model import BottomUpDetector
from itm.detect.selection import region_labels, select_regions
from itm.device import autocast
from itm.distributed import SINGLE_PROCESS, Context, all_gather_cat, broadcast_object, shard_range
from itm.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selection:
    """How regions are chosen among the proposals (see itm.detect.selection)."""

    nms_threshold: float = 0.3
    confidence_threshold: float = 0.2
    min_boxes: int = 10
    max_boxes: int = 100


@dataclass(frozen=True)
class Extraction:
    """How an extraction run goes: the selection, batching, precision, shards and decoding processes (the device is
    each process's own: `Context.device`)."""

    selection: Selection
    batch_size: int = 4
    precision: str = "fp32"  # fp32, bf16 or fp16 (autocast on any device)
    shard_size: int = 500  # images per resumable shard
    workers: int = 0  # image-decoding processes (of each rank)


# --- decoding ------------------------------------------------------------------------------------------------------


# The digest of an image file that could not be read at all (absent, a folder, no permission).
_UNREADABLE_FILE = ""


class _ImageFiles(Dataset):
    """(record, image or the reason it could not be read, the digest of the bytes read) for a list of records."""

    def __init__(self, records: Sequence[ImageRecord], images_dir: Path) -> None:
        self.records, self.images_dir = records, images_dir

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[ImageRecord, torch.Tensor | str, str]:
        record = self.records[index]
        path = self.images_dir / record.filename
        try:
            data = read_image_file(path)
        except UnreadableImageError as error:
            return record, str(error), _UNREADABLE_FILE
        digest = hashlib.sha256(data).hexdigest()
        try:
            return record, decode_bgr(data, path), digest
        except UnreadableImageError as error:
            return record, str(error), digest


def _file_digest(path: Path) -> str:
    """The digest `_ImageFiles` records for the image file at `path` as it is now."""
    try:
        return hashlib.sha256(read_image_file(path)).hexdigest()
    except UnreadableImageError:
        return _UNREADABLE_FILE


def inputs_fingerprint(filenames: Sequence[str], digests: Sequence[str]) -> str:
    """What a shard read: each image's file name with the sha256 of its bytes, in shard order."""
    return hashlib.sha256(json.dumps(list(zip(filenames, digests, strict=True))).encode()).hexdigest()


def _as_list(batch: list) -> list:
    return batch


# --- one batch ------------------------------------------------------------------------------------------------------


def regions_of_batch(
    model: BottomUpDetector,
    images: list[torch.Tensor],
    image_ids: list[int],
    selection: Selection,
    precision: str,
) -> list[ImageRegions]:
    """Selected regions of a batch of BGR images (already on the model's device)."""
    device = images[0].device
    with autocast(precision, device):
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
    with autocast(precision, images[0].device):
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


def _save_shard(
    path: Path, regions: list[ImageRegions], failures: list[Failure], feature_dim: int, inputs: str
) -> None:
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
        "inputs_sha256": np.array(inputs),
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


def _shard_count(n_records: int, shard_size: int) -> int:
    return (n_records + shard_size - 1) // shard_size


def _shard_records(records: Sequence[ImageRecord], shard_size: int, index: int) -> Sequence[ImageRecord]:
    return records[index * shard_size : (index + 1) * shard_size]


def _recorded_inputs(path: Path) -> str | None:
    """The inputs fingerprint a shard file recorded; None for a shard written before shards recorded one."""
    with np.load(path) as shard:
        return str(shard["inputs_sha256"]) if "inputs_sha256" in shard.files else None


def _is_current(path: Path, shard: Sequence[ImageRecord], images_dir: Path) -> bool:
    """Whether a finished shard file read the image files as they are now (it is reused only then)."""
    if not path.is_file():
        return False
    digests = [_file_digest(images_dir / record.filename) for record in shard]
    if _recorded_inputs(path) == inputs_fingerprint([record.filename for record in shard], digests):
        return True
    log.info("%s: its images changed since it was extracted; extracting it again", path)
    return False


def _shards_to_extract(
    work_dir: Path, records: Sequence[ImageRecord], shard_size: int, images_dir: Path, context: Context
) -> list[int]:
    """Indices of the shards without a current file (none, or one that read images that have changed since), as
    rank 0 sees them: every rank then divides the same list."""
    todo = None
    if context.is_main:
        indices = range(_shard_count(len(records), shard_size))
        finished = sum(_shard_path(work_dir, i).is_file() for i in indices)
        if finished:
            log.info("%s: checking that the images of %d finished shards are unchanged", work_dir, finished)
        todo = [
            i
            for i in indices
            if not _is_current(_shard_path(work_dir, i), _shard_records(records, shard_size, i), images_dir)
        ]
    return broadcast_object(todo, context)  # type: ignore[return-value]


def _extract_shard(
    model: BottomUpDetector,
    shard: Sequence[ImageRecord],
    images_dir: Path,
    settings: Extraction,
    device: torch.device,
    bar: tqdm,
) -> tuple[list[ImageRegions], list[Failure], str]:
    """Regions of the readable images of one shard, the images that could not be read, and the fingerprint of the
    bytes it read (`inputs_fingerprint`)."""
    loader = DataLoader(
        _ImageFiles(shard, images_dir),
        batch_size=settings.batch_size,
        num_workers=settings.workers,
        collate_fn=_as_list,
    )
    regions: list[ImageRegions] = []
    failures: list[Failure] = []
    digests: list[str] = []
    for batch in loader:
        readable = [(record, image) for record, image, _ in batch if not isinstance(image, str)]
        failures += [Failure(r.imgid, r.filename, image) for r, image, _ in batch if isinstance(image, str)]
        digests += [digest for _, _, digest in batch]
        if readable:
            images = [image.to(device) for _, image in readable]
            ids = [r.imgid for r, _ in readable]
            regions += regions_of_batch(model, images, ids, settings.selection, settings.precision)
        bar.update(len(batch))
    return regions, failures, inputs_fingerprint([record.filename for record in shard], digests)


def _throughput(processed: int, elapsed: float, label: str, context: Context) -> dict[str, float]:
    """Images per second of the whole job on a split: every rank's images over the slowest rank's time (the same
    metrics on every rank); empty when no rank had anything to do."""
    per_rank = all_gather_cat(torch.tensor([[float(processed), elapsed]], dtype=torch.float64), context)
    images, slowest = int(per_rank[:, 0].sum()), float(per_rank[:, 1].max())
    if not images:
        return {}
    rate = images / slowest
    if context.is_main:
        processes = f" in {context.world_size} processes" if context.distributed else ""
        log.info("%s: %d images in %.1f s (%.1f images/s%s)", label, images, slowest, rate, processes)
    return {f"{label}/images_per_second": rate}


def extract_split(
    model: BottomUpDetector,
    records: Sequence[ImageRecord],
    images_dir: Path,
    work_dir: Path,
    settings: Extraction,
    label: str,
    context: Context = SINGLE_PROCESS,
) -> dict[str, float]:
    """Write this rank's share of the missing shards of `records` into `work_dir`; returns the throughput metrics
    of this run over all ranks. Every rank must call it (it synchronises them)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    feature_dim = model.roi_heads.box_head.out_channels
    missing = _shards_to_extract(work_dir, records, settings.shard_size, images_dir, context)
    done_images = len(records) - sum(len(_shard_records(records, settings.shard_size, i)) for i in missing)
    if done_images and context.is_main:
        log.info("%s: %d images already extracted, resuming", label, done_images)
    mine = [missing[i] for i in shard_range(len(missing), context.rank, context.world_size)]
    shards = {index: _shard_records(records, settings.shard_size, index) for index in mine}
    desc = f"regions {label}" + (f" [rank 0 of {context.world_size}]" if context.distributed else "")
    bar = tqdm(total=sum(map(len, shards.values())), desc=desc, unit="img", mininterval=5, disable=not context.is_main)
    processed, started = 0, time.perf_counter()
    for index, shard in shards.items():
        regions, failures, inputs = _extract_shard(model, shard, images_dir, settings, context.device, bar)
        _save_shard(_shard_path(work_dir, index), regions, failures, feature_dim, inputs)
        processed += len(shard)
    bar.close()
    return _throughput(processed, time.perf_counter() - started, label, context)


def merge_shards(work_dir: Path, folder: Path, n_records: int, shard_size: int, feature_dim: int, info: dict) -> dict:
    """Write the split's region store from its shards; returns image, box and failure counts."""
    indices = range(_shard_count(n_records, shard_size))
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
    """Names the work folder: shards are reused only by a run with the same detector, data and settings (and each
    shard only while the image files it read are unchanged: `inputs_fingerprint`)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_shards_written(work_dir: Path, n_records: int, shard_size: int) -> None:
    """Refuse to merge when a shard file is missing: under several nodes, the work folder is not shared."""
    absent = [i for i in range(_shard_count(n_records, shard_size)) if not _shard_path(work_dir, i).is_file()]
    if absent:
        raise UserError(
            f"{work_dir}: {len(absent)} shard files missing after extraction (first: "
            f"{_shard_path(work_dir, absent[0]).name}); with several nodes the work folder must be shared by all"
        )


def _merge_splits(
    by_split: dict[str, list[ImageRecord]],
    work_dir: Path,
    out_dir: Path,
    settings: Extraction,
    feature_dim: int,
    info: dict[str, Any],
) -> dict[str, float]:
    """Every split's shards into `out_dir/<split>/` (atomically); returns the image, box and failure counts."""
    summary: dict[str, float] = {}
    for split, split_records in by_split.items():
        _check_shards_written(work_dir / split, len(split_records), settings.shard_size)
    with staged_dir(out_dir) as staging:
        for split, split_records in by_split.items():
            counts = merge_shards(
                work_dir / split, staging / split, len(split_records), settings.shard_size, feature_dim, info
            )
            summary |= {f"{split}/{key}": value for key, value in counts.items()}
            if counts["failures"]:
                log.warning("%s: %d images could not be read (see failures.parquet)", split, counts["failures"])
    return summary


def extract_dataset(
    model: BottomUpDetector,
    records: Sequence[ImageRecord],
    dataset_dir: Path,
    out_dir: Path,
    work_dir: Path,
    settings: Extraction,
    info: dict[str, Any],
    context: Context = SINGLE_PROCESS,
) -> dict[str, float]:
    """Regions of every split into `out_dir/<split>/` (atomically); the work folder is removed when done.

    Every rank calls it with the same arguments (`model` on its `context.device`) and extracts its share of the
    shards; rank 0 alone then writes the store and returns its counts with the throughput, while the other ranks
    return the throughput only and write nothing else.
    """
    by_split = {split: [r for r in records if r.split == split] for split in SPLITS}
    summary: dict[str, float] = {}
    for split, split_records in by_split.items():
        summary |= extract_split(
            model, split_records, dataset_dir / IMAGES_DIR, work_dir / split, settings, split, context
        )
    context.barrier()  # every rank's shards are on disk
    if context.is_main:
        feature_dim = model.roi_heads.box_head.out_channels
        summary |= _merge_splits(by_split, work_dir, out_dir, settings, feature_dim, info)
        remove_when_published(work_dir)  # kept while the stage may still fail and put the earlier store back
    return summary
