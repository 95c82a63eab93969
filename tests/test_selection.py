"""Region selection against a hand-worked example and against the reference's per-class NMS loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itm.detect.selection import (
    max_confidence_after_nms,
    pairwise_iou,
    reference_max_confidence,
    region_labels,
    select_regions,
)

# Four proposals (Caffe inclusive pixels) and probabilities over (background, class 1, class 2).
BOXES = torch.tensor([[0, 0, 9, 9], [1, 1, 10, 10], [20, 20, 29, 29], [0, 0, 9, 19]], dtype=torch.float32)
PROBS = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.7, 0.1], [0.85, 0.1, 0.05], [0.5, 0.05, 0.45]])
# Worked by hand: IoU(A,B) = 81/119 = 0.68, IoU(A,D) = 100/200 = 0.5, IoU(B,D) = 90/210 = 0.43, C touches none.
# Class 1 visits B, A, C, D: keeps B, suppresses A and D, keeps C. Class 2 visits D, A, B, C: keeps D,
# suppresses A and B, keeps C. So A survives no class (0), B has 0.7, C max(0.1, 0.05), D 0.45.
CONFIDENCE = [0.0, 0.7, 0.1, 0.45]


def test_iou_counts_pixels_inclusively() -> None:
    iou = pairwise_iou(BOXES)
    assert iou[0, 1].item() == pytest.approx(81 / 119)
    assert iou[0, 3].item() == pytest.approx(0.5)
    assert iou[1, 3].item() == pytest.approx(90 / 210)
    assert iou[0, 2].item() == 0.0


def test_confidence_after_per_class_nms_matches_the_hand_worked_example() -> None:
    assert max_confidence_after_nms(BOXES, PROBS, 0.3).tolist() == pytest.approx(CONFIDENCE)


@pytest.mark.parametrize(
    ("min_boxes", "max_boxes", "expected"),
    [
        (1, 10, [1, 3]),  # within bounds: proposal order (numpy.where), confidence >= 0.2
        (3, 10, [1, 3, 2]),  # too few: the 3 most confident, by confidence
        (1, 1, [1]),  # too many: the most confident
        (10, 20, [1, 3, 2, 0]),  # fewer proposals than min_boxes: all of them
    ],
)
def test_selection_bounds(min_boxes: int, max_boxes: int, expected: list[int]) -> None:
    keep = select_regions(BOXES, PROBS, min_boxes=min_boxes, max_boxes=max_boxes)
    assert keep.tolist() == expected


def test_labels_skip_background_and_no_attribute() -> None:
    attributes = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = region_labels(PROBS[[1, 3]], attributes)
    assert labels.object_ids.tolist() == [0, 1] and labels.object_confidence.tolist() == pytest.approx([0.7, 0.45])
    assert labels.attribute_ids.tolist() == [0, 1] and labels.attribute_confidence.tolist() == pytest.approx(
        [0.05, 0.5]
    )


def test_vectorised_nms_equals_the_reference_loop_on_random_proposals() -> None:
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(120, 2, generator=generator) * 300
    boxes = torch.cat([corners, corners + torch.rand(120, 2, generator=generator) * 120 + 5], dim=1)
    probs = torch.softmax(torch.randn(120, 40, generator=generator) * 3, dim=1)
    reference = reference_max_confidence(boxes.double().numpy(), probs.double().numpy(), 0.3)
    np.testing.assert_allclose(max_confidence_after_nms(boxes, probs, 0.3).numpy(), reference, rtol=1e-6)
