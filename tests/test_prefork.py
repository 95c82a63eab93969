"""The warm process of `make quick` (itm/prefork.py): a stage run as its fork is the stage run cold, with the
libraries already imported; a real training and evaluation write the same bytes either way."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from itm.prefork import SOCKET_VARIABLE, warm_stages
from tests.conftest import REPO
from tests.test_matcher_stages import prepared  # noqa: F401  (the fixture: tiny params, captions and regions)

PROBE = """
import json, os, sys
print(json.dumps({
    "argv": sys.argv,
    "cwd": os.getcwd(),
    "path0": sys.path[0],
    "variable": os.environ.get("ITM_PROBE"),
    "stdin": sys.stdin.read(),
    "itm": __import__("itm").__file__,
    "warm": "fractions" in sys.modules,
    "socket": "ITM_WARM_SOCKET" in os.environ,
}))
print("to stderr", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""

SLEEPER = """
import signal, sys, time
from pathlib import Path
def stop(number, frame):
    Path(sys.argv[1], "stopped").write_text(str(number))
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
Path(sys.argv[1], "started").write_text("")
time.sleep(60)
"""


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A folder laid out like a DVC temporary workspace: its own copy of the project's `itm`, and a `stages` package
    with the probes."""
    root = tmp_path / "workspace"
    shutil.copytree(REPO / "itm", root / "itm", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "stages").mkdir()
    (root / "stages" / "__init__.py").write_text("")
    (root / "stages" / "probe.py").write_text(PROBE)
    (root / "stages" / "sleeper.py").write_text(SLEEPER)
    return root


@pytest.fixture(scope="module")
def warm() -> Iterator[dict[str, str]]:
    """The environment of a warm run whose process has imported `fractions` (which a fresh interpreter has not)."""
    with warm_stages(preloaded=["fractions"]) as environment:
        yield environment | {"ITM_PROBE": "set"}


def _run(command: list[str], cwd: Path, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=env, input=stdin, capture_output=True, text=True, timeout=120)


def test_a_stage_run_warm_is_the_stage_run_cold_but_for_the_imports(workspace: Path, warm: dict[str, str]) -> None:
    """Arguments, working folder, sys.path, environment, standard streams and exit status are the launcher's; the
    project's modules come from the stage's folder, not from the warm process (which imported them from REPO)."""
    command = ["python", "-m", "stages.probe", "3", "two words"]
    warm_run = _run(command, workspace, warm, stdin="from stdin")
    cold_run = _run([sys.executable, *command[1:]], workspace, warm, stdin="from stdin")
    assert (warm_run.returncode, cold_run.returncode) == (3, 3)
    assert warm_run.stderr == cold_run.stderr == "to stderr\n"
    seen, cold = json.loads(warm_run.stdout), json.loads(cold_run.stdout)
    assert seen.pop("warm") is True and cold.pop("warm") is False
    assert seen.pop("socket") is False  # a stage's own `python -m stages.*` would run cold, not wait on its parent
    cold.pop("socket")
    assert seen == cold
    assert seen["argv"] == [str(workspace / "stages" / "probe.py"), "3", "two words"]
    assert seen["path0"] == seen["cwd"] == str(workspace)
    assert seen["variable"] == "set" and seen["stdin"] == "from stdin"
    assert seen["itm"] == str(workspace / "itm" / "__init__.py")


def test_other_python_commands_run_the_interpreter_itself(workspace: Path, warm: dict[str, str]) -> None:
    done = _run(["python", "-c", "import sys; print('fractions' in sys.modules, sys.argv)", "x"], workspace, warm)
    assert done.returncode == 0 and done.stdout == "False ['-c', 'x']\n"


def test_a_signal_to_the_launcher_reaches_the_stage(workspace: Path, warm: dict[str, str]) -> None:
    """DVC ends a stage by signalling its command: the fork gets the signal, and the launcher ends with its status."""
    launcher = subprocess.Popen(["python", "-m", "stages.sleeper", str(workspace)], cwd=workspace, env=warm)
    deadline = time.monotonic() + 30
    while not (workspace / "started").exists():
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 143
    assert (workspace / "stopped").read_text() == str(int(signal.SIGTERM))


def test_without_its_warm_process_a_stage_runs_cold(workspace: Path, warm: dict[str, str]) -> None:
    gone = warm | {SOCKET_VARIABLE: str(workspace / "no-socket")}
    done = _run([sys.executable, "-m", "itm.prefork", "-m", "stages.probe", "0"], workspace, gone)
    assert done.returncode == 0 and json.loads(done.stdout)["warm"] is False
    assert done.stderr.splitlines()[0].startswith("itm.prefork: no warm process (")
    assert done.stderr.splitlines()[0].endswith("); running stages.probe cold")


def test_a_warm_process_whose_imports_start_a_thread_leaves_the_stages_cold(workspace: Path, tmp_path: Path) -> None:
    """A fork would lack the thread: the warm process does not serve, and the stage runs in a fresh interpreter."""
    starts_a_thread = "import threading, time\nthreading.Thread(target=time.sleep, args=(9,)).start()\n"
    (tmp_path / "threaded.py").write_text(starts_a_thread)
    environment = {**os.environ, "PYTHONPATH": str(tmp_path)}
    with warm_stages(environment, preloaded=["threaded"]) as warm_env:
        done = _run(["python", "-m", "stages.probe", "0"], workspace, warm_env)
    assert done.returncode == 0 and json.loads(done.stdout)["warm"] is False
    assert "running stages.probe cold" in done.stderr.splitlines()[0]


@pytest.mark.slow
def test_a_training_and_an_evaluation_run_warm_write_the_same_bytes_as_cold(prepared: Path) -> None:  # noqa: F811
    """The warm process has imported torch, torch._dynamo (torch.optim's) and pandas; the stages fork DataLoader
    workers of their own. The model, the similarity matrix and the metrics are byte-identical to a cold run's."""
    params = str(prepared / "params.yaml")
    data = ["--regions", str(prepared / "data/regions"), "--captions", str(prepared / "data/captions")]

    def stages(out: Path) -> list[list[str]]:
        return [
            ["-m", "stages.train", "--params", params, "--matcher", "vsepp", *data,
             "--out", str(out / "model"), "--work", str(out / "work" / "train")],
            ["-m", "stages.evaluate", "--params", params, "--matcher", "vsepp", "--model", str(out / "model"), *data,
             "--scores", str(out / "scores.npz"), "--metrics", str(out / "metrics.json"), "--plots", str(out / "plots"),
             "--work", str(out / "work" / "evaluate")],
        ]  # fmt: skip

    cold, warm = prepared / "cold", prepared / "warm"
    environment = {**os.environ, "ITM_TRACKING": "off"}
    for command in stages(cold):
        assert _run([sys.executable, *command], REPO, environment).returncode == 0
    with warm_stages(environment, preloaded=["numpy", "pandas", "torch", "torch.optim", "torch._dynamo"]) as warm_env:
        for command in stages(warm):
            done = _run(["python", *command], REPO, warm_env)
            assert done.returncode == 0, done.stderr
            assert "itm.prefork" not in done.stderr  # run by the fork, not cold
    for name in ("model/model.pt", "scores.npz", "metrics.json"):
        assert (warm / name).read_bytes() == (cold / name).read_bytes(), name
