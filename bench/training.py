"""Benchmark matcher training: caption-image pairs per second of a training step, for every matcher kind.

    python -m bench.training                            # CPU: reduced sizes (embed 256, word 128, batch 64), fp32
    python -m bench.training --device cuda --compile    # full sizes; fp32, bf16 and fp16 rows, plus torch.compile
    python -m bench.training --kinds scan_t2i_avg uarda --steps 20 --embed-dim 1024 --word-dim 300

Each matcher is built from its `matchers:` block in params.yaml (vsepp, scan_t2i_avg, scan_i2t_lse, uarda, cvse,
mh_cvse, mvam) with the papers' joint space and word embeddings (embed_dim 1024, word_dim 300; `--embed-dim`,
`--word-dim`) instead of the small pipeline's. Inputs are random and seeded: batches of 128 images of 36 bottom-up
regions of 2,048 features (stored fp16, as the region store holds them) and 128 captions of 8..16 tokens from a
10,000-word vocabulary (Flickr30K-like), with multi-hot labels over 300 concepts for CVSE and MH-CVSE (whose
concept graph comes from random co-occurrence counts). A training step is the pipeline's own,
`itm.train.loop.TrainingStep`: the forward pass under the row's autocast (`itm.device.autocast`, on a CPU too:
a bf16 row there runs under CPU autocast, although training itself runs fp32 on a CPU), backward, gradient
clipping at 2.0 and an Adam step (learning rate 2e-4); fp16 scales the loss with `gradient_scaler`'s GradScaler,
bf16 needs none. Seconds per step are the median over `--steps` timed steps (cycling over 4 batches) after
`--warmup` steps; pairs/s = batch / that median, and the epoch projection is 145,000 pairs (Flickr30K's 29,000
train images x 5 captions) / pairs/s, data loading excluded.

`--compile` adds a row per matcher with `torch.compile` applied to the matcher (the compiled module is the step's
model), at train.precision's autocast on a GPU (fp32 on a CPU); a compile that fails is reported as a row saying
so.

Precision check: for each matcher, one step from the same weights on the same batch in fp32 and under bf16
autocast (and fp16 with loss scaling on a GPU; bf16 CPU autocast on a CPU), dropout switched off so that the
passes see the same network: the relative differences of the loss and of the gradient norm (`Stepped.grad_norm`,
before clipping; the check's steps do not clip). The hardest-negative hinge picks one negative per row, so a small
change of the scores can move the loss by more than rounding alone.

Every case runs in its own process, so its peak memory is its own (CUDA: max allocated, weights, Adam state and
inputs included; CPU: max resident set of the process).

Performance target: a SCAN epoch on Flickr30K (145,000 pairs) in at most 30 s on one H100, judged on a GPU at the
full sizes with the fastest row of each SCAN matcher.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from pydantic import TypeAdapter
from torch import nn

from bench.common import (
    REPO,
    median_seconds,
    peak_memory_mib,
    print_case_result,
    print_table,
    reset_peak_memory,
    run_case,
    run_description,
    target_verdict,
)
from itm.config import MatcherParams, load_params
from itm.data.batches import Captions, Regions
from itm.data.concepts import Concepts
from itm.device import PRECISION_DTYPES
from itm.distributed import SINGLE_PROCESS
from itm.models import Matcher, MatcherInputs, build_matcher
from itm.train.loop import TrainingStep, gradient_scaler

MATCHERS = ("vsepp", "scan_t2i_avg", "scan_i2t_lse", "uarda", "cvse", "mh_cvse", "mvam")  # params.yaml blocks
EPOCH_PAIRS = 145_000  # Flickr30K train: 29,000 images x 5 captions
TARGET_MATCHERS, TARGET_SECONDS = ("scan_t2i_avg", "scan_i2t_lse"), 30.0  # the target: a SCAN epoch <= 30 s, one H100
MIN_WORDS, MAX_WORDS = 8, 16
N_BATCHES = 4  # distinct batches the timed steps cycle over
GRAD_CLIP = 2.0  # train.grad_clip
LEARNING_RATE = 2e-4  # train.learning_rate


@dataclass(frozen=True)
class Sizes:
    embed_dim: int = 1024
    word_dim: int = 300
    feature_dim: int = 2048
    regions: int = 36
    batch_size: int = 128
    vocab_size: int = 10_000
    concepts: int = 300


FULL = Sizes()
REDUCED = Sizes(embed_dim=256, word_dim=128, batch_size=64)  # the CPU default: params.yaml's joint space, half a batch


# --- one case -------------------------------------------------------------------------------------------------------


def _concepts(n_concepts: int) -> Concepts:
    """A concept vocabulary with the co-occurrence counts of 2,000 random multi-hot captions (about 6 concepts
    each), for the concept graph of CVSE and MH-CVSE."""
    labels = (np.random.default_rng(0).random((2000, n_concepts)) < 6 / n_concepts).astype(np.int64)
    cooccurrence = labels.T @ labels
    words = tuple(f"concept{i}" for i in range(n_concepts))
    return Concepts(words, tuple(int(count) for count in np.diag(cooccurrence)), cooccurrence, len(labels))


def build(name: str, sizes: Sizes, device: str) -> Matcher:
    """The matcher of params.yaml's block `name`, with the benchmark's embedding sizes, on `device` (seeded)."""
    block = load_params(REPO / "params.yaml").matchers[name]
    settings = block.model_dump() | {"embed_dim": sizes.embed_dim, "word_dim": sizes.word_dim}
    params = TypeAdapter(MatcherParams).validate_python(settings)
    torch.manual_seed(0)
    inputs = MatcherInputs(sizes.feature_dim, sizes.vocab_size, _concepts(sizes.concepts))
    return build_matcher(params, inputs).to(device)


def batches(sizes: Sizes, n_concepts: int, device: str) -> list[tuple[Regions, Captions]]:
    """N_BATCHES seeded random batches on `device`: every image with all its regions (fp16, as stored), captions of
    MIN_WORDS..MAX_WORDS tokens padded to the batch's longest, concept labels when the matcher reads them."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(N_BATCHES):
        n = sizes.batch_size
        features = (torch.rand(n, sizes.regions, sizes.feature_dim, generator=generator) * 2).half()
        mask = torch.ones(n, sizes.regions, dtype=torch.bool)
        lengths = torch.randint(MIN_WORDS, MAX_WORDS + 1, (n,), generator=generator)
        longest = int(lengths.max())
        tokens = torch.randint(1, sizes.vocab_size, (n, longest), generator=generator)
        tokens = tokens.masked_fill(torch.arange(longest)[None] >= lengths[:, None], 0)
        concepts = None
        if n_concepts:
            concepts = (torch.rand(n, n_concepts, generator=generator) < 6 / n_concepts).float()
        out.append((Regions(features, mask).to(device), Captions(tokens, lengths, concepts).to(device)))
    return out


def training_step(
    matcher: Matcher, precision: str, device: str, *, compiled: bool = False, grad_clip: float = GRAD_CLIP
) -> TrainingStep:
    """The pipeline's training step (`itm.train.loop.TrainingStep`, one process) for `matcher` at `precision`,
    asked for explicitly: autocast on any device, the CPU included (training itself runs fp32 on a CPU). With
    `compiled`, the step's model is `torch.compile(matcher)`, whose parameters are the matcher's."""
    where = torch.device(device)
    return TrainingStep(
        model=torch.compile(matcher) if compiled else matcher,
        optimizer=torch.optim.Adam(matcher.parameters(), lr=LEARNING_RATE),
        scaler=gradient_scaler(precision, where),
        grad_clip=grad_clip,
        device=where,
        precision=precision,
        context=SINGLE_PROCESS,
    )


def _throughput_case(name: str, precision: str, compiled: bool, sizes: Sizes, args: argparse.Namespace) -> dict:
    matcher = build(name, sizes, args.device).train()
    data = batches(sizes, matcher.n_concepts, args.device)
    train_step = training_step(matcher, precision, args.device, compiled=compiled)
    steps = iter(range(10**9))
    losses: list[torch.Tensor] = []

    def step() -> None:
        regions, captions = data[next(steps) % len(data)]
        losses.append(train_step(regions, captions).losses["loss"].detach())

    # a compiled matcher recompiles for new shapes: it first sees every batch (twice, for dynamic shapes)
    warmup = max(args.warmup, 2 * N_BATCHES) if compiled else args.warmup
    try:
        for _ in range(warmup):
            step()
        reset_peak_memory(args.device)
        seconds = median_seconds(step, args.steps, args.device)
    except Exception as error:  # a compile failure becomes a row of the table, not a crash
        if not compiled:
            raise
        return {
            "error": f"compile failed: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:100]}"
        }
    if not all(torch.isfinite(loss) for loss in losses):
        raise SystemExit(f"{name} {precision}: the loss became non-finite")
    return {"seconds": seconds, "peak_mib": peak_memory_mib(args.device)}


def _no_dropout(matcher: Matcher) -> Matcher:
    """Dropout off (p = 0), everything else in training mode: two passes then see the same network."""
    for module in matcher.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(module, nn.MultiheadAttention):
            module.dropout = 0.0
    return matcher


def _precision_check_case(name: str, precisions: list[str], sizes: Sizes, args: argparse.Namespace) -> dict:
    """Loss and gradient norm of one step from the same weights on the same batch, per precision."""
    matcher = _no_dropout(build(name, sizes, args.device).train())
    regions, captions = batches(sizes, matcher.n_concepts, args.device)[0]
    initial = copy.deepcopy(matcher.state_dict())
    figures = {}
    for precision in ["fp32", *precisions]:
        matcher.load_state_dict(initial)
        torch.manual_seed(0)
        stepped = training_step(matcher, precision, args.device, grad_clip=float("inf"))(regions, captions)
        norm = math.nan if stepped.grad_norm is None else float(stepped.grad_norm)  # None: a non-finite loss
        figures[precision] = {"loss": float(stepped.losses["loss"]), "grad_norm": norm}
    return figures


# --- parent ---------------------------------------------------------------------------------------------------------


def _sizes(args: argparse.Namespace) -> Sizes:
    base = FULL if args.device == "cuda" else REDUCED
    chosen = {key: getattr(args, key) for key in asdict(base) if getattr(args, key, None) is not None}
    return Sizes(**(asdict(base) | chosen))


def _options(args: argparse.Namespace, sizes: Sizes) -> list[str]:
    options = ["--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    for key, value in asdict(sizes).items():
        options += [f"--{key.replace('_', '-')}", str(value)]
    return options


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--kinds", nargs="+", choices=MATCHERS, default=list(MATCHERS), help="params.yaml blocks")
    parser.add_argument("--precisions", nargs="+", choices=list(PRECISION_DTYPES),
                        help="default: fp32 (CPU); fp32 bf16 fp16 (CUDA)")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows")
    parser.add_argument("--steps", type=int, help="timed steps per case (default 3 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 1 on CPU, 5 on CUDA)")
    for key, value in asdict(FULL).items():
        default = f"{value}" if getattr(REDUCED, key) == value else f"{value} on CUDA, {getattr(REDUCED, key)} on CPU"
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"default {default}")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.steps = args.steps or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    sizes = _sizes(args)
    if args.case:
        kind, *case = json.loads(args.case)
        if kind == "check":
            print_case_result(_precision_check_case(*case, sizes, args))
        else:
            print_case_result(_throughput_case(*case, sizes, args))
        return

    precisions = args.precisions or (["fp32", "bf16", "fp16"] if cuda else ["fp32"])
    compiled_precision = load_params(REPO / "params.yaml").train.precision if cuda else "fp32"
    print(run_description(args.device, f"{args.steps} timed steps after {args.warmup} warm-up steps"))
    scope = "full sizes (the papers')" if sizes == FULL else "REDUCED sizes (not comparable with the target)"
    print(f"sizes: {scope}: {json.dumps(asdict(sizes))}; captions of {MIN_WORDS}..{MAX_WORDS} tokens\n")

    options = _options(args, sizes)
    memory = "peak MiB" if cuda else "peak RSS MiB"
    header = ["matcher", "precision", "ms/step", "pairs/s", f"epoch s ({EPOCH_PAIRS:,} pairs)", memory, "note"]
    rows, epochs = [], {}
    for name in args.kinds:
        variants = [(precision, False) for precision in precisions] + ([(compiled_precision, True)] * args.compile)
        for precision, compiled in variants:
            label = f"{precision} compiled" if compiled else precision
            result = run_case(__file__, options, ["time", name, precision, compiled], allow_failure=compiled)
            if "error" in result:
                rows.append([name, label, "-", "-", "-", "-", result["error"]])
                continue
            pairs_per_second = sizes.batch_size / result["seconds"]
            epoch = EPOCH_PAIRS / pairs_per_second
            epochs.setdefault(name, []).append((epoch, label))
            rows.append([name, label, f"{result['seconds'] * 1000:.1f}", f"{pairs_per_second:,.0f}", f"{epoch:,.1f}",
                         f"{result['peak_mib']:.0f}", ""])  # fmt: skip
    print_table(header, rows, align="llrrrrl")
    _print_target(epochs, sizes, args.device)
    _print_precision_check(args, sizes, options)


def _print_target(epochs: dict[str, list[tuple[float, str]]], sizes: Sizes, device: str) -> None:
    print(f"\ntarget: a SCAN epoch on Flickr30K ({EPOCH_PAIRS:,} pairs) in <= {TARGET_SECONDS:g} s on one H100")
    for name in TARGET_MATCHERS:
        if name not in epochs:
            continue
        seconds, label = min(epochs[name])
        if device == "cuda" and sizes != FULL:
            verdict = "not judged: reduced sizes"
        else:
            verdict = target_verdict(seconds, TARGET_SECONDS, at_most=True, device=device)
        print(f"  {name}: {seconds:,.1f} s ({label}): {verdict}")


def _print_precision_check(args: argparse.Namespace, sizes: Sizes, options: list[str]) -> None:
    reduced = ["bf16", "fp16"] if args.device == "cuda" else ["bf16"]
    autocast = "CUDA autocast" if args.device == "cuda" else "CPU autocast"
    print(f"\nprecision check: one step from the same weights and batch ({autocast}, dropout off), relative to fp32")
    header = ["matcher", "precision", "loss fp32", "loss", "rel. diff loss", "grad norm fp32", "grad norm",
              "rel. diff grad norm"]  # fmt: skip
    rows = []
    for name in args.kinds:
        figures = run_case(__file__, options, ["check", name, reduced])
        exact = figures["fp32"]
        for precision in reduced:
            got = figures[precision]
            rows.append([
                name, precision, f"{exact['loss']:.4f}", f"{got['loss']:.4f}",
                f"{abs(got['loss'] - exact['loss']) / abs(exact['loss']):.1e}", f"{exact['grad_norm']:.4f}",
                f"{got['grad_norm']:.4f}", f"{abs(got['grad_norm'] - exact['grad_norm']) / exact['grad_norm']:.1e}",
            ])  # fmt: skip
    print_table(header, rows, align="ll")


if __name__ == "__main__":
    main()
