"""Faults from outside the code, in images: extreme aspect ratios and tiny images get regions in the `regions` stage
and in `itm search --image` (pixel matchers prepare them without blowing them up), and a shard of a resumed run is
extracted again when an image it read has changed since (a broken image fixed after a failed run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import TypeAdapter

from itm.config import DetectorArchitecture, MatcherParams
from itm.data.batches import PixelSpec
from itm.data.pixels import MAX_ASPECT, PixelStore
from itm.data.records import ImageRecord, Sentence, write_dataset_json
from itm.data.regions import RegionStore
from itm.detect import extract
from itm.detect.dataset_regions import extract_regions
from itm.detect.extract import Extraction, Selection
from itm.detect.saved import save_detector
from itm.models import MatcherInputs, build_matcher
from itm.search.index import SearchIndex
from itm.search.queries import image_query
from itm.tracking import NullTracker
from tests.conftest import TINY_DETECTOR
from tests.test_convert import random_detector

CPU = torch.device("cpu")
SELECTION = Selection(min_boxes=3, max_boxes=10)
ARCHITECTURE = DetectorArchitecture(**TINY_DETECTOR)
# (width, height): a strip as wide as the issue's, the same standing up, a single pixel
EXTREME_SIZES = {"wide.jpg": (2000, 4), "tall.jpg": (4, 2000), "dot.jpg": (1, 1)}


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny detector saved as the detector stage saves one."""
    folder = tmp_path_factory.mktemp("detector")
    save_detector(folder, random_detector(ARCHITECTURE, 7, 5, seed=0), ARCHITECTURE, None, None, source={"kind": "t"})
    return folder


def _write_jpeg(path: Path, width: int, height: int, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=92)


def _dataset(root: Path, test_files: dict[str, tuple[int, int]]) -> Path:
    """A dataset folder: one 96-px image in train and in val, and `test_files` (name -> width, height) in test."""
    (root / "images").mkdir(parents=True)
    files = [("train", "train.jpg", (96, 96)), ("val", "val.jpg", (96, 96))]
    files += [("test", name, size) for name, size in test_files.items()]
    records = []
    for imgid, (split, name, (width, height)) in enumerate(files):
        _write_jpeg(root / "images" / name, width, height, seed=imgid)
        records.append(ImageRecord(imgid, name, split, (Sentence(imgid, "a red circle"),)))
    write_dataset_json(root / "dataset.json", "faults", records)
    return root


def _extract(dataset: Path, detector: Path, out: Path, work: Path, shard_size: int = 500) -> dict[str, float]:
    settings = Extraction(SELECTION, batch_size=2, shard_size=shard_size)
    return extract_regions(dataset, detector, out, work, settings, tracker=NullTracker())


def _image_ids(dataset: Path) -> dict[str, int]:
    images = json.loads((dataset / "dataset.json").read_text())["images"]
    return {image["filename"]: image["imgid"] for image in images}


# --- item 1: extreme aspect ratios and tiny images ------------------------------------------------------------------


def test_extreme_aspect_ratios_and_tiny_images_get_regions(detector_dir: Path, tmp_path: Path) -> None:
    """A 2000x4 strip, a 4x2000 one and a 1x1 image, batched with a normal image: the stage completes, and each has
    regions inside its own bounds (the resize rounds no side down to zero pixels)."""
    dataset = _dataset(tmp_path / "dataset", {"normal.jpg": (96, 96), **EXTREME_SIZES})
    summary = _extract(dataset, detector_dir, tmp_path / "regions", tmp_path / "work")
    store = RegionStore(tmp_path / "regions" / "test")
    assert summary["test/images"] == 4 and summary["test/failures"] == 0 and store.failures() == []
    ids = _image_ids(dataset)
    for name, (width, height) in EXTREME_SIZES.items():
        regions = store.regions_of(ids[name])
        assert (regions.width, regions.height) == (width, height)
        assert 3 <= len(regions) <= 10 and np.isfinite(regions.features.astype(np.float32)).all()
        x1, y1, x2, y2 = regions.boxes.T
        assert (x1 >= 0).all() and (x1 <= x2).all() and (x2 <= width).all()
        assert (y1 >= 0).all() and (y1 <= y2).all() and (y2 <= height).all()


def test_search_describes_extreme_and_tiny_images(detector_dir: Path, tmp_path: Path) -> None:
    """`itm search --image` with images outside the index: the detector describes each extreme image, as the
    regions stage would, and the matcher encodes it."""
    dataset = _dataset(tmp_path / "dataset", {"normal.jpg": (96, 96)})
    _extract(dataset, detector_dir, tmp_path / "regions", tmp_path / "work")
    store = RegionStore(tmp_path / "regions" / "test")
    params = TypeAdapter(MatcherParams).validate_python({"kind": "scan", "embed_dim": 16, "word_dim": 8})
    torch.manual_seed(0)
    matcher = build_matcher(params, MatcherInputs(ARCHITECTURE.feature_dim, 10)).eval()
    # What an image query reads of the index: no captions or vocabulary, and no file of the split is the query.
    index = SearchIndex(
        name="scan", matcher=matcher, device=CPU, split="test", store=store, captions=None, image_ids=[], files={},
        vocab=None, concept_words=(),
    )  # fmt: skip
    for name, (width, height) in EXTREME_SIZES.items():
        _write_jpeg(tmp_path / name, width, height, seed=1)
        query = image_query(index, tmp_path / name, detector_dir)
        assert query.image_id is None and 3 <= int(query.encoded.mask.sum()) <= 10
        assert torch.isfinite(query.encoded.local).all()


def test_a_pixel_matcher_prepares_a_strip_without_blowing_it_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1x3000 image (9 kB as PNG) through the pixel matchers' preparation (training, evaluation and `itm search
    --image` alike): a square of the spec's size, made without first scaling the strip to 224 x 672,000 pixels
    (600 MB; a 1x300,000 strip would need 60 GB). The extreme and tiny JPEGs come out square too."""
    for name, (width, height) in EXTREME_SIZES.items():
        _write_jpeg(tmp_path / name, width, height, seed=2)
    Image.fromarray(np.full((1, 3000, 3), 200, dtype=np.uint8)).save(tmp_path / "strip.png")
    write_dataset_json(tmp_path / "dataset.json", "faults", [ImageRecord(0, "strip.png", "test", ())])
    store = PixelStore(tmp_path, PixelSpec(224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    for name in EXTREME_SIZES:
        assert store.prepare(tmp_path / name).shape == (3, 224, 224)

    resized: list[tuple[int, int]] = []  # every size PIL resizes an image to, as torchvision's Resize asks it
    resize = Image.Image.resize

    def recording(image: Image.Image, size: tuple[int, int], *args, **kwargs) -> Image.Image:
        resized.append(tuple(size))
        return resize(image, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    strip = store.prepare(tmp_path / "strip.png")
    assert strip.shape == (3, 224, 224)
    assert np.allclose(strip, (200 / 255 - 0.5) / 0.25, atol=1e-5)  # grey 200 everywhere, and so is its square
    assert resized and max(width * height for width, height in resized) <= 224 * 224 * MAX_ASPECT


# --- item 2: a shard's resume fingerprint covers the images it read -------------------------------------------------


def test_a_fixed_image_is_extracted_again_on_resume(
    detector_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run fails after the first two test shards (the first holds a broken image, listed as a failure); the image
    is fixed and the run resumed: its shard is extracted again, so it has regions and is no failure, while the
    finished shards whose images did not change are reused."""
    test_files = {f"test{i}.jpg": (96, 96) for i in range(6)}  # shards of 2: [broken, 1], [2, 3], [4, 5]
    dataset = _dataset(tmp_path / "dataset", test_files)
    broken = dataset / "images" / "test0.jpg"
    good_bytes = broken.read_bytes()
    broken.write_bytes(good_bytes[: len(good_bytes) // 3])
    real = extract.regions_of_batch
    batches = {"run": 0, "interrupt_after": 4}  # train, val, test shards 0 and 1: one batch each

    def counting(*args, **kwargs):
        batches["run"] += 1
        if batches["run"] > batches["interrupt_after"]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(extract, "regions_of_batch", counting)
    with pytest.raises(KeyboardInterrupt):
        _extract(dataset, detector_dir, tmp_path / "regions", tmp_path / "work", shard_size=2)
    assert not (tmp_path / "regions").exists()
    finished = sorted(path.name for path in (tmp_path / "work").glob("*/test/shard-*.npz"))
    assert finished == ["shard-00000.npz", "shard-00001.npz"]

    broken.write_bytes(good_bytes)
    batches.update(run=0, interrupt_after=1_000)
    summary = _extract(dataset, detector_dir, tmp_path / "regions", tmp_path / "work", shard_size=2)
    assert batches["run"] == 2  # test shard 0 again, and shard 2; train, val and test shard 1 reused
    store = RegionStore(tmp_path / "regions" / "test")
    image_id = _image_ids(dataset)["test0.jpg"]
    assert summary["test/failures"] == 0 and store.failures() == []
    assert image_id in store and len(store.regions_of(image_id)) >= 3
