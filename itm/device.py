"""Where tensors run (the GPU when there is one, the CPU otherwise), and in which precision."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Literal, get_args

import torch

Precision = Literal["bf16", "fp16", "fp32"]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> torch.device:
    """`cuda` when available (override with ITM_DEVICE=cpu), else `cpu`."""
    wanted = os.environ.get("ITM_DEVICE")
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast to `precision` ("bf16" or "fp16") on a CUDA device; "fp32", and any other device, run in fp32."""
    check_precision(precision)
    if precision == "fp32" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=AUTOCAST_DTYPES[precision])


def check_precision(precision: str) -> None:
    """Refuse a precision other than bf16, fp16 or fp32 (`train.precision`, `evaluate.precision`)."""
    if precision not in get_args(Precision):
        raise ValueError(f"precision must be one of {', '.join(get_args(Precision))}, got {precision!r}")
