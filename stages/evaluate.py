"""DVC stage `evaluate@<matcher>`: recall@K and rSum under the dataset's protocols, and retrieval time."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from itm import distributed
from itm.atomic import write_json
from itm.config import PARAMS_FILE, load_params
from itm.data.splits import DataFolders
from itm.device import default_device
from itm.evaluate.completion import ConceptCompletion, rule_for
from itm.evaluate.run import RECALL_CURVE_FILE, evaluate_matcher, recall_curve
from itm.evaluate.score_file import SplitScores
from itm.stage_runner import relaunch_under_torchrun, run_stage
from itm.tracking import start_run_on_main


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--matcher", required=True, help="a key of `matchers` in params.yaml")
    parser.add_argument("--model", type=Path, required=True, help="models/<matcher>")
    parser.add_argument("--regions", type=Path, required=True, help="data/regions")
    parser.add_argument("--captions", type=Path, required=True, help="data/captions")
    parser.add_argument("--dataset", type=Path, help="data/raw/<dataset>, for matchers that read the images themselves")
    parser.add_argument("--scores", type=Path, required=True, help="test similarity matrix to write (.npz)")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics/<matcher>.json")
    parser.add_argument("--plots", type=Path, required=True, help="plots/<matcher>")
    parser.add_argument("--batch-size", type=int, default=128, help="images or captions encoded at once")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    relaunch_under_torchrun("stages.evaluate", argv, params.evaluate)
    settings = params.evaluate
    completion = None
    if settings.transductive_concepts:
        rule = rule_for(params.active_dataset.kind)  # CVSE's Flickr30K or COCO rule
        completion = ConceptCompletion(settings.completion_text_neighbours, settings.completion_image_window, rule)
    tags = {"itm.matcher": args.matcher, "itm.dataset": params.dataset}
    logged = {
        "matcher": args.matcher,
        "transductive_concepts": settings.transductive_concepts,
        "completion_rule": completion.rule.name if completion else "none",
        "precision": settings.precision,
    }
    with (
        distributed.processes(default_device()) as context,
        # rank 0 alone logs to MLflow (the others' tracker records nothing: run id None) and writes the outputs
        start_run_on_main(context.is_main, f"evaluate@{args.matcher}", params=logged, tags=tags) as tracker,
    ):
        # every rank encodes and scores its share
        metrics = evaluate_matcher(
            args.model,
            DataFolders(args.regions, args.captions, args.dataset),
            params.active_dataset.kind,
            scores_path=args.scores,
            device=context.device,
            batch_size=args.batch_size,
            precision=settings.precision,
            completion=completion,
            run_id=tracker.run_id,
            context=context,
        )
        if context.is_main:
            tracker.log_metrics(metrics)
            write_json(args.metrics, metrics)
            write_json(args.plots / RECALL_CURVE_FILE, recall_curve(SplitScores.load(args.scores)))
            tracker.log_artifact(args.metrics)


if __name__ == "__main__":
    run_stage(main)
