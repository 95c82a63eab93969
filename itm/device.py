"""Where tensors run: the GPU when there is one, the CPU otherwise."""

from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    """`cuda` when available (override with ITM_DEVICE=cpu), else `cpu`."""
    wanted = os.environ.get("ITM_DEVICE")
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
