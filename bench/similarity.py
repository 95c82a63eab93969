"""Benchmark the fast cross-attention scorers against the loop reference at retrieval-gallery sizes.

    python bench/similarity.py                      # CPU, Flickr30K test size: 1,000 images x 5,000 captions
    python bench/similarity.py --scale 0.1          # a quick check: a tenth of the images and of the captions
    python bench/similarity.py --device cuda        # adds COCO 5K (5,000 x 25,000) and fp16-autocast rows

Inputs are random unit vectors, 1,024-d: 36 regions per image, captions of 8..16 words (about 12) padded to 16.
Cases: SCAN t-i AVG (λ1 9), SCAN i-t LSE (λ1 4, λ2 5) and
UARDA t-i AVG with its threshold at the median best word-region similarity (so about half of the word queries are
skipped), both with skipping (retrieval mode) and without (the same scores, computed and masked).

Every case runs in a fresh process so that its peak memory is its own: on CPU the peak resident set of the whole
process (Python, torch and the inputs included), on CUDA the peak allocated beyond the inputs. Times are medians of
`--repeats` runs after one warm-up. The reference (`reference_cross_attention_scores`, `reference_uarda_scores`: a
Python loop over captions, as kuanghuei/SCAN) runs on the first `--reference-captions` captions only and its time
is scaled linearly to the whole gallery; those rows say "extrapolated". Before any time is printed, the fast
scores of those captions are compared with the reference's: max |difference| at most 1e-4 in fp32, 1e-3 under
fp16 autocast. For UARDA, pairs with a region-word similarity within 1e-6 (fp16: 1e-4) of the threshold are left
out of that comparison and counted: the hard in/out decision there depends on rounding (a different summation
order suffices), so two correct implementations may disagree on them.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from itm.models.base import Encoded  # noqa: E402
from itm.models.encoders import l2norm  # noqa: E402
from itm.models.similarity import (  # noqa: E402
    cross_attention_scores,
    reference_cross_attention_scores,
    reference_uarda_scores,
)

REGIONS, DIM, MIN_WORDS, MAX_WORDS = 36, 1024, 8, 16
GALLERIES = {"f30k": (1000, 5000), "coco5k": (5000, 25000)}  # images, captions
T2I_AVG = {"direction": "t2i", "pooling": "avg", "lambda_softmax": 9.0, "lambda_lse": 6.0}
METHODS = {
    "scan t2i avg": T2I_AVG,
    "scan i2t lse": {"direction": "i2t", "pooling": "lse", "lambda_softmax": 4.0, "lambda_lse": 5.0},
    "uarda t2i avg": T2I_AVG | {"threshold": "median", "compact": True},
    "uarda no skip": T2I_AVG | {"threshold": "median", "compact": False},
}
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-3}  # max |fast - reference| allowed
BOUNDARY = {"fp32": 1e-6, "fp16": 1e-4}  # |s - t| below which a thresholded decision may flip with rounding


def _gallery(n_img: int, n_cap: int, device: str) -> tuple[Encoded, Encoded]:
    """Seeded random unit vectors: the same gallery in every process."""
    generator = torch.Generator().manual_seed(0)
    regions = l2norm(torch.randn(n_img, REGIONS, DIM, generator=generator))  # [n_img, 36, 1024]
    lengths = torch.randint(MIN_WORDS, MAX_WORDS + 1, (n_cap,), generator=generator)
    mask = torch.arange(MAX_WORDS)[None] < lengths[:, None]  # [n_cap, 16]
    words = l2norm(torch.randn(n_cap, MAX_WORDS, DIM, generator=generator)).masked_fill(~mask[..., None], 0)
    images = Encoded(regions.to(device), torch.ones(n_img, REGIONS, dtype=torch.bool, device=device))
    return images, Encoded(words.to(device), mask.to(device))


def _median_threshold(images: Encoded, captions: Encoded) -> float:
    """The median over words of max_i s_ij, on the first 100 images x 100 captions."""
    sims = torch.einsum("kre,cle->kclr", images.local[:100], captions.local[:100])  # [k, c, L, R]
    return float(sims.amax(dim=-1)[:, captions.mask[:100]].median())


def _boundary_pairs(images: Encoded, captions: Encoded, threshold: float, eps: float) -> torch.Tensor:
    """[n_img, n_cap] pairs with a real region-word similarity within `eps` of the threshold: there, rounding (a
    different summation order, or fp16) may flip a hard in/out decision, so two correct implementations may differ.
    """
    rows = []
    for start in range(0, len(captions), 10):
        part = captions.slice(start, start + 10)
        sims = torch.einsum("kre,cle->kcrl", images.local, part.local)  # [n_img, 10, R, L]
        near = ((sims - threshold).abs() < eps) & part.mask[None, :, None, :]
        rows.append(near.flatten(2).any(dim=2).cpu())
    return torch.cat(rows, dim=1)


def _scoring(impl: str, method: str, images: Encoded, captions: Encoded, threshold: float | None, device: str):
    """The function that scores the gallery against some captions, for one implementation of one method."""
    settings = {key: value for key, value in METHODS[method].items() if key != "threshold"}
    if impl == "reference" and threshold is not None:
        settings = {key: value for key, value in settings.items() if key not in ("direction", "compact")}
        return lambda caps: reference_uarda_scores(images, caps, threshold, **settings)
    if impl == "reference":
        return lambda caps: reference_cross_attention_scores(images, caps, **settings)
    if threshold is not None:
        settings["threshold"] = torch.tensor(threshold, device=device)

    def fast(caps: Encoded) -> torch.Tensor:
        with torch.autocast(device, dtype=torch.float16, enabled=impl == "fast fp16"):
            return cross_attention_scores(images, caps, **settings)

    return fast


def _run_case(gallery: str, method: str, impl: str, args: argparse.Namespace, scores_file: str) -> dict:
    """Time one implementation in this process; save its scores on the reference's captions to `scores_file`
    (with, for the reference of a thresholded method, the pairs on the threshold's boundary)."""
    n_img, n_cap = (max(1, round(n * args.scale)) for n in GALLERIES[gallery])
    images, captions = _gallery(n_img, n_cap, args.device)
    threshold = _median_threshold(images, captions) if "threshold" in METHODS[method] else None
    n_ref = min(args.reference_captions, n_cap)
    targets = captions.slice(0, n_ref) if impl == "reference" else captions
    score = _scoring(impl, method, images, captions, threshold, args.device)

    def timed() -> tuple[float, torch.Tensor]:
        _synchronize(args.device)
        started = time.perf_counter()
        with torch.no_grad():
            out = score(targets)
        _synchronize(args.device)
        return time.perf_counter() - started, out

    baseline = torch.cuda.memory_allocated() if args.device == "cuda" else 0
    _, out = timed()  # warm-up
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = statistics.median(timed()[0] for _ in range(args.repeats))
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    saved = {"scores": out[:, :n_ref].float().cpu(), "boundary": {}}
    if impl == "reference" and threshold is not None:
        subset = captions.slice(0, n_ref)
        saved["boundary"] = {key: _boundary_pairs(images, subset, threshold, eps) for key, eps in BOUNDARY.items()}
    torch.save(saved, scores_file)
    scale = n_cap / n_ref if impl == "reference" else 1.0
    return {"seconds": seconds * scale, "extrapolated": scale != 1.0, "peak_mib": peak / 2**20, "size": [n_img, n_cap]}


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _subprocess(gallery: str, method: str, impl: str, args: argparse.Namespace, scores_file: str) -> dict:
    case = json.dumps([gallery, method, impl, scores_file])
    command = [
        sys.executable, __file__, "--device", args.device, "--repeats", str(args.repeats), "--scale", str(args.scale),
        "--reference-captions", str(args.reference_captions), "--case", case,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{gallery} {method} {impl} failed:\n{done.stderr}")
    return json.loads(done.stdout)


def _measure(
    gallery: str, method: str, impls: list[str], args: argparse.Namespace, folder: Path, references: dict
) -> tuple:
    """Run the fast implementations and the reference (run once for methods that differ only in `compact`; cached
    in `references`), then check that the fast scores agree with the reference's on the reference's captions."""
    key = json.dumps([gallery, {name: value for name, value in METHODS[method].items() if name != "compact"}])
    if key not in references:
        reference_file = folder / f"reference-{len(references)}.pt"
        references[key] = (_subprocess(gallery, method, "reference", args, str(reference_file)), reference_file)
    reference, reference_file = references[key]
    results = {}
    for impl in impls:
        scores_file = folder / f"{gallery}-{method}-{impl}.pt".replace(" ", "_")
        results[impl] = _subprocess(gallery, method, impl, args, str(scores_file))
        results[impl] |= _agreement(gallery, method, impl, torch.load(scores_file), torch.load(reference_file))
    return gallery, method, results | {"reference": reference}


def _agreement(gallery: str, method: str, impl: str, fast: dict, reference: dict) -> dict:
    """Stop unless the fast scores equal the reference's within the tolerance, except on pairs where a
    similarity sits on the threshold's boundary; return the largest difference elsewhere and those pairs' count."""
    precision = "fp16" if "fp16" in impl else "fp32"
    gap = (fast["scores"] - reference["scores"]).abs()  # [n_img, n_ref]
    boundary = reference["boundary"].get(precision, torch.zeros_like(gap, dtype=torch.bool))
    worst = float(gap.masked_fill(boundary, 0).max())
    if not worst <= TOLERANCE[precision]:
        raise SystemExit(
            f"{gallery} {method}: {impl} differs from the reference by {worst:.2e} > {TOLERANCE[precision]}"
        )
    return {"gap": worst, "boundary_pairs": int(boundary.sum()), "pairs": boundary.numel()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the numbers of images and captions")
    parser.add_argument("--reference-captions", type=int, default=200, help="captions the reference is timed on")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.case:
        gallery, method, impl, scores_file = json.loads(args.case)
        print(json.dumps(_run_case(gallery, method, impl, args, scores_file)))
        return

    galleries = ["f30k", "coco5k"] if args.device == "cuda" else ["f30k"]
    impls = ["fast", "fast fp16"] if args.device == "cuda" else ["fast"]
    references: dict[str, tuple[dict, Path]] = {}
    with tempfile.TemporaryDirectory() as folder:
        rows = [
            _measure(gallery, method, impls, args, Path(folder), references)
            for gallery in galleries
            for method in METHODS
        ]
    _print_table(rows, args)


def _print_table(rows: list[tuple], args: argparse.Namespace) -> None:
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.repeats} "
        f"runs, scale {args.scale}, reference timed on {args.reference_captions} captions"
    )
    n_img, n_cap = (max(1, round(n * args.scale)) for n in GALLERIES["f30k"])
    print(f"inputs (fp32): {(n_img * REGIONS + n_cap * MAX_WORDS) * DIM * 4 / 2**20:.0f} MiB for the f30k gallery\n")
    memory = "peak MiB over inputs" if args.device == "cuda" else "peak RSS MiB"
    header = f"{'gallery':18} {'method':14} {'implementation':14} {'seconds':>9} {'speed-up':>9} {memory:>20}"
    print(f"{header} {'max |diff|':>10}")
    for gallery, method, results in rows:
        n_img, n_cap = results["fast"]["size"]
        for impl, result in results.items():
            speedup = results["reference"]["seconds"] / result["seconds"]
            gap = f"{result['gap']:.1e}" if "gap" in result else "-"
            notes = [
                "extrapolated" if result["extrapolated"] else "",
                f"{result['boundary_pairs']} of {result['pairs']} pairs on the threshold not compared"
                if result.get("boundary_pairs")
                else "",
            ]
            note = "; ".join(filter(None, notes))
            print(
                f"{f'{gallery} {n_img}x{n_cap}':18} {method:14} {impl:14} {result['seconds']:>9.2f} {speedup:>8.1f}x "
                f"{result['peak_mib']:>20.0f} {gap:>10}{f'  ({note})' if note else ''}"
            )


if __name__ == "__main__":
    main()
