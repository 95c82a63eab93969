"""Whole images as normalised pixels, for matchers whose backbone sees the image itself (MVAM over open_clip).

`PixelStore` serves the same interface as `RegionStore` (`image_id in store`, `features_of`, `collate`, `folder`,
`info`), so the loaders, the training loop and the evaluator serve both: an image is read from
`data/raw/<dataset>/images/`, its shorter side resized to the spec's size (bicubic), centre-cropped to a square,
scaled to [0, 1] and normalised per channel (open_clip's `image_transform` for evaluation, without augmentation).
An image whose longer side exceeds `MAX_ASPECT` times its shorter one is first cut to its centre (`central_part`), so
a strip is not scaled up to millions of pixels before the crop.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from itm.data.batches import Images, Pixels, PixelSpec
from itm.data.records import read_dataset_json
from itm.errors import UserError

# Longer side over shorter side beyond which an image is first cut to its centre. Only the central square survives the
# centre crop, and resizing the shorter side of a 1x3000 strip to 224 px would make it 224 x 672,000 pixels (600 MB).
MAX_ASPECT = 8


class ImageStore(Protocol):
    """What loaders and the evaluator need from a source of images: membership, one image's array, batching."""

    folder: Path
    info: dict[str, Any]

    def __contains__(self, image_id: int) -> bool: ...

    def features_of(self, image_id: int) -> np.ndarray: ...

    def collate(self, arrays: Sequence[np.ndarray]) -> Images: ...


class PixelStore:
    """The images of a downloaded dataset (`dataset.json` + `images/`), prepared as `spec` says."""

    def __init__(self, dataset_dir: Path, spec: PixelSpec) -> None:
        records = read_dataset_json(dataset_dir / "dataset.json")
        self.folder = dataset_dir
        self.spec = spec
        self.info: dict[str, Any] = {"source": "pixels", "size": spec.size, "mean": spec.mean, "std": spec.std}
        self._files = {record.imgid: dataset_dir / "images" / record.filename for record in records}
        from torchvision.transforms import v2 as transforms  # here: importing torchvision costs seconds

        self._prepare = transforms.Compose(
            [
                transforms.Resize(spec.size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
                transforms.CenterCrop(spec.size),
                transforms.ToImage(),
                transforms.ToDtype(torch.float32, scale=True),
                transforms.Normalize(list(spec.mean), list(spec.std)),
            ]
        )

    def __contains__(self, image_id: int) -> bool:
        return image_id in self._files

    def __len__(self) -> int:
        return len(self._files)

    def features_of(self, image_id: int) -> np.ndarray:
        """[3, size, size] float32 normalised pixels of one image."""
        return self.prepare(self._files[image_id])

    def prepare(self, path: Path) -> np.ndarray:
        """[3, size, size] float32 normalised pixels of any image file, prepared as the dataset's images are."""
        try:
            with Image.open(path) as image:
                return self._prepare(central_part(image).convert("RGB")).numpy()
        except (OSError, ValueError) as error:
            raise UserError(f"{path}: cannot read the image ({type(error).__name__}: {error})") from None

    @staticmethod
    def collate(arrays: Sequence[np.ndarray]) -> Pixels:
        return Pixels(torch.from_numpy(np.stack(arrays)))


def central_part(image: Image.Image, max_aspect: int = MAX_ASPECT) -> Image.Image:
    """`image` itself, or, when its longer side exceeds `max_aspect` times the shorter, its centre cut to that
    aspect. The central square the centre crop keeps lies well inside the cut, so what the matcher sees moves by a
    rounding of the resized size only (under a pixel), and images within the aspect are not touched."""
    width, height = image.size
    shorter, longer = min(width, height), max(width, height)
    if longer <= max_aspect * shorter:
        return image
    kept = max_aspect * shorter
    start = (longer - kept) // 2
    box = (start, 0, start + kept, height) if width > height else (0, start, width, start + kept)
    return image.crop(box)
