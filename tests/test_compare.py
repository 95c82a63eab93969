"""The comparison's DVC files and its MLflow parent run: child runs per model, linked to the runs behind them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from itm.compare import Inputs, linked_runs, log_comparison, model_scores
from itm.evaluate.score_file import SplitScores
from itm.report import Entry, comparison_metrics, rsum_points
from itm.tracking import NullTracker, start_run

FIGURES = {"test/rsum": 300.0, "test/t2i_r1": 40.0}


def _table() -> pd.DataFrame:
    rows = [
        {"protocol": "test_5fold1k", "name": "a", "type": "single", "kind": "scan", "rsum": 400.0, "i2t_r1": 50.0,
         "ms_per_query": float("nan"), "parameters": 10},
        {"protocol": "test_5k", "name": "a", "type": "single", "kind": "scan", "rsum": 300.0, "i2t_r1": 30.0,
         "ms_per_query": 1.5, "parameters": 10},
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_metrics_nest_protocol_model_column_and_leave_out_unknowns() -> None:
    metrics = comparison_metrics(_table())
    assert metrics["test_5fold1k"]["a"] == {"i2t_r1": 50.0, "rsum": 400.0, "parameters": 10.0}
    assert metrics["test_5k"]["a"]["ms_per_query"] == 1.5


def test_rsum_points_name_the_protocol_only_when_there_are_several() -> None:
    assert [point["model"] for point in rsum_points(_table())] == ["a (test_5fold1k)", "a (test_5k)"]
    single = _table().iloc[:1]
    assert rsum_points(single) == [{"model": "a", "type": "single", "rsum": 400.0}]


def _scores(run_id: str | None, shift: float = 0.0) -> SplitScores:
    matrix = torch.arange(6, dtype=torch.float32).view(2, 3) + shift
    return SplitScores(matrix, np.array([7, 8]), np.array([1, 2, 3]), torch.tensor([0, 0, 1]), run_id)


def _inputs(tmp_path: Path) -> Inputs:
    models, scores = tmp_path / "models", tmp_path / "scores"
    for name, train_run, evaluate_run, shift in (("a", "t-a", "e-a", 0.0), ("b", None, None, 2.0)):
        (models / name).mkdir(parents=True)
        card = {"name": name} | ({"mlflow_run_id": train_run} if train_run else {})
        (models / name / "card.json").write_text(json.dumps(card))
        _scores(evaluate_run, shift).save(scores / f"{name}.npz")
    return Inputs(tmp_path / "metrics", models, scores, tmp_path, tmp_path, tmp_path)


ENTRIES = [
    Entry("a", "single", "scan", FIGURES, 10, 60.0),
    Entry("b", "single", "vsepp", FIGURES, 5, None),
    Entry("ab", "ensemble", "ensemble", FIGURES, 15, None, ("a", "b")),
]


def test_scores_carry_the_evaluation_run_and_an_ensemble_averages_its_members(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    assert SplitScores.load(inputs.scores_dir / "a.npz").run_id == "e-a"
    assert SplitScores.load(inputs.scores_dir / "b.npz").run_id is None
    averaged = model_scores(inputs.scores_dir, ENTRIES[2])
    assert torch.equal(averaged.scores, _scores(None, 1.0).scores)
    assert linked_runs(inputs, ENTRIES[0], NullTracker()) == {"train@a": "t-a", "evaluate@a": "e-a"}
    assert linked_runs(inputs, ENTRIES[1], NullTracker()) == {}


def test_parent_run_has_one_child_per_model_with_its_links(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    out = tmp_path / "reports"
    out.mkdir()
    for name in ("comparison.md", "comparison.parquet", "comparison.json"):
        (out / name).write_text("x")
    tracker = NullTracker()
    log_comparison(tracker, inputs, ENTRIES, "| table |", out, [out / "figures" / "f.png"])
    assert tracker.tags["mlflow.note.content"] == "| table |"
    assert (out / "figures" / "f.png", "figures") in tracker.artifacts
    assert list(tracker.children) == ["a", "b", "ab"]
    child = tracker.children["a"]
    assert child.tags["itm.run.train@a"] == "t-a" and child.tags["itm.run.evaluate@a"] == "e-a"
    assert child.metrics == [(FIGURES, None), ({"train_seconds": 60.0}, None)]
    assert tracker.children["ab"].params["members"] == ["a", "b"]


@pytest.mark.slow
def test_mlflow_children_are_nested_and_find_the_ensemble_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ITM_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "itm-compare-test")
    with start_run("ensemble@ab") as ensemble_run:
        ensemble_id = ensemble_run.run_id
    inputs = _inputs(tmp_path)
    out = tmp_path / "reports"
    out.mkdir()
    for name in ("comparison.md", "comparison.parquet", "comparison.json"):
        (out / name).write_text("x")
    with start_run("compare") as tracker:
        log_comparison(tracker, inputs, ENTRIES, "| table |", out, [])
        parent_id = tracker.run_id

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(
        experiment_names=["itm-compare-test"], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    assert sorted(runs["tags.mlflow.runName"]) == ["a", "ab", "b"]
    ensemble_child = runs[runs["tags.mlflow.runName"] == "ab"].iloc[0]
    assert ensemble_child["tags.itm.run.ensemble@ab"] == ensemble_id
    assert ensemble_child["metrics.test/rsum"] == 300.0
    assert f"runs/{ensemble_id}" in ensemble_child["tags.mlflow.note.content"]
    assert mlflow.get_run(parent_id).data.tags["mlflow.note.content"] == "| table |"
