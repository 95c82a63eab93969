"""DVC stage `evaluate@<matcher>-<seed>`: recall@K and rSum under the dataset's protocols with their bootstrap
intervals (the metrics file), and the retrieval times (MLflow and the run's record, itm/measurements.py)."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

from itm.atomic import check_writable, replaced_together, write_json
from itm.config import PARAMS_FILE, load_params
from itm.evaluate.headline import headline
from itm.stage_runner import relaunch_under_torchrun, run_stage
from itm.tracking import download_model, is_model_uri, start_run_on_main


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--matcher", required=True, help="a key of `matchers` in params.yaml")
    parser.add_argument(
        "--model", required=True,
        help="models/<matcher>/seed<seed>, or an MLflow URI of a trained matcher (runs:/<train run id>/model, "
        "models:/<model id>, models:/<registered name>/<version>)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="the model's training seed (names the MLflow run)")
    parser.add_argument("--regions", type=Path, required=True, help="data/regions")
    parser.add_argument("--captions", type=Path, required=True, help="data/captions")
    parser.add_argument("--dataset", type=Path, help="data/raw/<dataset>, for matchers that read the images themselves")
    parser.add_argument("--scores", type=Path, required=True, help="test similarity matrix to write (.npz)")
    parser.add_argument("--metrics", type=Path, required=True, help="metrics/<matcher>/seed<seed>.json")
    parser.add_argument("--plots", type=Path, required=True, help="plots/<matcher>/seed<seed>")
    parser.add_argument("--work", type=Path, required=True, help="where the run's times are recorded (run.json)")
    parser.add_argument("--batch-size", type=int, default=128, help="images or captions encoded at once")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    check_writable(files=[args.scores, args.metrics], folders=[args.plots, args.work])  # before the scoring
    relaunch_under_torchrun("stages.evaluate", argv, params.evaluate)
    # The work's modules (torch among them) are imported once the arguments and params are known to be good.
    from itm import distributed
    from itm.data.splits import DataFolders
    from itm.device import default_device
    from itm.evaluate.completion import ConceptCompletion, rule_for
    from itm.evaluate.metrics import recall_curve
    from itm.evaluate.run import RECALL_CURVE_FILE, evaluate_matcher
    from itm.evaluate.score_file import SplitScores
    from itm.evaluate.statistics import Bootstrap
    from itm.measurements import write_record

    settings = params.evaluate
    completion = None
    if settings.transductive_concepts:
        rule = rule_for(params.active_dataset.kind)  # CVSE's Flickr30K or COCO rule
        completion = ConceptCompletion(settings.completion_text_neighbours, settings.completion_image_window, rule)
    tags = {"itm.matcher": args.matcher, "itm.dataset": params.dataset, "itm.seed": str(args.seed)}
    logged = {
        "matcher": args.matcher,
        "transductive_concepts": settings.transductive_concepts,
        "completion_rule": completion.rule.name if completion else "none",
        "precision": settings.precision,
        "bootstrap": settings.bootstrap.model_dump(),
    }
    with (
        replaced_together(args.scores, args.metrics, args.plots),  # the score file, metrics and plots: all or none
        tempfile.TemporaryDirectory(prefix="itm-model-") as scratch,  # an MLflow model's download, while it runs
        distributed.processes(default_device()) as context,
        # rank 0 alone logs to MLflow (the others' tracker records nothing: run id None) and writes the outputs
        start_run_on_main(context.is_main, f"evaluate@{args.matcher}-{args.seed}", params=logged, tags=tags) as tracker,
    ):
        # every rank encodes and scores its share
        model_dir = download_model(args.model, Path(scratch)) if is_model_uri(args.model) else Path(args.model)
        evaluation = evaluate_matcher(
            model_dir,
            DataFolders(args.regions, args.captions, args.dataset),
            params.active_dataset.kind,
            scores_path=args.scores,
            device=context.device,
            batch_size=args.batch_size,
            precision=settings.precision,
            bootstrap=Bootstrap(**settings.bootstrap.model_dump()),
            completion=completion,
            context=context,
        )
        if context.is_main:
            tracker.log_metrics(evaluation.metrics | evaluation.timing)
            write_json(args.metrics, evaluation.metrics)
            write_record(args.work, args.scores, {"mlflow_run_id": tracker.run_id, **evaluation.timing})
            write_json(args.plots / RECALL_CURVE_FILE, recall_curve(SplitScores.load(args.scores)))
            tracker.log_artifact(args.metrics)
            print("\n".join(headline(f"evaluate@{args.matcher}-{args.seed}", evaluation.metrics)), flush=True)


if __name__ == "__main__":
    run_stage(main)
