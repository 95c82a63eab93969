"""Images as the BUTD detector expects them: BGR channels, values 0..255, float32, [3, H, W]."""

from __future__ import annotations

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
    """Decode `path` into a [3, H, W] float32 BGR tensor in 0..255 (Caffe's cv2.imread order).

    EXIF orientation is applied, as cv2.imread does by default. Truncated or corrupt files raise
    `UnreadableImageError` instead of yielding a partly grey image.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.float32)
    except FileNotFoundError:
        raise UnreadableImageError("file not found") from None
    except _DECODE_ERRORS as error:
        raise UnreadableImageError(f"{type(error).__name__}: {error}") from None
    return torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1].transpose(2, 0, 1)))
