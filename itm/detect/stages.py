"""What the `detector` and `regions` stages do, as library functions of plain arguments."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from itm.atomic import staged_dir
from itm.config import DetectorArchitecture, DetectorTraining, DownloadParams, PretrainedDetector, RemoteFile
from itm.data.download import fetch
from itm.data.records import DATASET_JSON, IMAGES_DIR, ImageRecord, read_dataset_json
from itm.data.regions import RegionStore
from itm.data.synthetic import OBJECTS_FILE
from itm.detect.convert import load_pretrained
from itm.detect.data import read_annotations, read_vocabularies
from itm.detect.extract import SINGLE_PROCESS, Extraction, extract_dataset, precision_agreement, work_fingerprint
from itm.detect.images import UnreadableImageError, load_bgr
from itm.detect.metrics import ground_truth_coverage
from itm.detect.saved import load_detector, save_detector, write_card
from itm.detect.train import train_detector
from itm.distributed import Context
from itm.errors import UserError
from itm.tracking import Tracker

log = logging.getLogger(__name__)


def file_digest(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


# --- detector -------------------------------------------------------------------------------------------------------


def train_synthetic_detector(
    dataset_dir: Path,
    out_dir: Path,
    work_dir: Path,
    architecture: DetectorArchitecture,
    training: DetectorTraining,
    *,
    tracker: Tracker,
    device: torch.device,
    workers: int,
) -> dict[str, Any]:
    """Train the detector on the dataset's object annotations and save it with its validation figures."""
    vocabularies = read_vocabularies(dataset_dir)
    train_items = read_annotations(dataset_dir, "train", vocabularies)
    val_items = read_annotations(dataset_dir, "val", vocabularies)
    digest = file_digest(dataset_dir / DATASET_JSON) + file_digest(dataset_dir / OBJECTS_FILE)
    model, validation = train_detector(
        train_items,
        val_items,
        vocabularies,
        architecture,
        training,
        work_dir=work_dir,
        data_digest=digest,
        tracker=tracker,
        device=device,
        workers=workers,
    )
    tracker.log_metrics(validation.as_metrics())
    log.info(
        "detector validation: object AP@0.5 %.3f, attribute accuracy %.3f",
        validation.object_ap50,
        validation.attribute_accuracy,
    )
    with staged_dir(out_dir) as staging:
        card = save_detector(
            staging,
            model.cpu(),
            architecture,
            list(vocabularies.classes),
            list(vocabularies.attributes),
            source={"kind": "trained", "dataset": str(dataset_dir), "train_images": len(train_items)},
            validation=validation.as_metrics(),
        )
    (work_dir / "checkpoint.pt").unlink(missing_ok=True)
    return card


def convert_published_detector(
    pretrained: PretrainedDetector,
    architecture: DetectorArchitecture,
    out_dir: Path,
    *,
    cache_dir: Path,
    download: DownloadParams,
) -> dict[str, Any]:
    """Fetch published BUTD weights (sha256-checked), convert them to our layout and save them with a card."""
    options = {"retries": download.retries, "backoff_seconds": download.backoff_seconds}
    options |= {"timeout_seconds": download.timeout_seconds}
    assert pretrained.source is not None and pretrained.sha256 is not None  # enforced by the params schema
    path = fetch(pretrained.source, cache_dir, sha256=pretrained.sha256, **options)
    model, converted = load_pretrained(path, pretrained.layout, architecture)
    classes = _vocabulary(pretrained.objects_vocab, cache_dir, options, converted.num_classes - 1)
    attributes = _vocabulary(pretrained.attributes_vocab, cache_dir, options, converted.num_attributes - 1)
    with staged_dir(out_dir) as staging:
        return save_detector(
            staging,
            model,
            architecture,
            classes,
            attributes,
            source={
                "kind": "pretrained",
                "source": pretrained.source,
                "sha256": pretrained.sha256,
                "layout": pretrained.layout,
            },
        )


def _vocabulary(remote: RemoteFile, cache_dir: Path, options: dict, expected: int) -> list[str] | None:
    """Names from a Visual Genome vocabulary file (synonyms comma-separated: the first is kept)."""
    if remote.source is None:
        log.warning("no vocabulary file given: the card lists class/attribute ids without names")
        return None
    path = fetch(remote.source, cache_dir, size=remote.size, md5=remote.md5, sha256=remote.sha256, **options)
    names = [line.split(",")[0].strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != expected:
        raise UserError(f"{path}: {len(names)} names, but the checkpoint has {expected}")
    return names


def record_no_detector(out_dir: Path) -> dict[str, Any]:
    """`detector.weights: none`: a card saying so, for pipelines that import precomputed regions."""
    card = {"source": {"kind": "none"}, "note": "no detector: regions come from precomputed features"}
    with staged_dir(out_dir) as staging:
        write_card(staging, card)
    return card


# --- regions --------------------------------------------------------------------------------------------------------


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
    identity = {"detector": card["sha256"], "data": file_digest(dataset_dir / DATASET_JSON)}
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
    log.info("%s vs fp32 on %d images: %s", settings.precision, len(images), agreement)
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
    log.info("ground-truth objects covered by a region at IoU >= 0.5: %s", coverage)
    return coverage
