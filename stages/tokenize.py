"""DVC stage `tokenize`: captions to per-split Parquet files, vocabulary and CVSE concepts."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from itm.atomic import check_writable
from itm.config import PARAMS_FILE, load_params
from itm.data.captions import write_captions
from itm.data.records import read_dataset_json
from itm.stage_runner import run_stage
from itm.tracking import start_run


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--dataset-json", type=Path, required=True, help="data/raw/<name>/dataset.json")
    parser.add_argument("--out", type=Path, required=True, help="captions folder to write (data/captions)")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    check_writable(folders=[args.out])
    settings = params.tokenize
    logged = {"tokenize": settings.model_dump(mode="json")}
    with start_run("tokenize", params=logged, tags={"itm.dataset": params.dataset}) as tracker:
        summary = write_captions(
            read_dataset_json(args.dataset_json),
            args.out,
            min_count=settings.min_count,
            concept_top_k=settings.concepts.top_k,
            stop_words=settings.concepts.stop_words,
        )
        tracker.log_metrics(summary)


if __name__ == "__main__":
    run_stage(main)
