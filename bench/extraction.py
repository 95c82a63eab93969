"""Benchmark region extraction: images/s and peak memory of the detector, and the selection step vs the reference.

    python bench/extraction.py                 # CPU: small model at 256 px, BUTD ResNet-101 at 600x1000
    python bench/extraction.py --device cuda   # the same cases on the GPU, plus larger batches and fp16/bf16

Every case runs in a fresh process so that its peak memory (resident set on CPU, allocated on GPU) is its own.
Times are the median of `--repeats` timed runs after one warm-up. Weights are random: speed does not depend on them
(the selection step sees random class scores, which is its worst case: few proposals are suppressed early).
The selection row compares our vectorised per-class NMS with a loop of py-faster-rcnn's per-class NMS (the
reference extractor's procedure) on the same 300 proposals x 1601 classes.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from itm.config import load_params  # noqa: E402
from itm.detect.extract import Selection, regions_of_batch  # noqa: E402
from itm.detect.model import build_detector  # noqa: E402
from itm.detect.selection import max_confidence_after_nms, reference_max_confidence  # noqa: E402

CASES = {
    "cpu": [
        ("small", 256, 256, 1, "fp32"),
        ("small", 256, 256, 4, "fp32"),
        ("small", 256, 256, 16, "fp32"),
        ("butd", 600, 1000, 1, "fp32"),
    ],
    "cuda": [
        ("small", 256, 256, 1, "fp32"),
        ("small", 256, 256, 64, "fp32"),
        ("butd", 600, 1000, 1, "fp32"),
        ("butd", 600, 1000, 8, "fp32"),
        ("butd", 600, 1000, 8, "fp16"),
        ("butd", 600, 1000, 8, "bf16"),
    ],
}
CLASSES = {"small": (7, 11), "butd": (1601, 401)}


def _one_case(
    architecture: str, height: int, width: int, batch: int, precision: str, device: str, repeats: int
) -> dict:
    torch.manual_seed(0)
    arch = load_params(REPO / "params.yaml").detector.architectures[architecture]
    model = build_detector(arch, *CLASSES[architecture]).to(device).eval()
    images = [torch.rand(3, height, width, device=device) * 255 for _ in range(batch)]
    selection = Selection()

    def run() -> None:
        regions_of_batch(model, images, list(range(batch)), selection, precision)
        if device == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {"images_per_second": batch / median, "seconds_per_batch": median, "peak_mib": peak / 2**20}


def _selection_case(device: str, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(300, 2, generator=generator) * 800
    boxes = torch.cat([corners, corners + torch.rand(300, 2, generator=generator) * 300 + 10], dim=1)
    probs = torch.softmax(torch.randn(300, 1601, generator=generator) * 3, dim=1)

    def reference() -> np.ndarray:
        return reference_max_confidence(boxes.double().numpy(), probs.double().numpy(), 0.3)

    def ours() -> np.ndarray:
        result = max_confidence_after_nms(boxes.to(device), probs.to(device), 0.3)
        return result.cpu().numpy()

    np.testing.assert_allclose(ours(), reference(), rtol=1e-5)
    timings = {}
    for name, fn in (("reference", reference), ("ours", ours)):
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - started)
        timings[name] = statistics.median(seconds)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.case:
        print(json.dumps(_one_case(*json.loads(args.case), args.device, args.repeats)))
        return

    print(
        f"device: {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, median of {args.repeats} runs\n"
    )
    print(f"{'model':6} {'input':>9} {'batch':>5} {'precision':>9} {'images/s':>9} {'s/batch':>8} {'peak MiB':>9}")
    for architecture, height, width, batch, precision in CASES[args.device]:
        case = json.dumps([architecture, height, width, batch, precision])
        command = [sys.executable, __file__, "--device", args.device, "--repeats", str(args.repeats), "--case", case]
        result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        print(
            f"{architecture:6} {height:>4}x{width:<4} {batch:>5} {precision:>9} {result['images_per_second']:>9.2f} "
            f"{result['seconds_per_batch']:>8.3f} {result['peak_mib']:>9.0f}"
        )

    timings = _selection_case(args.device, args.repeats)
    print(
        f"\nselection, 300 proposals x 1601 classes: reference per-class NMS loop {timings['reference']:.3f} s, "
        f"vectorised {timings['ours']:.4f} s, speed-up x{timings['reference'] / timings['ours']:.1f}"
    )


if __name__ == "__main__":
    main()
