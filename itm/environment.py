"""What a stage's numbers depend on besides code, params and data: the numeric environment, pinned where it can be,
and recorded where it cannot.

On a CPU, PyTorch picks its kernels by the instruction set it detects (`ATEN_CPU_CAPABILITY`: default, avx2,
avx512), oneDNN its convolutions likewise (`ONEDNN_MAX_CPU_ISA`), MKL its reductions (`MKL_CBWR`), and a
convolution's result also changes with the number of threads that split it. Each of these changes float rounding,
and the detector's training amplifies a rounding difference into a different detector (docs/reproducibility.md).
`pin()` fixes all four before torch is imported, so two x86-64 machines with AVX2 compute the same kernels in the same
order; a value already in the environment is kept (set it to compare kernels, e.g. `ATEN_CPU_CAPABILITY=avx512`).
`ITM_CPU_THREADS` (default 2) is the thread count.

What cannot be pinned (the torch build, the GPU and its libraries) is recorded by `record()`: every model card and
MLflow run carries it, and a reader comparing two results can see whether they ran alike.

This module imports nothing heavy at import time: `pin()` must run before the first `import torch`.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any

THREADS_VARIABLE = "ITM_CPU_THREADS"
DEFAULT_THREADS = 2
# x86-64 kernel choices, pinned to AVX2: the widest instruction set every x86-64 CPU of the last decade has.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # read by torch (and BLAS) when it loads
X86_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
_X86 = ("x86_64", "amd64")


def pin() -> None:
    """Fix the CPU kernels' instruction set (x86-64), unless the environment already sets it, and the thread count.

    Call before torch is imported (stages import it lazily, once their arguments are good). The thread variables
    are set from `ITM_CPU_THREADS` whatever they held, the one knob of the count; torch reads them when it loads (at
    most one thread per core) and `apply_threads` sets its count exactly once it is loaded.
    """
    if platform.machine().lower() in _X86:
        for name, value in X86_PINS.items():
            os.environ.setdefault(name, value)
    threads = str(cpu_threads())
    for name in THREAD_VARIABLES:
        os.environ[name] = threads


def cpu_threads() -> int:
    """The pinned thread count: `ITM_CPU_THREADS`, else 2."""
    value = os.environ.get(THREADS_VARIABLE, str(DEFAULT_THREADS))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_VARIABLE}={value!r}: expected a whole number of threads, at least 1")
    return int(value)


def apply_threads() -> None:
    """Set torch's intra-op thread count to the pinned one (the count changes how convolutions split their sums)."""
    import torch

    torch.set_num_threads(cpu_threads())


def record() -> dict[str, Any]:
    """What a result depends on beyond code, params and data: library versions, CPU kernels and threads, GPUs.

    A process that has not loaded torch (the download and tokenize stages) records torch's installed version and
    None for what torch would choose (kernels, threads, GPUs), which nothing it computed depended on; importing
    torch only to ask would cost such a stage seconds."""
    import numpy

    torch = sys.modules.get("torch")
    loaded = torch is not None
    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__) if loaded else importlib.metadata.version("torch"),
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda if loaded else None,
        "cudnn": torch.backends.cudnn.version() if loaded and torch.backends.cudnn.is_available() else None,
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability() if loaded else None,
        "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "threads": torch.get_num_threads() if loaded else None,
        "gpus": [torch.cuda.get_device_name(index) for index in range(torch.cuda.device_count())] if loaded else None,
    }


def _cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` says."""
    try:
        with Path("/proc/cpuinfo").open(encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
