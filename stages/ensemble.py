"""DVC stage `ensemble@<name>-<seed>`: evaluate the average of several matchers' test similarity matrices (SCAN's
*), each member the model of that training seed, with the same bootstrap intervals as `evaluate@`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from itm.atomic import check_writable, write_json
from itm.config import PARAMS_FILE, load_params
from itm.errors import UserError
from itm.evaluate.headline import headline
from itm.seeds import seed_path
from itm.stage_runner import run_stage
from itm.tracking import start_run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--name", required=True, help="a key of `evaluate.ensembles` in params.yaml")
    parser.add_argument("--seed", type=int, help="the members' training seed, one of train.seeds (default: the first)")
    parser.add_argument("--scores", type=Path, required=True, help="data/scores/ (members' <m>/seed<seed>.npz)")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics/<name>/seed<seed>.json")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    if args.name not in params.evaluate.ensembles:
        raise UserError(
            f"--name {args.name!r} is not a key of evaluate.ensembles ({', '.join(params.evaluate.ensembles)})"
        )
    members = params.evaluate.ensembles[args.name]
    seed = params.train.seeds[0] if args.seed is None else args.seed
    if seed not in params.train.seeds:
        raise UserError(f"--seed {seed} is not one of train.seeds {list(params.train.seeds)}")
    check_writable(files=[args.metrics])
    # The work's modules (torch among them) are imported once the arguments and params are known to be good.
    from itm.evaluate.ensemble import evaluate_ensemble
    from itm.evaluate.statistics import Bootstrap

    tags = {"itm.ensemble": args.name, "itm.dataset": params.dataset, "itm.seed": str(seed)}
    bootstrap = params.evaluate.bootstrap
    logged = {"ensemble": {args.name: list(members)}, "bootstrap": bootstrap.model_dump()}
    with start_run(f"ensemble@{args.name}-{seed}", params=logged, tags=tags) as tracker:
        member_scores = [seed_path(args.scores, member, seed, ".npz") for member in members]
        metrics = evaluate_ensemble(member_scores, params.active_dataset.kind, Bootstrap(**bootstrap.model_dump()))
        tracker.log_metrics(metrics)
        write_json(args.metrics, metrics)
    print("\n".join(headline(f"ensemble@{args.name}-{seed}", metrics)), flush=True)


if __name__ == "__main__":
    run_stage(main)
