"""Helpers shared by the benchmarks in bench/: one case per subprocess, medians of timed runs, peak memory, tables,
and the peak dense TFLOP/s of known GPUs (for "fraction of the hardware limit").

A benchmark's parent process builds a list of cases and runs each with `run_case`, which starts the same module
again from the repository root (`python -m bench.<name> ... --case <json>`); the child measures that one case and
prints one JSON line. So every case starts from a fresh process and its peak memory (CUDA: max allocated; CPU: max
resident set of the whole process) is its own.

Peak TFLOP/s are the vendors' dense figures (no structured sparsity): H100 SXM (and H200, the same GH100 compute)
bf16/fp16 989, tf32 494.7, fp32 66.9; H100 PCIe bf16/fp16 756, tf32 378, fp32 51.2; A100 bf16/fp16 312, tf32 156,
fp32 19.5. An fp32 row counts against the tf32 peak when TF32 is enabled for it (cuDNN convolutions
by default; matrix products only after `torch.set_float32_matmul_precision("high")`), else against the fp32 peak.
Unknown GPUs and the CPU print "n/a" unless `--peak-tflops` gives a figure.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# name fragment (matched in order, case-insensitive) -> peak dense TFLOP/s per compute dtype; None: unknown
PEAK_TFLOPS: list[tuple[str, dict[str, float] | None]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", None),  # other clocks and power: give --peak-tflops
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.7, "fp32": 66.9}),  # SXM5 (names "H100 80GB HBM3")
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


# --- subprocess per case --------------------------------------------------------------------------------------------


def module_name(file: str) -> str:
    """`bench.<name>`, the module of a benchmark's file (what `python -m` runs)."""
    return f"bench.{Path(file).stem}"


def run_case(file: str, options: Sequence[str], case: object, *, allow_failure: bool = False) -> dict:
    """Run `python -m bench.<name> *options --case <case as JSON>` (the benchmark of `file`, from the repository
    root) in a fresh process and return the JSON it prints last.

    A failing case stops the benchmark with its error output, or with `allow_failure` comes back as
    {"error": <its last error line>} (e.g. a `torch.compile` that does not work on this machine).
    """
    module = module_name(file)
    command = [sys.executable, "-m", module, *options, "--case", json.dumps(case)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        if allow_failure:
            lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
            return {"error": lines[-1] if lines else f"exit status {done.returncode}"}
        raise SystemExit(f"case {json.dumps(case)} of {module} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_case_result(result: dict) -> None:
    """What a child process prints: one JSON line (the last line of its output)."""
    print(json.dumps(result), flush=True)


# --- timing and memory ----------------------------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(run: Callable[[], object], repeats: int, device: str) -> float:
    """Median wall time of `repeats` calls of `run` (CUDA synchronised around each call); no warm-up here."""
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mib(device: str, baseline_bytes: int = 0) -> float:
    """CUDA: the peak allocated since the last reset, less `baseline_bytes`; CPU: the process's peak resident set
    (Linux reports KiB)."""
    if device == "cuda":
        return (torch.cuda.max_memory_allocated() - baseline_bytes) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def run_description(device: str, repeats: int | str, *extra: str) -> str:
    """The first line of a benchmark's output: device, torch, threads, what the medians are of (`repeats`: a number
    of runs, or words such as "5 timed steps")."""
    parts = [
        f"device: {device_name(device)}",
        f"torch {torch.__version__}",
        f"{torch.get_num_threads()} CPU threads",
        f"median of {repeats} runs" if isinstance(repeats, int) else f"median of {repeats}",
        *extra,
    ]
    return ", ".join(parts)


# --- hardware limits ------------------------------------------------------------------------------------------------


def parse_peak_override(text: str | None) -> dict[str, float] | None:
    """`--peak-tflops`: one figure for every dtype ("400") or figures per dtype ("bf16=989,tf32=494.7,fp32=66.9")."""
    if not text:
        return None
    if "=" not in text:
        return dict.fromkeys(("bf16", "fp16", "tf32", "fp32"), float(text))
    pairs = (item.split("=", 1) for item in text.split(",") if item.strip())
    return {key.strip(): float(value) for key, value in pairs}


def peak_tflops(device: str, compute_dtype: str, override: dict[str, float] | None = None) -> float | None:
    """Peak dense TFLOP/s of this device for `compute_dtype` (bf16, fp16, tf32, fp32); None when unknown."""
    if override is not None and compute_dtype in override:
        return override[compute_dtype]
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name().lower()
    for fragment, peaks in PEAK_TFLOPS:
        if fragment.lower() in name:
            return None if peaks is None else peaks.get(compute_dtype)
    return None


def matmul_compute_dtype(precision: str) -> str:
    """The tensor-core dtype of matrix products run at `precision` (fp32 products use TF32 only when allowed)."""
    if precision != "fp32":
        return precision
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def conv_compute_dtype(precision: str) -> str:
    """The tensor-core dtype of cuDNN convolutions run at `precision` (fp32 ones use TF32 unless disabled)."""
    if precision != "fp32":
        return precision
    conv = getattr(torch.backends.cudnn, "conv", None)
    setting = getattr(conv, "fp32_precision", "none")
    if setting in ("tf32", "ieee"):
        return "tf32" if setting == "tf32" else "fp32"
    return "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"


def achieved(flops: float | None, seconds: float, peak: float | None) -> tuple[str, str]:
    """("TFLOP/s achieved", "share of the peak") as printed; "-" without a FLOP count, "n/a" without a peak."""
    if flops is None or seconds <= 0:
        return "-", "-"
    tflops = flops / seconds / 1e12
    rate = f"{tflops:.3f}" if tflops < 10 else f"{tflops:.1f}"
    return rate, "n/a" if peak is None else f"{100 * tflops / peak:.1f}%"


def target_verdict(value: float, limit: float, *, at_most: bool, device: str, target_device: str = "H100") -> str:
    """Whether a measured `value` meets its `limit` (at most / at least), said with where it was measured."""
    if device != "cuda":
        return "not measured (no GPU: the target is for a GPU)"
    met = value <= limit if at_most else value >= limit
    name = torch.cuda.get_device_name()
    where = "" if target_device.lower() in name.lower() else f" (measured on {name}, the target is for {target_device})"
    return f"{'met' if met else 'NOT met'}{where}"


# --- tables ---------------------------------------------------------------------------------------------------------


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, align: str = "", indent: str = "") -> None:
    """Columns padded to their widest cell. `align` has one letter per column, "l" (left) or "r" (right); columns
    it leaves out are right-aligned, except the first, which is left-aligned by default."""
    align = align or "l"
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    for cells in (header, *rows):
        padded = [
            cell.ljust(width) if align[column : column + 1] == "l" else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        print((indent + "  ".join(padded)).rstrip())
