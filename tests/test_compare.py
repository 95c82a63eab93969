"""The comparison's DVC files and its MLflow parent run: child runs per model, linked to the runs behind them."""

from __future__ import annotations

import dataclasses
import json
import statistics
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from itm.compare import (
    Examples,
    Inputs,
    compare,
    linked_runs,
    log_comparison,
    model_scores,
    pairwise_comparisons,
    read_timings,
    recall_curves,
    run_records,
)
from itm.errors import UserError
from itm.evaluate.ensemble import evaluate_ensemble
from itm.evaluate.metrics import recall_metrics
from itm.evaluate.protocols import protocol_metrics
from itm.evaluate.score_file import SplitScores
from itm.evaluate.statistics import Bootstrap, PairwiseComparison, Significance, protocol_intervals, with_intervals
from itm.measurements import write_record
from itm.report import INTERVAL_COLUMNS, Entry, Timing, comparison_metrics, rsum_points
from itm.seeds import seed_path
from itm.tracking import NullTracker, start_run
from tests.test_report import _save, _write_metrics

FIGURES = {"test/rsum": 300.0, "test/t2i_r1": 40.0}


def _table() -> pd.DataFrame:
    rows = [
        {"protocol": "test_5fold1k", "name": "a", "type": "single", "kind": "scan", "rsum": 400.0, "i2t_r1": 50.0,
         "i2t_medr": float("nan"), "parameters": 10, "training": "3, plateau", "rsum_seeds": None},
        {"protocol": "test_5k", "name": "a", "type": "single", "kind": "scan", "rsum": 300.0, "i2t_r1": 30.0,
         "i2t_medr": 1.5, "parameters": 10, "training": "3, plateau", "rsum_seeds": None},
    ]  # fmt: skip
    return pd.DataFrame(rows)


def test_metrics_nest_protocol_model_column_and_leave_out_unknowns() -> None:
    metrics = comparison_metrics(_table())
    assert metrics["test_5fold1k"]["a"] == {"i2t_r1": 50.0, "rsum": 400.0, "parameters": 10.0}  # no text columns
    assert metrics["test_5k"]["a"]["i2t_medr"] == 1.5


def test_rsum_points_name_the_protocol_only_when_there_are_several() -> None:
    assert [point["model"] for point in rsum_points(_table())] == ["a (test_5fold1k)", "a (test_5k)"]
    single = _table().iloc[:1]
    assert rsum_points(single) == [{"model": "a", "type": "single", "rsum": 400.0}]


def _scores(shift: float = 0.0) -> SplitScores:
    matrix = torch.arange(6, dtype=torch.float32).view(2, 3) + shift
    return SplitScores(matrix, np.array([7, 8]), np.array([1, 2, 3]), torch.tensor([0, 0, 1]))


def _inputs(tmp_path: Path) -> Inputs:
    """Outputs of a and b (seed 0) and the records their runs kept in data/work/: a's name its current outputs, b's
    name earlier versions of them (as after DVC restored b's outputs from its run-cache without running a stage)."""
    models, scores, work = tmp_path / "models", tmp_path / "scores", tmp_path / "work"
    for name, shift in (("a", 0.0), ("b", 2.0)):
        model_dir = seed_path(models, name, 0)
        model_dir.mkdir(parents=True)
        (model_dir / "card.json").write_text(json.dumps({"name": name, "seed": 0}))
        (model_dir / "model.pt").write_bytes(f"weights of {name}".encode())  # read here only for its digest
        _scores(shift).save(seed_path(scores, name, 0, ".npz"))
    write_record(seed_path(work / "train", "a", 0), models / "a" / "seed0" / "model.pt",
                 {"mlflow_run_id": "t-a", "train_seconds": 60.0, "epoch_seconds": [25.0, 35.0]})  # fmt: skip
    write_record(seed_path(work / "evaluate", "a", 0), seed_path(scores, "a", 0, ".npz"),
                 {"mlflow_run_id": "e-a", "test/seconds_per_query": 0.004, "test/score_seconds": 0.5,
                  "test/encode_seconds": 2.0})  # fmt: skip
    (models / "b" / "seed0" / "model.pt").write_bytes(b"earlier weights of b")
    _scores(5.0).save(seed_path(scores, "b", 0, ".npz"))
    write_record(seed_path(work / "train", "b", 0), models / "b" / "seed0" / "model.pt",
                 {"mlflow_run_id": "t-b", "train_seconds": 1.0})  # fmt: skip
    write_record(seed_path(work / "evaluate", "b", 0), seed_path(scores, "b", 0, ".npz"),
                 {"mlflow_run_id": "e-b", "test/seconds_per_query": 0.5})  # fmt: skip
    (models / "b" / "seed0" / "model.pt").write_bytes(b"weights of b")
    _scores(2.0).save(seed_path(scores, "b", 0, ".npz"))
    return Inputs(tmp_path / "metrics", models, scores, tmp_path, tmp_path, tmp_path, work)


def _entries(inputs: Inputs) -> list[Entry]:
    return [
        Entry("a", "single", "scan", FIGURES, 10, seed_path(inputs.models_dir, "a", 0)),
        Entry("b", "single", "vsepp", FIGURES, 5, seed_path(inputs.models_dir, "b", 0)),
        Entry("ab", "ensemble", "ensemble", FIGURES, 15, members=("a", "b")),
    ]


class _FindsEnsembleRuns(NullTracker):
    """A tracker that knows one finished `ensemble@` run."""

    def find_run(self, stage: str) -> str | None:
        return {"ensemble@ab-0": "x-ab"}.get(stage)


def test_records_link_the_runs_behind_a_model_and_an_ensemble_averages_its_members(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    entries = _entries(inputs)
    path = seed_path(inputs.scores_dir, "a", 0, ".npz")
    with zipfile.ZipFile(path) as archive:  # no run id, and no time: the same matrix gives the same bytes
        assert sorted(archive.namelist()) == ["caption_ids.npy", "caption_image.npy", "image_ids.npy", "scores.npy"]
        assert {entry.date_time for entry in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert "run_id" not in {field.name for field in dataclasses.fields(SplitScores)}
    averaged = model_scores(inputs.scores_dir, entries[2])
    assert torch.equal(averaged.scores, _scores(1.0).scores)

    records = run_records(inputs, entries)
    assert linked_runs(entries[0], NullTracker(), records["a"]) == {"train@a-0": "t-a", "evaluate@a-0": "e-a"}
    assert linked_runs(entries[1], NullTracker(), records["b"]) == {}  # b's records measured other versions of it
    unrecorded = run_records(dataclasses.replace(inputs, work_dir=None), entries)
    assert linked_runs(entries[0], NullTracker(), unrecorded["a"]) == {}
    assert linked_runs(entries[2], _FindsEnsembleRuns(), records["ab"]) == {"ensemble@ab-0": "x-ab"}
    assert linked_runs(entries[2], NullTracker(), records["ab"]) == {}
    assert read_timings(entries, records) == [
        Timing("a", 0, train_seconds=60.0, seconds_per_query=0.004, encode_seconds=2.0),
        Timing("b", 0),  # ignored records: unknown times ("–" in timing.md), not those of an earlier run
    ]


def test_parent_run_has_one_child_per_model_with_its_links(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    entries = _entries(inputs)
    out = tmp_path / "reports"
    out.mkdir()
    for name in ("comparison.md", "comparison.parquet", "comparison.json", "timing.md"):
        (out / name).write_text("x")
    tracker = NullTracker()
    figures = [out / "figures" / "f.png", out / "figures" / "retrieval_t2i_a.png", out / "figures" / "attention_ab.png"]
    figures.append(out / "figures" / "retrieval_t2i_ab.png")
    timings = read_timings(entries, run_records(inputs, entries))
    log_comparison(tracker, inputs, entries, "| table |", out, figures, timings=timings)
    assert tracker.tags["mlflow.note.content"] == "| table |"
    assert (out / "figures" / "f.png", "figures") in tracker.artifacts and (
        out / "timing.md",
        None,
    ) in tracker.artifacts
    assert list(tracker.children) == ["a", "b", "ab"]
    own = {name: [path.name for path, folder in child.artifacts] for name, child in tracker.children.items()}
    assert own == {"a": ["retrieval_t2i_a.png"], "b": [], "ab": ["attention_ab.png", "retrieval_t2i_ab.png"]}
    child = tracker.children["a"]
    assert child.tags["itm.run.train@a-0"] == "t-a" and child.tags["itm.run.evaluate@a-0"] == "e-a"
    assert child.metrics == [(FIGURES, None), ({"train_seconds": 60.0, "test/seconds_per_query": 0.004}, None)]
    assert "- train@a-0: [t-a](t-a)" in child.tags["mlflow.note.content"]
    assert not any(tag.startswith("itm.run.") for tag in tracker.children["b"].tags)
    assert tracker.children["b"].metrics == [(FIGURES, None), ({}, None)]  # no times of another run's outputs
    assert tracker.children["ab"].params["members"] == ["a", "b"]


@pytest.mark.slow
def test_mlflow_children_are_nested_and_find_the_ensemble_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ITM_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "itm-compare-test")
    with start_run("ensemble@ab-0") as ensemble_run:
        ensemble_id = ensemble_run.run_id
    inputs = _inputs(tmp_path)
    out = tmp_path / "reports"
    out.mkdir()
    for name in ("comparison.md", "comparison.parquet", "comparison.json"):
        (out / name).write_text("x")
    with start_run("compare") as tracker:
        log_comparison(tracker, inputs, _entries(inputs), "| table |", out, [], _groups())
        parent_id = tracker.run_id

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(
        experiment_names=["itm-compare-test"], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    assert sorted(runs["tags.mlflow.runName"]) == ["a", "ab", "b"]
    ensemble_child = runs[runs["tags.mlflow.runName"] == "ab"].iloc[0]
    assert ensemble_child["tags.itm.run.ensemble@ab-0"] == ensemble_id
    a_child = runs[runs["tags.mlflow.runName"] == "a"].iloc[0]
    assert a_child["tags.itm.run.train@a-0"] == "t-a" and a_child["tags.itm.run.evaluate@a-0"] == "e-a"
    assert ensemble_child["metrics.test/rsum"] == 300.0
    assert f"runs/{ensemble_id}" in ensemble_child["tags.mlflow.note.content"]
    assert mlflow.get_run(parent_id).data.tags["mlflow.note.content"] == "| table |"
    assert ensemble_child["tags.itm.group.test"] == "b"
    pairwise = json.loads(mlflow.artifacts.load_text(f"runs:/{parent_id}/pairwise.json"))
    assert pairwise["groups"] == {"test": {"a": "a", "b": "a", "ab": "b"}}
    assert [(pair["better"], pair["worse"], pair["significant"]) for pair in pairwise["pairs"]] == [
        ("a", "b", False), ("a", "ab", True), ("b", "ab", True)
    ]  # fmt: skip


# --- pairwise tests ---------------------------------------------------------------------------------------------------


def _groups() -> dict[str, PairwiseComparison]:
    """Hand-made tests of ENTRIES: a and b cannot be told apart, the ensemble differs from both."""
    from itm.evaluate.statistics import Pair, PairedTest

    pairs = (
        Pair("a", "b", PairedTest(1.0, -2.0, 4.0, 0.6), 0.6, False),
        Pair("a", "ab", PairedTest(50.0, 40.0, 60.0, 0.001), 0.003, True),
        Pair("b", "ab", PairedTest(49.0, 39.0, 59.0, 0.001), 0.003, True),
    )
    return {"test": PairwiseComparison(("a", "b", "ab"), {"a": 300.0, "b": 299.0, "ab": 250.0}, pairs,
                                       {"a": "a", "b": "a", "ab": "b"})}  # fmt: skip


def test_the_parent_run_logs_the_pairwise_tests_and_each_child_its_group(tmp_path: Path) -> None:
    inputs = _inputs(tmp_path)
    out = tmp_path / "reports"
    out.mkdir()
    tracker = NullTracker()
    log_comparison(tracker, inputs, _entries(inputs), "| table |", out, [], _groups())
    logged = tracker.dicts["pairwise.json"]
    assert logged["groups"] == {"test": {"a": "a", "b": "a", "ab": "b"}}
    first = logged["pairs"][0]
    assert first == {"protocol": "test", "better": "a", "worse": "b", "rsum_better": 300.0, "rsum_worse": 299.0,
                     "rsum_diff": 1.0, "ci_low": -2.0, "ci_high": 4.0, "p_value": 0.6, "p_adjusted": 0.6,
                     "significant": False}  # fmt: skip
    json.dumps(logged)  # plain Python values: MLflow writes it as JSON
    assert [tracker.children[name].tags["itm.group.test"] for name in ("a", "b", "ab")] == ["a", "a", "b"]


def _galleries(root: Path) -> dict[str, SplitScores]:
    """Test matrices of a 60-image, 300-caption gallery: a strong model, its exact twin, and a weak one."""
    generator = torch.Generator().manual_seed(0)
    caption_image = torch.arange(60).repeat_interleave(5)
    columns = torch.arange(len(caption_image))
    saved = {}
    for name, signal in (("strong", 3.0), ("weak", 0.5)):
        matrix = torch.randn(60, len(caption_image), generator=generator)
        matrix[caption_image, columns] += signal
        saved[name] = SplitScores(matrix, np.arange(60) + 100, np.arange(len(caption_image)), caption_image)
    saved["twin"] = saved["strong"]
    root.mkdir(parents=True, exist_ok=True)
    for name, scores in saved.items():
        scores.save(seed_path(root, name, 0, ".npz"))
    return saved


def test_pairwise_comparisons_read_each_models_matrix_and_an_ensembles_mean(tmp_path: Path) -> None:
    saved = _galleries(tmp_path / "scores")
    entries = [Entry(name, "single", "vsepp", {}, 1, None) for name in ("weak", "strong", "twin")]
    entries.append(Entry("mix", "ensemble", "ensemble", {}, 2, members=("strong", "weak")))
    (result,) = pairwise_comparisons(tmp_path / "scores", entries, "synthetic", Significance(resamples=2000)).values()
    mean = (saved["strong"].scores + saved["weak"].scores) / 2
    for name, matrix in (("strong", saved["strong"].scores), ("weak", saved["weak"].scores), ("mix", mean)):
        assert result.rsum[name] == pytest.approx(recall_metrics(matrix, saved["strong"].caption_image)["rsum"])
    assert result.order[:2] == ("strong", "twin") and result.order[-1] == "weak"
    twins = next(pair for pair in result.pairs if {pair.better, pair.worse} == {"strong", "twin"})
    assert twins.test.p_value == 1.0 and not twins.significant
    assert result.groups["strong"] == result.groups["twin"] and result.groups["strong"].startswith("a")
    assert not set(result.groups["weak"]) & set(result.groups["strong"])
    assert len(result.pairs) == 6

    other = SplitScores(saved["weak"].scores, np.arange(60), saved["weak"].caption_ids, saved["weak"].caption_image)
    other.save(seed_path(tmp_path / "scores", "weak", 0, ".npz"))  # other image ids: another gallery
    with pytest.raises(UserError, match="weak scored another test gallery than strong"):
        pairwise_comparisons(tmp_path / "scores", [entries[1], entries[0]], "synthetic", Significance(resamples=100))


def test_recall_curves_hold_every_model_both_directions_from_its_matrix(tmp_path: Path) -> None:
    saved = _galleries(tmp_path / "scores")
    entries = [Entry("weak", "single", "vsepp", {}, 1, None), Entry("mix", "ensemble", "ensemble", {}, 2,
                                                                       members=("strong", "weak"))]  # fmt: skip
    rows = recall_curves(tmp_path / "scores", entries)
    assert len(rows) == 2 * 2 * 20 and {row["model"] for row in rows} == {"weak", "mix"}
    mean = (saved["strong"].scores + saved["weak"].scores) / 2
    expected = recall_metrics(mean, saved["strong"].caption_image, ks=(1, 5))
    mixed = {(row["direction"], row["k"]): row["recall"] for row in rows if row["model"] == "mix"}
    assert mixed["text to image", 5] == pytest.approx(expected["t2i_r5"])
    assert mixed["image to text", 1] == pytest.approx(expected["i2t_r1"])


def test_the_compare_stage_reports_intervals_groups_and_pairs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import itm.compare

    monkeypatch.setattr(itm.compare, "draw_figures", lambda *args: [])  # figures: their own tests
    saved = _galleries(tmp_path / "scores")
    metrics_dir, models_dir, work = tmp_path / "metrics", tmp_path / "models", tmp_path / "work"
    bootstrap = Bootstrap(resamples=200)
    for name in ("strong", "weak"):
        _save(models_dir, name, "vsepp")
        figures = with_intervals(protocol_metrics(saved[name], "synthetic"),
                                 protocol_intervals(saved[name], "synthetic", bootstrap))  # fmt: skip
        _write_metrics(metrics_dir, name, figures)
        _write_metrics(metrics_dir, name, figures | {"test/rsum": figures["test/rsum"] - 4.0}, seed=1)
    ensemble = evaluate_ensemble([seed_path(tmp_path / "scores", name, 0, ".npz") for name in ("strong", "weak")],
                                 "synthetic", bootstrap)  # fmt: skip
    _write_metrics(metrics_dir, "mix", ensemble)
    _write_metrics(metrics_dir, "mix", ensemble | {"test/rsum": ensemble["test/rsum"] + 2.0}, seed=1)
    write_record(seed_path(work / "train", "strong", 0), models_dir / "strong" / "seed0" / "model.pt",
                 {"mlflow_run_id": "t-strong", "train_seconds": 120.0})  # fmt: skip
    measured = {"mlflow_run_id": "e-strong", "test/seconds_per_query": 0.004, "test/encode_seconds": 1.5}
    write_record(
        seed_path(work / "evaluate", "strong", 0), seed_path(tmp_path / "scores", "strong", 0, ".npz"), measured
    )
    inputs = Inputs(metrics_dir, models_dir, tmp_path / "scores", tmp_path, tmp_path, tmp_path, work, (0, 1))
    out, tracker = tmp_path / "reports", NullTracker()
    settings = {"dataset_kind": "synthetic", "examples": Examples(), "intervals": bootstrap,
                "significance": Significance(resamples=1000, correction="none")}  # fmt: skip
    compare(inputs, ["strong", "weak"], {"mix": ["strong", "weak"]}, out, tracker=tracker, **settings)

    markdown = (out / "comparison.md").read_text()
    strong_row = next(line for line in markdown.splitlines() if line.startswith("| strong |"))
    assert f"{ensemble['test/rsum']:.1f} [" in markdown and strong_row.count("[") == 7
    assert "Pairwise rSum differences in `test`" in markdown and "p not adjusted" in markdown
    assert sum(line.startswith("- ") for line in markdown.splitlines()) == 3
    assert "200 resamples of the image queries" in markdown and "1,000 resamples of the same queries" in markdown
    mix_rsums = (ensemble["test/rsum"], ensemble["test/rsum"] + 2.0)
    assert "| rSum over seeds |" in markdown and f"{statistics.fmean(mix_rsums):.1f} ± 1.4 (2 seeds)" in markdown
    table = pd.read_parquet(out / "comparison.parquet")
    assert {*INTERVAL_COLUMNS, "group", "rsum_seeds_mean", "rsum_seeds_std"} <= set(table.columns)
    assert table.set_index("name").loc["strong", "group"] == "a" and table.set_index("name").loc["weak", "group"] != "a"
    assert table.set_index("name").loc["strong", "rsum_seeds_std"] == pytest.approx(2**0.5 * 2.0)
    dvc_metrics = json.loads((out / "comparison.json").read_text())["test"]["strong"]
    assert dvc_metrics["rsum_ci_low"] <= dvc_metrics["rsum"] <= dvc_metrics["rsum_ci_high"]
    assert len(tracker.dicts["pairwise.json"]["pairs"]) == 3

    timing = (out / "timing.md").read_text().splitlines()  # the times the runs recorded, beside the outputs
    assert "| strong | 0 | 2.0 | 4.0 | 1.5 |" in timing and "| weak | 0 | – | – | – |" in timing
    assert not any(line.startswith("| mix |") for line in timing)  # an ensemble trains and encodes nothing
    assert (out / "timing.md", None) in tracker.artifacts
    assert tracker.children["strong"].tags["itm.run.train@strong-0"] == "t-strong"
    assert not {"train_minutes", "ms_per_query", "train_seconds"} & set(table.columns)

    again = tmp_path / "again"  # without the records: the DVC outputs are the same bytes, only timing.md differs
    compare(dataclasses.replace(inputs, work_dir=None), ["strong", "weak"], {"mix": ["strong", "weak"]}, again,
            tracker=NullTracker(), **settings)  # fmt: skip
    for name in ("comparison.md", "comparison.parquet", "comparison.json", "rsum.json"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    assert "| strong | 0 | – | – | – |" in (again / "timing.md").read_text().splitlines()
