"""Benchmark the fast cross-attention scorers against the loop reference at retrieval-gallery sizes.

    python -m bench.similarity                      # CPU, Flickr30K test size: 1,000 images x 5,000 captions
    python -m bench.similarity --scale 0.1          # a quick check: a tenth of the images and of the captions
    python -m bench.similarity --device cuda        # adds COCO 5K (5,000 x 25,000) and fp16/bf16-autocast rows
    python -m bench.similarity --precisions fp32 bf16   # choose the autocast rows (CPU autocast works too)
    python -m bench.similarity --methods "scan t2i avg" "uarda t2i avg"   # some of the methods

Inputs are random unit vectors, 1,024-d: 36 regions per image, captions of 8..16 words (about 12) padded to 16.
Cases: SCAN t-i AVG (λ1 9), SCAN i-t LSE (λ1 4, λ2 5) and
UARDA t-i AVG with its threshold at the median best word-region similarity (so about half of the word queries are
skipped), both with skipping (retrieval mode) and without (the same scores, computed and masked).

Every case runs in a fresh process so that its peak memory is its own: on CPU the peak resident set of the whole
process (Python, torch and the inputs included), on CUDA the peak allocated beyond the inputs. Times are medians of
`--repeats` runs after one warm-up. The reference (`reference_cross_attention_scores`, `reference_uarda_scores`: a
Python loop over captions, as kuanghuei/SCAN) runs on the first `--reference-captions` captions only and its time
is scaled linearly to the whole gallery; those rows say "extrapolated". Before any time is printed, the fast
scores of those captions are compared with the reference's (fp32): max |difference| at most 1e-4 in fp32, 1e-3
under fp16 autocast and 5e-3 under bf16 autocast (8 significant bits instead of fp16's 11). For UARDA, pairs with a
region-word similarity within 1e-6 (fp16: 1e-4, bf16: 5e-4) of the threshold are left out of that comparison and
counted: the hard in/out decision there depends on rounding (a different summation order suffices), so two correct
implementations may disagree on them.

Hardware limit: the fast path's matrix products are counted (real words only, L_c the length of caption c):
the similarity product [n_img·R, E] x [E, Σ L_c], 2·n_img·R·E·Σ L_c FLOPs (about 97% of the count at E = 1,024);
the Gram matrices (t-i: of each image's regions, 2·n_img·R²·E; i-t: of each caption's words, 2·E·Σ L_c²), once
each; and ‖a‖² = αᵀGα (t-i: 2·n_img·R²·Σ L_c; i-t: 2·n_img·R·Σ L_c²). UARDA with skipping is counted as without
(its rate is an effective one). Achieved TFLOP/s = that count / seconds, against the device's peak dense TFLOP/s
for the dtype of the similarity product (fp32 rows: fp32, or tf32 when matrix products may use TF32); unknown
GPUs and the CPU print n/a unless `--peak-tflops` gives the peak (see bench/common.py). The elementwise softmax
and pooling passes are not counted, so the share of the peak is a lower bound on how busy the device is.

Performance target: SCAN and UARDA over the COCO 5K gallery in at most 2 s on one H100; judged on a GPU at
`--scale 1` with the fastest precision of each method.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from bench.common import (
    achieved,
    matmul_compute_dtype,
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
from itm.device import autocast
from itm.models.base import Encoded
from itm.models.encoders import l2norm
from itm.models.similarity import (
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
IMPLEMENTATIONS = {"fp32": "fast", "fp16": "fast fp16", "bf16": "fast bf16"}  # precision -> row name
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-3, "bf16": 5e-3}  # max |fast - reference| allowed
# |s - t| below which a thresholded decision may flip: about twice the rounding of a similarity near t (t is about
# 0.065 here; half an ulp there is 3.7e-9 in fp32, 3.1e-5 in fp16, 2.4e-4 in bf16)
BOUNDARY = {"fp32": 1e-6, "fp16": 1e-4, "bf16": 5e-4}
TARGET_GALLERY, TARGET_SECONDS = "coco5k", 2.0  # the target: COCO 5K in <= 2 s on one H100


def _precision(impl: str) -> str:
    """The autocast precision of a fast implementation's row name ("fast" is fp32)."""
    return next(precision for precision, name in IMPLEMENTATIONS.items() if name == impl)


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


def fast_path_flops(method: str, n_images: int, word_counts: torch.Tensor) -> float:
    """The matrix-product FLOPs of scoring `n_images` images against captions of `word_counts` [n_cap] real words
    with the fast path (see the module docstring): similarity product, Gram matrices and αᵀGα."""
    words, squared = float(word_counts.sum()), float((word_counts.double() ** 2).sum())
    similarity = 2.0 * n_images * REGIONS * DIM * words
    if METHODS[method]["direction"] == "t2i":  # words attend to the regions: G is the image's [R, R]
        gram, attended = 2.0 * n_images * REGIONS**2 * DIM, 2.0 * n_images * REGIONS**2 * words
    else:  # regions attend to the words: G is the caption's [L, L]
        gram, attended = 2.0 * DIM * squared, 2.0 * n_images * REGIONS * squared
    return similarity + gram + attended


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
    precision = _precision(impl)

    def fast(caps: Encoded) -> torch.Tensor:
        with autocast(precision, torch.device(device)):
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
    outputs: list[torch.Tensor] = []

    def run() -> None:
        with torch.no_grad():
            outputs[:] = [score(targets)]

    baseline = torch.cuda.memory_allocated() if args.device == "cuda" else 0
    run()  # warm-up
    reset_peak_memory(args.device)
    seconds = median_seconds(run, args.repeats, args.device)
    peak = peak_memory_mib(args.device, baseline)
    saved = {"scores": outputs[0][:, :n_ref].float().cpu(), "boundary": {}}
    if impl == "reference" and threshold is not None:
        subset = captions.slice(0, n_ref)
        saved["boundary"] = {key: _boundary_pairs(images, subset, threshold, eps) for key, eps in BOUNDARY.items()}
    torch.save(saved, scores_file)
    scale = n_cap / n_ref if impl == "reference" else 1.0
    flops = None if impl == "reference" else fast_path_flops(method, n_img, captions.mask.sum(dim=1).cpu())
    return {
        "seconds": seconds * scale, "extrapolated": scale != 1.0, "peak_mib": peak, "size": [n_img, n_cap],
        "flops": flops,
    }  # fmt: skip


def _options(args: argparse.Namespace) -> list[str]:
    return [
        "--device", args.device, "--repeats", str(args.repeats), "--scale", str(args.scale),
        "--reference-captions", str(args.reference_captions),
    ]  # fmt: skip


def _measure(
    gallery: str, method: str, impls: list[str], args: argparse.Namespace, folder: Path, references: dict
) -> tuple:
    """Run the fast implementations and the reference (run once for methods that differ only in `compact`; cached
    in `references`), then check that the fast scores agree with the reference's on the reference's captions."""
    key = json.dumps([gallery, {name: value for name, value in METHODS[method].items() if name != "compact"}])
    if key not in references:
        reference_file = folder / f"reference-{len(references)}.pt"
        case = [gallery, method, "reference", str(reference_file)]
        references[key] = (run_case(__file__, _options(args), case), reference_file)
    reference, reference_file = references[key]
    results = {}
    for impl in impls:
        scores_file = folder / f"{gallery}-{method}-{impl}.pt".replace(" ", "_")
        results[impl] = run_case(__file__, _options(args), [gallery, method, impl, str(scores_file)])
        results[impl] |= _agreement(gallery, method, impl, torch.load(scores_file), torch.load(reference_file))
    return gallery, method, results | {"reference": reference}


def _agreement(gallery: str, method: str, impl: str, fast: dict, reference: dict) -> dict:
    """Stop unless the fast scores equal the reference's within the tolerance, except on pairs where a
    similarity sits on the threshold's boundary; return the largest difference elsewhere and those pairs' count."""
    precision = _precision(impl)
    gap = (fast["scores"] - reference["scores"]).abs()  # [n_img, n_ref]
    boundary = reference["boundary"].get(precision, torch.zeros_like(gap, dtype=torch.bool))
    worst = float(gap.masked_fill(boundary, 0).max())
    if not worst <= TOLERANCE[precision]:
        raise SystemExit(
            f"{gallery} {method}: {impl} differs from the reference by {worst:.2e} > {TOLERANCE[precision]}"
        )
    return {"gap": worst, "boundary_pairs": int(boundary.sum()), "pairs": boundary.numel()}


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.similarity", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the numbers of images and captions")
    parser.add_argument("--reference-captions", type=int, default=200, help="captions the reference is timed on")
    parser.add_argument("--galleries", nargs="+", choices=list(GALLERIES), help="default: f30k (CPU), both (CUDA)")
    parser.add_argument(
        "--precisions", nargs="+", choices=list(IMPLEMENTATIONS), help="fast-path rows; default fp32 (CPU), all (CUDA)"
    )
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="default: all")
    parser.add_argument("--peak-tflops", help="peak dense TFLOP/s: one figure, or per dtype 'bf16=989,fp32=66.9'")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.case:
        gallery, method, impl, scores_file = json.loads(args.case)
        print_case_result(_run_case(gallery, method, impl, args, scores_file))
        return

    cuda = args.device == "cuda"
    galleries = args.galleries or (list(GALLERIES) if cuda else ["f30k"])
    precisions = args.precisions or (["fp32", "fp16", "bf16"] if cuda else ["fp32"])
    impls = [IMPLEMENTATIONS[precision] for precision in precisions]
    references: dict[str, tuple[dict, Path]] = {}
    with tempfile.TemporaryDirectory() as folder:
        rows = [
            _measure(gallery, method, impls, args, Path(folder), references)
            for gallery in galleries
            for method in METHODS
            if method in args.methods
        ]
    _print_table(rows, args)
    _print_target(rows, args)


def _print_table(rows: list[tuple], args: argparse.Namespace) -> None:
    print(
        run_description(
            args.device, args.repeats, f"scale {args.scale}", f"reference timed on {args.reference_captions} captions"
        )
    )
    n_img, n_cap = (max(1, round(n * args.scale)) for n in GALLERIES["f30k"])
    print(f"inputs (fp32): {(n_img * REGIONS + n_cap * MAX_WORDS) * DIM * 4 / 2**20:.0f} MiB for the f30k gallery\n")
    override = parse_peak_override(args.peak_tflops)
    memory = "peak MiB over inputs" if args.device == "cuda" else "peak RSS MiB"
    header = ["gallery", "method", "implementation", "seconds", "speed-up", "TFLOP/s", "of peak", memory,
              "max |diff|", "note"]  # fmt: skip
    table = []
    for gallery, method, results in rows:
        n_img, n_cap = results[next(iter(results))]["size"]
        for impl, result in results.items():
            speedup = results["reference"]["seconds"] / result["seconds"]
            peak = None if impl == "reference" else peak_tflops(args.device, _matmul_dtype(impl), override)
            rate, share = achieved(result["flops"], result["seconds"], peak)
            notes = [
                "extrapolated" if result["extrapolated"] else "",
                f"{result['boundary_pairs']} of {result['pairs']} pairs on the threshold not compared"
                if result.get("boundary_pairs")
                else "",
                "FLOPs counted without skipping" if impl != "reference" and METHODS[method].get("compact") else "",
            ]
            table.append([
                f"{gallery} {n_img}x{n_cap}", method, impl, f"{result['seconds']:.2f}", f"{speedup:.1f}x", rate, share,
                f"{result['peak_mib']:.0f}", f"{result['gap']:.1e}" if "gap" in result else "-",
                "; ".join(filter(None, notes)),
            ])  # fmt: skip
    print_table(header, table, align="lllrrrrrrl")


def _matmul_dtype(impl: str) -> str:
    return matmul_compute_dtype(_precision(impl))


def _print_target(rows: list[tuple], args: argparse.Namespace) -> None:
    """The performance target, judged on the fastest precision of each method over the full COCO 5K gallery."""
    print(f"\ntarget: each method over COCO 5K ({GALLERIES[TARGET_GALLERY][0]:,} images x "
          f"{GALLERIES[TARGET_GALLERY][1]:,} captions) in <= {TARGET_SECONDS:g} s on one H100")  # fmt: skip
    measured = [(method, results) for gallery, method, results in rows if gallery == TARGET_GALLERY]
    if args.device != "cuda":
        print(f"  {target_verdict(0.0, TARGET_SECONDS, at_most=True, device=args.device)}")
        return
    if not measured or args.scale != 1.0:
        print(f"  not measured: run with --device cuda --scale 1 and the {TARGET_GALLERY} gallery")
        return
    for method, results in measured:
        fastest = min((impl for impl in results if impl != "reference"), key=lambda impl: results[impl]["seconds"])
        seconds = results[fastest]["seconds"]
        verdict = target_verdict(seconds, TARGET_SECONDS, at_most=True, device=args.device)
        print(f"  {method}: {seconds:.2f} s ({fastest}): {verdict}")


if __name__ == "__main__":
    main()
