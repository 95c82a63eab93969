"""DVC stage `regions`: bottom-up regions of every image, from the detector or from SCAN's precomputed release.

With `regions.gpus` x `regions.nodes` above one, extraction re-launches itself under torchrun: every process extracts
its share of the shards, and rank 0 alone writes the region store, the metrics file and the MLflow run. Importing
precomputed features stays one process's work.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from itm.atomic import check_writable, replaced_together, write_json
from itm.config import PARAMS_FILE, Params, RegionParams, load_params
from itm.data.records import DATASET_JSON, has_image_files
from itm.errors import UserError
from itm.stage_runner import default_workers, relaunch_under_torchrun, run_stage
from itm.tracking import start_run_on_main

if TYPE_CHECKING:
    from itm.detect.extract import Extraction


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--dataset", type=Path, required=True, help="data/raw/<name>")
    parser.add_argument("--detector", type=Path, required=True, help="models/detector")
    parser.add_argument("--out", type=Path, required=True, help="region store to write (data/regions)")
    parser.add_argument("--metrics", type=Path, required=True, help="summary metrics (metrics/regions.json)")
    parser.add_argument("--work", type=Path, default=Path("data/work/regions"), help="resumable shards")
    parser.add_argument("--shard-size", type=int, default=500, help="images per resumable shard")
    parser.add_argument("--workers", type=int, default=default_workers(), help="image decoding processes")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    settings = params.regions
    check_writable(files=[args.metrics], folders=[args.out, args.work])  # before hours of extraction
    if settings.source == "detector" and not has_image_files(args.dataset):
        raise UserError(
            f"{args.dataset}: no images/ to run the detector on (downloaded captions only, for regions.source: "
            f"precomp): set datasets.{params.dataset}.images[].source and run the download stage again"
        )
    if settings.source == "detector":
        relaunch_under_torchrun("stages.regions", argv, settings)
    # The work's modules (torch among them) are imported once the arguments and params are known to be good.
    from itm import distributed
    from itm.detect.dataset_regions import extract_regions
    from itm.device import default_device

    # the store and its metrics are replaced together: a failure while writing the metrics puts the earlier store back
    with replaced_together(args.out, args.metrics), distributed.processes(default_device()) as context:
        if settings.source == "precomp" and not context.is_main:
            return  # the import is one process's work
        run_params = {"regions": settings.model_dump(mode="json")}
        with start_run_on_main(context.is_main, "regions", params=run_params) as tracker:
            if settings.source == "precomp":
                summary = _import_precomputed(params, args)
            else:
                extraction = _extraction(settings, args.shard_size, args.workers)
                summary = extract_regions(
                    args.dataset, args.detector, args.out, args.work, extraction, tracker=tracker, context=context
                )
            tracker.log_metrics(summary)
        if context.is_main:
            write_json(args.metrics, _stable_metrics(summary))


def _import_precomputed(params: Params, args: argparse.Namespace) -> dict[str, float]:
    """SCAN's precomputed features (SCAN's or VSE∞'s folder layout) as the region store."""
    from itm.data.precomp import import_precomp

    assert params.regions.precomp_dir is not None  # enforced by the params schema
    id_field = "source_id" if params.active_dataset.kind == "coco" else "imgid"
    return import_precomp(Path(params.regions.precomp_dir), args.dataset / DATASET_JSON, args.out, id_field=id_field)


def _extraction(settings: RegionParams, shard_size: int, workers: int) -> Extraction:
    from itm.detect.extract import Extraction, Selection

    selection = Selection(settings.nms_threshold, settings.confidence_threshold, settings.min_boxes, settings.max_boxes)
    return Extraction(
        selection, batch_size=settings.batch_size, precision=settings.precision, shard_size=shard_size, workers=workers
    )


def _stable_metrics(summary: dict[str, float]) -> dict[str, float]:
    """The DVC metrics file's content. Throughput goes to MLflow and the log only: here it would differ on every
    run."""
    return {key: value for key, value in summary.items() if not key.endswith("images_per_second")}


if __name__ == "__main__":
    run_stage(main)
