"""DVC stage `detector`: train the bottom-up detector on synthetic boxes, or convert published BUTD weights."""

from __future__ import annotations

import argparse
import functools
from collections.abc import Sequence
from pathlib import Path

from itm.atomic import check_writable, replaced_together, write_json
from itm.config import PARAMS_FILE, load_params
from itm.stage_runner import default_workers, run_stage
from itm.tracking import start_run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--dataset", type=Path, required=True, help="data/raw/<name> (training data)")
    parser.add_argument("--out", type=Path, required=True, help="detector folder to write (models/detector)")
    parser.add_argument("--metrics", type=Path, required=True, help="validation metrics (metrics/detector.json)")
    parser.add_argument("--work", type=Path, default=Path("data/work/detector"), help="resumable checkpoints")
    parser.add_argument("--cache", type=Path, default=Path("data/downloads"), help="where downloads are kept")
    parser.add_argument("--workers", type=int, default=default_workers(), help="image decoding processes")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    check_writable(files=[args.metrics], folders=[args.out, args.work, args.cache])  # before the training
    # The work's modules (torch among them) are imported once the arguments and params are known to be good.
    from itm.detect.obtain import convert_published_detector, record_no_detector, train_synthetic_detector
    from itm.device import default_device

    settings = params.detector
    open_run = functools.partial(start_run, "detector", params={"detector": settings.model_dump(mode="json")})
    with replaced_together(args.out, args.metrics):  # the detector and its metrics: both or neither
        if settings.weights == "train":  # its run opens once it is known whether a checkpoint logged to one
            card = train_synthetic_detector(
                args.dataset,
                args.out,
                args.work,
                settings.active_architecture,
                settings.train,
                open_run=open_run,
                device=default_device(),
                workers=args.workers,
            )
        else:
            with open_run(continue_run=None) as tracker:
                if settings.weights == "pretrained":
                    card = convert_published_detector(
                        settings.pretrained,
                        settings.active_architecture,
                        args.out,
                        cache_dir=args.cache,
                        download=params.download,
                    )
                else:
                    card = record_no_detector(args.out)
                tracker.log_dict(card, "card.json")
        write_json(args.metrics, card.get("validation") or {})


if __name__ == "__main__":
    run_stage(main)
