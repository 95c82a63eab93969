"""Benchmark the retrieval precision of the trained matchers: test scores and R@K in bf16 and fp16 against fp32.

    python bench/precision.py                      # CPU: the first 200 test images and their captions
    python bench/precision.py --device cuda        # the whole test split
    python bench/precision.py --models scan_t2i_avg uarda --images 500

For every matcher of params.yaml trained under models/<name> (a matcher that is not there is skipped with a line
saying so; so is everything when models/ or data/regions is missing), the test split is scored as the evaluate
stage scores it (`itm.evaluate.scoring.score_split`, inductive concepts) in fp32, bf16 and fp16: on a GPU with
`score_split(precision=...)`, which autocasts the scoring; on a CPU, where `score_split` always runs in fp32, by
wrapping the call in `torch.autocast("cpu", dtype=...)`, which also autocasts the encoders (matrix products and
linear layers; the GRU stays fp32). Printed per matcher and precision, against fp32: max |Δscore| over the matrix,
and the change of R@1, R@5 and R@10 in both directions and of rSum (`itm.evaluate.metrics.recall_metrics`, over
the gallery scored; a subset's figures are higher than the full split's), with the scoring seconds (one run: this
is a precision benchmark, not a timing one).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PRECISION_DTYPES, REPO, device_name, print_table

from itm.config import load_params
from itm.data.captions import VOCAB_FILE, read_concepts
from itm.data.loaders import CaptionTable, captions_for, image_store, read_captions, with_regions
from itm.data.vocab import load_vocab
from itm.evaluate.metrics import recall_metrics
from itm.evaluate.scoring import score_split
from itm.train.saved import MODEL_FILE, load_matcher

PRECISIONS = ("bf16", "fp16")  # compared with fp32
KS = (1, 5, 10)


def first_images(captions: CaptionTable, n_images: int | None) -> CaptionTable:
    """The captions of the first `n_images` images (in first-appearance order); all of them for None."""
    if n_images is None:
        return captions
    chosen = list(dict.fromkeys(int(i) for i in captions.image_ids))[:n_images]
    return captions.select(np.isin(captions.image_ids, chosen))


def score(name: str, args: argparse.Namespace, precision: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The test matrix of models/<name> at `precision`, each caption's image row, and the scoring seconds."""
    device = torch.device(args.device)
    vocab = load_vocab(args.captions / VOCAB_FILE)
    concepts = read_concepts(args.captions)
    matcher, _ = load_matcher(args.models_dir / name, device, vocab_digest=vocab.digest(),
                              concepts_digest=concepts.digest())  # fmt: skip
    store = image_store(matcher, args.regions, args.dataset, "test")
    captions = read_captions(
        args.captions, "test", concepts=matcher.n_concepts > 0, texts=matcher.tokenizer is not None
    )
    captions = first_images(captions_for(matcher, with_regions(captions, store, "test")), args.images)
    cpu_autocast = (
        torch.autocast("cpu", dtype=PRECISION_DTYPES[precision])
        if device.type == "cpu" and precision != "fp32"
        else contextlib.nullcontext()
    )
    with cpu_autocast:
        scored, _, caption_image = score_split(matcher, store, captions, batch_size=args.batch_size, device=device,
                                               precision=precision)  # fmt: skip
    return scored.matrix, caption_image, scored.score_seconds


def compare(name: str, args: argparse.Namespace) -> list[list[str]]:
    """The table rows of one matcher: fp32, then each reduced precision against it."""
    exact, caption_image, seconds = score(name, args, "fp32")
    reference = recall_metrics(exact, caption_image)
    size = f"{exact.shape[0]}x{exact.shape[1]}"
    rows = [[name, size, "fp32", f"{seconds:.2f}", "-", *_recalls(reference), f"{reference['rsum']:.1f}"]]
    for precision in PRECISIONS:
        matrix, _, seconds = score(name, args, precision)
        if not torch.isfinite(matrix).all():
            rows.append([name, size, precision, f"{seconds:.2f}", "non-finite scores", *[""] * 7])
            continue
        figures = recall_metrics(matrix, caption_image)
        changes = [f"{figures[key] - reference[key]:+.1f}" for key in _recall_keys()]
        gap = float((matrix - exact).abs().max())
        rows.append([name, size, precision, f"{seconds:.2f}", f"{gap:.1e}", *changes,
                     f"{figures['rsum'] - reference['rsum']:+.1f}"])  # fmt: skip
    return rows


def _recall_keys() -> list[str]:
    return [f"{side}_r{k}" for side in ("i2t", "t2i") for k in KS]


def _recalls(figures: dict[str, float]) -> list[str]:
    return [f"{figures[key]:.1f}" for key in _recall_keys()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", nargs="+", help="names under models/ (default: every matcher of params.yaml)")
    parser.add_argument("--images", type=int, help="score the first N test images and their captions (default: 200 "
                        "on CPU, all on CUDA; 0: all)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=128, help="encoding batch size")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--regions", type=Path, default=REPO / "data/regions")
    parser.add_argument("--captions", type=Path, default=REPO / "data/captions")
    parser.add_argument("--dataset", type=Path, help="data/raw/<dataset> (pixel matchers); default: params.yaml's")
    args = parser.parse_args()
    if args.images is None:
        args.images = 200 if args.device == "cpu" else None
    elif args.images <= 0:
        args.images = None
    params = load_params(REPO / "params.yaml")
    args.dataset = args.dataset or REPO / "data/raw" / params.dataset

    where = (
        "CUDA autocast of the scoring" if args.device == "cuda" else "CPU autocast around score_split (encoders too)"
    )
    gallery = "the whole test split" if args.images is None else f"the first {args.images} test images"
    print(f"device: {device_name(args.device)}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"reduced precision by {where}; {gallery} and their captions; one run each")  # fmt: skip
    missing = [path for path in (args.models_dir, args.regions) if not path.is_dir()]
    if missing:
        print(f"skipped: {', '.join(map(str, missing))} not found (run the pipeline first: dvc repro)")
        return
    names = args.models or list(params.matchers)
    rows = []
    for name in names:
        if not (args.models_dir / name / MODEL_FILE).is_file():
            print(f"skipped {name}: {args.models_dir / name / MODEL_FILE} not found")
            continue
        rows += compare(name, args)
    if not rows:
        return
    header = ["matcher", "gallery", "precision", "score s", "max |Δscore|",
              *[f"{side} R@{k}" for side in ("i2t", "t2i") for k in KS], "rSum"]  # fmt: skip
    print("\nfp32 rows: the figures; bf16 and fp16 rows: their change against fp32 (R@K in points)")
    print_table(header, rows, align="lll")


if __name__ == "__main__":
    main()
