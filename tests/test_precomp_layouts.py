"""Precomputed features in both layouts their mirrors use: SCAN's `data/f30k_precomp/` and VSE∞'s `data/f30k/`
(split files in `precomp/`, `id_mapping.json` beside it), named by the folder of the files or VSE∞'s dataset folder;
each missing file a one-line error naming it and the layout."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from itm.data.precomp import PrecompLayout, find_layout, import_precomp
from itm.data.records import ImageRecord, Sentence, Split, write_dataset_json
from itm.data.regions import RegionStore
from itm.errors import UserError

DIM = 8
BOXES = 36
SPLITS: list[Split] = ["train"] * 4 + ["val"] * 2 + ["test"] * 3
RELEASE_SPLITS = {"train": "train", "val": "dev", "test": "test"}  # ours -> the release's


def _records(coco: bool = False) -> list[ImageRecord]:
    records = []
    for imgid, split in enumerate(SPLITS):
        sentences = tuple(Sentence(imgid * 5 + k, f"A photo, number {imgid} caption {k}.") for k in range(5))
        if coco:
            filename, source_id = f"val2014/COCO_val2014_{500 + imgid:012d}.jpg", 500 + imgid
        else:
            filename, source_id = f"{1000 + imgid}.jpg", None
        records.append(ImageRecord(imgid, filename, split, sentences, source_id))
    return records


def _write_release(folder: Path, records: list[ImageRecord], *, coco: bool = False) -> dict[int, np.ndarray]:
    """The three files of every split (release order reversed from ours); returns each imgid's features."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    features = {}
    for ours, theirs in RELEASE_SPLITS.items():
        split = [r for r in records if r.split == ours][::-1]
        ims = rng.normal(size=(len(split), BOXES, DIM)).astype(np.float32)
        np.save(folder / f"{theirs}_ims.npy", ims)
        (folder / f"{theirs}_caps.txt").write_text("".join(f"{s.raw}\n" for r in split for s in r.sentences))
        ids = [r.source_id if coco else r.imgid for r in split for _ in range(5 if coco else 1)]
        (folder / f"{theirs}_ids.txt").write_text("".join(f"{i}\n" for i in ids))
        features |= {r.imgid: ims[row] for row, r in enumerate(split)}
    return features


def _write_mapping(path: Path, records: list[ImageRecord], *, coco: bool = False) -> None:
    """VSE∞'s id_mapping.json: the release's id -> the image's file name (no folder)."""
    mapping = {str(r.source_id if coco else r.imgid): Path(r.filename).name for r in records}
    path.write_text(json.dumps(mapping))


@pytest.fixture
def releases(tmp_path: Path) -> dict[str, object]:
    """dataset.json, and one release in SCAN's layout and one in VSE∞'s, under tmp_path/data/."""
    records = _records()
    write_dataset_json(tmp_path / "dataset.json", "flickr30k", records)
    scan = _write_release(tmp_path / "data" / "f30k_precomp", records)
    vse = _write_release(tmp_path / "data" / "f30k" / "precomp", records)
    _write_mapping(tmp_path / "data" / "f30k" / "id_mapping.json", records)
    return {"records": records, "features": {"scan": scan, "vse_infty": vse}}


# precomp_dir as written in params.yaml (relative to tmp_path) -> the layout found
GIVEN = {
    "data/f30k_precomp": ("scan", "data/f30k_precomp", None),
    "data/f30k": ("vse_infty", "data/f30k/precomp", "data/f30k/id_mapping.json"),
    "data/f30k/precomp": ("vse_infty", "data/f30k/precomp", "data/f30k/id_mapping.json"),
}


@pytest.mark.parametrize("given", list(GIVEN))
def test_both_layouts_import_the_same_way(releases: dict, tmp_path: Path, given: str) -> None:
    kind, files_dir, mapping = GIVEN[given]
    assert find_layout(tmp_path / given) == PrecompLayout(
        kind, tmp_path / files_dir, tmp_path / mapping if mapping else None
    )
    summary = import_precomp(tmp_path / given, tmp_path / "dataset.json", tmp_path / "regions", id_field="imgid")
    assert [summary[f"{split}/images"] for split in ("train", "val", "test")] == [4, 2, 3]
    for split, theirs in RELEASE_SPLITS.items():
        store = RegionStore(tmp_path / "regions" / split)
        assert store.info["layout"] == kind and store.info["scan_split"] == theirs
        assert store.info["precomp_dir"] == str(tmp_path / given)
        for imgid in store.image_ids:
            expected = releases["features"][kind][imgid]
            np.testing.assert_allclose(store.features_of(imgid), expected, rtol=1e-3, atol=1e-3)


def test_vse_infty_without_id_mapping_imports_unchecked(releases: dict, tmp_path: Path, caplog) -> None:
    (tmp_path / "data" / "f30k" / "id_mapping.json").unlink()
    with caplog.at_level(logging.INFO, logger="itm.data.precomp"):
        import_precomp(tmp_path / "data" / "f30k", tmp_path / "dataset.json", tmp_path / "regions", id_field="imgid")
    assert any("VSE∞'s layout" in r.getMessage() and "no id_mapping.json" in r.getMessage() for r in caplog.records)
    assert RegionStore(tmp_path / "regions" / "test").info["layout"] == "vse_infty"


def test_id_mapping_must_name_the_same_image_files(releases: dict, tmp_path: Path) -> None:
    mapping_path = tmp_path / "data" / "f30k" / "id_mapping.json"
    mapping = json.loads(mapping_path.read_text())
    mapping["5"], mapping["4"] = mapping["4"], mapping["5"]  # two val images swapped
    mapping_path.write_text(json.dumps(mapping))
    with pytest.raises(UserError) as raised:
        import_precomp(tmp_path / "data" / "f30k", tmp_path / "dataset.json", tmp_path / "regions", id_field="imgid")
    message = str(raised.value)
    assert message.startswith(f"{mapping_path}: 2 of 2 val images have another file name than in dataset.json")
    assert "imgid 4: '1005.jpg' there, '1004.jpg' in dataset.json" in message and "\n" not in message
    assert not (tmp_path / "regions").exists()

    del mapping["7"]
    mapping["5"], mapping["4"] = mapping["4"], mapping["5"]
    mapping_path.write_text(json.dumps(mapping))
    with pytest.raises(UserError, match=r"1 of 3 test images .* imgid 7: absent there, '1007\.jpg' in dataset\.json"):
        import_precomp(tmp_path / "data" / "f30k", tmp_path / "dataset.json", tmp_path / "regions", id_field="imgid")


def test_unreadable_id_mapping_is_a_user_error(releases: dict, tmp_path: Path) -> None:
    mapping_path = tmp_path / "data" / "f30k" / "id_mapping.json"
    mapping_path.write_text('["1000.jpg"]')
    with pytest.raises(UserError, match=r"id_mapping\.json: not a readable id -> file name mapping"):
        import_precomp(tmp_path / "data" / "f30k", tmp_path / "dataset.json", tmp_path / "regions", id_field="imgid")


def test_coco_in_vse_infty_layout_maps_coco_ids_to_file_names_without_folders(tmp_path: Path) -> None:
    records = _records(coco=True)
    write_dataset_json(tmp_path / "dataset.json", "coco", records)
    root = tmp_path / "data" / "coco"
    features = _write_release(root / "precomp", records, coco=True)
    (root / "precomp" / "test_ims.npy").rename(root / "precomp" / "testall_ims.npy")
    for suffix in ("caps.txt", "ids.txt"):
        (root / "precomp" / f"test_{suffix}").rename(root / "precomp" / f"testall_{suffix}")
    _write_mapping(root / "id_mapping.json", records, coco=True)
    summary = import_precomp(root, tmp_path / "dataset.json", tmp_path / "regions", id_field="source_id")
    assert summary["test/images"] == 3
    store = RegionStore(tmp_path / "regions" / "test")
    assert store.info["scan_split"] == "testall"
    np.testing.assert_allclose(store.features_of(8), features[8], rtol=1e-3, atol=1e-3)


def test_a_data_root_names_the_release_folders_inside(releases: dict, tmp_path: Path) -> None:
    with pytest.raises(UserError) as raised:
        import_precomp(tmp_path / "data", tmp_path / "dataset.json", tmp_path / "regions", id_field="imgid")
    assert str(raised.value) == (
        f"{tmp_path / 'data'}: holds no split files but the release folders f30k/, f30k_precomp/: set "
        f"regions.precomp_dir to the one of this dataset, e.g. {tmp_path / 'data' / 'f30k'}"
    )


def test_a_missing_folder_names_both_layouts(tmp_path: Path) -> None:
    with pytest.raises(UserError) as raised:
        find_layout(tmp_path / "nowhere")
    message = str(raised.value)
    assert message.startswith(f"{tmp_path / 'nowhere'}: regions.precomp_dir is not a folder")
    assert "data/<f30k|coco>_precomp/" in message and "id_mapping.json beside precomp/" in message
    assert "\n" not in message


SCAN_LAYOUT = "SCAN's layout: data/<f30k|coco>_precomp/ holding {split}_ims.npy, {split}_caps.txt, {split}_ids.txt"
VSE_LAYOUT = (
    "VSE∞'s layout: data/<f30k|coco>/precomp/ holding {split}_ims.npy, {split}_caps.txt, {split}_ids.txt, "
    "with id_mapping.json beside precomp/"
)


@pytest.mark.parametrize("given", list(GIVEN))
@pytest.mark.parametrize("missing", ["dev_caps.txt", "test_ids.txt", "train_caps.txt", "dev_ids.txt"])
def test_a_missing_split_file_names_itself_and_the_layout(
    releases: dict, tmp_path: Path, given: str, missing: str
) -> None:
    kind, files_dir, _ = GIVEN[given]
    (tmp_path / files_dir / missing).unlink()
    split = {"train": "train", "dev": "val", "test": "test"}[missing.split("_")[0]]
    with pytest.raises(UserError) as raised:
        import_precomp(tmp_path / given, tmp_path / "dataset.json", tmp_path / "regions", id_field="imgid")
    layout = SCAN_LAYOUT if kind == "scan" else VSE_LAYOUT
    assert str(raised.value) == f"{tmp_path / files_dir / missing}: not found, needed for our {split} split ({layout})"
    assert not (tmp_path / "regions").exists()


@pytest.mark.parametrize("given", list(GIVEN))
@pytest.mark.parametrize(
    ("missing", "named"), [("train", "train_ims.npy"), ("test", "testall_ims.npy or test_ims.npy")]
)
def test_a_missing_feature_file_names_itself_and_the_layout(
    releases: dict, tmp_path: Path, given: str, missing: str, named: str
) -> None:
    kind, files_dir, _ = GIVEN[given]
    (tmp_path / files_dir / f"{missing}_ims.npy").unlink()
    with pytest.raises(UserError) as raised:
        import_precomp(tmp_path / given, tmp_path / "dataset.json", tmp_path / "regions", id_field="imgid")
    layout = SCAN_LAYOUT if kind == "scan" else VSE_LAYOUT
    assert str(raised.value) == f"{tmp_path / files_dir}: no {named} for our {missing} split ({layout})"
