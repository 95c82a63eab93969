"""The `regions` stage's work: the bottom-up regions of every image of a dataset from the saved detector, as a
library function of plain arguments; on the synthetic set also how many ground-truth objects a region covers."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch

from itm.data.records import DATASET_JSON, IMAGES_DIR, ImageRecord, file_md5, read_dataset_json
from itm.data.regions import RegionStore
from itm.data.synthetic import OBJECTS_FILE
from itm.detect.extract import Extraction, extract_dataset, precision_agreement, work_fingerprint
from itm.detect.images import UnreadableImageError, load_bgr
from itm.detect.metrics import ground_truth_coverage
from itm.detect.saved import load_detector
from itm.distributed import SINGLE_PROCESS, Context
from itm.formatting import format_figures
from itm.tracking import Tracker

log = logging.getLogger(__name__)


def extract_regions(
    dataset_dir: Path,
    detector_dir: Path,
    out_dir: Path,
    work_root: Path,
    settings: Extraction,
    *,
    tracker: Tracker,
    context: Context = SINGLE_PROCESS,
) -> dict[str, float]:
    """Regions of every image with the saved detector; resumes from finished shards under `work_root`.

    Every rank of `context` calls it and extracts its share of the images on its device; rank 0 alone checks the
    reduced precision, writes the store and measures the ground-truth coverage (see `extract_dataset`).
    """
    model, card = load_detector(detector_dir, context.device)
    records = read_dataset_json(dataset_dir / DATASET_JSON)
    identity = {"detector": card["sha256"], "data": file_md5(dataset_dir / DATASET_JSON)}
    identity |= {key: value for key, value in vars(settings).items() if key != "workers"}
    work_dir = work_root / work_fingerprint(**identity)
    info = {"source": "detector", "detector_sha256": card["sha256"], "selection": vars(settings.selection)}
    info |= {"precision": settings.precision}
    if settings.precision != "fp32" and context.is_main:
        info["precision_check"] = _check_precision(model, records, dataset_dir, settings, context.device)
        tracker.log_metrics({f"precision/{key}": value for key, value in info["precision_check"].items()})
    summary = extract_dataset(model, records, dataset_dir, out_dir, work_dir, settings, info, context)
    if context.is_main and (dataset_dir / OBJECTS_FILE).is_file():
        summary |= coverage_by_split(dataset_dir, out_dir, records)
    return summary


def _check_precision(
    model: torch.nn.Module,
    records: list[ImageRecord],
    dataset_dir: Path,
    settings: Extraction,
    device: torch.device,
) -> dict[str, float]:
    """Compare reduced precision with fp32 on the first readable images, and warn when they drift apart."""
    images = []
    for record in records:
        try:
            images.append(load_bgr(dataset_dir / IMAGES_DIR / record.filename).to(device))
        except UnreadableImageError:
            continue
        if len(images) == settings.batch_size:
            break
    agreement = precision_agreement(model, images, settings.precision)
    log.info("%s vs fp32 on %d images: %s", settings.precision, len(images), format_figures(agreement))
    if agreement["mean_cosine"] < 0.99:
        log.warning(
            "%s features differ from fp32 (mean cosine %.4f); consider fp32",
            settings.precision,
            agreement["mean_cosine"],
        )
    return agreement


def coverage_by_split(dataset_dir: Path, regions_dir: Path, records: list[ImageRecord]) -> dict[str, float]:
    """Per split, the share of ground-truth objects overlapped (IoU >= 0.5) by an extracted region."""
    objects = pd.read_parquet(dataset_dir / OBJECTS_FILE)
    truth = {
        int(image_id): torch.tensor(rows[["x1", "y1", "x2", "y2"]].to_numpy(), dtype=torch.float32)
        for image_id, rows in objects.groupby("image_id")
    }
    coverage = {}
    for split in ("train", "val", "test"):
        store = RegionStore(regions_dir / split)
        ids = [r.imgid for r in records if r.split == split and r.imgid in store]
        regions = [torch.from_numpy(store.regions_of(i).boxes) for i in ids]
        coverage[f"{split}/gt_coverage_iou50"] = ground_truth_coverage(
            [truth.get(i, torch.zeros(0, 4)) for i in ids], regions
        )
    log.info("ground-truth objects covered by a region at IoU >= 0.5: %s", format_figures(coverage))
    return coverage
