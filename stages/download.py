"""DVC stage `download`: materialise the dataset selected by `dataset` in params.yaml under data/raw/<name>."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from itm.atomic import check_writable
from itm.config import PARAMS_FILE, load_params
from itm.data.sources import materialise, pixel_matchers
from itm.stage_runner import run_stage
from itm.tracking import start_run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--out", type=Path, required=True, help="dataset folder to write (data/raw/<name>)")
    parser.add_argument("--cache", type=Path, default=Path("data/downloads"), help="where downloads are kept")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    check_writable(folders=[args.out, args.cache])  # before a download of many gigabytes
    dataset = params.active_dataset
    logged = {
        "dataset": params.dataset,
        "datasets": {params.dataset: dataset.model_dump(mode="json")},
        "regions": {"source": params.regions.source},  # precomp: the images may be left out
    }
    with start_run("download", params=logged, tags={"itm.dataset": params.dataset}) as tracker:
        summary = materialise(
            params.dataset,
            dataset,
            args.out,
            cache_dir=args.cache,
            download=params.download,
            precomputed_regions=params.regions.source == "precomp",
            pixel_matchers=pixel_matchers(params.matchers),
        )
        tracker.log_metrics(summary)


if __name__ == "__main__":
    run_stage(main)
