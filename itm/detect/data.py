"""Object annotations for training and validating the detector: the synthetic set's boxes, classes and attributes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from itm.data.records import DATASET_JSON, IMAGES_DIR, read_dataset_json
from itm.data.synthetic import ATTRIBUTES_FILE, CLASSES_FILE, OBJECTS_FILE
from itm.detect.images import load_bgr
from itm.errors import UserError


@dataclass(frozen=True)
class Vocabularies:
    """Names of the object classes and attributes, without background / "no attribute"."""

    classes: tuple[str, ...]
    attributes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes) + 1

    @property
    def num_attributes(self) -> int:
        return len(self.attributes) + 1


def read_vocabularies(dataset_dir: Path) -> Vocabularies:
    """The class and attribute lists written beside `objects.parquet` (one name per line)."""
    paths = [dataset_dir / CLASSES_FILE, dataset_dir / ATTRIBUTES_FILE]
    for path in paths:
        if not path.is_file():
            raise UserError(
                f"{path}: not found; training a detector needs object annotations, which only the synthetic dataset "
                "has (for Flickr30K or COCO set detector.weights to 'pretrained')"
            )
    classes, attributes = (tuple(p.read_text().split("\n")[:-1]) for p in paths)
    return Vocabularies(classes, attributes)


@dataclass(frozen=True)
class Annotated:
    """One image and its objects, as the detector's training targets."""

    image_id: int
    path: Path
    boxes: Tensor  # [M, 4] float32, pixels
    labels: Tensor  # [M] int64, 1-based (0 is background)
    attributes: Tensor  # [M, A] float32 multi-hot, column 0 ("no attribute") unused


def read_annotations(dataset_dir: Path, split: str, vocabularies: Vocabularies) -> list[Annotated]:
    """The images of `split` with their objects, in image-id order."""
    objects_path = dataset_dir / OBJECTS_FILE
    if not objects_path.is_file():
        raise UserError(f"{objects_path}: not found; only the synthetic dataset has object annotations")
    objects = pd.read_parquet(objects_path)
    class_ids = {name: i + 1 for i, name in enumerate(vocabularies.classes)}
    attribute_ids = {name: i + 1 for i, name in enumerate(vocabularies.attributes)}
    by_image = dict(tuple(objects.groupby("image_id")))
    annotated = []
    for record in read_dataset_json(dataset_dir / DATASET_JSON):
        if record.split != split:
            continue
        rows = by_image.get(record.imgid)
        n = 0 if rows is None else len(rows)
        attributes = torch.zeros(n, vocabularies.num_attributes)
        boxes, labels = torch.zeros(n, 4), torch.zeros(n, dtype=torch.int64)
        if rows is not None:
            boxes = torch.tensor(rows[["x1", "y1", "x2", "y2"]].to_numpy(), dtype=torch.float32)
            labels = torch.tensor([class_ids[name] for name in rows["class"]], dtype=torch.int64)
            for row, names in enumerate(rows["attributes"]):
                attributes[row, [attribute_ids[name] for name in names]] = 1.0
        annotated.append(Annotated(record.imgid, dataset_dir / IMAGES_DIR / record.filename, boxes, labels, attributes))
    return annotated


class DetectionDataset(Dataset):
    """(BGR image, torchvision-style target) pairs; targets also carry the multi-hot `attributes`."""

    def __init__(self, items: list[Annotated]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        item = self.items[index]
        return load_bgr(item.path), {"boxes": item.boxes, "labels": item.labels, "attributes": item.attributes}


def collate(batch: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
