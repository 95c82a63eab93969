"""DVC stage `train@<matcher>-<seed>`: train one matcher of params.yaml with one of `train.seeds` on the train split
until its validation rSum plateaus, keeping the best epoch; or, for a block with `weights:`, convert those published
weights instead."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from itm.atomic import check_writable, replaced_together
from itm.config import PARAMS_FILE, DownloadParams, MatcherParams, load_params
from itm.errors import UserError
from itm.stage_runner import default_workers, relaunch_under_torchrun, run_stage
from itm.tracking import start_run, start_run_on_main

if TYPE_CHECKING:
    from itm.data.splits import DataFolders


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--matcher", required=True, help="a key of `matchers` in params.yaml")
    parser.add_argument("--regions", type=Path, required=True, help="data/regions")
    parser.add_argument("--captions", type=Path, required=True, help="data/captions")
    parser.add_argument("--dataset", type=Path, help="data/raw/<dataset>, for matchers that read the images themselves")
    parser.add_argument("--seed", type=int, help="one of train.seeds (default: the first)")
    parser.add_argument("--out", type=Path, required=True, help="models/<matcher>/seed<seed>")
    parser.add_argument("--work", type=Path, required=True, help="resumable checkpoint folder")
    parser.add_argument("--workers", type=int, default=min(2, default_workers()), help="batch loading processes")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    if args.matcher not in params.matchers:
        raise UserError(f"--matcher {args.matcher!r} is not a key of matchers ({', '.join(params.matchers)})")
    matcher = params.matchers[args.matcher]
    seed = params.train.seeds[0] if args.seed is None else args.seed
    if seed not in params.train.seeds:
        raise UserError(f"--seed {seed} is not one of train.seeds {list(params.train.seeds)}")
    check_writable(folders=[args.out, args.work])  # before the epochs, not after them
    # The work's modules (torch among them) are imported once the arguments and params are known to be good.
    from itm import distributed
    from itm.data.splits import DataFolders
    from itm.device import default_device
    from itm.train.run import resolved_settings, train_matcher

    data = DataFolders(args.regions, args.captions, args.dataset)
    if matcher.weights is not None:  # the same conversion for every seed: nothing is drawn at random
        convert(args, matcher, params.download, data, params.dataset, seed)
        return
    logged = matcher_params(args.matcher, matcher)
    settings = resolved_settings(matcher, params.train).model_dump(mode="json", exclude={"seeds"})
    logged |= {"train": settings, "seed": seed, "dataset": params.dataset}
    relaunch_under_torchrun("stages.train", argv, params.train)
    tags = {"itm.matcher": args.matcher, "itm.dataset": params.dataset, "itm.seed": str(seed)}
    with (
        replaced_together(args.out),  # a failure after the model is written (its run record) puts the earlier back
        distributed.processes(default_device()) as context,
    ):
        # rank 0 alone logs to MLflow and writes the model; every process trains. The run opens once the training
        # run is known, so that a resumed training continues the run its checkpoint logged to.
        stage = f"train@{args.matcher}-{seed}"
        open_run = functools.partial(start_run_on_main, context.is_main, stage, params=logged, tags=tags)
        train_matcher(
            args.matcher,
            matcher,
            params.train,
            seed=seed,
            data=data,
            out_dir=args.out,
            work_dir=args.work,
            open_run=open_run,
            device=context.device,
            workers=args.workers,
            context=context,
        )


def matcher_params(name: str, matcher: MatcherParams) -> dict[str, Any]:
    """The MLflow params of a matcher's block: under `matchers.<name>` (as params.yaml spells it) and under `model`,
    the prefix every matcher's run shares, so that two matchers compared in MLflow line up key by key."""
    block = matcher.model_dump(mode="json")
    return {"matcher": name, "matchers": {name: block}, "model": block}


def convert(
    args: argparse.Namespace,
    matcher: MatcherParams,
    download: DownloadParams,
    data: DataFolders,
    dataset: str,
    seed: int,
) -> None:
    """The published weights of the block, converted in one process (nothing to train, nothing to distribute)."""
    from itm.device import default_device
    from itm.train.published import import_published

    logged = matcher_params(args.matcher, matcher) | {"dataset": dataset}
    tags = {"itm.matcher": args.matcher, "itm.dataset": dataset, "itm.weights": "published"}
    with replaced_together(args.out), start_run(f"train@{args.matcher}-{seed}", params=logged, tags=tags) as tracker:
        import_published(
            args.matcher, matcher, data=data, out_dir=args.out, work_dir=args.work, download=download,
            tracker=tracker, device=default_device(),
        )  # fmt: skip


if __name__ == "__main__":
    run_stage(main)
