"""Benchmark region extraction: images/s and peak memory of the detector, and the selection step vs the reference.

    python -m bench.extraction                 # CPU: small model at 256 px, BUTD ResNet-101 at 600x1000
    python -m bench.extraction --device cuda   # the same cases on the GPU, plus larger batches and fp16/bf16
    python -m bench.extraction --models small --batches 1 --classes 101 --repeats 1   # a check in seconds

`--models` and `--batches` keep only the cases of those models and batch sizes (default: every case of the
device), and `--classes` sets the classes of the selection row (default 1601, BUTD's, background included; the
reference loop's time grows with it): the default run is the full one, the options make a quick check.

Every case runs in a fresh process so that its peak memory (resident set on CPU, allocated on GPU) is its own.
Times are the median of `--repeats` timed runs after one warm-up. Weights are random: speed does not depend on them
(the selection step sees random class scores, which is its worst case: few proposals are suppressed early).
The selection row compares our vectorised per-class NMS with a loop of py-faster-rcnn's per-class NMS (the
reference extractor's procedure) on the same 300 proposals x 1601 classes (`--classes`), after checking that both
give the same confidences.

Hardware limit: each case counts the FLOPs of its warm-up run with `torch.utils.flop_counter.FlopCounterMode`
(convolutions and matrix products: the trunk, the RPN and the res5 head on the 300 proposals, about 90% of it at
600x1000 since res5 runs with dilation 2 on 14x14 pooled regions; RoI pooling, NMS and the selection are not
counted), so achieved TFLOP/s = FLOPs per image x images/s, against the device's peak dense TFLOP/s for the
case's precision (fp32 convolutions run as TF32 on a GPU unless cuDNN's TF32 is switched off; see
bench/common.py). Unknown GPUs and the CPU print n/a unless `--peak-tflops` gives the peak. At 60 images/s the
BUTD model needs about 118 TFLOP/s.

Performance target: the full BUTD model at 600x1000 extracts at least 60 images/s on one H100; judged on a GPU
with the fastest BUTD 600x1000 case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import (
    REPO,
    achieved,
    conv_compute_dtype,
    median_seconds,
    parse_peak_override,
    peak_memory_mib,
    peak_tflops,
    print_case_result,
    print_table,
    reset_peak_memory,
    run_case,
    run_description,
    target_verdict,
)
from itm.config import load_params
from itm.detect.extract import Selection, regions_of_batch
from itm.detect.model import build_detector
from itm.detect.selection import max_confidence_after_nms, reference_max_confidence

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
PROPOSALS = 300  # the selection row's proposals (BUTD's rpn_post_nms_test)
TARGET = ("butd", 600, 1000, 60.0)  # the target: full BUTD at 600x1000, at least 60 images/s on one H100


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

    with FlopCounterMode(display=False) as counter:  # the warm-up run, counted
        run()
    reset_peak_memory(device)
    median = median_seconds(run, repeats, device)
    peak = peak_memory_mib(device)
    return {
        "images_per_second": batch / median,
        "seconds_per_batch": median,
        "peak_mib": peak,
        "flops_per_image": counter.get_total_flops() / batch,
    }


def _selection_case(device: str, repeats: int, n_classes: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(PROPOSALS, 2, generator=generator) * 800
    boxes = torch.cat([corners, corners + torch.rand(PROPOSALS, 2, generator=generator) * 300 + 10], dim=1)
    probs = torch.softmax(torch.randn(PROPOSALS, n_classes, generator=generator) * 3, dim=1)

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
    parser = argparse.ArgumentParser(
        prog="python -m bench.extraction", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", choices=list(CLASSES), help="only these models' cases (default: all)")
    parser.add_argument("--batches", nargs="+", type=int, help="only the cases of these batch sizes (default: all)")
    parser.add_argument("--classes", type=int, default=CLASSES["butd"][0],
                        help="classes of the selection row, background included (default: BUTD's 1601)")  # fmt: skip
    parser.add_argument("--peak-tflops", help="peak dense TFLOP/s: one figure, or per dtype 'bf16=989,tf32=494.7'")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.case:
        print_case_result(_one_case(*json.loads(args.case), args.device, args.repeats))
        return

    print(run_description(args.device, args.repeats) + "\n")
    override = parse_peak_override(args.peak_tflops)
    options = ["--device", args.device, "--repeats", str(args.repeats)]
    header = ["model", "input", "batch", "precision", "images/s", "s/batch", "peak MiB", "GFLOP/image", "TFLOP/s",
              "of peak"]  # fmt: skip
    cases = [
        case
        for case in CASES[args.device]
        if (args.models is None or case[0] in args.models) and (args.batches is None or case[3] in args.batches)
    ]
    if args.classes < 2:
        raise SystemExit("--classes counts the background: at least 2")
    if not cases:
        raise SystemExit(f"no {args.device} case of models {args.models} at batch sizes {args.batches}")
    rows, target_rates = [], []
    for architecture, height, width, batch, precision in cases:
        result = run_case(__file__, options, [architecture, height, width, batch, precision])
        rate, seconds = result["images_per_second"], result["seconds_per_batch"]
        peak = peak_tflops(args.device, conv_compute_dtype(precision), override)
        tflops, share = achieved(result["flops_per_image"] * batch, seconds, peak)
        rows.append([
            architecture, f"{height}x{width}", str(batch), precision, f"{rate:.2f}", f"{seconds:.3f}",
            f"{result['peak_mib']:.0f}", f"{result['flops_per_image'] / 1e9:.1f}", tflops, share,
        ])  # fmt: skip
        if (architecture, height, width) == TARGET[:3]:
            target_rates.append((rate, f"batch {batch}, {precision}"))
    print_table(header, rows, align="l")

    timings = _selection_case(args.device, args.repeats, args.classes)
    print(
        f"\nselection, {PROPOSALS} proposals x {args.classes} classes: reference per-class NMS loop "
        f"{timings['reference']:.3f} s, "
        f"vectorised {timings['ours']:.4f} s, speed-up x{timings['reference'] / timings['ours']:.1f}"
    )
    architecture, height, width, minimum = TARGET
    print(f"\ntarget: {architecture} at {height}x{width} >= {minimum:g} images/s on one H100")
    if target_rates:
        rate, case = max(target_rates)
        verdict = target_verdict(rate, minimum, at_most=False, device=args.device)
        print(f"  fastest: {rate:.2f} images/s ({case}): {verdict}")
    else:
        print(f"  not measured: no {architecture} {height}x{width} case was run")


if __name__ == "__main__":
    main()
