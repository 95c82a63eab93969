"""DVC stage `regions`: bottom-up regions of every image, from the detector or from SCAN's precomputed release."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from itm.cli import default_workers, run_stage
from itm.config import PARAMS_FILE, load_params
from itm.data.precomp import import_precomp
from itm.data.records import DATASET_JSON
from itm.detect.extract import Extraction, Selection
from itm.detect.stages import extract_regions
from itm.device import default_device
from itm.tracking import start_run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--dataset", type=Path, required=True, help="data/raw/<name>")
    parser.add_argument("--detector", type=Path, required=True, help="models/detector")
    parser.add_argument("--out", type=Path, required=True, help="region store to write (data/regions)")
    parser.add_argument("--metrics", type=Path, required=True, help="summary figures (metrics/regions.json)")
    parser.add_argument("--work", type=Path, default=Path("data/work/regions"), help="resumable shards")
    parser.add_argument("--shard-size", type=int, default=500, help="images per resumable shard")
    parser.add_argument("--workers", type=int, default=default_workers(), help="image decoding processes")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    settings = params.regions
    with start_run("regions", params={"regions": settings.model_dump(mode="json")}) as tracker:
        if settings.source == "precomp":
            id_field = "source_id" if params.active_dataset.kind == "coco" else "imgid"
            summary = import_precomp(
                Path(settings.precomp_dir), args.dataset / DATASET_JSON, args.out, id_field=id_field
            )
        else:
            extraction = Extraction(
                Selection(
                    settings.nms_threshold, settings.confidence_threshold, settings.min_boxes, settings.max_boxes
                ),
                batch_size=settings.batch_size,
                precision=settings.precision,
                shard_size=args.shard_size,
                workers=args.workers,
                device=default_device(),
            )
            summary = extract_regions(args.dataset, args.detector, args.out, args.work, extraction, tracker=tracker)
        tracker.log_metrics(summary)
    # Throughput goes to MLflow and the log only: in the DVC metrics file it would differ on every run.
    figures = {key: value for key, value in summary.items() if not key.endswith("images_per_second")}
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    run_stage(main)
