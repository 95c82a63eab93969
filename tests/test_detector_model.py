"""The BUTD architecture: Caffe anchors, a fixed stride of 16, the ceil-mode stem, full-size forward on CPU."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from itm.config import DetectorArchitecture
from itm.detect.images import load_bgr
from itm.detect.model import C4Trunk, FixedStrideAnchorGenerator, attribute_loss, build_detector, caffe_anchors

# pipeline.md §1.6, recomputed from py-faster-rcnn generate_anchors.py (ratios 0.5/1/2 x scales 4/8/16/32).
CAFFE_ANCHORS = [
    [-38, -16, 53, 31], [-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199],
    [-24, -24, 39, 39], [-56, -56, 71, 71], [-120, -120, 135, 135], [-248, -248, 263, 263],
    [-14, -36, 29, 51], [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359],
]  # fmt: skip


def test_anchors_are_caffes() -> None:
    assert caffe_anchors((0.5, 1.0, 2.0), (4.0, 8.0, 16.0, 32.0)).tolist() == CAFFE_ANCHORS


def test_ceil_mode_stem_and_res4_size_for_an_unpadded_600_by_1000_image() -> None:
    trunk = C4Trunk((1, 1, 1), width=4, trainable_norm=False)
    res4 = trunk(torch.zeros(1, 3, 600, 1000))["res4"]
    assert res4.shape[-2:] == (38, 63)  # 300x500 -> pool (ceil) 150x250 -> 75x125 -> 38x63


def test_anchor_stride_is_16_whatever_the_padding() -> None:
    generator = FixedStrideAnchorGenerator(caffe_anchors((1.0,), (8.0,)))
    images = ImageList(torch.zeros(1, 3, 600, 1000), [(600, 1000)])
    anchors = generator(images, [torch.zeros(1, 4, 38, 63)])[0]
    assert anchors.shape == (38 * 63, 4)
    assert anchors[1, 0] - anchors[0, 0] == 16 and anchors[63, 1] - anchors[0, 1] == 16
    assert anchors[-1].tolist() == [-56 + 62 * 16, -56 + 37 * 16, 71 + 62 * 16, 71 + 37 * 16]


@pytest.mark.slow
def test_full_size_butd_model_runs_on_a_600_by_1000_image() -> None:
    architecture = DetectorArchitecture(rpn_post_nms_test=8)  # the published model, fewer proposals for speed
    model = build_detector(architecture, 1601, 401).eval()
    image = torch.rand(3, 600, 1000, generator=torch.Generator().manual_seed(0)) * 255
    (output,) = model.extract([image])
    assert output.features.shape == (8, 2048)
    assert output.class_probs.shape == (8, 1601) and output.attribute_probs.shape == (8, 401)
    assert torch.allclose(output.class_probs.sum(1), torch.ones(8), atol=1e-5)
    assert (output.boxes[:, 2] <= 1000).all() and (output.boxes[:, 3] <= 600).all()


def test_attribute_loss_spreads_the_target_over_an_objects_attributes() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.45, 0.45], [0.8, 0.1, 0.1]]))
    targets = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # two attributes; none (-> "no attribute")
    expected = -(torch.log(torch.tensor(0.45)) + torch.log(torch.tensor(0.8))) / 2
    assert torch.isclose(attribute_loss(logits, targets), expected)


def test_described_ground_truth_boxes_come_back_in_image_pixels(tiny_synthetic) -> None:
    from tests.conftest import TINY_DETECTOR

    model = build_detector(DetectorArchitecture(**TINY_DETECTOR), 7, 11).eval()
    image = load_bgr(tiny_synthetic / "images" / "000000.jpg")
    boxes = torch.tensor([[10.0, 20.0, 40.0, 60.0]])
    (output,) = model.describe_boxes([image], [boxes])
    assert torch.allclose(output.boxes, boxes) and output.features.shape == (1, 4 * 32)
