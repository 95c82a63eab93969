"""Each stage's main(argv) on a tiny synthetic profile, as DVC would call it."""

from __future__ import annotations

import copy
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from itm.data.records import read_dataset_json
from itm.errors import UserError
from stages import download, tokenize
from tests.conftest import REPO, TINY_SYNTHETIC


@pytest.fixture
def tiny_params(tmp_path: Path) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["datasets"]["synthetic"] = {"kind": "synthetic", **copy.deepcopy(TINY_SYNTHETIC)}
    raw["tokenize"]["min_count"] = 1
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_download_then_tokenize(tmp_path: Path, tiny_params: Path) -> None:
    raw = tmp_path / "data" / "raw" / "synthetic"
    download.main(["--params", str(tiny_params), "--out", str(raw), "--cache", str(tmp_path / "cache")])
    records = read_dataset_json(raw / "dataset.json")
    assert len(records) == sum(TINY_SYNTHETIC["splits"].values())
    assert (raw / "objects.parquet").is_file()

    captions = tmp_path / "data" / "captions"
    tokenize.main(["--params", str(tiny_params), "--dataset-json", str(raw / "dataset.json"), "--out", str(captions)])
    for split, n_images in TINY_SYNTHETIC["splits"].items():
        table = pq.read_table(captions / f"{split}.parquet")
        assert table.num_rows == 5 * n_images
        assert pq.read_table(captions / "concept_labels" / f"{split}.parquet").num_rows == table.num_rows
    assert {p.name for p in captions.iterdir()} == {
        "train.parquet",
        "val.parquet",
        "test.parquet",
        "vocab.json",
        "concepts.json",
        "concept_cooccurrence.npy",
        "concept_labels",
    }


def test_failed_stage_keeps_the_previous_output(tmp_path: Path, tiny_params: Path) -> None:
    captions = tmp_path / "captions"
    captions.mkdir()
    (captions / "train.parquet").write_bytes(b"previous output")
    broken = tmp_path / "dataset.json"
    broken.write_text('{"images": [{"imgid": 0}]}')
    with pytest.raises(UserError, match=r"not a valid dataset\.json"):
        tokenize.main(["--params", str(tiny_params), "--dataset-json", str(broken), "--out", str(captions)])
    assert (captions / "train.parquet").read_bytes() == b"previous output"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
