"""A stage's measurements of itself: wall-clock times and the MLflow run it logged to.

What DVC tracks (models, metrics, plots, reports) is a function of code, params, data and the numeric environment,
so two runs on one machine write the same bytes and the same `dvc.lock`. Times and run ids differ on every run, so
they live apart: in MLflow, and in `run.json` in the stage's work folder (`data/work/<stage>/<name>/seed<seed>/`),
which DVC neither tracks nor removes. The record names the output it measured (`output_sha256`), so a reader can
tell whether it belongs to the output now in the workspace or to an earlier run (e.g. when DVC restored the output
from its run-cache without running the stage).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from itm.atomic import sha256_of, write_json

RUN_FILE = "run.json"


def write_record(work_dir: Path, output: Path, record: Mapping[str, Any]) -> None:
    """Write `record` (times, run id) to `work_dir/run.json`, naming `output` (a file) by its digest."""
    work_dir.mkdir(parents=True, exist_ok=True)
    write_json(work_dir / RUN_FILE, {"output_sha256": sha256_of(output), **record})


def read_record(work_dir: Path, output: Path) -> dict[str, Any] | None:
    """The record in `work_dir` when it measured `output` as it is now; None when there is none, it is unreadable, or
    it measured another version of the output."""
    try:
        record = json.loads((work_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not output.is_file() or record.get("output_sha256") != sha256_of(output):
        return None
    return record
