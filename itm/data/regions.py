"""The region store: bottom-up region features and boxes of one split, the input of every matcher.

A split folder holds
- `features.npy`: float16 [total_boxes, D], read memory-mapped; the regions of an image are a contiguous run;
- `regions.parquet`: one row per image: image_id, offset and n_boxes into `features.npy`, width, height, boxes
  (flattened x1, y1, x2, y2 in original pixels), object_ids / object_confidence and attribute_ids /
  attribute_confidence (0-based over the detector's classes and attributes; -1 and NaN where unknown, e.g. for
  SCAN's precomputed features, which carry no boxes or labels);
- `failures.parquet`: image_id, filename and reason of every image that could not be read;
- `store.json`: the feature dimension and where the regions came from.
Adaptive (10..100) and fixed (36) box counts share this format.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from itm.data.batches import Regions
from itm.errors import UserError

FEATURES_FILE = "features.npy"
REGIONS_FILE = "regions.parquet"
FAILURES_FILE = "failures.parquet"
STORE_FILE = "store.json"

REGION_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("offset", pa.int64()),
        ("n_boxes", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("boxes", pa.list_(pa.float32())),
        ("object_ids", pa.list_(pa.int16())),
        ("object_confidence", pa.list_(pa.float32())),
        ("attribute_ids", pa.list_(pa.int16())),
        ("attribute_confidence", pa.list_(pa.float32())),
    ]
)
FAILURE_SCHEMA = pa.schema([("image_id", pa.int64()), ("filename", pa.string()), ("reason", pa.string())])


@dataclass(frozen=True)
class ImageRegions:
    """The regions of one image."""

    image_id: int
    width: int
    height: int
    features: np.ndarray  # [n, D]
    boxes: np.ndarray  # [n, 4] float32, original pixels; NaN when unknown
    object_ids: np.ndarray  # [n] int16, -1 when unknown
    object_confidence: np.ndarray  # [n] float32
    attribute_ids: np.ndarray  # [n] int16
    attribute_confidence: np.ndarray  # [n] float32

    def __len__(self) -> int:
        return len(self.features)


@dataclass(frozen=True)
class Failure:
    """An image that could not be read, and why."""

    image_id: int
    filename: str
    reason: str


@dataclass
class StoreWriter:
    """Writes one split folder: preallocates the feature matrix, then takes images in order."""

    folder: Path
    total_boxes: int
    feature_dim: int
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        shape = (self.total_boxes, self.feature_dim)
        path = self.folder / FEATURES_FILE
        self._features = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
        self._rows: list[dict[str, Any]] = []
        self._failures: list[Failure] = []
        self._offset = 0

    def add(self, regions: ImageRegions) -> None:
        n = len(regions)
        if regions.features.shape[1:] != (self.feature_dim,):
            expected = f"[n, {self.feature_dim}]"
            raise ValueError(f"image {regions.image_id}: features {regions.features.shape}, expected {expected}")
        self._features[self._offset : self._offset + n] = regions.features
        self._rows.append(
            {
                "image_id": regions.image_id,
                "offset": self._offset,
                "n_boxes": n,
                "width": regions.width,
                "height": regions.height,
                "boxes": regions.boxes.astype(np.float32).reshape(-1),
                "object_ids": regions.object_ids.astype(np.int16),
                "object_confidence": regions.object_confidence.astype(np.float32),
                "attribute_ids": regions.attribute_ids.astype(np.int16),
                "attribute_confidence": regions.attribute_confidence.astype(np.float32),
            }
        )
        self._offset += n

    def fail(self, failure: Failure) -> None:
        self._failures.append(failure)

    def close(self) -> None:
        if self._offset != self.total_boxes:
            raise ValueError(f"{self.folder}: wrote {self._offset} boxes, expected {self.total_boxes}")
        self._features.flush()
        del self._features
        pq.write_table(pa.Table.from_pylist(self._rows, schema=REGION_SCHEMA), self.folder / REGIONS_FILE)
        failures = [vars(f) for f in self._failures]
        pq.write_table(pa.Table.from_pylist(failures, schema=FAILURE_SCHEMA), self.folder / FAILURES_FILE)
        info = {"feature_dim": self.feature_dim, "images": len(self._rows), "boxes": self.total_boxes} | self.info
        (self.folder / STORE_FILE).write_text(json.dumps(info, indent=1))


def write_store(
    folder: Path, images: Iterable[ImageRegions], failures: Iterable[Failure], feature_dim: int, info: dict[str, Any]
) -> None:
    """Write a split folder from in-memory regions (for small splits and imports)."""
    images = list(images)
    writer = StoreWriter(folder, sum(len(image) for image in images), feature_dim, info)
    for image in images:
        writer.add(image)
    for failure in failures:
        writer.fail(failure)
    writer.close()


def pad_regions(features: Sequence[np.ndarray]) -> Regions:
    """Stack per-image [n_i, D] region features into [B, R, D] with a [B, R] mask (R = max n_i)."""
    longest = max(len(f) for f in features)
    batch = np.zeros((len(features), longest, features[0].shape[1]), dtype=np.float16)
    mask = torch.zeros(len(features), longest, dtype=torch.bool)
    for row, f in enumerate(features):
        batch[row, : len(f)] = f
        mask[row, : len(f)] = True
    return Regions(torch.from_numpy(batch), mask)


class RegionStore:
    """Read access to one split folder; features stay on disk (memory-mapped)."""

    collate = staticmethod(pad_regions)  # a batch of `features_of` arrays -> Regions

    def __init__(self, folder: Path) -> None:
        for name in (FEATURES_FILE, REGIONS_FILE, STORE_FILE):
            if not (folder / name).is_file():
                raise UserError(f"{folder / name}: not found (run the regions stage first)")
        self.folder = folder
        self.info = json.loads((folder / STORE_FILE).read_text())
        self.features = np.load(folder / FEATURES_FILE, mmap_mode="r")
        self.table = pq.read_table(folder / REGIONS_FILE)
        image_ids = self.table.column("image_id").to_numpy()
        self._row = {int(image_id): i for i, image_id in enumerate(image_ids)}
        self._offsets = self.table.column("offset").to_numpy()
        self._counts = self.table.column("n_boxes").to_numpy()

    @property
    def image_ids(self) -> list[int]:
        return list(self._row)

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, image_id: int) -> bool:
        return image_id in self._row

    def features_of(self, image_id: int) -> np.ndarray:
        """[n, D] float16 view of one image's region features."""
        row = self._row[image_id]
        offset = int(self._offsets[row])
        return self.features[offset : offset + int(self._counts[row])]

    def regions_of(self, image_id: int) -> ImageRegions:
        row = self.table.slice(self._row[image_id], 1).to_pylist()[0]
        return ImageRegions(
            image_id=image_id,
            width=row["width"],
            height=row["height"],
            features=np.asarray(self.features_of(image_id)),
            boxes=np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4),
            object_ids=np.asarray(row["object_ids"], dtype=np.int16),
            object_confidence=np.asarray(row["object_confidence"], dtype=np.float32),
            attribute_ids=np.asarray(row["attribute_ids"], dtype=np.int16),
            attribute_confidence=np.asarray(row["attribute_confidence"], dtype=np.float32),
        )

    def __iter__(self) -> Iterator[ImageRegions]:
        return (self.regions_of(image_id) for image_id in self._row)

    def failures(self) -> list[Failure]:
        path = self.folder / FAILURES_FILE
        return [Failure(**row) for row in pq.read_table(path).to_pylist()] if path.is_file() else []
