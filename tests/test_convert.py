"""`itm.detect.convert`: published BUTD checkpoints map exactly onto our detector, and files are read safely.

Checkpoints are written from a random model of ours in each published layout by an inverse mapping written here,
independently of the module: detectron2 (airsplay / HF: bg last, 6400 box rows scaled by (10, 10, 5, 5), 12 sigmoid
logits in size-major anchor order, a pickle of numpy arrays) and MILVLG (bg first, 6404 box rows, 24-channel softmax
RPN, `cls_embed` / `attr_linear{1,2}`, a torch file).
"""

from __future__ import annotations

import os
import pickle
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor
from torchvision.ops.misc import FrozenBatchNorm2d

from itm.config import DetectorArchitecture
from itm.detect.convert import convert_checkpoint, load_pretrained, read_checkpoint
from itm.detect.model import BottomUpDetector, build_detector
from itm.errors import UserError

TINY = DetectorArchitecture(
    blocks=(1, 1, 1, 1),
    width=8,
    rpn_channels=16,
    class_embedding=8,
    attribute_hidden=16,
    min_size=64,
    max_size=96,
)
CLASSES, ATTRIBUTES = 7, 4  # 6 + background, 3 + "no attribute"
D2_BOX_WEIGHTS = torch.tensor([10.0, 10.0, 5.0, 5.0])
ANCHORS = "rpn.anchor_generator.cell_anchors"


# --- a random model of ours -----------------------------------------------------------------------------------------


def random_detector(architecture: DetectorArchitecture, classes: int, attributes: int, seed: int) -> BottomUpDetector:
    """Every weight and frozen-BN statistic random; RPN logits on a 2^-12 grid so the softmax round trip is exact."""
    torch.manual_seed(seed)
    model = build_detector(architecture, classes, attributes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
        for tensor in (model.rpn.head.cls_logits.weight, model.rpn.head.cls_logits.bias):
            tensor.copy_(torch.round(tensor * 4096) / 4096)
    return model.eval()


def ours(model: BottomUpDetector) -> dict[str, Tensor]:
    return dict(model.state_dict())  # detached tensors; nothing below changes them in place


def without_background_boxes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """What survives the detectron2 layout, which has no box-delta rows for the background class."""
    out = dict(state)
    for field in ("weight", "bias"):
        name = f"roi_heads.box_predictor.bbox_pred.{field}"
        out[name] = torch.cat([torch.zeros_like(state[name][:4]), state[name][4:]])
    return out


# --- the published layouts, written independently of the module -----------------------------------------------------

_D2_RENAMES = [
    (r"^backbone\.conv1\.", "backbone.stem.conv1."),
    (r"^backbone\.bn1\.", "backbone.stem.conv1.norm."),
    (r"^backbone\.layer(\d)\.", lambda m: f"backbone.res{int(m[1]) + 1}."),
    (r"^roi_heads\.box_head\.layer4\.", "roi_heads.res5."),
    (r"\.bn(\d)\.", r".conv\1.norm."),
    (r"\.downsample\.0\.", ".shortcut."),
    (r"\.downsample\.1\.", ".shortcut.norm."),
    (r"^rpn\.head\.conv\.", "proposal_generator.rpn_head.conv."),
    (r"^rpn\.head\.cls_logits\.", "proposal_generator.rpn_head.objectness_logits."),
    (r"^rpn\.head\.bbox_pred\.", "proposal_generator.rpn_head.anchor_deltas."),
    (r"^rpn\.anchor_generator\.cell_anchors$", "proposal_generator.anchor_generator.cell_anchors.0"),
    (r"^roi_heads\.attribute_head\.", "roi_heads.box_predictor."),
]
_MILVLG_RENAMES = [
    (r"\.cls_embedding\.", ".cls_embed."),
    (r"\.fc_attr\.", ".attr_linear1."),
    (r"\.attr_score\.", ".attr_linear2."),
]


def d2_name(name: str) -> str:
    for pattern, replacement in _D2_RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def milvlg_name(name: str) -> str:
    name = d2_name(name)
    for pattern, replacement in _MILVLG_RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def to_size_major(channels: Tensor, architecture: DetectorArchitecture) -> Tensor:
    """Per-anchor groups in Caffe's ratio-major order -> detectron2's size-major order."""
    sizes, ratios = len(architecture.anchor_scales), len(architecture.anchor_ratios)
    ratio_major_index = torch.arange(sizes * ratios).view(ratios, sizes).t().reshape(-1)
    groups = channels.reshape(sizes * ratios, -1, *channels.shape[1:])
    return groups[ratio_major_index].reshape(channels.shape)


def detectron2_layout(
    state: dict[str, Tensor], architecture: DetectorArchitecture, anchors: str = "none"
) -> dict[str, Tensor]:
    """`anchors`: "none" (not saved: RPN channels size-major), "same" (saved, channels as they are) or "size-major"."""
    out = {}
    for name, tensor in state.items():
        if name.startswith(("roi_heads.box_predictor.cls_score.", "roi_heads.attribute_head.cls_embedding.")):
            tensor = torch.cat([tensor[1:], tensor[:1]])  # background last
        elif name.startswith("roi_heads.attribute_head.attr_score."):
            tensor = torch.cat([tensor[1:], tensor[:1]])  # "no attribute" last
        elif name.startswith("roi_heads.box_predictor.bbox_pred."):
            rows = tensor[4:]
            scale = D2_BOX_WEIGHTS.repeat(rows.shape[0] // 4)
            tensor = rows * scale.view(-1, *[1] * (rows.dim() - 1))
        elif name.startswith(("rpn.head.cls_logits.", "rpn.head.bbox_pred.")) and anchors != "same":
            tensor = to_size_major(tensor, architecture)
        elif name == ANCHORS:
            if anchors == "none":
                continue
            if anchors == "size-major":
                tensor = to_size_major(tensor, architecture)
        out[d2_name(name)] = tensor
    return out


def milvlg_layout(state: dict[str, Tensor], seed: int = 0) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        if name == ANCHORS:
            continue
        if name.startswith("rpn.head.cls_logits."):
            background = torch.randint(-64, 64, tensor.shape, generator=generator).float() / 64
            tensor = torch.cat([background, tensor + background])  # softmax: A background, then A foreground
        out[milvlg_name(name)] = tensor
        if name.endswith("running_var"):  # MILVLG's trunk is BatchNorm2d
            out[milvlg_name(name).replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    return out


def write_detectron2_pickle(path: Path, tensors: dict[str, Tensor]) -> Path:
    model = {name: tensor.numpy() for name, tensor in tensors.items()}
    model |= {"pixel_mean": np.array([[[102.9801]], [[115.9465]], [[122.7717]]]), "pixel_std": np.ones((3, 1, 1))}
    with path.open("wb") as stream:
        pickle.dump({"model": model, "__author__": "test", "matching_heuristics": True}, stream)
    return path


def write_milvlg_torch(path: Path, tensors: dict[str, Tensor]) -> Path:
    torch.save({"model": tensors, "iteration": 180000}, path)
    return path


def assert_same_state(converted: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert list(converted) == list(expected)
    for name, tensor in expected.items():
        if not torch.equal(converted[name], tensor):  # only the rescaled box deltas may differ, by rounding
            torch.testing.assert_close(converted[name], tensor, msg=lambda m, name=name: f"{name}: {m}")


def assert_same_regions(model: BottomUpDetector, reference: BottomUpDetector) -> None:
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(5)) * 255
    got, expected = model.extract([image])[0], reference.extract([image])[0]
    assert len(expected.boxes) > 0
    for field in ("boxes", "features", "class_probs", "attribute_probs"):
        torch.testing.assert_close(getattr(got, field), getattr(expected, field), msg=field)


@pytest.fixture(scope="module")
def tiny() -> BottomUpDetector:
    return random_detector(TINY, CLASSES, ATTRIBUTES, seed=1)


# --- round trips ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("anchors", ["none", "same"])
def test_detectron2_round_trip(tiny: BottomUpDetector, anchors: str) -> None:
    state = without_background_boxes(ours(tiny))
    if anchors == "same":  # saved anchors are copied as they are, not replaced by Caffe's
        state[ANCHORS] = state[ANCHORS] + 0.5
    converted = convert_checkpoint(detectron2_layout(state, TINY, anchors), "detectron2", TINY)
    assert (converted.num_classes, converted.num_attributes) == (CLASSES, ATTRIBUTES)
    assert_same_state(converted.state_dict, state)


def test_milvlg_round_trip(tiny: BottomUpDetector) -> None:
    state = ours(tiny)
    converted = convert_checkpoint(milvlg_layout(state), "milvlg", TINY)
    assert (converted.num_classes, converted.num_attributes) == (CLASSES, ATTRIBUTES)
    assert_same_state(converted.state_dict, state)
    assert torch.equal(converted.state_dict["rpn.head.cls_logits.weight"], state["rpn.head.cls_logits.weight"])


def test_box_reg_weights_are_a_parameter(tiny: BottomUpDetector) -> None:
    state = ours(tiny)
    raw = detectron2_layout(state, TINY)
    converted = convert_checkpoint(raw, "detectron2", TINY, box_reg_weights=(1.0, 1.0, 1.0, 1.0))
    boxes = converted.state_dict["roi_heads.box_predictor.bbox_pred.weight"]
    assert torch.equal(boxes[:4], torch.zeros_like(boxes[:4]))
    torch.testing.assert_close(boxes[4:], raw["roi_heads.box_predictor.bbox_pred.weight"])


def test_load_pretrained_gives_the_same_regions(tiny: BottomUpDetector, tmp_path: Path) -> None:
    state = ours(tiny)
    d2 = write_detectron2_pickle(tmp_path / "model.pkl", detectron2_layout(state, TINY))
    milvlg = write_milvlg_torch(tmp_path / "model.pth", milvlg_layout(state))
    for path, layout in ((d2, "detectron2"), (milvlg, "milvlg")):
        model, converted = load_pretrained(path, layout, TINY)
        assert not model.training
        assert converted.num_classes == CLASSES
        assert_same_regions(model, tiny)


def test_saved_size_major_anchors_keep_the_checkpoint_order(tiny: BottomUpDetector) -> None:
    state = ours(tiny)
    converted = convert_checkpoint(detectron2_layout(state, TINY, "size-major"), "detectron2", TINY)
    anchors = converted.state_dict[ANCHORS]
    torch.testing.assert_close(anchors, to_size_major(state[ANCHORS], TINY))
    assert not torch.equal(anchors, state[ANCHORS])
    model = build_detector(TINY, CLASSES, ATTRIBUTES)
    model.load_state_dict(converted.state_dict)
    assert_same_regions(model.eval(), tiny)  # a different anchor order, the same network


@pytest.mark.slow
def test_full_size_butd_round_trip(tmp_path: Path) -> None:
    full = DetectorArchitecture()
    state = ours(random_detector(full, 1601, 401, seed=2))
    d2 = read_checkpoint(write_detectron2_pickle(tmp_path / "frcnn.pkl", detectron2_layout(state, full)))
    assert d2["roi_heads.box_predictor.bbox_pred.weight"].shape == (6400, 2048)
    assert d2["proposal_generator.rpn_head.objectness_logits.weight"].shape == (12, 512, 1, 1)
    converted = convert_checkpoint(d2, "detectron2", full)
    assert (converted.num_classes, converted.num_attributes) == (1601, 401)
    assert_same_state(converted.state_dict, without_background_boxes(state))
    del d2, converted

    milvlg = read_checkpoint(write_milvlg_torch(tmp_path / "bua.pth", milvlg_layout(state)))
    assert milvlg["proposal_generator.rpn_head.objectness_logits.weight"].shape == (24, 512, 1, 1)
    assert milvlg["roi_heads.box_predictor.bbox_pred.weight"].shape == (6404, 2048)
    assert milvlg["roi_heads.box_predictor.attr_linear1.weight"].shape == (512, 2304)
    assert_same_state(convert_checkpoint(milvlg, "milvlg", full).state_dict, state)


# --- refusals -------------------------------------------------------------------------------------------------------


def test_missing_tensor_is_named(tiny: BottomUpDetector) -> None:
    raw = detectron2_layout(ours(tiny), TINY)
    del raw["backbone.res3.0.conv2.norm.running_var"]
    with pytest.raises(UserError, match=r"1 missing tensor\(s\): backbone\.res3\.0\.conv2\.norm\.running_var"):
        convert_checkpoint(raw, "detectron2", TINY)


def test_many_missing_tensors_are_counted(tiny: BottomUpDetector) -> None:
    raw = {name: t for name, t in detectron2_layout(ours(tiny), TINY).items() if not name.startswith("roi_heads.res5")}
    with pytest.raises(UserError, match=r"20 missing tensor\(s\): roi_heads\.res5\.0\.conv1\.weight, .* \(\+15 more\)"):
        convert_checkpoint(raw, "detectron2", TINY)


def test_unexpected_tensor_is_named(tiny: BottomUpDetector) -> None:
    raw = milvlg_layout(ours(tiny)) | {"roi_heads.box_predictor.extra.weight": torch.zeros(2)}
    with pytest.raises(UserError, match=r"unexpected tensor\(s\): roi_heads\.box_predictor\.extra\.weight"):
        convert_checkpoint(raw, "milvlg", TINY)


def test_wrong_layout_is_suspected(tiny: BottomUpDetector) -> None:
    with pytest.raises(UserError, match=r"names of the detectron2 layout"):
        convert_checkpoint(detectron2_layout(ours(tiny), TINY), "milvlg", TINY)


def test_wrong_shape_is_named_with_both_shapes(tiny: BottomUpDetector) -> None:
    raw = detectron2_layout(ours(tiny), TINY)
    raw["roi_heads.res5.0.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    expected = r"roi_heads\.res5\.0\.conv2\.weight expected \[64, 64, 3, 3\], got \[64, 64, 1, 1\]"
    with pytest.raises(UserError, match=expected):
        convert_checkpoint(raw, "detectron2", TINY)


def test_single_logit_rpn_is_a_wrong_shape_for_milvlg(tiny: BottomUpDetector) -> None:
    raw = milvlg_layout(ours(tiny))
    raw["proposal_generator.rpn_head.objectness_logits.bias"] = torch.zeros(12)
    with pytest.raises(UserError, match=r"objectness_logits\.bias expected \[24\], got \[12\]"):
        convert_checkpoint(raw, "milvlg", TINY)


class _Payload:
    """Runs a shell command when unpickled, as a hostile weights file would."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.zeros(2), "x": _Payload(marker)}}))
    with pytest.raises(UserError, match=r"refused to load `posix\.system`"):
        read_checkpoint(path)
    assert not marker.exists()


def test_malicious_torch_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": _Payload(marker)}}, path)
    with pytest.raises(UserError, match="not a loadable torch weights file"):
        read_checkpoint(path)
    assert not marker.exists()


# --- reading --------------------------------------------------------------------------------------------------------


def test_numpy1_protocol2_pickle_is_read(tmp_path: Path) -> None:
    """An older writer: protocol 2 (bytes via `_codecs.encode`) and numpy 1's `numpy.core` module names."""
    weights = np.arange(6, dtype=np.float32).reshape(2, 3)
    data = pickle.dumps({"model": {"w": weights, "s": np.float32(2.5)}, "__author__": "x"}, protocol=2)
    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in data
    (tmp_path / "old.pkl").write_bytes(data)
    tensors = read_checkpoint(tmp_path / "old.pkl")
    assert torch.equal(tensors["w"], torch.from_numpy(weights))
    assert tensors["s"].item() == 2.5


@pytest.mark.parametrize("zipped", [True, False])
def test_bare_torch_state_dict_is_read(tmp_path: Path, zipped: bool) -> None:
    path = tmp_path / "weights.bin"  # the extension does not decide the format
    torch.save({"a.weight": torch.ones(2, 2)}, path, _use_new_zipfile_serialization=zipped)
    assert torch.equal(read_checkpoint(path)["a.weight"], torch.ones(2, 2))


def test_protocol5_pickle_is_read(tmp_path: Path) -> None:
    path = tmp_path / "new.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.ones((2, 2), dtype=np.float32)}}, protocol=5))
    assert torch.equal(read_checkpoint(path)["w"], torch.ones(2, 2))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a pickle at all", "not a readable weights pickle"),
        (pickle.dumps(["w", 1]), "expected a state dict"),
        (pickle.dumps({"model": {"w": "text"}}), "entry 'w' is not a numeric tensor"),
        (b"PK\x03\x04 truncated zip", "not a loadable torch weights file"),
    ],
)
def test_unreadable_files_are_user_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "weights.pkl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_checkpoint(path)


def test_missing_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_pretrained(tmp_path / "absent.pkl", "detectron2", TINY)
