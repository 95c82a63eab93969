"""Published bottom-up-attention weights mapped onto our detector (`itm.detect.model`).

Two public conversions of the Caffe Visual Genome model exist, with different conventions (see the research notes,
pipeline.md §1.2/§1.6, derived from the Caffe test.prototxt, airsplay/py-bottom-up-attention and
MILVLG/bottom-up-attention.pytorch):

- "detectron2": airsplay `faster_rcnn_from_caffe_attr.pkl` and HF `unc-nlp/frcnn-vg-finetuned`. A pickle of numpy
  arrays (or a torch file). One sigmoid objectness logit per anchor; background is the LAST class, `bbox_pred` has
  no background rows and is read with detectron2's box weights (10, 10, 5, 5); "no attribute" is the LAST attribute;
  anchors are size-major unless the checkpoint carries its own `cell_anchors`.
- "milvlg": MILVLG `bua-caffe-frcn-r101-k36.pth`. A torch file in the Caffe conventions: a 2-way softmax per anchor
  (channels 0..A-1 background, A..2A-1 foreground), background FIRST, `bbox_pred` with background rows and box
  weights (1, 1, 1, 1), "no attribute" FIRST, Caffe's ratio-major anchors.

Both share detectron2's trunk names (`backbone.stem`, `backbone.res{2,3,4}`, `roi_heads.res5`). Pickles are read
with an unpickler that only builds numpy arrays and plain containers, torch files with `weights_only=True`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from itm.config import DetectorArchitecture
from itm.detect.model import BottomUpDetector, build_detector, caffe_anchors
from itm.errors import UserError
from itm.safe_load import load_pickle, load_torch

Layout = Literal["detectron2", "milvlg"]
BoxWeights = tuple[float, float, float, float]

DEFAULT_BOX_REG_WEIGHTS: dict[str, BoxWeights] = {
    "detectron2": (10.0, 10.0, 5.0, 5.0),  # detectron2's ROI_BOX_HEAD.BBOX_REG_WEIGHTS default
    "milvlg": (1.0, 1.0, 1.0, 1.0),  # Caffe snapshots hold un-normalised deltas; MILVLG's config says (1, 1, 1, 1)
}

ANCHORS = "rpn.anchor_generator.cell_anchors"
CLS_LOGITS = "rpn.head.cls_logits"
RPN_DELTAS = "rpn.head.bbox_pred"
CLS_SCORE = "roi_heads.box_predictor.cls_score"
BOX_DELTAS = "roi_heads.box_predictor.bbox_pred"
CLS_EMBEDDING = "roi_heads.attribute_head.cls_embedding"
ATTR_SCORE = "roi_heads.attribute_head.attr_score"

# Our module prefix -> the checkpoint's, for the tensors outside the ResNet blocks.
_HEAD_NAMES: dict[str, dict[str, str]] = {
    "detectron2": {
        "backbone.conv1": "backbone.stem.conv1",
        "backbone.bn1": "backbone.stem.conv1.norm",
        "rpn.head.conv": "proposal_generator.rpn_head.conv",
        CLS_LOGITS: "proposal_generator.rpn_head.objectness_logits",
        RPN_DELTAS: "proposal_generator.rpn_head.anchor_deltas",
        CLS_SCORE: "roi_heads.box_predictor.cls_score",
        BOX_DELTAS: "roi_heads.box_predictor.bbox_pred",
        CLS_EMBEDDING: "roi_heads.box_predictor.cls_embedding",
        "roi_heads.attribute_head.fc_attr": "roi_heads.box_predictor.fc_attr",
        ATTR_SCORE: "roi_heads.box_predictor.attr_score",
    },
}
_HEAD_NAMES["milvlg"] = _HEAD_NAMES["detectron2"] | {
    CLS_EMBEDDING: "roi_heads.box_predictor.cls_embed",
    "roi_heads.attribute_head.fc_attr": "roi_heads.box_predictor.attr_linear1",
    ATTR_SCORE: "roi_heads.box_predictor.attr_linear2",
}
# A buffer old detectron2 saved (persistent until detectron2 commit 564bc2fb); optional in both layouts.
_CHECKPOINT_ANCHORS = "proposal_generator.anchor_generator.cell_anchors.0"
_IGNORED_NAMES = {"pixel_mean", "pixel_std"}  # detectron2 model buffers that our transform holds as constants
_IGNORED_SUFFIX = ".num_batches_tracked"  # MILVLG's trunk uses BatchNorm2d in eval mode; we use frozen BN

_OUR_STAGE = re.compile(r"^backbone\.layer([123])\.(\d+)\.(.+)$")
_OUR_RES5 = re.compile(r"^roi_heads\.box_head\.layer4\.(\d+)\.(.+)$")
_OUR_BLOCK_TENSOR = re.compile(r"^(conv[123]\.weight|bn([123])\.(\w+)|downsample\.0\.weight|downsample\.1\.(\w+))$")

_TORCH_ZIP_MAGIC = b"PK\x03\x04"  # torch >= 1.6 writes a zip archive
_LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a torch < 1.6 file (torch.serialization)


@dataclass(frozen=True)
class ConvertedCheckpoint:
    """Published weights in our naming and conventions, ready for `load_state_dict(strict=True)`."""

    state_dict: dict[str, Tensor]
    num_classes: int  # background (class 0) included
    num_attributes: int  # "no attribute" (attribute 0) included


# --- reading --------------------------------------------------------------------------------------------------------


def _load_torch(path: Path) -> Any:
    return load_torch(path, stand_ins={}, what="torch weights file")


def _load_pickle(path: Path) -> Any:
    return load_pickle(path, stand_ins={}, what="weights pickle")


def _as_tensor(path: Path, name: str, value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray | np.generic) and value.dtype.kind in "fiub":
        return torch.from_numpy(np.array(value))  # a writable copy, also for numpy scalars
    raise UserError(f"{path}: entry {name!r} is not a numeric tensor ({type(value).__name__})")


def read_checkpoint(path: Path) -> dict[str, Tensor]:
    """The tensors of a weights file: `{"model": state_dict, ...}` or a bare state dict, as CPU tensors.

    The format is decided by content: a zip archive is a torch file (torch >= 1.6), anything else is read as a
    pickle of numpy arrays (detectron2 `.pkl`), unless that pickle turns out to start a torch < 1.6 file.
    """
    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    with path.open("rb") as stream:
        magic = stream.read(len(_TORCH_ZIP_MAGIC))
    content = _load_torch(path) if magic == _TORCH_ZIP_MAGIC else _load_pickle(path)
    if isinstance(content, int) and content == _LEGACY_TORCH_MAGIC:
        content = _load_torch(path)
    if isinstance(content, dict) and isinstance(content.get("model"), dict):
        content = content["model"]
    if not isinstance(content, dict) or not content:
        raise UserError(f"{path}: expected a state dict or {{'model': state dict}}, found {type(content).__name__}")
    return {str(name): _as_tensor(path, str(name), value) for name, value in content.items()}


# --- names and shapes -----------------------------------------------------------------------------------------------


def _block_tensor_name(ours: str) -> str:
    """`conv2.weight`, `bn2.running_mean`, `downsample.1.bias` -> detectron2's `conv2.weight`, `conv2.norm....`"""
    match = _OUR_BLOCK_TENSOR.match(ours)
    if match is None:
        raise ValueError(f"unknown bottleneck tensor {ours!r}")
    whole, bn, bn_field, shortcut_norm_field = match.groups()
    if bn is not None:
        return f"conv{bn}.norm.{bn_field}"
    if whole == "downsample.0.weight":
        return "shortcut.weight"
    if shortcut_norm_field is not None:
        return f"shortcut.norm.{shortcut_norm_field}"
    return whole


def _checkpoint_name(ours: str, layout: Layout) -> str:
    """The published checkpoint's name for one of our state-dict keys."""
    if ours == ANCHORS:
        return _CHECKPOINT_ANCHORS
    if match := _OUR_STAGE.match(ours):
        stage, block, rest = match.groups()
        return f"backbone.res{int(stage) + 1}.{block}.{_block_tensor_name(rest)}"
    if match := _OUR_RES5.match(ours):
        block, rest = match.groups()
        return f"roi_heads.res5.{block}.{_block_tensor_name(rest)}"
    module, _, field = ours.rpartition(".")
    if module in _HEAD_NAMES[layout]:
        return f"{_HEAD_NAMES[layout][module]}.{field}"
    raise ValueError(f"no published name for {ours!r}")


def _checkpoint_shape(ours: str, shape: torch.Size, layout: Layout) -> tuple[int, ...]:
    """The shape the checkpoint holds for our tensor `ours` of shape `shape`."""
    rows, rest = shape[0] if shape else 0, tuple(shape[1:])
    if layout == "milvlg" and ours.startswith(CLS_LOGITS + "."):
        return (2 * rows, *rest)  # background and foreground logit per anchor
    if layout == "detectron2" and ours.startswith(BOX_DELTAS + "."):
        return (rows - 4, *rest)  # no background rows
    return tuple(shape)


def _some(names: list[str], shown: int = 5) -> str:
    more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _format_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _layout_hint(unexpected: list[str], layout: Layout) -> str:
    other: Layout = "milvlg" if layout == "detectron2" else "detectron2"
    theirs = set(_HEAD_NAMES[other].values()) - set(_HEAD_NAMES[layout].values())
    if any(name.rpartition(".")[0] in theirs for name in unexpected):
        return f" (names of the {other} layout: is the layout right?)"
    return ""


def _check_names(raw: dict[str, Tensor], table: dict[str, str], layout: Layout) -> None:
    """Every tensor we need is there and nothing else is; raises UserError naming the offenders."""
    missing = [name for name, ours in table.items() if name not in raw and ours != ANCHORS]
    unexpected = [name for name in raw if name not in table]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_some(missing)}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected tensor(s): {_some(unexpected)}{_layout_hint(unexpected, layout)}"
        )
    if problems:
        raise UserError(f"{layout} checkpoint does not match the detector architecture: {'; '.join(problems)}")


def _check_shapes(raw: dict[str, Tensor], table: dict[str, str], reference: dict[str, Tensor], layout: Layout) -> None:
    wrong = []
    for name, ours in table.items():
        if name in raw:
            expected = _checkpoint_shape(ours, reference[ours].shape, layout)
            if tuple(raw[name].shape) != expected:
                wrong.append(f"{name} expected {_format_shape(expected)}, got {_format_shape(tuple(raw[name].shape))}")
    if wrong:
        raise UserError(f"{layout} checkpoint has {len(wrong)} tensor(s) of the wrong shape: {_some(wrong, 3)}")


# --- value conversions ----------------------------------------------------------------------------------------------


def _softmax_to_sigmoid(pair: Tensor) -> Tensor:
    """[2A, ...] Caffe softmax logits (background block, then foreground) -> [A, ...] sigmoid logits.

    softmax([bg, fg])[1] = sigmoid(fg - bg), and both are affine in the input, so this is exact.
    """
    anchors = pair.shape[0] // 2
    return pair[anchors:] - pair[:anchors]


def _last_row_first(tensor: Tensor) -> Tensor:
    return torch.cat([tensor[-1:], tensor[:-1]])


def _unweighted_box_deltas(deltas: Tensor, weights: BoxWeights) -> Tensor:
    """Rows (dx, dy, dw, dh per class) divided by the box weights they were trained with: we decode with (1,1,1,1)."""
    divisor = torch.tensor(weights, dtype=deltas.dtype).repeat(deltas.shape[0] // 4)
    return deltas / divisor.view(-1, *([1] * (deltas.dim() - 1)))


def _with_background_boxes(deltas: Tensor) -> Tensor:
    return torch.cat([deltas.new_zeros((4, *deltas.shape[1:])), deltas])


def _size_major_to_ratio_major(channels: Tensor, num_scales: int, num_ratios: int) -> Tensor:
    """Reorder per-anchor channel groups from detectron2's (size, ratio) order to Caffe's (ratio, size) order.

    `channels` has A * k rows (k = 1 for objectness, 4 for deltas); ratio-major group r*S + s takes size-major group
    s*R + r.
    """
    order = [s * num_ratios + r for r in range(num_ratios) for s in range(num_scales)]
    groups = channels.reshape(len(order), -1, *channels.shape[1:])
    return groups[order].reshape(channels.shape)


def _from_detectron2(
    tensors: dict[str, Tensor], architecture: DetectorArchitecture, weights: BoxWeights
) -> dict[str, Tensor]:
    """Background and "no attribute" to the front, background box rows added, anchors to Caffe's order if needed.

    detectron2's RPN decodes with box weights (1, 1, 1, 1) like ours, so its deltas keep their values.
    """
    out = dict(tensors)
    for field in ("weight", "bias"):
        boxes = f"{BOX_DELTAS}.{field}"
        out[boxes] = _with_background_boxes(_unweighted_box_deltas(out[boxes], weights))
        for module in (CLS_SCORE, ATTR_SCORE):
            out[f"{module}.{field}"] = _last_row_first(out[f"{module}.{field}"])
        if ANCHORS not in tensors:
            scales, ratios = len(architecture.anchor_scales), len(architecture.anchor_ratios)
            for module in (CLS_LOGITS, RPN_DELTAS):
                out[f"{module}.{field}"] = _size_major_to_ratio_major(out[f"{module}.{field}"], scales, ratios)
    # The attribute head embeds the classifier's argmax, so its rows follow the classifier's order.
    out[f"{CLS_EMBEDDING}.weight"] = _last_row_first(out[f"{CLS_EMBEDDING}.weight"])
    return out


def _from_milvlg(tensors: dict[str, Tensor], weights: BoxWeights) -> dict[str, Tensor]:
    """Already in Caffe's orders; only the RPN softmax becomes a sigmoid (and box deltas take `weights`)."""
    out = dict(tensors)
    for field in ("weight", "bias"):
        out[f"{BOX_DELTAS}.{field}"] = _unweighted_box_deltas(out[f"{BOX_DELTAS}.{field}"], weights)
        out[f"{CLS_LOGITS}.{field}"] = _softmax_to_sigmoid(out[f"{CLS_LOGITS}.{field}"])
    return out


def _rows(raw: dict[str, Tensor], name: str) -> int:
    # A stand-in count when the tensor is absent or scalar: the name/shape checks then report it.
    tensor = raw.get(name)
    return int(tensor.shape[0]) if tensor is not None and tensor.dim() > 0 else 2


def _reference_state(architecture: DetectorArchitecture, num_classes: int, num_attributes: int) -> dict[str, Tensor]:
    """Shapes and dtypes of a freshly built detector (on the meta device: nothing is allocated), Caffe anchors."""
    with torch.device("meta"):
        reference = build_detector(architecture, num_classes, num_attributes).state_dict()
    # The one buffer whose values we may need: build_detector's Caffe anchors, made off the meta device.
    reference[ANCHORS] = caffe_anchors(tuple(architecture.anchor_ratios), tuple(architecture.anchor_scales))
    return reference


# --- public ---------------------------------------------------------------------------------------------------------


def convert_checkpoint(
    raw: dict[str, Tensor],
    layout: Layout,
    architecture: DetectorArchitecture,
    *,
    box_reg_weights: BoxWeights | None = None,
) -> ConvertedCheckpoint:
    """Map a published checkpoint (`read_checkpoint`) onto `build_detector(architecture, classes, attributes)`.

    The class and attribute counts are read from the checkpoint's classifier and attribute scorer. Box deltas
    are divided by `box_reg_weights` (default: (10, 10, 5, 5) for detectron2, (1, 1, 1, 1) for MILVLG) because our
    heads decode with (1, 1, 1, 1); this only changes the regressed boxes of `forward`, never the region features,
    which `extract` computes on the proposal boxes. If the checkpoint carries `cell_anchors`, they replace our
    Caffe anchors as they are (they match its RPN channel order); otherwise detectron2's size-major RPN channels
    are reordered to Caffe's ratio-major anchors. `pixel_mean`, `pixel_std` and `num_batches_tracked` are dropped;
    any other unknown tensor, any missing one and any shape mismatch raise UserError.
    """
    weights = DEFAULT_BOX_REG_WEIGHTS[layout] if box_reg_weights is None else box_reg_weights
    if len(weights) != 4 or min(weights) <= 0:
        raise ValueError(f"box_reg_weights must be four positive numbers, got {weights}")
    raw = {name: t for name, t in raw.items() if name not in _IGNORED_NAMES and not name.endswith(_IGNORED_SUFFIX)}
    names = _HEAD_NAMES[layout]
    num_classes = _rows(raw, f"{names[CLS_SCORE]}.weight")
    num_attributes = _rows(raw, f"{names[ATTR_SCORE]}.weight")
    reference = _reference_state(architecture, num_classes, num_attributes)
    table = {_checkpoint_name(ours, layout): ours for ours in reference}
    _check_names(raw, table, layout)
    _check_shapes(raw, table, reference, layout)

    tensors = {ours: raw[name] for name, ours in table.items() if name in raw}
    if layout == "detectron2":
        converted = _from_detectron2(tensors, architecture, weights)
    else:
        converted = _from_milvlg(tensors, weights)
    converted.setdefault(ANCHORS, reference[ANCHORS])
    state = {ours: converted[ours].to(reference[ours].dtype).contiguous() for ours in reference}
    return ConvertedCheckpoint(state, num_classes, num_attributes)


def load_pretrained(
    path: Path, layout: Layout, architecture: DetectorArchitecture
) -> tuple[BottomUpDetector, ConvertedCheckpoint]:
    """Our detector holding the published weights in `path` (strictly loaded, eval mode, CPU), and the conversion."""
    try:
        converted = convert_checkpoint(read_checkpoint(path), layout, architecture)
    except UserError as error:
        message = str(error)
        raise UserError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    model = build_detector(architecture, converted.num_classes, converted.num_attributes)
    model.load_state_dict(converted.state_dict, strict=True)
    return model.eval(), converted
