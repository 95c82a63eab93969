"""Start-up: an entry point imports what its work needs, when the work starts. `--help` and argument mistakes load
neither torch nor mlflow (seconds each), and no stage that works on region features loads torchvision (whose
import pulls in torch's compiler stack). bench/startup.py measures the times."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

STAGES = sorted(path.stem for path in (REPO / "stages").glob("*.py") if path.stem != "__init__")
HEAVY = ("torch", "mlflow")
# The module of each stage's work on region features, and of the search: none needs torchvision.
WORK_WITHOUT_TORCHVISION = (
    "itm.train.run",
    "itm.evaluate.run",
    "itm.evaluate.ensemble",
    "itm.compare",
    "itm.search.engine",
)


def run_entry_point(module: str, argv: list[str]) -> tuple[int, str, list[str]]:
    """Run `python -m <module> <argv>` in a fresh interpreter: its exit status, its output, and which of HEAVY it
    had imported when it exited."""
    probe = (
        "import json, runpy, sys\n"
        f"sys.argv = [{module!r}, *{argv!r}]\n"
        "try:\n"
        f"    runpy.run_module({module!r}, run_name='__main__')\n"
        "    status = 0\n"
        "except SystemExit as stop:\n"
        "    status = stop.code or 0\n"
        f"print(json.dumps([status, sorted(set(sys.modules) & {set(HEAVY)!r})]), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    status, loaded = json.loads(done.stderr.splitlines()[-1])
    return status, done.stdout + done.stderr, loaded


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_help_loads_neither_torch_nor_mlflow(stage: str) -> None:
    status, output, loaded = run_entry_point(f"stages.{stage}", ["--help"])
    assert status == 0 and "usage:" in output
    assert loaded == []


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_argument_mistake_stops_before_torch(stage: str) -> None:
    status, output, loaded = run_entry_point(f"stages.{stage}", ["--no-such-option"])
    assert status == 2 and "error:" in output
    assert loaded == []


@pytest.mark.parametrize(
    "argv", [["--help"], ["search", "--help"], ["search", "--model", "m"], ["experiments", "--help"]]
)
def test_the_itm_command_help_and_mistakes_load_neither_torch_nor_mlflow(argv: list[str]) -> None:
    status, output, loaded = run_entry_point("itm.commands", argv)
    assert status == (2 if "--model" in argv else 0)  # the last one gives neither --text nor --image
    assert ("usage:" in output) != ("--model" in argv)
    assert loaded == []


def test_the_work_on_region_features_does_not_load_torchvision() -> None:
    probe = f"import importlib, sys\nfor name in {WORK_WITHOUT_TORCHVISION!r}:\n    importlib.import_module(name)\n"
    probe += "print(sorted(name for name in sys.modules if name.split('.')[0] == 'torchvision'))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_stage_of_the_pipeline_is_checked() -> None:
    assert {"download", "detector", "regions", "tokenize", "train", "evaluate", "ensemble", "compare"} <= set(STAGES)
