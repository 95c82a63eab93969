"""The `detector` and `regions` stages through main(argv): trained, converted (sha256-checked) and precomputed."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from itm.data.records import read_dataset_json
from itm.data.regions import RegionStore
from itm.detect.saved import load_detector
from itm.errors import UserError
from stages import detector, regions
from tests.conftest import REPO, TINY_DETECTOR, TINY_SYNTHETIC
from tests.test_convert import TINY, detectron2_layout, ours, random_detector, write_detectron2_pickle

pytestmark = pytest.mark.slow  # whole stages


def _params(tmp_path: Path, change=None) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["datasets"]["synthetic"] = {"kind": "synthetic", **copy.deepcopy(TINY_SYNTHETIC)}
    raw["detector"]["architectures"]["small"] = {**TINY_DETECTOR, "blocks": [1, 1, 1, 1]}
    raw["detector"]["train"] |= {"epochs": 1, "max_images": 16, "batch_size": 8}
    raw["regions"] |= {"min_boxes": 3, "max_boxes": 10}
    if change:
        change(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _detector(params: Path, dataset: Path, out: Path, tmp_path: Path) -> None:
    detector.main(
        ["--params", str(params), "--dataset", str(dataset), "--out", str(out), "--metrics", str(tmp_path / "d.json"),
         "--work", str(tmp_path / "dwork"), "--cache", str(tmp_path / "cache"), "--workers", "0"]
    )  # fmt: skip


def _regions(params: Path, dataset: Path, detector_dir: Path, out: Path, tmp_path: Path) -> dict:
    metrics = tmp_path / "r.json"
    regions.main(
        ["--params", str(params), "--dataset", str(dataset), "--detector", str(detector_dir), "--out", str(out),
         "--metrics", str(metrics), "--work", str(tmp_path / "rwork"), "--workers", "0"]
    )  # fmt: skip
    return json.loads(metrics.read_text())


def test_trained_detector_then_regions(tiny_synthetic: Path, tmp_path: Path) -> None:
    params = _params(tmp_path)
    _detector(params, tiny_synthetic, tmp_path / "detector", tmp_path)
    card = json.loads((tmp_path / "detector" / "card.json").read_text())
    assert card["classes"] == ["circle", "square", "triangle", "diamond", "star", "hexagon"]
    assert card["source"]["kind"] == "trained" and set(card["validation"]) >= {"val/object_ap50"}
    assert json.loads((tmp_path / "d.json").read_text()) == card["validation"]
    assert not (tmp_path / "dwork" / "checkpoint.pt").exists()

    summary = _regions(params, tiny_synthetic, tmp_path / "detector", tmp_path / "regions", tmp_path)
    assert summary["test/images"] == TINY_SYNTHETIC["splits"]["test"]
    assert 0.0 <= summary["test/gt_coverage_iou50"] <= 1.0
    store = RegionStore(tmp_path / "regions" / "test")
    assert store.info["detector_sha256"] == card["sha256"] and store.feature_dim == card["feature_dim"]


def test_published_weights_are_converted_and_checked(tiny_synthetic: Path, tmp_path: Path) -> None:
    model = random_detector(TINY, 7, 4, seed=1)
    checkpoint = write_detectron2_pickle(tmp_path / "butd.pkl", detectron2_layout(ours(model), TINY))
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    vocab = tmp_path / "objects_vocab.txt"
    vocab.write_text("".join(f"thing{i},synonym\n" for i in range(6)))

    def pretrained(raw: dict, sha256: str = digest) -> None:
        raw["detector"]["weights"] = "pretrained"
        raw["detector"]["architecture"] = "tiny"
        raw["detector"]["architectures"]["tiny"] = TINY.model_dump(mode="json")
        raw["detector"]["pretrained"] |= {"source": str(checkpoint), "sha256": sha256, "layout": "detectron2"}
        raw["detector"]["pretrained"]["objects_vocab"]["source"] = str(vocab)

    _detector(_params(tmp_path, pretrained), tiny_synthetic, tmp_path / "detector", tmp_path)
    loaded, card = load_detector(tmp_path / "detector", torch.device("cpu"))
    assert card["source"]["sha256"] == digest and card["classes"] == [f"thing{i}" for i in range(6)]
    image = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(0)) * 255
    (a,), (b,) = model.extract([image]), loaded.extract([image])
    assert torch.allclose(a.features, b.features, atol=1e-5)

    tampered = _params(tmp_path, lambda raw: pretrained(raw, "0" * 64))
    with pytest.raises(UserError, match="checksum mismatch"):
        _detector(tampered, tiny_synthetic, tmp_path / "detector2", tmp_path)
    assert not (tmp_path / "detector2").exists()


def test_precomputed_features_need_no_detector(tiny_synthetic: Path, tmp_path: Path) -> None:
    precomp = tmp_path / "precomp"
    precomp.mkdir()
    records = read_dataset_json(tiny_synthetic / "dataset.json")
    rng = np.random.default_rng(0)
    expected = {}
    for ours_split, scan_split in (("train", "train"), ("val", "dev"), ("test", "test")):
        split = [r for r in records if r.split == ours_split]
        ims = rng.standard_normal((len(split), 36, 16)).astype(np.float32)
        np.save(precomp / f"{scan_split}_ims.npy", ims)
        (precomp / f"{scan_split}_ids.txt").write_text("".join(f"{r.imgid}\n" for r in split))
        (precomp / f"{scan_split}_caps.txt").write_text("".join(f"{s.raw}\n" for r in split for s in r.sentences))
        expected |= {r.imgid: ims[i] for i, r in enumerate(split)}

    def precomputed(raw: dict) -> None:
        raw["detector"]["weights"] = "none"
        raw["regions"] |= {"source": "precomp", "precomp_dir": str(precomp)}

    params = _params(tmp_path, precomputed)
    _detector(params, tiny_synthetic, tmp_path / "detector", tmp_path)
    with pytest.raises(UserError, match="no detector was built"):
        load_detector(tmp_path / "detector", torch.device("cpu"))
    summary = _regions(params, tiny_synthetic, tmp_path / "detector", tmp_path / "regions", tmp_path)
    assert summary["test/images"] == TINY_SYNTHETIC["splits"]["test"]
    store = RegionStore(tmp_path / "regions" / "val")
    some = store.image_ids[0]
    np.testing.assert_allclose(store.features_of(some), expected[some], atol=1e-2, rtol=1e-2)
