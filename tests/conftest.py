"""Shared fixtures: tracking off by default, and tiny synthetic datasets generated once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from itm.data.synthetic import generate_synthetic

REPO = Path(__file__).resolve().parents[1]

TINY_SYNTHETIC = {
    "seed": 3,
    "splits": {"train": 60, "val": 10, "test": 30},
    "image_size": 96,
    "captions_per_image": 5,
    "min_objects": 2,
    "max_objects": 4,
    "twin_fraction": 0.5,
    "jpeg_quality": 92,
}


@pytest.fixture(autouse=True)
def _tracking_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests log nowhere unless a test turns MLflow on itself."""
    monkeypatch.setenv("ITM_TRACKING", "off")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 100-image synthetic dataset folder (dataset.json, images/, objects.parquet, vocabularies)."""
    out = tmp_path_factory.mktemp("synthetic") / "synthetic"
    generate_synthetic(out, **TINY_SYNTHETIC)
    return out


# A detector small enough to train and run in a test (same code as the BUTD model).
TINY_DETECTOR = {
    "blocks": (1, 1, 1, 1),
    "width": 4,
    "rpn_channels": 16,
    "anchor_scales": (1.0, 2.0, 3.0),
    "anchor_ratios": (0.5, 1.0, 2.0),
    "pool_size": 4,
    "class_embedding": 8,
    "attribute_hidden": 16,
    "min_size": 96,
    "max_size": 96,
    "rpn_pre_nms_train": 200,
    "rpn_post_nms_train": 50,
    "rpn_pre_nms_test": 200,
    "rpn_post_nms_test": 30,
    "roi_batch_per_image": 16,
}
