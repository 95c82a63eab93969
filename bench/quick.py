"""The quick profile (`make quick`) end to end, its stages started cold and warm (itm/prefork.py).

    python -m bench.quick                # one run of each
    python -m bench.quick --repeats 3    # medians of three

Each run is `python -m itm.profiles profiles/quick.yaml` (with `--cold` for the cold one) in a fresh clone of the
repository's HEAD commit (uncommitted changes are not in it), so that nothing comes from an earlier run's DVC
cache, with ITM_TRACKING=off as `make quick` has it. Printed, for each stage: the seconds from DVC's
"Running stage" line to the next stage's (the stage's process, then DVC saving its outputs and rewriting dvc.lock;
the last stage's run to the end of the experiment), cold and warm, and cold / warm; then the whole run's wall time.
The machine should be otherwise idle: most of a cold stage is import work, which another process's load stretches.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import REPO, print_table

PROFILE = "profiles/quick.yaml"
STAGE_LINE = re.compile(r"Running stage '([^']+)'")
TOTAL = "whole run"


def stage_seconds(marks: Sequence[tuple[str, float]], started: float, ended: float) -> dict[str, float]:
    """Stage -> seconds, from `marks` ((stage, time its "Running stage" line came), in order): each stage lasts
    until the next one starts, the last until `ended`; the whole run from `started` to `ended` is `TOTAL`."""
    times = [moment for _, moment in marks[1:]] + [ended]
    return {**{name: end - start for (name, start), end in zip(marks, times, strict=True)}, TOTAL: ended - started}


def run_profile(folder: Path, cold: bool) -> dict[str, float]:
    """Clone HEAD into `folder`, run the quick profile there and time it (`stage_seconds`)."""
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(folder)], check=True)
    command = [sys.executable, "-m", "itm.profiles", PROFILE, *(["--cold"] if cold else [])]
    environment = {**os.environ, "ITM_TRACKING": "off"}
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])
    marks, output = [], []
    started = time.perf_counter()
    with subprocess.Popen(command, cwd=folder, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:  # fmt: skip
        for line in process.stdout:  # type: ignore[union-attr]
            output.append(line)
            match = STAGE_LINE.match(line)
            if match:
                marks.append((match.group(1), time.perf_counter()))
    ended = time.perf_counter()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed in {folder}:\n{''.join(output[-40:])}")
    return stage_seconds(marks, started, ended)


def medians(runs: Sequence[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.median(run[name] for run in runs) for name in runs[0]}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each (the median is shown)")
    args = parser.parse_args(argv)

    figures: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="itm-bench-quick-") as scratch:
        for repeat in range(args.repeats):
            for mode in figures:  # alternated, so that a slower spell of the machine falls on both
                folder = Path(scratch) / f"{mode}{repeat}"
                figures[mode].append(run_profile(folder, cold=mode == "cold"))
                print(f"  {mode} run {repeat + 1}: {figures[mode][-1][TOTAL]:.1f} s", file=sys.stderr, flush=True)
    cold, warm = medians(figures["cold"]), medians(figures["warm"])
    print(f"{PROFILE}, median of {args.repeats} run(s) of each, a fresh clone of HEAD per run, ITM_TRACKING=off")
    rows = [[name, f"{cold[name]:.1f}", f"{warm[name]:.1f}", f"{cold[name] / warm[name]:.2f}"] for name in cold]
    print_table(["stage", "cold s", "warm s", "cold / warm"], rows)


if __name__ == "__main__":
    main()
