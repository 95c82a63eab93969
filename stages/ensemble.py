"""DVC stage `ensemble@<name>`: evaluate the average of several matchers' test similarity matrices (SCAN's *)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from itm.atomic import write_json
from itm.config import PARAMS_FILE, load_params
from itm.errors import UserError
from itm.evaluate.ensemble import evaluate_ensemble
from itm.stage_runner import run_stage
from itm.tracking import start_run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--name", required=True, help="a key of `evaluate.ensembles` in params.yaml")
    parser.add_argument("--scores", type=Path, required=True, help="folder of the members' <matcher>.npz")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics/<name>.json")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    if args.name not in params.evaluate.ensembles:
        raise UserError(
            f"--name {args.name!r} is not a key of evaluate.ensembles ({', '.join(params.evaluate.ensembles)})"
        )
    members = params.evaluate.ensembles[args.name]
    tags = {"itm.ensemble": args.name, "itm.dataset": params.dataset}
    with start_run(f"ensemble@{args.name}", params={"ensemble": {args.name: list(members)}}, tags=tags) as tracker:
        metrics = evaluate_ensemble([args.scores / f"{member}.npz" for member in members], params.active_dataset.kind)
        tracker.log_metrics(metrics)
        write_json(args.metrics, metrics)


if __name__ == "__main__":
    run_stage(main)
