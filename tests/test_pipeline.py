"""The DVC pipeline end to end on a tiny profile (dvc.yaml's consistency with the code: tests/test_stage_deps.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.tiny_repo import md5, run, tiny_repo_fixture  # noqa: F401 - provides the `tiny_repo` fixture


@pytest.mark.slow
def test_repro_then_nothing_to_do_then_an_experiment_changes_the_data(tiny_repo: Path) -> None:
    first = run(["dvc", "repro"], tiny_repo)
    matchers = list(yaml.safe_load((tiny_repo / "params.yaml").read_text())["matchers"])
    stages = [
        "download",
        "detector",
        "regions",
        "tokenize",
        *(f"{s}@{m}" for s in ("train", "evaluate") for m in matchers),
    ]
    for stage in [*stages, "ensemble@scan_ensemble", "compare"]:
        assert f"Running stage '{stage}'" in first.stdout
    report = (tiny_repo / "reports" / "comparison.md").read_text()
    for name in [*matchers, "scan_ensemble"]:
        assert f"| {name} |" in report
    figures = {path.name for path in (tiny_repo / "reports" / "figures").iterdir()}
    assert {"training_curves.png", "recall_bars_test.png", "attention_scan_t2i_avg.png", "views_mvam.png"} <= figures
    assert {f"retrieval_t2i_{name}.png" for name in [*matchers, "scan_ensemble"]} <= figures
    assert (tiny_repo / "models" / "detector" / "card.json").is_file()
    assert (tiny_repo / "data" / "regions" / "test" / "features.npy").is_file()
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], tiny_repo).stdout)
    shown = json.dumps(metrics)
    assert "test/gt_coverage_iou50" in shown and "val/object_ap50" in shown
    for name in [*matchers, "scan_ensemble"]:
        assert f"metrics/{name}.json" in shown and '"test/rsum"' in shown
    dataset_json = tiny_repo / "data" / "raw" / "synthetic" / "dataset.json"
    test_captions = tiny_repo / "data" / "captions" / "test.parquet"
    before = md5(dataset_json), md5(test_captions)

    again = run(["dvc", "repro"], tiny_repo)
    assert "Running stage" not in again.stdout
    assert "Data and pipelines are up to date." in again.stdout
    stray = tiny_repo / "itm" / "models" / "__pycache__" / "stray.cpython-311.pyc"
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"bytecode")  # Python rewrites its caches at will: no stage may depend on them
    assert "Data and pipelines are up to date." in run(["dvc", "status"], tiny_repo).stdout
    stray.unlink()

    run(["git", "add", "dvc.lock"], tiny_repo)
    run(["git", "commit", "-qm", "lock"], tiny_repo)
    one_matcher = run(["dvc", "exp", "run", "-S", "matchers.scan_t2i_avg.lambda_softmax=4"], tiny_repo).stdout
    ran = set(re.findall(r"Running stage '([^']+)'", one_matcher))
    assert ran == {"train@scan_t2i_avg", "evaluate@scan_t2i_avg", "ensemble@scan_ensemble", "compare"}, ran
    compared = json.loads(run(["dvc", "metrics", "diff", "HEAD", "--json"], tiny_repo).stdout)
    assert "test.scan_t2i_avg.rsum" in compared["reports/comparison.json"]
    plotted = json.loads(run(["dvc", "plots", "diff", "HEAD", "--json", "--split"], tiny_repo).stdout)
    assert "reports/rsum.json" in json.dumps(plotted) and "attention_scan_t2i_avg.png" in json.dumps(plotted)

    experiment = run(["dvc", "exp", "run", "-S", "datasets.synthetic.seed=7"], tiny_repo)
    assert "Running stage 'download'" in experiment.stdout
    assert (md5(dataset_json), md5(test_captions)) != before
    assert yaml.safe_load((tiny_repo / "params.yaml").read_text())["datasets"]["synthetic"]["seed"] == 7
