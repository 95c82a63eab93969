"""Importing SCAN's precomputed features: round trip through the region store, id mapping and the checks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from itm.data.precomp import import_precomp
from itm.data.records import ImageRecord, Sentence, Split, write_dataset_json
from itm.data.regions import RegionStore
from itm.errors import UserError

DIM = 8
BOXES = 36


def _record(imgid: int, split: Split, source_id: int | None = None) -> ImageRecord:
    sentences = tuple(Sentence(imgid * 5 + k, f"A photo, number {imgid} caption {k}.") for k in range(5))
    return ImageRecord(imgid, f"{imgid}.jpg", split, sentences, source_id)


def _write_scan(folder: Path, scan_split: str, records: list[ImageRecord], ids: list[int], per_caption: bool) -> None:
    """SCAN's three files for `records` in the given order, features derived from the position in the file."""
    folder.mkdir(parents=True, exist_ok=True)
    features = np.random.default_rng(len(records)).normal(size=(len(records), BOXES, DIM)).astype(np.float32)
    np.save(folder / f"{scan_split}_ims.npy", features)
    captions = [s.raw.upper() for record in records for s in record.sentences]  # tokenize lower-cases both sides
    (folder / f"{scan_split}_caps.txt").write_text("\n".join(captions) + "\n")
    lines = [i for i in ids for _ in range(5)] if per_caption else ids
    (folder / f"{scan_split}_ids.txt").write_text("\n".join(map(str, lines)) + "\n")


def _assert_matches(store: RegionStore, records: list[ImageRecord], scan_file: Path, scan_rows: dict[int, int]) -> None:
    """Each record's features equal its SCAN row (float16 tolerance); boxes and labels are unknown."""
    scan = np.load(scan_file)
    assert store.image_ids == sorted(r.imgid for r in records)
    for record in records:
        regions = store.regions_of(record.imgid)
        np.testing.assert_allclose(regions.features, scan[scan_rows[record.imgid]], rtol=1e-3, atol=1e-3)
        assert regions.features.dtype == np.float16 and len(regions) == BOXES
        assert np.isnan(regions.boxes).all() and regions.boxes.shape == (BOXES, 4)
        assert (regions.object_ids == -1).all() and (regions.attribute_ids == -1).all()
        assert np.isnan(regions.object_confidence).all() and np.isnan(regions.attribute_confidence).all()
        assert regions.width == regions.height == 0


@pytest.fixture
def flickr(tmp_path: Path) -> tuple[Path, Path, list[ImageRecord]]:
    """Flickr30K-like: ids are imgids, one per image; SCAN's train holds one image that is not in ours."""
    splits: list[Split] = ["train"] * 6 + ["val"] * 3 + ["test"] * 3
    records = [_record(imgid, split) for imgid, split in enumerate(splits)]
    extra = _record(99, "train")
    dataset = tmp_path / "dataset.json"
    write_dataset_json(dataset, "flickr30k", records)
    precomp = tmp_path / "f30k_precomp"
    for scan_split, split in [("train", "train"), ("dev", "val"), ("test", "test")]:
        scan_records = [r for r in records if r.split == split] + ([extra] if split == "train" else [])
        _write_scan(precomp, scan_split, scan_records, [r.imgid for r in scan_records], per_caption=False)
    return precomp, dataset, records


def test_flickr_features_round_trip(flickr, tmp_path: Path) -> None:
    precomp, dataset, records = flickr
    summary = import_precomp(precomp, dataset, tmp_path / "regions", id_field="imgid")
    assert summary == {
        "train/images": 6, "train/boxes": 6 * BOXES, "train/skipped": 1,
        "val/images": 3, "val/boxes": 3 * BOXES, "val/skipped": 0,
        "test/images": 3, "test/boxes": 3 * BOXES, "test/skipped": 0,
    }  # fmt: skip
    for split, scan_split in [("train", "train"), ("val", "dev"), ("test", "test")]:
        split_records = [r for r in records if r.split == split]
        store = RegionStore(tmp_path / "regions" / split)
        assert store.info == {
            "feature_dim": DIM, "images": len(split_records), "boxes": len(split_records) * BOXES,
            "source": "precomp", "precomp_dir": str(precomp), "layout": "scan", "scan_split": scan_split,
        }  # fmt: skip
        rows = {r.imgid: i for i, r in enumerate(split_records)}
        _assert_matches(store, split_records, precomp / f"{scan_split}_ims.npy", rows)


def test_coco_ids_per_caption_map_through_source_id_and_test_comes_from_testall(tmp_path: Path) -> None:
    splits: list[Split] = ["train"] * 5 + ["val"] * 2 + ["test"] * 4
    records = [_record(imgid, split, source_id=1000 + 7 * imgid) for imgid, split in enumerate(splits)]
    dataset = tmp_path / "dataset.json"
    write_dataset_json(dataset, "coco", records)
    precomp = tmp_path / "coco_precomp"
    scan_order: dict[str, list[ImageRecord]] = {}
    for scan_split, split in [("train", "train"), ("dev", "val"), ("testall", "test")]:
        scan_order[scan_split] = [r for r in records if r.split == split][::-1]  # SCAN's order is not ours
    scan_order["test"] = scan_order["testall"][:2]
    for scan_split, scan_records in scan_order.items():
        _write_scan(precomp, scan_split, scan_records, [r.source_id for r in scan_records], per_caption=True)

    summary = import_precomp(precomp, dataset, tmp_path / "regions", id_field="source_id")
    assert summary["test/images"] == 4 and summary["train/images"] == 5 and summary["val/images"] == 2
    for split, scan_split in [("train", "train"), ("val", "dev"), ("test", "testall")]:
        store = RegionStore(tmp_path / "regions" / split)
        assert store.info["scan_split"] == scan_split
        rows = {r.imgid: i for i, r in enumerate(scan_order[scan_split])}
        _assert_matches(store, [r for r in records if r.split == split], precomp / f"{scan_split}_ims.npy", rows)


def test_an_image_missing_from_scan_fails_and_leaves_nothing(flickr, tmp_path: Path) -> None:
    precomp, dataset, records = flickr
    dev = [r for r in records if r.split == "val"][:-1]
    _write_scan(precomp, "dev", dev, [r.imgid for r in dev], per_caption=False)
    with pytest.raises(UserError, match=r"val: 1 of 3 images are not in SCAN's dev split .* imgid 8"):
        import_precomp(precomp, dataset, tmp_path / "regions", id_field="imgid")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.json", "f30k_precomp"]


def test_ims_and_ids_counts_must_agree(flickr, tmp_path: Path) -> None:
    precomp, dataset, _ = flickr
    ids = precomp / "test_ids.txt"
    ids.write_text("\n".join(ids.read_text().split("\n")[:2]) + "\n")
    with pytest.raises(UserError, match=r"test_ids.txt: 2 ids for 3 images"):
        import_precomp(precomp, dataset, tmp_path / "regions", id_field="imgid")
    assert not (tmp_path / "regions").exists()


def test_caption_ids_must_agree_within_an_image(flickr, tmp_path: Path) -> None:
    precomp, dataset, _ = flickr
    (precomp / "test_ids.txt").write_text("\n".join(["9"] * 5 + ["10"] * 4 + ["11"] * 6) + "\n")
    with pytest.raises(
        UserError, match=r"test_ids.txt: the 5 caption ids of 1 images are not all equal \(first at line 6\)"
    ):
        import_precomp(precomp, dataset, tmp_path / "regions", id_field="imgid")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "dev_caps.txt").unlink(), r"dev_caps.txt: not found"),
        (lambda p: (p / "dev_ims.npy").unlink(), r"no dev_ims.npy for our val split"),
        (
            lambda p: np.save(p / "dev_ims.npy", np.zeros((3, DIM), np.float32)),
            r"dev_ims.npy: expected an array of rank 3",
        ),
        (lambda p: (p / "dev_caps.txt").write_text("one caption\n"), r"dev_caps.txt: 1 captions for 3 images"),
        (lambda p: np.save(p / "dev_ims.npy", np.zeros((3, BOXES, 4), np.float32)), r"different feature dimensions"),
    ],
)
def test_broken_files_are_user_errors(flickr, tmp_path: Path, damage, message: str) -> None:
    precomp, dataset, _ = flickr
    damage(precomp)
    with pytest.raises(UserError, match=message):
        import_precomp(precomp, dataset, tmp_path / "regions", id_field="imgid")
    assert not (tmp_path / "regions").exists()


def test_differing_captions_are_counted_in_a_warning(flickr, tmp_path: Path, caplog) -> None:
    precomp, dataset, _ = flickr
    captions = (precomp / "test_caps.txt").read_text().split("\n")
    captions[0] = "something else entirely"
    (precomp / "test_caps.txt").write_text("\n".join(captions))
    with caplog.at_level(logging.WARNING, logger="itm.data.precomp"):
        import_precomp(precomp, dataset, tmp_path / "regions", id_field="imgid")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "test: captions of 1 of 3 images differ from SCAN's test_caps.txt after tokenization (e.g. imgid 9)"
    ]
    assert json.loads((tmp_path / "regions" / "test" / "store.json").read_text())["images"] == 3
