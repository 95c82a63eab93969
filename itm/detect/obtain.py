"""The `detector` stage's work: a bottom-up detector trained on the dataset's object boxes, converted from published
BUTD weights, or a card saying there is none; as library functions of plain arguments."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from itm.atomic import staged_dir
from itm.checkpoints import checkpoint_run, remove_checkpoints_when_published
from itm.config import DetectorArchitecture, DetectorTraining, DownloadParams, PretrainedDetector, RemoteFile
from itm.data.download import fetch
from itm.data.records import DATASET_JSON, file_md5
from itm.data.synthetic import OBJECTS_FILE
from itm.detect.convert import load_pretrained
from itm.detect.data import read_annotations, read_vocabularies
from itm.detect.saved import save_detector, write_card
from itm.detect.train import train_detector, training_fingerprint
from itm.errors import UserError
from itm.tracking import RunOpener

log = logging.getLogger(__name__)


def train_synthetic_detector(
    dataset_dir: Path,
    out_dir: Path,
    work_dir: Path,
    architecture: DetectorArchitecture,
    training: DetectorTraining,
    *,
    open_run: RunOpener,
    device: torch.device,
    workers: int,
) -> dict[str, Any]:
    """Train the detector on the dataset's object annotations and save it with its validation metrics; logged to
    the run `open_run` opens, which continues the run of the checkpoint it resumes from."""
    vocabularies = read_vocabularies(dataset_dir)
    train_items = read_annotations(dataset_dir, "train", vocabularies)
    val_items = read_annotations(dataset_dir, "val", vocabularies)
    digest = file_md5(dataset_dir / DATASET_JSON) + file_md5(dataset_dir / OBJECTS_FILE)
    resumed_run = checkpoint_run(work_dir, training_fingerprint(architecture, training, digest))
    with open_run(continue_run=resumed_run) as tracker:
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
        tracker.log_dict(card, "card.json")
    remove_checkpoints_when_published(work_dir)
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
