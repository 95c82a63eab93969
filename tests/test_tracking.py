"""Tracking: where runs go, what they are tagged with, and that a failing stage is marked failed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from itm.tracking import NullTracker, flatten, repository_root, run_tags, start_run, tracking_uri


def test_flatten_nested_params() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": [1, 2], "e": "x"}


def test_repository_root_sees_through_dvc_experiment_copies(tmp_path: Path) -> None:
    (tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123" / ".dvc").mkdir(parents=True)
    (tmp_path / "stages").mkdir()
    assert repository_root(tmp_path / "stages") == tmp_path
    assert repository_root(tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123") == tmp_path


def test_default_uri_is_an_absolute_sqlite_path_and_env_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"


def test_tags_name_stage_revision_and_experiment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "bold-fern")
    tags = run_tags("tokenize", {"itm.dataset": "synthetic"})
    assert tags["itm.stage"] == "tokenize" and tags["itm.dvc_exp_name"] == "bold-fern"
    assert tags["itm.dataset"] == "synthetic" and tags["itm.git_revision"]
    assert tags["itm.env.torch"] == torch.__version__ and int(tags["itm.env.threads"]) == torch.get_num_threads()
    assert tags["itm.env.cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_tracking_off_gives_the_null_tracker() -> None:
    with start_run("download", params={"a": {"b": 2}}) as tracker:
        assert isinstance(tracker, NullTracker)
        tracker.log_metrics({"images/train": 3}, step=1)
    assert tracker.params == {"a.b": 2} and tracker.dicts == {"params.json": {"a": {"b": 2}}}
    assert tracker.metrics == [({"images/train": 3}, 1)]


def test_mlflow_run_records_params_metrics_tags_and_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ITM_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "itm-test")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    params = {"tokenize": {"min_count": 4, "concepts": {"top_k": 300}}}
    with start_run("tokenize", params=params, tags={"itm.dataset": "synthetic"}) as tracker:
        tracker.log_metrics({"captions/train": 15.0})
        run_id = tracker.run_id
    with pytest.raises(RuntimeError), start_run("download"):
        raise RuntimeError("boom")

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["itm-test"], order_by=["attributes.start_time ASC"])
    ok, failed = runs.iloc[0], runs.iloc[1]
    assert ok["status"] == "FINISHED" and failed["status"] == "FAILED"
    assert ok["tags.itm.stage"] == "tokenize" and ok["tags.itm.dvc_exp_name"] == "exp-1"
    assert ok["tags.itm.dataset"] == "synthetic" and ok["tags.itm.git_revision"]
    assert ok["params.tokenize.concepts.top_k"] == "300" and ok["metrics.captions/train"] == 15.0
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/params.json") == params
    experiment = mlflow.get_experiment_by_name("itm-test")
    assert experiment.artifact_location.startswith((tmp_path / "mlruns").as_uri())
