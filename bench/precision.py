"""Benchmark the retrieval precision of the trained matchers: test scores and R@K in bf16 and fp16 against fp32.

    python -m bench.precision                      # CPU: the first 200 test images and their captions
    python -m bench.precision --device cuda        # the whole test split
    python -m bench.precision --models scan_t2i_avg uarda --images 500

For every matcher of params.yaml (or of `--models`) trained under models/<name>/seed<seed> (`--models-dir`; `--seed`,
default the first of train.seeds; a matcher that is not there is skipped with a line saying so; so is everything when
models/ or data/regions is missing), the test
split, read as the evaluate stage reads it (`itm.data.splits.DataFolders`), is scored as it scores it
(`itm.evaluate.scoring.score_split`, inductive concepts) in fp32, bf16 and fp16: on a GPU with
`score_split(precision=...)`, which autocasts the scoring; on a CPU, where `score_split` always runs in fp32, by
wrapping the call in CPU autocast (`itm.device.autocast`), which also autocasts the encoders (matrix products and
linear layers; the GRU stays fp32). Printed per matcher and precision, against fp32: max |Δscore| over the matrix,
and the change of R@1, R@5 and R@10 in both directions and of rSum (`itm.evaluate.metrics.recall_metrics`, over
the gallery scored; a subset's figures are higher than the full split's), with the scoring seconds (one run: this
is a precision benchmark, not a timing one).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from bench.common import REPO, device_name, print_table
from itm.config import load_params
from itm.data.splits import DataFolders, SplitData
from itm.device import autocast
from itm.evaluate.metrics import recall_metrics
from itm.evaluate.scoring import score_split
from itm.models.base import Matcher
from itm.models.saved import MODEL_FILE, load_matcher
from itm.seeds import seed_path

PRECISIONS = ("bf16", "fp16")  # compared with fp32
KS = (1, 5, 10)


def prepared_test_split(matcher: Matcher, data: DataFolders, n_images: int | None) -> SplitData:
    """The test split as `matcher` reads it; with `n_images`, only the captions of its first `n_images` images."""
    test = data.split("test", matcher.reads)
    return test if n_images is None else SplitData(test.store, test.captions.of_first_images(n_images))


def score(
    matcher: Matcher, test: SplitData, args: argparse.Namespace, precision: str
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The test matrix of `matcher` at `precision`, each caption's image row, and the scoring seconds."""
    device = torch.device(args.device)
    # score_split autocasts on a GPU only: on a CPU, the whole call runs under CPU autocast
    cpu_autocast = autocast(precision, device) if device.type == "cpu" else contextlib.nullcontext()
    with cpu_autocast:
        scored, _, caption_image = score_split(matcher, test.store, test.captions, batch_size=args.batch_size,
                                               device=device, precision=precision)  # fmt: skip
    return scored.matrix, caption_image, scored.score_seconds


def compare(name: str, data: DataFolders, args: argparse.Namespace) -> list[list[str]]:
    """The table rows of the matcher models/<name>/seed<seed>: fp32, then each reduced precision against it."""
    matcher, _ = load_matcher(seed_path(args.models_dir, name, args.seed), torch.device(args.device), data)
    test = prepared_test_split(matcher, data, args.images)
    exact, caption_image, seconds = score(matcher, test, args, "fp32")
    reference = recall_metrics(exact, caption_image)
    size = f"{exact.shape[0]}x{exact.shape[1]}"
    rows = [[name, size, "fp32", f"{seconds:.2f}", "-", *_recalls(reference), f"{reference['rsum']:.1f}"]]
    for precision in PRECISIONS:
        matrix, _, seconds = score(matcher, test, args, precision)
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
    parser = argparse.ArgumentParser(
        prog="python -m bench.precision", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", nargs="+", help="names under --models-dir (default: every matcher of params.yaml)")
    parser.add_argument("--images", type=int, help="score the first N test images and their captions (default: 200 "
                        "on CPU, all on CUDA; 0: all)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=128, help="encoding batch size")
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--seed", type=int, help="the models' training seed (default: the first of train.seeds)")
    parser.add_argument("--regions", type=Path, default=REPO / "data/regions")
    parser.add_argument("--captions", type=Path, default=REPO / "data/captions")
    parser.add_argument("--dataset", type=Path, help="data/raw/<dataset> (pixel matchers); default: params.yaml's")
    args = parser.parse_args()
    if args.images is None:
        args.images = 200 if args.device == "cpu" else None
    elif args.images <= 0:
        args.images = None
    if args.models is None or args.dataset is None or args.seed is None:  # params.yaml says what the options do not
        params = load_params(REPO / "params.yaml")
        args.models = args.models or list(params.matchers)
        args.dataset = args.dataset or REPO / "data/raw" / params.dataset
        args.seed = params.train.seeds[0] if args.seed is None else args.seed

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
    data = DataFolders(args.regions, args.captions, args.dataset)
    rows = []
    for name in args.models:
        if not (seed_path(args.models_dir, name, args.seed) / MODEL_FILE).is_file():
            print(f"skipped {name}: {seed_path(args.models_dir, name, args.seed) / MODEL_FILE} not found")
            continue
        rows += compare(name, data, args)
    if not rows:
        return
    header = ["matcher", "gallery", "precision", "score s", "max |Δscore|",
              *[f"{side} R@{k}" for side in ("i2t", "t2i") for k in KS], "rSum"]  # fmt: skip
    print("\nfp32 rows: the figures; bf16 and fp16 rows: their change against fp32 (R@K in points)")
    print_table(header, rows, align="lll")


if __name__ == "__main__":
    main()
