"""How good a detector is: box AP at IoU 0.5 per class (PASCAL VOC, all-point interpolation), attribute accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou


@dataclass(frozen=True)
class Detections:
    """One image's detections."""

    boxes: Tensor  # [N, 4]
    scores: Tensor  # [N]
    labels: Tensor  # [N] class ids (background excluded)


@dataclass(frozen=True)
class GroundTruth:
    """One image's annotated objects."""

    boxes: Tensor  # [M, 4]
    labels: Tensor  # [M]


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope (VOC 2010+ all-point interpolation)."""
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # precision envelope, non-increasing in recall
    changes = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[changes + 1] - recall[changes]) * precision[changes + 1]))


def class_ap(
    detections: Sequence[Detections], truths: Sequence[GroundTruth], label: int, iou_threshold: float = 0.5
) -> float | None:
    """AP of one class; None when the class has no ground-truth object."""
    n_truth = sum(int((truth.labels == label).sum()) for truth in truths)
    if n_truth == 0:
        return None
    found: list[tuple[float, bool]] = []
    for detection, truth in zip(detections, truths, strict=True):
        mine = detection.labels == label
        boxes, scores = detection.boxes[mine], detection.scores[mine]
        targets = truth.boxes[truth.labels == label]
        taken = torch.zeros(len(targets), dtype=torch.bool)
        overlaps = box_iou(boxes, targets) if len(targets) and len(boxes) else torch.zeros(len(boxes), 0)
        for index in scores.argsort(descending=True).tolist():
            hit = False
            if overlaps.shape[1]:
                best_iou, best = overlaps[index].max(dim=0)
                # A ground-truth object is matched once; later detections of it are false positives (VOC rule).
                if best_iou >= iou_threshold and not taken[best]:
                    taken[best] = hit = True
            found.append((float(scores[index]), hit))
    if not found:
        return 0.0
    found.sort(key=lambda item: -item[0])
    hits = np.array([hit for _, hit in found], dtype=np.float64)
    true_positives, false_positives = np.cumsum(hits), np.cumsum(1.0 - hits)
    return average_precision(true_positives / n_truth, true_positives / (true_positives + false_positives))


def mean_ap(
    detections: Sequence[Detections], truths: Sequence[GroundTruth], labels: Sequence[int], iou_threshold: float = 0.5
) -> tuple[float, dict[int, float]]:
    """Mean over classes with ground truth of their AP, and the per-class values."""
    per_class = {}
    for label in labels:
        value = class_ap(detections, truths, label, iou_threshold)
        if value is not None:
            per_class[label] = value
    return (float(np.mean(list(per_class.values()))) if per_class else 0.0), per_class


def attribute_accuracy(attribute_probs: Tensor, targets: Tensor) -> float:
    """Share of ground-truth attributes found among each object's top-k predictions, k = its attribute count.

    `attribute_probs` [M, A] and multi-hot `targets` [M, A] exclude "no attribute"; objects without attributes
    are not counted.
    """
    counts = targets.sum(dim=1).long()
    total, hits = 0, 0
    for probs, target, k in zip(attribute_probs, targets, counts.tolist(), strict=True):
        if k:
            top = probs.topk(k).indices
            hits += int(target[top].sum())
            total += k
    return hits / total if total else 0.0


def ground_truth_coverage(truth_boxes: Sequence[Tensor], region_boxes: Sequence[Tensor], iou: float = 0.5) -> float:
    """Share of ground-truth objects that some extracted region overlaps with IoU >= `iou`."""
    covered = total = 0
    for truth, regions in zip(truth_boxes, region_boxes, strict=True):
        total += len(truth)
        if len(truth) and len(regions):
            covered += int((box_iou(truth, regions).amax(dim=1) >= iou).sum())
    return covered / total if total else 0.0
