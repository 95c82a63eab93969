"""DVC's run-cache on the tiny pipeline (no output is `persist`), and a training that resumes after it was killed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from itm.measurements import RUN_FILE
from tests.tiny_repo import environment, make_tiny_repo, md5, run

MATCHER = "vsepp"  # one global vector per side: the cheapest matcher to train
TRAIN, EVALUATE = f"train@{MATCHER}-0", f"evaluate@{MATCHER}-0"
MODEL = Path("models", MATCHER, "seed0")
CHECKPOINT = Path("data", "work", "train", MATCHER, "seed0", "checkpoint.pt")
EVALUATION_RECORD = Path("data", "work", "evaluate", MATCHER, "seed0", RUN_FILE)  # the evaluation's times


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny repository with everything upstream of the matchers (download to regions, tokenize) already run."""
    repo = make_tiny_repo(tmp_path_factory.mktemp("upstream") / "repo")
    run(["dvc", "repro", "regions", "tokenize"], repo)
    return repo


@pytest.fixture
def repo(upstream: Path, tmp_path: Path) -> Path:
    """A copy of `upstream` of this test's own (workspace, git history and DVC cache)."""
    return Path(shutil.copytree(upstream, tmp_path / "repo", symlinks=True))


def _set_params(repo: Path, train: dict[str, object] | None = None, **matcher: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["matchers"][MATCHER] |= matcher
    params["train"] |= train or {}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_an_experiment_run_again_with_earlier_params_is_restored_from_the_run_cache(repo: Path) -> None:
    # no warm-up epoch (it sums every violation whatever max_violation says), so the parameter acts from epoch 1 on
    _set_params(repo, max_epochs=3, warmup_epochs=0)
    metrics, scores = repo / "metrics" / MATCHER / "seed0.json", repo / "data" / "scores" / MATCHER / "seed0.npz"
    runs, shown, scored, records = [], [], [], []
    for value in ("true", "false", "true"):
        done = run(["dvc", "exp", "run", EVALUATE, "-S", f"matchers.{MATCHER}.max_violation={value}"], repo)
        runs.append(done.stdout)
        shown.append(metrics.read_text())  # `dvc exp run` applies its results to the workspace
        scored.append(md5(scores))
        records.append((repo / EVALUATION_RECORD).read_text())  # untracked: left as the last run wrote it
    first, second, third = runs
    for stage in (TRAIN, EVALUATE):
        assert f"Running stage '{stage}'" in first and f"Running stage '{stage}'" in second
        assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in third, third
        assert f"Running stage '{stage}'" not in third, third
    assert not any("seconds" in key for key in json.loads(shown[0]))  # times live in run.json
    assert scored[1] != scored[0] and shown[1] != shown[0]  # the parameter changes the model
    assert scored[2] == scored[0] and shown[2] == shown[0]  # the first run's files, restored
    assert records[2] == records[1] != records[0]  # nothing was evaluated again: the record is the second run's
    assert yaml.safe_load((repo / "params.yaml").read_text())["matchers"][MATCHER]["max_violation"] is True


def _wait_for(path: Path, process: subprocess.Popen, log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not path.is_file():  # the checkpoint is written whole under another name, then renamed into place
        assert process.poll() is None, f"the stage ended before {path} appeared:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no {path} after {seconds} s"
        time.sleep(0.1)


def _kill_stage(dvc: subprocess.Popen, module: str) -> int:
    """Kill the stage's own process (`python -m <module>`, a child of `dvc repro`) at once, as a crash or a
    preempted job would end it, and return the exit status of `dvc repro`, which reports the failed stage.

    SIGKILL, not Ctrl-C: Python drops a KeyboardInterrupt raised while a process forks (the training loop starts its
    batch loader's worker at every epoch), so an interrupt on a fast machine can miss a short epoch.
    """
    stages = [child for child in psutil.Process(dvc.pid).children(recursive=True) if module in child.cmdline()]
    # A batch loader's worker is a fork of the stage and shows the same command line; the stage is the one whose parent
    # is not itself the stage.
    stage_pids = {child.pid for child in stages}
    roots = [child for child in stages if child.ppid() not in stage_pids]
    assert len(roots) == 1, [(child.pid, child.ppid(), child.cmdline()) for child in stages]
    roots[0].kill()
    return dvc.wait(timeout=120)


@pytest.mark.slow
def test_a_killed_training_resumes_from_its_checkpoint(repo: Path, tmp_path: Path) -> None:
    epochs = 20  # the stage is killed right after the first epoch's checkpoint; the rest are for the resumed run
    _set_params(repo, train={"patience": None}, max_epochs=epochs)  # every epoch, no early stop
    log = tmp_path / "interrupted.log"
    with log.open("w") as output:
        stage = subprocess.Popen(
            ["dvc", "repro", TRAIN],
            cwd=repo,
            env=environment(),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so that nothing of it outlives the test
        )
        try:
            _wait_for(repo / CHECKPOINT, stage, log, 300)
            status = _kill_stage(stage, "stages.train")
        finally:
            with contextlib.suppress(ProcessLookupError):  # whatever of the group is left, a batch worker included
                os.killpg(stage.pid, signal.SIGKILL)
            stage.wait()
    interrupted = log.read_text()
    assert status != 0, interrupted
    assert f"failed to reproduce '{TRAIN}'" in interrupted, interrupted
    assert (repo / CHECKPOINT).is_file()
    assert not (repo / MODEL).exists(), "an interrupted training left a model behind"

    resumed = run(["dvc", "repro", TRAIN], repo)
    assert f"Running stage '{TRAIN}'" in resumed.stdout
    done = [int(epoch) for epoch in re.findall(r"resuming after epoch (\d+) from ", resumed.stderr)]
    assert len(done) == 1 and 1 <= done[0] < epochs, resumed.stderr
    card = json.loads((repo / MODEL / "card.json").read_text())
    assert len(card["history"]) == epochs == card["training"]["epochs"]  # those before the interrupt and after it
    assert card["training"]["stopped"] == "cap"
    assert not (repo / CHECKPOINT).exists()  # removed once the model is saved
    assert "Data and pipelines are up to date." in run(["dvc", "status", TRAIN], repo).stdout
