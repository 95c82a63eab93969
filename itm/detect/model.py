"""The bottom-up-attention Faster R-CNN (Anderson et al., CVPR 2018) on torchvision.models.detection parts.

The architecture follows the Caffe Visual Genome model that SCAN, CVSE and their successors consume
(peteanderson80/bottom-up-attention, `models/vg/ResNet-101/faster_rcnn_end2end_final/test.prototxt`):
- a ResNet C4 trunk with MSRA-style bottlenecks (the stride sits on the first 1x1 conv), a stem max-pool with
  pad 0 and Caffe's ceil rounding, and frozen batch norm (eps 1e-5);
- an RPN with a 3x3 conv to `rpn_channels` (512), 12 Caffe anchors (ratios 0.5/1/2 x scales 4/8/16/32 of a 16-px
  base, ratio-major) laid out with a fixed stride of 16, and box deltas with weights (1, 1, 1, 1);
- RoI max-pooling 14x14 at 1/16 on res4, then res5 with stride 1 and dilation 2, mean-pooled to the region
  feature (2048-d at full width);
- a class head (background is class 0) with class-specific box deltas, weights (1, 1, 1, 1);
- the attribute head: class embedding (256) of the class, concatenated with the region feature, fc 512, ReLU, fc
  to the attributes ("no attribute" is attribute 0).

The same builder makes the scaled-down variant that the synthetic pipeline trains: fewer blocks per stage,
narrower stages, smaller images and anchors (all in `params.yaml: detector.architectures`).

Known differences from the Caffe extractor, all inherited from torchvision's RPN and transform: box decoding uses
width = x2 - x1 (Caffe adds one pixel); proposals are filtered at a minimum size of 1e-3 px after the top-k (Caffe
drops boxes under 16 px at the input scale before it); images are resized with bilinear interpolation on the
mean-subtracted tensor and zero-padded to a multiple of 32 when batched. They can move proposals at the margin,
which changes which regions are selected, never how they are pooled. Unlike torchvision's, the resize keeps at least
one pixel on each side (`network_input_size`), so a strip such as 2000x4 is read instead of stopping the run.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import RoIPool
from torchvision.ops.misc import FrozenBatchNorm2d

from itm.config import DetectorArchitecture

# Caffe BUTD preprocessing: BGR pixels in 0..255 minus these means, no scaling (lib/fast_rcnn/config.py).
PIXEL_MEANS_BGR = (102.9801, 115.9465, 122.7717)
FEATURE_STRIDE = 16  # res4 of a C4 ResNet
RES4 = "res4"


# --- trunk and res5 -------------------------------------------------------------------------------------------------


def _norm(channels: int, trainable: bool) -> nn.Module:
    # Frozen BN is what the published weights use; a network trained from scratch needs batch statistics instead.
    # Both hold the same four tensors, so a trained model converts to frozen BN (see `freeze_batch_norm`).
    return nn.BatchNorm2d(channels, eps=1e-5) if trainable else FrozenBatchNorm2d(channels, eps=1e-5)


class Bottleneck(nn.Module):
    """ResNet bottleneck, MSRA style: the stride is on the first 1x1 conv (Caffe `res{s}a_branch2a`)."""

    def __init__(
        self, in_channels: int, planes: int, out_channels: int, stride: int, dilation: int, trainable_norm: bool
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, stride=stride, bias=False)
        self.bn1 = _norm(planes, trainable_norm)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = _norm(planes, trainable_norm)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = _norm(out_channels, trainable_norm)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), _norm(out_channels, trainable_norm)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


def _stage(
    in_channels: int, planes: int, blocks: int, stride: int, dilation: int, trainable_norm: bool
) -> nn.Sequential:
    out_channels = planes * 4
    layers = [Bottleneck(in_channels, planes, out_channels, stride, dilation, trainable_norm)]
    layers += [Bottleneck(out_channels, planes, out_channels, 1, dilation, trainable_norm) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class C4Trunk(nn.Module):
    """conv1 .. res4 of a ResNet: stride 16, `width * 16` output channels (1024 for ResNet-101)."""

    def __init__(self, blocks: tuple[int, int, int], width: int, trainable_norm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = _norm(width, trainable_norm)
        # Caffe `pool1`: kernel 3, stride 2, no padding, output size rounded up.
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=0, ceil_mode=True)
        self.layer1 = _stage(width, width, blocks[0], 1, 1, trainable_norm)
        self.layer2 = _stage(width * 4, width * 2, blocks[1], 2, 1, trainable_norm)
        self.layer3 = _stage(width * 8, width * 4, blocks[2], 2, 1, trainable_norm)
        self.out_channels = width * 16

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        x = self.maxpool(F.relu(self.bn1(self.conv1(images))))
        return OrderedDict([(RES4, self.layer3(self.layer2(self.layer1(x))))])


class Res5Head(nn.Module):
    """res5 on pooled regions with stride 1 and dilation 2 (Caffe test.prototxt), mean-pooled to one vector."""

    def __init__(self, blocks: int, width: int, trainable_norm: bool) -> None:
        super().__init__()
        self.layer4 = _stage(width * 16, width * 8, blocks, 1, 2, trainable_norm)
        self.out_channels = width * 32

    def forward(self, pooled: Tensor) -> Tensor:
        return self.layer4(pooled).mean(dim=(2, 3))  # [R, D]


class C4RoIPool(nn.Module):
    """RoI max-pooling on res4 in the interface torchvision's RoIHeads expects."""

    def __init__(self, output_size: int) -> None:
        super().__init__()
        self.pool = RoIPool((output_size, output_size), spatial_scale=1.0 / FEATURE_STRIDE)

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: object = None) -> Tensor:
        return self.pool(features[RES4], proposals)


# --- RPN ------------------------------------------------------------------------------------------------------------


def caffe_anchors(ratios: tuple[float, ...], scales: tuple[float, ...], base_size: int = 16) -> Tensor:
    """[A, 4] anchors of one feature cell, ratio-major, as py-faster-rcnn `lib/rpn/generate_anchors.py` makes them.

    Boxes are in Caffe's inclusive pixel convention around the centre ((base - 1) / 2, (base - 1) / 2); widths and
    heights are rounded to whole pixels (numpy's round-half-to-even, as in the original).
    """

    def centre_form(box: np.ndarray) -> tuple[float, float, float, float]:
        w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
        return w, h, box[0] + 0.5 * (w - 1), box[1] + 0.5 * (h - 1)

    def corners(ws: np.ndarray, hs: np.ndarray, cx: float, cy: float) -> np.ndarray:
        ws, hs = ws[:, None], hs[:, None]
        return np.hstack([cx - 0.5 * (ws - 1), cy - 0.5 * (hs - 1), cx + 0.5 * (ws - 1), cy + 0.5 * (hs - 1)])

    w, h, cx, cy = centre_form(np.array([0, 0, base_size - 1, base_size - 1], dtype=np.float64))
    widths = np.round(np.sqrt(w * h / np.asarray(ratios)))
    per_ratio = corners(widths, np.round(widths * np.asarray(ratios)), cx, cy)
    anchors = []
    for box in per_ratio:
        w, h, cx, cy = centre_form(box)
        anchors.append(corners(w * np.asarray(scales), h * np.asarray(scales), cx, cy))
    return torch.tensor(np.vstack(anchors), dtype=torch.float32)


class FixedStrideAnchorGenerator(nn.Module):
    """Cell anchors repeated every `stride` pixels over the feature map.

    torchvision's AnchorGenerator derives the stride from the padded image size, which is 15 instead of 16 for an
    unpadded 600-px input with the ceil-mode stem; Caffe's proposal layer uses a fixed `feat_stride` of 16.
    """

    def __init__(self, cell_anchors: Tensor, stride: int = FEATURE_STRIDE) -> None:
        super().__init__()
        self.register_buffer("cell_anchors", cell_anchors)
        self.stride = stride

    def num_anchors_per_location(self) -> list[int]:
        return [int(self.cell_anchors.shape[0])]

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        height, width = feature_maps[0].shape[-2:]
        device = feature_maps[0].device
        ys = torch.arange(height, device=device, dtype=torch.float32) * self.stride
        xs = torch.arange(width, device=device, dtype=torch.float32) * self.stride
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([grid_x, grid_y, grid_x, grid_y], dim=-1).reshape(-1, 1, 4)
        # Order (y, x, anchor) matches the RPN head's flattening in torchvision's concat_box_prediction_layers.
        anchors = (shifts + self.cell_anchors.to(device).view(1, -1, 4)).reshape(-1, 4)
        return [anchors for _ in range(len(image_list.image_sizes))]


class RPNHead(nn.Module):
    """3x3 conv to `hidden` channels + ReLU, then objectness logits (one per anchor) and box deltas."""

    def __init__(self, in_channels: int, hidden: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.cls_logits = nn.Conv2d(hidden, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(hidden, num_anchors * 4, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        hidden = [F.relu(self.conv(feature)) for feature in features]
        return [self.cls_logits(h) for h in hidden], [self.bbox_pred(h) for h in hidden]


# --- input ----------------------------------------------------------------------------------------------------------


def network_input_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(height, width) an image is resized to: the shorter side to `min_size` unless the longer then exceeds
    `max_size`, floored as torchvision floors it, but never below one pixel.

    torchvision rounds a side to zero for an extreme aspect ratio (2000x4 with a 96-px cap: 96x0.19) and its
    interpolation then raises; one pixel keeps the image usable, and the boxes go back with per-axis scales.
    """
    scale = min(min_size / min(height, width), max_size / max(height, width))
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


class BottomUpTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform (mean subtraction, resize, padding into a batch) with a resize that never
    makes a side zero pixels; every other image is resized exactly as before (the same bilinear call and size)."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict | None]:
        height, width = image.shape[-2:]
        min_size = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        size = network_input_size(int(height), int(width), min_size, self.max_size)
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], [height, width], list(size))
        return image, target


# --- heads ----------------------------------------------------------------------------------------------------------


class AttributeHead(nn.Module):
    """Attribute logits from a region feature and its class (Caffe `cls_embedding`, `fc_attr`, `attr_score`)."""

    def __init__(self, feature_dim: int, num_classes: int, num_attributes: int, embedding: int, hidden: int) -> None:
        super().__init__()
        self.cls_embedding = nn.Embedding(num_classes, embedding)
        self.fc_attr = nn.Linear(feature_dim + embedding, hidden)
        self.attr_score = nn.Linear(hidden, num_attributes)

    def forward(self, features: Tensor, classes: Tensor) -> Tensor:
        joint = torch.cat([features, self.cls_embedding(classes)], dim=1)  # [R, D + E]
        return self.attr_score(F.relu(self.fc_attr(joint)))  # [R, A]


def attribute_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Softmax cross-entropy against the uniform distribution over each region's attributes.

    The head is read with a softmax at test time (BUTD `attr_prob`), so it is trained as one: a region with k
    attributes spreads its target mass 1/k over them, and one with none targets attribute 0 ("no attribute").
    `targets` is multi-hot [R, A].
    """
    targets = targets.clone()
    targets[targets.sum(dim=1) == 0, 0] = 1.0
    distribution = targets / targets.sum(dim=1, keepdim=True)
    return -(distribution * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


@dataclass(frozen=True)
class RegionOutputs:
    """What the detector says about one image's proposals, in original image pixels."""

    boxes: Tensor  # [R, 4] proposal boxes (x1, y1, x2, y2)
    features: Tensor  # [R, D] pooled res5 features
    class_probs: Tensor  # [R, C] softmax over classes, background first
    attribute_probs: Tensor  # [R, A] softmax over attributes of the most likely class, "no attribute" first


class BottomUpRoIHeads(RoIHeads):
    """torchvision RoIHeads plus the attribute head; trains the attribute head on foreground regions."""

    def __init__(self, attribute_head: AttributeHead, attribute_loss_weight: float, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.attribute_head = attribute_head
        self.attribute_loss_weight = attribute_loss_weight

    def forward(  # type: ignore[override]
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise ValueError("training needs targets")
        proposals, matched, labels, regression_targets = self.select_training_samples(proposals, targets)
        region_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(region_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)

        classes = torch.cat(labels)
        attributes = torch.cat([target["attributes"][index] for target, index in zip(targets, matched, strict=True)])
        foreground = classes > 0
        # As in BUTD training, the attribute head sees the ground-truth class, not the predicted one.
        attribute_logits = self.attribute_head(region_features[foreground], classes[foreground])
        loss_attributes = attribute_loss(attribute_logits, attributes[foreground])
        return [], {
            "loss_classifier": loss_classifier,
            "loss_box_reg": loss_box_reg,
            "loss_attributes": self.attribute_loss_weight * loss_attributes,
        }

    def describe(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list) -> list[RegionOutputs]:
        """Features, class and attribute probabilities of `proposals` (boxes still at network input scale)."""
        region_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, _ = self.box_predictor(region_features)
        class_probs = F.softmax(class_logits, dim=1)
        # Caffe feeds the argmax class, background included, to the attribute embedding at test time.
        attribute_probs = F.softmax(self.attribute_head(region_features, class_probs.argmax(dim=1)), dim=1)
        counts = [len(p) for p in proposals]
        return [
            RegionOutputs(boxes, feats, probs, attrs)
            for boxes, feats, probs, attrs in zip(
                proposals,
                region_features.split(counts),
                class_probs.split(counts),
                attribute_probs.split(counts),
                strict=True,
            )
        ]


class BottomUpDetector(GeneralizedRCNN):
    """Faster R-CNN with the BUTD C4 layout and attribute head.

    Takes BGR images with values in 0..255 (see `itm.detect.images`). `forward` is torchvision's (losses in
    training, detections in eval); `extract` returns every proposal with its feature and class/attribute
    probabilities, for the Caffe-style region selection in `itm.detect.selection`.
    """

    @torch.no_grad()
    def extract(self, images: list[Tensor]) -> list[RegionOutputs]:
        """Every RPN proposal of each image with its feature and class/attribute probabilities."""
        return self._describe(images, None)

    @torch.no_grad()
    def describe_boxes(self, images: list[Tensor], boxes: list[Tensor]) -> list[RegionOutputs]:
        """Features and class/attribute probabilities of given boxes (original image pixels)."""
        return self._describe(images, boxes)

    def _describe(self, images: list[Tensor], boxes: list[Tensor] | None) -> list[RegionOutputs]:
        original_sizes = [image.shape[-2:] for image in images]
        batch, _ = self.transform(images)
        features = self.backbone(batch.tensors)
        # Per image (x, y, x, y) factors from original pixels to network input pixels.
        scales = [
            torch.tensor([new[1] / old[1], new[0] / old[0]] * 2, device=batch.tensors.device)
            for new, old in zip(batch.image_sizes, original_sizes, strict=True)
        ]
        if boxes is None:
            proposals, _ = self.rpn(batch, features)
        else:
            proposals = [b.to(batch.tensors.device) * scale for b, scale in zip(boxes, scales, strict=True)]
        outputs = self.roi_heads.describe(features, proposals, batch.image_sizes)
        return [replace(output, boxes=output.boxes / scale) for output, scale in zip(outputs, scales, strict=True)]


def build_detector(
    architecture: DetectorArchitecture, num_classes: int, num_attributes: int, *, trainable_norm: bool = False
) -> BottomUpDetector:
    """The bottom-up detector for `num_classes` (background included) and `num_attributes` ("none" included)."""
    a = architecture
    trunk = C4Trunk(tuple(a.blocks[:3]), a.width, trainable_norm)
    cell_anchors = caffe_anchors(tuple(a.anchor_ratios), tuple(a.anchor_scales))
    rpn = RegionProposalNetwork(
        FixedStrideAnchorGenerator(cell_anchors),  # type: ignore[arg-type]
        RPNHead(trunk.out_channels, a.rpn_channels, len(cell_anchors)),
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_top_n={"training": a.rpn_pre_nms_train, "testing": a.rpn_pre_nms_test},
        post_nms_top_n={"training": a.rpn_post_nms_train, "testing": a.rpn_post_nms_test},
        nms_thresh=a.rpn_nms_threshold,
    )
    res5 = Res5Head(a.blocks[3], a.width, trainable_norm)
    roi_heads = BottomUpRoIHeads(
        attribute_head=AttributeHead(
            res5.out_channels, num_classes, num_attributes, a.class_embedding, a.attribute_hidden
        ),
        attribute_loss_weight=a.attribute_loss_weight,
        box_roi_pool=C4RoIPool(a.pool_size),
        box_head=res5,
        box_predictor=FastRCNNPredictor(res5.out_channels, num_classes),
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.5,
        batch_size_per_image=a.roi_batch_per_image,
        positive_fraction=0.25,
        bbox_reg_weights=(1.0, 1.0, 1.0, 1.0),
        score_thresh=0.05,
        nms_thresh=0.3,
        detections_per_img=100,
    )
    transform = BottomUpTransform(
        min_size=a.min_size, max_size=a.max_size, image_mean=list(PIXEL_MEANS_BGR), image_std=[1.0, 1.0, 1.0]
    )
    return BottomUpDetector(trunk, rpn, roi_heads, transform)


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a FrozenBatchNorm2d holding its running statistics (in place, returned)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for tensor in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, tensor).copy_(getattr(child, tensor).detach())
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)
    return module
