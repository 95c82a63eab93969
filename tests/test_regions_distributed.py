"""Region extraction in two processes over gloo: each rank writes its own shards, rank 0 alone writes the store, and
the store is exactly the one a single process writes, also when some shards already exist."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from itm.config import DetectorArchitecture
from itm.data.records import read_dataset_json
from itm.data.regions import FAILURES_FILE, FEATURES_FILE, REGIONS_FILE
from itm.detect import extract
from itm.detect.extract import Extraction, Selection, extract_dataset, extract_split
from itm.detect.model import BottomUpDetector, build_detector
from itm.distributed import Context
from tests.conftest import TINY_DETECTOR, TINY_SYNTHETIC
from tests.processes import run_processes

pytestmark = pytest.mark.slow  # several processes

# 7 images per shard: train 60 -> 9 shards (5 for rank 0, 4 for rank 1), val 10 -> 2, test 30 -> 5 (3 and 2), the
# last shard of each split partial.
SETTINGS = Extraction(
    Selection(nms_threshold=0.3, confidence_threshold=0.2, min_boxes=3, max_boxes=10), batch_size=4, shard_size=7
)
SPLITS = tuple(TINY_SYNTHETIC["splits"])


@pytest.fixture(scope="module")
def tiny_model() -> BottomUpDetector:
    torch.manual_seed(0)
    return build_detector(DetectorArchitecture(**TINY_DETECTOR), 7, 11).eval()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Compute as the test's processes do (one thread each), so that floating-point sums come out the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_process_store(tiny_model, tiny_synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The region store of a single-process extraction."""
    out = tmp_path_factory.mktemp("single") / "regions"
    records = read_dataset_json(tiny_synthetic / "dataset.json")
    with _one_thread():
        extract_dataset(tiny_model, records, tiny_synthetic, out, out.parent / "work", SETTINGS, {})
    return out


def _extract_in_rank(context: Context, model: BottomUpDetector, dataset: Path, out: Path, work: Path) -> dict:
    """One rank's extraction (run by `run_processes`): its summary, the shard files it wrote and the number of images
    it ran the detector on."""
    written: list[str] = []
    detected = [0]
    save_shard, regions_of_batch = extract._save_shard, extract.regions_of_batch

    def recording_save(path: Path, *args: Any) -> None:
        written.append(f"{path.parent.name}/{path.name}")
        save_shard(path, *args)

    def counting_regions(model: BottomUpDetector, images: list, *args: Any) -> list:
        detected[0] += len(images)
        return regions_of_batch(model, images, *args)

    # This process is one that run_processes started for this call alone: patching its modules leaks nowhere.
    extract._save_shard, extract.regions_of_batch = recording_save, counting_regions
    records = read_dataset_json(dataset / "dataset.json")
    summary = extract_dataset(model, records, dataset, out, work, SETTINGS, {}, context)
    return {"summary": summary, "written": written, "detected": detected[0]}


def _shards(split: str, indices: range | list[int]) -> list[str]:
    return [f"{split}/shard-{i:05d}.npz" for i in indices]


def _assert_same_store(expected: Path, actual: Path) -> None:
    for split in SPLITS:
        assert (actual / split / FEATURES_FILE).read_bytes() == (expected / split / FEATURES_FILE).read_bytes()
        for table in (REGIONS_FILE, FAILURES_FILE):
            assert pq.read_table(actual / split / table).equals(pq.read_table(expected / split / table))


def test_two_processes_write_the_single_process_store(
    tiny_model, tiny_synthetic: Path, single_process_store: Path, tmp_path: Path
) -> None:
    out, work = tmp_path / "regions", tmp_path / "work"
    first, second = run_processes(_extract_in_rank, tiny_model, tiny_synthetic, out, work)

    _assert_same_store(single_process_store, out)
    assert not work.exists()
    assert first["written"] == _shards("train", range(5)) + _shards("val", [0]) + _shards("test", range(3))
    assert second["written"] == _shards("train", range(5, 9)) + _shards("val", [1]) + _shards("test", range(3, 5))
    assert (first["detected"], second["detected"]) == (35 + 7 + 21, 25 + 3 + 9)
    # rank 0 reports the store's counts and the whole job's throughput; rank 1 the same throughput only
    throughput = {f"{split}/images_per_second" for split in SPLITS}
    assert set(second["summary"]) == throughput
    assert all(first["summary"][key] == second["summary"][key] > 0 for key in throughput)
    assert {split: first["summary"][f"{split}/images"] for split in SPLITS} == TINY_SYNTHETIC["splits"]


def test_two_processes_resume_from_existing_shards(
    tiny_model, tiny_synthetic: Path, single_process_store: Path, tmp_path: Path
) -> None:
    out, work = tmp_path / "regions", tmp_path / "work"
    records = read_dataset_json(tiny_synthetic / "dataset.json")
    with _one_thread():  # every shard, as an interrupted single-process run could have left them
        for split in SPLITS:
            split_records = [r for r in records if r.split == split]
            extract_split(tiny_model, split_records, tiny_synthetic / "images", work / split, SETTINGS, split)
    lost = _shards("train", [1, 7]) + _shards("test", [4])
    for name in lost:
        (work / name).unlink()

    first, second = run_processes(_extract_in_rank, tiny_model, tiny_synthetic, out, work)

    _assert_same_store(single_process_store, out)
    # only the missing shards are redone, divided between the ranks; test has one for rank 0 and none for rank 1
    assert first["written"] == _shards("train", [1]) + _shards("test", [4])
    assert second["written"] == _shards("train", [7])
    assert (first["detected"], second["detected"]) == (7 + 2, 7)
    assert set(first["summary"]) >= {"train/images_per_second", "test/images_per_second"}
    assert "val/images_per_second" not in first["summary"]  # nothing left to do there
