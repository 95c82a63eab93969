"""The DVC pipeline end to end on a tiny profile, and dvc.yaml's consistency with the code and the schema."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from itm.config import Params
from tests.conftest import REPO, TINY_DETECTOR, TINY_SYNTHETIC

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())


def test_every_stage_depends_on_its_own_script_and_the_schema() -> None:
    for name, definition in DVC_YAML["stages"].items():
        stage = definition.get("do", definition)  # a foreach stage's template
        module = stage["cmd"].split()[2]  # python -m stages.<name> ...
        assert f"{module.replace('.', '/')}.py" in stage["deps"], name
        assert "itm/config.py" in stage["deps"], name
        for dep in stage["deps"]:
            if dep.startswith(("itm/", "stages/")):  # code; the rest are outputs of other stages
                assert (REPO / dep).exists(), f"{name}: {dep}"


def test_every_tracked_param_is_in_the_schema() -> None:
    for name, definition in DVC_YAML["stages"].items():
        for key in definition.get("do", definition).get("params", []):
            top = key.split(".")[0]
            assert top in Params.model_fields, f"{name}: {key}"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "itm tests",
        "GIT_AUTHOR_EMAIL": "tests@itm.invalid",
        "GIT_COMMITTER_NAME": "itm tests",
        "GIT_COMMITTER_EMAIL": "tests@itm.invalid",
    }
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def tiny_repo(tmp_path: Path) -> Path:
    """A git + DVC repository holding this pipeline with the tiny synthetic profile."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("itm", "stages"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"]["synthetic"] = {"kind": "synthetic", **TINY_SYNTHETIC}
    params["tokenize"]["min_count"] = 1
    params["detector"]["architectures"]["small"] = {**TINY_DETECTOR, "blocks": [1, 1, 1, 1]}
    params["detector"]["train"] |= {"epochs": 1, "max_images": 16, "batch_size": 8}
    params["regions"] |= {"min_boxes": 3, "max_boxes": 10}
    for block in params["matchers"].values():
        block |= {"embed_dim": 16, "word_dim": 8}
    params["train"] |= {"epochs": 1, "batch_size": 32}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "tiny pipeline"], repo)
    return repo


@pytest.mark.slow
def test_repro_then_nothing_to_do_then_an_experiment_changes_the_data(tiny_repo: Path) -> None:
    first = _run(["dvc", "repro"], tiny_repo)
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
    metrics = json.loads(_run(["dvc", "metrics", "show", "--json"], tiny_repo).stdout)
    shown = json.dumps(metrics)
    assert "test/gt_coverage_iou50" in shown and "val/object_ap50" in shown
    for name in [*matchers, "scan_ensemble"]:
        assert f"metrics/{name}.json" in shown and '"test/rsum"' in shown
    dataset_json = tiny_repo / "data" / "raw" / "synthetic" / "dataset.json"
    test_captions = tiny_repo / "data" / "captions" / "test.parquet"
    before = _md5(dataset_json), _md5(test_captions)

    again = _run(["dvc", "repro"], tiny_repo)
    assert "Running stage" not in again.stdout
    assert "Data and pipelines are up to date." in again.stdout
    stray = tiny_repo / "itm" / "models" / "__pycache__" / "stray.cpython-311.pyc"
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"bytecode")  # Python rewrites its caches at will: no stage may depend on them
    assert "Data and pipelines are up to date." in _run(["dvc", "status"], tiny_repo).stdout
    stray.unlink()

    _run(["git", "add", "dvc.lock"], tiny_repo)
    _run(["git", "commit", "-qm", "lock"], tiny_repo)
    one_matcher = _run(["dvc", "exp", "run", "-S", "matchers.scan_t2i_avg.lambda_softmax=4"], tiny_repo).stdout
    ran = set(re.findall(r"Running stage '([^']+)'", one_matcher))
    assert ran == {"train@scan_t2i_avg", "evaluate@scan_t2i_avg", "ensemble@scan_ensemble", "compare"}, ran
    compared = json.loads(_run(["dvc", "metrics", "diff", "HEAD", "--json"], tiny_repo).stdout)
    assert "test.scan_t2i_avg.rsum" in compared["reports/comparison.json"]
    plotted = json.loads(_run(["dvc", "plots", "diff", "HEAD", "--json", "--split"], tiny_repo).stdout)
    assert "reports/rsum.json" in json.dumps(plotted) and "attention_scan_t2i_avg.png" in json.dumps(plotted)

    experiment = _run(["dvc", "exp", "run", "-S", "datasets.synthetic.seed=7"], tiny_repo)
    assert "Running stage 'download'" in experiment.stdout
    assert (_md5(dataset_json), _md5(test_captions)) != before
    assert yaml.safe_load((tiny_repo / "params.yaml").read_text())["datasets"]["synthetic"]["seed"] == 7
