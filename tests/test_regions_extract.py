"""Region extraction: the store it writes, corrupt images recorded and skipped, and resume by shard."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from itm.config import DetectorArchitecture
from itm.data.records import read_dataset_json
from itm.data.regions import RegionStore
from itm.detect import extract
from itm.detect.extract import Extraction, Selection, extract_dataset
from itm.detect.images import UnreadableImageError, load_bgr
from itm.detect.model import build_detector
from tests.conftest import TINY_DETECTOR, TINY_SYNTHETIC

pytestmark = pytest.mark.slow  # whole extractions with a trained detector

SELECTION = Selection(nms_threshold=0.3, confidence_threshold=0.2, min_boxes=3, max_boxes=10)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_detector(DetectorArchitecture(**TINY_DETECTOR), 7, 11).eval()


def _run(model, dataset: Path, out: Path, work: Path, shard_size: int = 16) -> dict:
    settings = Extraction(SELECTION, batch_size=4, shard_size=shard_size)
    return extract_dataset(model, read_dataset_json(dataset / "dataset.json"), dataset, out, work, settings, {})


def test_store_holds_every_image_within_the_box_bounds(tiny_model, tiny_synthetic: Path, tmp_path: Path) -> None:
    summary = _run(tiny_model, tiny_synthetic, tmp_path / "regions", tmp_path / "work")
    assert not (tmp_path / "work").exists()
    for split, n_images in TINY_SYNTHETIC["splits"].items():
        store = RegionStore(tmp_path / "regions" / split)
        assert len(store) == n_images == summary[f"{split}/images"]
        assert store.features.dtype == np.float16 and store.feature_dim == 128
        for regions in store:
            assert 3 <= len(regions) <= 10
            assert regions.boxes.shape == (len(regions), 4) and (regions.object_ids >= 0).all()
            assert regions.width == regions.height == TINY_SYNTHETIC["image_size"]
        assert int(pq.read_table(store.folder / "regions.parquet").column("n_boxes").to_numpy().sum()) == len(
            store.features
        )


def test_corrupt_images_are_recorded_and_skipped(tiny_model, tiny_synthetic: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "dataset"
    shutil.copytree(tiny_synthetic, dataset)
    records = read_dataset_json(dataset / "dataset.json")
    test_records = [r for r in records if r.split == "test"]
    truncated, garbage = test_records[0], test_records[1]
    data = (dataset / "images" / truncated.filename).read_bytes()
    (dataset / "images" / truncated.filename).write_bytes(data[: len(data) // 3])
    (dataset / "images" / garbage.filename).write_bytes(b"not an image at all")
    with pytest.raises(UnreadableImageError):
        load_bgr(dataset / "images" / truncated.filename)

    summary = _run(tiny_model, dataset, tmp_path / "regions", tmp_path / "work")
    assert summary["test/failures"] == 2 and summary["test/images"] == len(test_records) - 2
    store = RegionStore(tmp_path / "regions" / "test")
    failures = {f.image_id: f for f in store.failures()}
    assert set(failures) == {truncated.imgid, garbage.imgid}
    assert all(f.reason for f in failures.values()) and truncated.imgid not in store


def test_an_interrupted_run_resumes_without_redoing_finished_shards(
    tiny_model, tiny_synthetic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run(tiny_model, tiny_synthetic, tmp_path / "uninterrupted", tmp_path / "work-a")

    real = extract.regions_of_batch
    calls = {"n": 0}

    def failing_after_five_batches(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(extract, "regions_of_batch", failing_after_five_batches)
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_model, tiny_synthetic, tmp_path / "resumed", tmp_path / "work-b")
    assert not (tmp_path / "resumed").exists()
    assert sorted(p.name for p in (tmp_path / "work-b" / "train").iterdir()) == ["shard-00000.npz"]  # 4 batches

    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(extract, "regions_of_batch", counting)
    _run(tiny_model, tiny_synthetic, tmp_path / "resumed", tmp_path / "work-b")
    total_batches = sum(
        -(-min(16, n - start) // 4) for n in TINY_SYNTHETIC["splits"].values() for start in range(0, n, 16)
    )
    assert counted["n"] == total_batches - 4
    for split in TINY_SYNTHETIC["splits"]:
        a, b = RegionStore(tmp_path / "uninterrupted" / split), RegionStore(tmp_path / "resumed" / split)
        assert np.array_equal(a.features, b.features)
        assert a.table.equals(b.table)


def test_reduced_precision_is_checked_against_fp32(tiny_model, tiny_synthetic: Path) -> None:
    from itm.detect.extract import precision_agreement

    images = [load_bgr(tiny_synthetic / "images" / f"{i:06d}.jpg") for i in range(4)]
    agreement = precision_agreement(tiny_model, images, "bf16")
    assert 0.98 < agreement["mean_cosine"] <= 1.0001 and agreement["min_cosine"] <= agreement["mean_cosine"]
    assert 0.0 <= agreement["label_agreement"] <= 1.0
    exact = precision_agreement(tiny_model, images, "fp32")
    assert exact["mean_cosine"] == pytest.approx(1.0, abs=1e-5) and exact["label_agreement"] == 1.0
