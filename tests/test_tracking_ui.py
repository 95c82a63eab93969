"""`itm ui`: MLflow's UI on the pipeline's store, at an address that opens on the runs (not MLflow 3's GenAI view)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from itm import commands
from itm.tracking import start_run
from itm.tracking.pages import run_page, runs_page

VIEW = "workflowType=machine_learning"  # what MLflow 3.17's UI reads to open the model-training view


def test_the_pages_carry_the_model_training_view() -> None:
    assert runs_page("7") == f"#/experiments/7/runs?{VIEW}"
    assert run_page("7", "abc") == f"#/experiments/7/runs/abc?{VIEW}"


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A DVC repository with tracking on (its default store: mlflow.db in it)."""
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ITM_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "itm-ui")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_itm_ui_serves_the_store_and_prints_the_runs_page(
    repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with start_run("tokenize") as tracker:
        link = tracker.run_link(tracker.run_id)
    started: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda command, check: started.append(command))
    commands.main(["ui", "--port", "5099"])
    uri = f"sqlite:///{repo.resolve()}/mlflow.db"
    assert started == [[sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                        "--port", "5099"]]  # fmt: skip
    experiment = link.split("/")[2]
    assert f"http://127.0.0.1:5099/{runs_page(experiment)}" in capsys.readouterr().out
    assert link.endswith(f"?{VIEW}")  # the compare report's run links open on the runs too


def test_itm_ui_before_any_run_says_what_to_run_and_creates_nothing(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        commands.main(["ui"])
    assert stopped.value.code == 2 and not (repo / "mlflow.db").exists()
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].endswith("mlflow.db: no such file yet: run the pipeline first (make quick)")


def test_itm_ui_on_a_store_without_the_experiment_says_what_to_run(
    repo: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with start_run("tokenize"):
        pass
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "another")
    with pytest.raises(SystemExit) as stopped:
        commands.main(["ui"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith("has no experiment 'another' yet: run the pipeline first (make quick)")
