"""Where tensors run (the GPU when there is one, the CPU otherwise), and in which precision."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Literal, get_args

import torch

from itm import environment

Precision = Literal["bf16", "fp16", "fp32"]
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> torch.device:
    """`cuda` when available (override with ITM_DEVICE=cpu), else `cpu`. Also sets torch's pinned CPU thread count
    (`itm.environment.apply_threads`): every stage that computes with torch picks its device here first."""
    environment.apply_threads()
    wanted = os.environ.get("ITM_DEVICE")
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast to `precision` ("bf16" or "fp16") on `device`'s type (CUDA or CPU); "fp32" runs without autocast."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISION_DTYPES[precision])


def running_precision(precision: str, device: torch.device) -> str:
    """The precision matchers train and score in on `device`: `precision` (`train.precision`, `evaluate.precision`)
    on a GPU; fp32 on any other device, where autocast is slow and leaves the GRU in fp32."""
    check_precision(precision)
    return precision if device.type == "cuda" else "fp32"


def check_precision(precision: str) -> None:
    """Refuse a precision other than bf16, fp16 or fp32 (`train.precision`, `evaluate.precision`)."""
    if precision not in get_args(Precision):
        raise ValueError(f"precision must be one of {', '.join(get_args(Precision))}, got {precision!r}")
