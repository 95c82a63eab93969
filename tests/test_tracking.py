"""Tracking: where runs go, what they are tagged with, and that a failing stage is marked failed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from itm.config import load_params
from itm.errors import UserError
from itm.tracking import (
    MODEL_TYPE,
    NullTracker,
    download_model,
    flatten,
    git_revision,
    is_model_uri,
    repository_root,
    run_tags,
    start_run,
    tracking_uri,
)
from stages.train import matcher_params
from tests.conftest import REPO


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
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs


def test_the_revision_is_dirty_for_code_and_params_not_for_what_dvc_rewrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "itm").mkdir()
    for name in ("itm/code.py", "params.yaml", "dvc.lock", "README.md"):
        (tmp_path / name).write_text("a\n")
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-qm", "first")
    (tmp_path / "itm").joinpath("sub").mkdir()
    monkeypatch.chdir(tmp_path / "itm" / "sub")  # from any folder of the repository
    clean = git_revision()
    assert len(clean) == 40
    for name in ("dvc.lock", "README.md"):  # outputs DVC rewrites, documentation: not inputs of a run
        (tmp_path / name).write_text("b\n")
    assert git_revision() == clean
    for name in ("params.yaml", "itm/code.py"):
        (tmp_path / name).write_text("b\n")
        assert git_revision() == f"{clean}-dirty"
        git("checkout", "--", name)


def test_every_matcher_run_logs_its_block_under_one_prefix() -> None:
    params = load_params(REPO / "params.yaml")
    first, second = (flatten(matcher_params(name, params.matchers[name])) for name in ("scan_t2i_avg", "scan_i2t_lse"))
    shared = {key for key in first if key.startswith("model.")}
    assert shared == {key for key in second if key.startswith("model.")} and "model.embed_dim" in shared
    assert first["model.direction"] == "t2i" and second["model.direction"] == "i2t"
    assert first["matchers.scan_t2i_avg.direction"] == "t2i"  # as params.yaml spells it, too


def test_a_trained_model_is_logged_as_an_mlflow_model_and_downloads_by_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ITM_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "itm-test")
    folder = tmp_path / "models" / "vsepp" / "seed0"
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"weights")
    (folder / "card.json").write_text('{"name": "vsepp"}')
    with start_run("train@vsepp-0") as tracker:
        tracker.log_artifact(folder / "model.pt", "model")
        tracker.log_artifact(folder / "card.json", "model")
        model_id = tracker.log_model(folder, "vsepp", params={"embed_dim": 16}, metrics={"best/val_rsum": 42.0},
                                     tags={"itm.seed": "0"})  # fmt: skip
        run_id = tracker.run_id
    assert model_id is not None
    mlflow.set_tracking_uri(tracking_uri())
    model = mlflow.MlflowClient().get_logged_model(model_id)
    assert model.status == "READY" and model.source_run_id == run_id and model.model_type == MODEL_TYPE
    assert model.params == {"embed_dim": "16"} and model.tags["itm.seed"] == "0"
    assert [(metric.key, metric.value) for metric in model.metrics] == [("best/val_rsum", 42.0)]
    for uri in (f"models:/{model_id}", f"runs:/{run_id}/model"):
        assert is_model_uri(uri)
        downloaded = download_model(uri, tmp_path / "download" / uri.split(":")[0])
        assert (downloaded / "model.pt").read_bytes() == b"weights"
        assert (downloaded / "card.json").read_text() == '{"name": "vsepp"}'
    assert not is_model_uri("models/vsepp/seed0")
    with pytest.raises(UserError, match=r"^models:/m-0000: cannot download it from sqlite:///"):
        download_model("models:/m-0000", tmp_path / "nothing")
