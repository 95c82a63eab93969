"""Training the (scaled-down) bottom-up detector on the synthetic object and attribute boxes.

SGD with momentum, linear warm-up and 10x step decay, as torchvision's detection references train Faster R-CNN.
Batch norm uses batch statistics while training from scratch and is frozen into the model afterwards, so the
saved detector has exactly the BUTD layout. A checkpoint is written after every epoch (`itm.checkpoints`: atomically,
the one before kept for when it is damaged); a re-run with the same settings and data resumes from it, and logs to
the MLflow run the checkpoint names, or, in another run, logs the resumed epochs again, so one run holds them all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from itm.checkpoints import FINGERPRINT_KEY, RUN_ID_KEY, load_checkpoint, save_checkpoint
from itm.config import DetectorArchitecture, DetectorTraining
from itm.detect.data import Annotated, DetectionDataset, Vocabularies, collate
from itm.detect.metrics import Detections, GroundTruth, attribute_accuracy, mean_ap
from itm.detect.model import BottomUpDetector, build_detector, freeze_batch_norm
from itm.errors import UserError
from itm.tracking import Tracker

log = logging.getLogger(__name__)

_CHECKPOINT_KEYS = ("optimizer", "schedule", "rng", "history")  # and the fingerprint and model weights


@dataclass(frozen=True)
class Validation:
    """Validation metrics of a detector."""

    object_ap50: float  # mean over classes of box AP at IoU 0.5
    per_class_ap50: dict[str, float]
    attribute_accuracy: float  # on ground-truth boxes, see itm.detect.metrics.attribute_accuracy

    def as_metrics(self) -> dict[str, float]:
        per_class = {f"val/ap50_{name}": value for name, value in self.per_class_ap50.items()}
        return {"val/object_ap50": self.object_ap50, "val/attribute_accuracy": self.attribute_accuracy} | per_class


def training_fingerprint(architecture: DetectorArchitecture, training: DetectorTraining, data_digest: str) -> str:
    """Identifies a training run: a checkpoint is resumed only by a run with the same settings and data."""
    settings = {"architecture": architecture.model_dump(mode="json"), "training": training.model_dump(mode="json")}
    payload = json.dumps(settings, sort_keys=True) + data_digest
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def learning_rate_factor(iteration: int, total: int, warmup: int, decay_at: tuple[float, ...]) -> float:
    """Multiplier of the base learning rate: linear warm-up from 0.001, then 10x down at each `decay_at` share."""
    warm = 1.0 if iteration >= warmup else 0.001 + (1 - 0.001) * iteration / warmup
    return warm * 0.1 ** sum(iteration >= share * total for share in decay_at)


def train_detector(
    train_items: list[Annotated],
    val_items: list[Annotated],
    vocabularies: Vocabularies,
    architecture: DetectorArchitecture,
    training: DetectorTraining,
    *,
    work_dir: Path,
    data_digest: str,
    tracker: Tracker,
    device: torch.device,
    workers: int = 0,
) -> tuple[BottomUpDetector, Validation]:
    """Train, freeze batch norm, validate; resumes from `work_dir/checkpoint.pt` when it belongs to this run."""
    torch.manual_seed(training.seed)
    items = train_items[: training.max_images] if training.max_images else train_items
    model = build_detector(architecture, vocabularies.num_classes, vocabularies.num_attributes, trainable_norm=True).to(
        device
    )
    optimizer = torch.optim.SGD(
        model.parameters(), lr=training.learning_rate, momentum=training.momentum, weight_decay=training.weight_decay
    )
    per_epoch = math.ceil(len(items) / training.batch_size)
    total = per_epoch * training.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: learning_rate_factor(it, total, training.warmup_iterations, training.decay_at)
    )
    fingerprint = training_fingerprint(architecture, training, data_digest)
    history = _resume(work_dir, fingerprint, model, optimizer, schedule, tracker)
    for epoch in range(len(history), training.epochs):
        generator = torch.Generator().manual_seed(training.seed * 1000 + epoch)
        loader = DataLoader(
            DetectionDataset(items),
            batch_size=training.batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=collate,
            num_workers=workers,
        )
        averages = _train_one_epoch(model, loader, optimizer, schedule, device, epoch, training.epochs)
        tracker.log_metrics(averages, step=epoch + 1)
        history.append(averages)
        _save_checkpoint(work_dir, fingerprint, history, model, optimizer, schedule, tracker.run_id)
    model.eval()
    freeze_batch_norm(model)
    validation = validate(model, val_items, vocabularies, device=device, batch_size=training.batch_size)
    return model, validation


def _train_one_epoch(
    model: BottomUpDetector,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    epoch: int,
    epochs: int,
) -> dict[str, float]:
    from tqdm import tqdm

    model.train()
    sums: dict[str, float] = defaultdict(float)
    seen, started = 0, time.perf_counter()
    bar = tqdm(loader, desc=f"detector epoch {epoch + 1}/{epochs}", unit="batch", mininterval=5)
    for iteration, (images, targets) in enumerate(bar):
        images = [image.to(device) for image in images]
        targets = [{key: value.to(device) for key, value in target.items()} for target in targets]
        losses = model(images, targets)
        loss = sum(losses.values())
        if not torch.isfinite(loss):  # a setting to change, not a bug: one line, as the matchers' loop says it
            raise UserError(
                f"detector: the loss became {loss.item()} in epoch {epoch + 1}, batch {iteration + 1} "
                f"({_scalars(losses)}); lower detector.train.learning_rate or raise detector.train.warmup_iterations"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        for key, value in losses.items():
            sums[key] += value.item() * len(images)
        sums["loss"] += loss.item() * len(images)
        seen += len(images)
        bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}")
    elapsed = time.perf_counter() - started
    averages = {f"train/{key}": value / seen for key, value in sums.items()}
    averages |= {"train/images_per_second": seen / elapsed, "train/learning_rate": schedule.get_last_lr()[0]}
    log.info("detector epoch %d/%d: %s", epoch + 1, epochs, _scalars(averages))
    return averages


def _scalars(values: Mapping[str, float | Tensor]) -> str:
    return ", ".join(
        f"{key}={float(value.detach() if torch.is_tensor(value) else value):.4g}" for key, value in values.items()
    )


def _save_checkpoint(
    work_dir: Path,
    fingerprint: str,
    history: list[dict[str, float]],
    model: BottomUpDetector,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    run_id: str | None,
) -> None:
    state = {
        FINGERPRINT_KEY: fingerprint,
        RUN_ID_KEY: run_id,
        "history": history,  # each finished epoch's averages, one per epoch done
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "rng": torch.get_rng_state(),
    }
    save_checkpoint(work_dir, state)


def _resume(
    work_dir: Path,
    fingerprint: str,
    model: BottomUpDetector,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    tracker: Tracker,
) -> list[dict[str, float]]:
    """The finished epochs' averages (none without a usable checkpoint of this run), with the state restored; when
    `tracker` logs to another run than the checkpoint's, the finished epochs are logged to it again."""
    state = load_checkpoint(work_dir, fingerprint, model, _CHECKPOINT_KEYS)
    if state is None:
        return []
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["rng"])
    history = list(state["history"])
    log.info("resuming detector training after epoch %d from %s", len(history), work_dir)
    if tracker.run_id is not None and tracker.run_id != state.get(RUN_ID_KEY):
        for epoch, averages in enumerate(history, start=1):
            tracker.log_metrics(averages, step=epoch)
    return history


@torch.no_grad()
def validate(
    model: BottomUpDetector,
    items: list[Annotated],
    vocabularies: Vocabularies,
    *,
    device: torch.device,
    batch_size: int,
) -> Validation:
    """Box AP@0.5 of the detector's own detections, and attribute accuracy on the ground-truth boxes."""
    model.eval()
    loader = DataLoader(DetectionDataset(items), batch_size=batch_size, collate_fn=collate)
    detections, truths, attribute_probs, attribute_targets = [], [], [], []
    for images, targets in loader:
        images = [image.to(device) for image in images]
        for output in model(images):
            detections.append(Detections(output["boxes"].cpu(), output["scores"].cpu(), output["labels"].cpu()))
        truths += [GroundTruth(t["boxes"], t["labels"]) for t in targets]
        described = model.describe_boxes(images, [t["boxes"] for t in targets])
        attribute_probs += [d.attribute_probs[:, 1:].cpu() for d in described]
        attribute_targets += [t["attributes"][:, 1:] for t in targets]
    labels = range(1, vocabularies.num_classes)
    mean, per_class = mean_ap(detections, truths, labels)
    accuracy = attribute_accuracy(torch.cat(attribute_probs), torch.cat(attribute_targets))
    named = {vocabularies.classes[label - 1]: value for label, value in per_class.items()}
    return Validation(mean, named, accuracy)
