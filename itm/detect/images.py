"""Images as the BUTD detector expects them: BGR channels, values 0..255, float32, [3, H, W]."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

# What a broken or hostile file raises while PIL decodes it.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning)


class UnreadableImageError(Exception):
    """An image file that cannot be decoded; the message says why (recorded in failures.parquet)."""


def load_bgr(path: Path) -> torch.Tensor:
    """Decode `path` into a [3, H, W] float32 BGR tensor in 0..255 (Caffe's cv2.imread order); see `decode_bgr`."""
    return decode_bgr(read_image_file(path), path)


def read_image_file(path: Path) -> bytes:
    """The bytes of an image file, read once: region extraction decodes them and fingerprints its shard with them."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UnreadableImageError("file not found") from None
    except OSError as error:
        raise UnreadableImageError(f"{type(error).__name__}: {error}") from None


class _FileBytes(io.BytesIO):
    """A file's bytes that PIL's messages name by the file's path, as when PIL opens the path itself (the default
    repr holds a memory address, which would make failures.parquet differ from run to run)."""

    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(data)
        self.path = os.fspath(path)

    def __repr__(self) -> str:
        return repr(self.path)


def decode_bgr(data: bytes, path: Path) -> torch.Tensor:
    """Decode the bytes of the image file `path` into a [3, H, W] float32 BGR tensor in 0..255 (Caffe's cv2.imread
    order).

    EXIF orientation is applied, as cv2.imread does by default. Truncated or corrupt files raise
    `UnreadableImageError` instead of yielding a partly grey image.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(_FileBytes(data, path)) as image:
                image.load()
                rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.float32)
    except _DECODE_ERRORS as error:
        raise UnreadableImageError(f"{type(error).__name__}: {error}") from None
    return torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1)))
