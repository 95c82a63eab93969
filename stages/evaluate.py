"""DVC stage `evaluate@<matcher>`: recall@K and rSum under the dataset's protocols, and retrieval time."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Sequence
from pathlib import Path

from itm import distributed
from itm.cli import relaunch_under_torchrun, run_stage
from itm.config import PARAMS_FILE, Params, load_params
from itm.device import default_device
from itm.distributed import Context
from itm.evaluate.completion import ConceptCompletion
from itm.evaluate.run import RECALL_CURVE_FILE, SplitScores, evaluate_matcher, recall_curve, write_json
from itm.tracking import NullTracker, Tracker, start_run


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
        completion = ConceptCompletion(settings.completion_text_neighbours, settings.completion_image_window)
    with distributed.processes(default_device()) as context, _tracking(args.matcher, params, context) as tracker:
        # every rank encodes and scores its share; rank 0 alone writes the outputs
        figures = evaluate_matcher(
            args.model,
            args.regions,
            args.captions,
            params.active_dataset.kind,
            scores_path=args.scores,
            device=context.device,
            batch_size=args.batch_size,
            precision=settings.precision,
            completion=completion,
            dataset_dir=args.dataset,
            run_id=tracker.run_id,
            context=context,
        )
        if context.is_main:
            tracker.log_metrics(figures)
            write_json(args.metrics, figures)
            write_json(args.plots / RECALL_CURVE_FILE, recall_curve(SplitScores.load(args.scores)))
            tracker.log_artifact(args.metrics)


def _tracking(matcher: str, params: Params, context: Context) -> contextlib.AbstractContextManager[Tracker]:
    """The MLflow run of the evaluation on rank 0; a tracker that records nothing (run id None) on the others."""
    if not context.is_main:
        return contextlib.nullcontext(NullTracker())
    tags = {"itm.matcher": matcher, "itm.dataset": params.dataset}
    settings = params.evaluate
    logged = {
        "matcher": matcher,
        "transductive_concepts": settings.transductive_concepts,
        "precision": settings.precision,
    }
    return start_run(f"evaluate@{matcher}", params=logged, tags=tags)


if __name__ == "__main__":
    run_stage(main)
