"""Which proposals become an image's bottom-up regions: the selection of the reference extractor.

peteanderson80/bottom-up-attention `tools/generate_tsv.py` (`get_detections_from_im`), which produced the features
SCAN and its successors use:
1. for every object class c >= 1, greedy NMS at IoU 0.3 over the (class-agnostic) proposal boxes ranked by the
   class-c probability; a proposal's confidence is the highest class probability with which it survives NMS;
2. proposals with confidence >= 0.2 are kept; if that gives fewer than `min_boxes`, the `min_boxes` most confident
   are taken instead, and if more than `max_boxes`, the `max_boxes` most confident;
3. regions keep the proposal boxes (not the class-regressed ones) and their pooled features; the object label is the
   most likely non-background class and the attribute the most likely attribute other than "none" (LXMERT/MILVLG).
Box overlap uses Caffe's inclusive pixel convention (width = x2 - x1 + 1), as py-faster-rcnn's NMS does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def pairwise_iou(boxes: Tensor, plus_one: bool = True) -> Tensor:
    """[R, R] intersection over union of (x1, y1, x2, y2) boxes; `plus_one` counts pixels inclusively (Caffe)."""
    extra = 1.0 if plus_one else 0.0
    areas = (boxes[:, 2] - boxes[:, 0] + extra) * (boxes[:, 3] - boxes[:, 1] + extra)
    top_left = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    sizes = (bottom_right - top_left + extra).clamp(min=0)
    intersection = sizes[..., 0] * sizes[..., 1]
    return intersection / (areas[:, None] + areas[None, :] - intersection)


def max_confidence_after_nms(boxes: Tensor, class_probs: Tensor, nms_threshold: float) -> Tensor:
    """[R] each proposal's highest foreground-class probability among the classes whose NMS it survives.

    All classes run their greedy NMS at once: proposals are visited in each class's own score order, and the IoU
    matrix is shared because the proposal boxes do not depend on the class.
    """
    scores = class_probs[:, 1:].T.contiguous()  # [C, R], background dropped
    n_classes, n_boxes = scores.shape
    overlaps = pairwise_iou(boxes) > nms_threshold  # [R, R]
    order = scores.argsort(dim=1, descending=True)  # [C, R]
    suppressed = torch.zeros(n_classes, n_boxes, dtype=torch.bool, device=boxes.device)
    kept = torch.zeros_like(suppressed)
    classes = torch.arange(n_classes, device=boxes.device)
    for rank in range(n_boxes):
        candidate = order[:, rank]  # [C] the next proposal of each class
        alive = ~suppressed[classes, candidate]
        kept[classes, candidate] |= alive
        suppressed |= overlaps[candidate] & alive[:, None]
    return (scores * kept).amax(dim=0) if n_classes else scores.new_zeros(n_boxes)


def reference_nms(dets: np.ndarray, threshold: float) -> list[int]:
    """py-faster-rcnn `py_cpu_nms` restated: greedy NMS of [N, 5] (x1, y1, x2, y2, score) rows, inclusive pixels."""
    x1, y1, x2, y2, scores = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, keep = scores.argsort()[::-1], []
    while order.size:
        i = order[0]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        overlap = w * h / (areas[i] + areas[order[1:]] - w * h)
        order = order[np.where(overlap <= threshold)[0] + 1]
    return keep


def reference_max_confidence(boxes: np.ndarray, class_probs: np.ndarray, nms_threshold: float) -> np.ndarray:
    """`max_confidence_after_nms` as generate_tsv.py computes it: one NMS per class in a Python loop.

    Kept as the reference that tests and `bench/extraction.py` check the vectorised version against.
    """
    confidence = np.zeros(len(boxes))
    for c in range(1, class_probs.shape[1]):
        keep = np.array(reference_nms(np.hstack([boxes, class_probs[:, c : c + 1]]), nms_threshold))
        confidence[keep] = np.maximum(confidence[keep], class_probs[keep, c])
    return confidence


def select_regions(
    boxes: Tensor,
    class_probs: Tensor,
    *,
    nms_threshold: float = 0.3,
    confidence_threshold: float = 0.2,
    min_boxes: int = 10,
    max_boxes: int = 100,
) -> Tensor:
    """Indices of the proposals kept as regions, in the reference's order.

    Within the bounds the kept proposals stay in proposal order (numpy.where); when the count is clamped they are
    ordered by descending confidence (argsort). An image with fewer proposals than `min_boxes` keeps them all.
    """
    confidence = max_confidence_after_nms(boxes, class_probs, nms_threshold)
    keep = torch.nonzero(confidence >= confidence_threshold).flatten()
    if min_boxes <= len(keep) <= max_boxes:
        return keep
    limit = min_boxes if len(keep) < min_boxes else max_boxes
    return confidence.argsort(descending=True)[:limit]


@dataclass(frozen=True)
class Labels:
    """Object and attribute labels of regions; ids are 0-based over the real classes/attributes."""

    object_ids: Tensor  # [N] int64
    object_confidence: Tensor  # [N]
    attribute_ids: Tensor  # [N] int64
    attribute_confidence: Tensor  # [N]


def region_labels(class_probs: Tensor, attribute_probs: Tensor) -> Labels:
    """Most likely class without background and attribute without "none", as LXMERT/MILVLG store them."""
    object_confidence, object_ids = class_probs[:, 1:].max(dim=1)
    attribute_confidence, attribute_ids = attribute_probs[:, 1:].max(dim=1)
    return Labels(object_ids, object_confidence, attribute_ids, attribute_confidence)
