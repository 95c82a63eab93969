"""DVC stage `compare`: every matcher and ensemble side by side (reports/), with figures, as one MLflow run."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from itm.atomic import check_writable, replaced_together
from itm.config import PARAMS_FILE, load_params
from itm.stage_runner import run_stage
from itm.tracking import start_run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--metrics", type=Path, required=True, help="metrics/ (the evaluate and ensemble stages')")
    parser.add_argument("--models", type=Path, required=True, help="models/ (the train stages')")
    parser.add_argument("--scores", type=Path, required=True, help="data/scores/ (the test similarity matrices)")
    parser.add_argument("--regions", type=Path, required=True, help="data/regions")
    parser.add_argument("--captions", type=Path, required=True, help="data/captions")
    parser.add_argument("--dataset", type=Path, required=True, help="data/raw/<dataset>")
    parser.add_argument("--work", type=Path, help="data/work/ (the runs' records of their times), when there is one")
    parser.add_argument("--out", type=Path, required=True, help="reports/")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    check_writable(folders=[args.out])
    # The work's modules (torch among them) are imported once the arguments and params are known to be good.
    from itm.compare import Examples, Inputs, compare
    from itm.evaluate.statistics import Bootstrap, Significance

    settings = params.compare
    matchers, ensembles = list(params.matchers), dict(params.evaluate.ensembles)
    bootstrap = params.evaluate.bootstrap  # how the metrics files' intervals were made, which the report states
    seeds = tuple(params.train.seeds)
    logged = {"compare": settings.model_dump(mode="json"), "matchers": matchers, "ensembles": ensembles,
              "dataset": params.dataset, "bootstrap": bootstrap.model_dump(), "seeds": list(seeds)}  # fmt: skip
    with (
        replaced_together(args.out),  # written file by file: a failure half-way puts back the earlier report whole
        start_run("compare", params=logged, tags={"itm.dataset": params.dataset}) as tracker,
    ):
        compare(
            Inputs(args.metrics, args.models, args.scores, args.regions, args.captions, args.dataset, args.work, seeds),
            matchers,
            ensembles,
            args.out,
            dataset_kind=params.active_dataset.kind,
            examples=Examples(settings.examples, settings.top, settings.seed),
            tracker=tracker,
            intervals=Bootstrap(**bootstrap.model_dump()),
            significance=Significance(**settings.significance.model_dump()),
        )


if __name__ == "__main__":
    run_stage(main)
