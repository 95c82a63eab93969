"""`itm.data.karpathy`: tiny Flickr30K- and COCO-like sources served locally, prepared into `dataset.json`."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from itm.config import KarpathyDataset
from itm.data import download
from itm.data.karpathy import parse_karpathy, prepare_karpathy
from itm.data.records import DATASET_JSON, IMAGES_DIR, read_dataset_json
from itm.errors import UserError
from tests.http_server import drop_after, http_server_fixture  # noqa: F401 - provides the `http_server` fixture

OPTIONS = {"retries": 2, "backoff_seconds": 0.0, "timeout_seconds": 5.0}


@pytest.fixture(autouse=True)
def _instant_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_sleep", lambda _seconds: None)


def _jpeg(colour: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (colour, 0, 255 - colour)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _image(imgid: int, filename: str, split: str, n_captions: int = 5, **extra: object) -> dict:
    sentences = [
        {"raw": f"A photo number {imgid}, caption {k}.", "tokens": [], "imgid": imgid, "sentid": imgid * 10 + k}
        for k in range(n_captions)
    ]
    return {"filename": filename, "imgid": imgid, "split": split, "sentences": sentences, **extra}


def _zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def tar_gz_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _remote(url: str, data: bytes, **extra: object) -> dict:
    return {"source": url, "size": len(data), "md5": hashlib.md5(data).hexdigest(), **extra}


FLICKR_SPLITS = ["train", "train", "train", "val", "test", "test"]
FLICKR_IMAGES = [_image(i, f"{1000 + i}.jpg", split) for i, split in enumerate(FLICKR_SPLITS)]


def _serve_flickr(http_server, images: list[dict] = FLICKR_IMAGES, archive_faults=()) -> KarpathyDataset:
    splits_zip = _zip_bytes({"dataset_flickr30k.json": json.dumps({"dataset": "flickr30k", "images": images}).encode()})
    photos = {f"flickr30k-images/{image['filename']}": _jpeg(i) for i, image in enumerate(FLICKR_IMAGES)}
    photos["flickr30k-images/readme.txt"] = b"not an image of the split file"
    archive = tar_gz_bytes(photos)
    return KarpathyDataset.model_validate(
        {
            "kind": "flickr30k",
            "karpathy": _remote(
                http_server.add("/caption_datasets.zip", splits_zip), splits_zip, member="dataset_flickr30k.json"
            ),
            "images": [
                _remote(
                    http_server.add("/flickr30k-images.tar.gz", archive, faults=archive_faults),
                    archive,
                    strip_prefix="flickr30k-images/",
                )
            ],
        }
    )


def _prepare(name: str, dataset: KarpathyDataset, tmp_path: Path) -> Path:
    out_dir = tmp_path / "data" / "raw" / name
    prepare_karpathy(name, dataset, out_dir, cache_dir=tmp_path / "cache", **OPTIONS)
    return out_dir


def _leftovers(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.iterdir()) if parent.exists() else []


def test_flickr30k_is_prepared_with_resumed_archive(http_server, tmp_path):
    dataset = _serve_flickr(http_server, archive_faults=[drop_after(300)])
    out_dir = _prepare("flickr30k", dataset, tmp_path)

    records = read_dataset_json(out_dir / DATASET_JSON)
    assert [record.split for record in records] == FLICKR_SPLITS
    assert [record.filename for record in records] == [f"{1000 + i}.jpg" for i in range(6)]
    assert all(len(record.sentences) == 5 for record in records)
    assert all(record.source_id is None for record in records)
    for i, record in enumerate(records):
        assert (out_dir / IMAGES_DIR / record.filename).read_bytes() == _jpeg(i)
    assert http_server.ranges("/flickr30k-images.tar.gz") == [None, "bytes=300-"]
    assert _leftovers(out_dir.parent) == ["flickr30k"]


def test_missing_image_fails_and_leaves_no_output(http_server, tmp_path):
    images = [*FLICKR_IMAGES, _image(6, "9999.jpg", "test")]
    dataset = _serve_flickr(http_server, images=images)
    with pytest.raises(UserError, match=r"1 of 7 images .* missing .*9999\.jpg.*strip_prefix") as raised:
        _prepare("flickr30k", dataset, tmp_path)
    assert "\n" not in str(raised.value)
    assert _leftovers(tmp_path / "data" / "raw") == []


def test_wrong_strip_prefix_names_an_extracted_file(http_server, tmp_path):
    dataset = _serve_flickr(http_server)
    archive = dataset.images[0].model_copy(update={"strip_prefix": ""})
    dataset = dataset.model_copy(update={"images": (archive,)})
    with pytest.raises(UserError, match=r"6 of 6 images .*e\.g\. 'flickr30k-images/"):
        _prepare("flickr30k", dataset, tmp_path)


def test_failed_run_keeps_the_previous_output(http_server, tmp_path):
    out_dir = _prepare("flickr30k", _serve_flickr(http_server), tmp_path)
    before = (out_dir / DATASET_JSON).read_bytes()
    broken = _serve_flickr(http_server, images=[*FLICKR_IMAGES, _image(6, "9999.jpg", "test")])
    for cached in (tmp_path / "cache").glob("*/caption_datasets.zip"):  # serve the new split file, not the cached one
        cached.unlink()
    with pytest.raises(UserError, match="missing"):
        _prepare("flickr30k", broken, tmp_path)
    assert (out_dir / DATASET_JSON).read_bytes() == before
    assert _leftovers(out_dir.parent) == ["flickr30k"]


def test_archive_without_source_asks_for_it(tmp_path):
    dataset = KarpathyDataset.model_validate(
        {
            "kind": "flickr30k",
            "karpathy": {"source": str(tmp_path / "caption_datasets.zip"), "member": "dataset_flickr30k.json"},
            "images": [{"source": None, "strip_prefix": "flickr30k-images/"}],
        }
    )
    with pytest.raises(UserError, match=r"datasets\.flickr30k\.images\[0\]\.source is not set.*forms\.illinois\.edu"):
        _prepare("flickr30k", dataset, tmp_path)
    assert _leftovers(tmp_path / "data" / "raw") == []


COCO_IMAGES = [
    _image(0, "COCO_val2014_000000000001.jpg", "test", filepath="val2014", cocoid=1),
    _image(1, "COCO_train2014_000000000002.jpg", "train", n_captions=7, filepath="train2014", cocoid=2),
    _image(2, "COCO_val2014_000000000003.jpg", "restval", filepath="val2014", cocoid=3),
    _image(3, "COCO_val2014_000000000004.jpg", "val", filepath="val2014", cocoid=4),
    _image(4, "COCO_train2014_000000000005.jpg", "train", n_captions=6, filepath="train2014", cocoid=5),
]


def _serve_coco(http_server, tmp_path: Path) -> KarpathyDataset:
    split_file = tmp_path / "dataset_coco.json"  # a plain local JSON, not inside a zip
    split_file.write_text(json.dumps({"dataset": "coco", "images": list(reversed(COCO_IMAGES))}))
    archives = []
    for folder in ("train2014", "val2014"):
        members = {
            f"{folder}/{image['filename']}": _jpeg(image["cocoid"])
            for image in COCO_IMAGES
            if image["filepath"] == folder
        }
        data = _zip_bytes(members)
        faults = [drop_after(200)] if folder == "val2014" else []
        archives.append(_remote(http_server.add(f"/zips/{folder}.zip", data, faults=faults), data))
    return KarpathyDataset.model_validate({"kind": "coco", "karpathy": {"source": str(split_file)}, "images": archives})


def test_coco_is_prepared_with_restval_in_train_and_five_captions(http_server, tmp_path):
    out_dir = _prepare("coco", _serve_coco(http_server, tmp_path), tmp_path)

    records = read_dataset_json(out_dir / DATASET_JSON)
    assert [record.imgid for record in records] == [0, 1, 2, 3, 4]
    assert [record.split for record in records] == ["test", "train", "train", "val", "train"]
    assert [record.source_id for record in records] == [1, 2, 3, 4, 5]
    assert records[1].filename == "train2014/COCO_train2014_000000000002.jpg"
    assert [s.sentid for s in records[1].sentences] == [10, 11, 12, 13, 14]
    assert all(len(record.sentences) == 5 for record in records)
    for record in records:
        assert (out_dir / IMAGES_DIR / record.filename).read_bytes() == _jpeg(record.source_id)
    assert http_server.ranges("/zips/val2014.zip") == [None, "bytes=200-"]
    assert sorted(path.name for path in (tmp_path / "cache").glob("*/*")) == ["train2014.zip", "val2014.zip"]


def test_second_run_reuses_the_cache(http_server, tmp_path):
    dataset = _serve_coco(http_server, tmp_path)
    _prepare("coco", dataset, tmp_path)
    requests = len(http_server.requests)
    _prepare("coco", dataset, tmp_path)
    assert len(http_server.requests) == requests


def test_parse_rejects_too_few_captions():
    document = {"images": [_image(0, "a.jpg", "train", n_captions=4)]}
    with pytest.raises(UserError, match=r"'a\.jpg' has 4 caption\(s\), fewer than captions_per_image \(5\)"):
        parse_karpathy(document, captions_per_image=5)


def test_parse_rejects_unknown_split():
    document = {"images": [_image(0, "a.jpg", "dev")]}
    with pytest.raises(UserError, match=r"'a\.jpg' has split 'dev', expected one of train, val, test, restval"):
        parse_karpathy(document, captions_per_image=5)


def test_parse_rejects_malformed_entries():
    with pytest.raises(UserError, match=r"images\[0\] is malformed \(KeyError: 'sentences'\)"):
        parse_karpathy({"images": [{"filename": "a.jpg", "imgid": 0, "split": "train"}]}, captions_per_image=5)
    with pytest.raises(UserError, match="expected a mapping with an 'images' list"):
        parse_karpathy({"annotations": []}, captions_per_image=5)


def test_parse_rejects_duplicate_imgids():
    document = {"images": [_image(0, "a.jpg", "train"), _image(0, "b.jpg", "train")]}
    with pytest.raises(UserError, match="imgid 0 occurs 2 times"):
        parse_karpathy(document, captions_per_image=5)
