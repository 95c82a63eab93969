"""The DVC pipeline end to end on a tiny profile (dvc.yaml's consistency with the code: tests/test_stage_deps.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.tiny_repo import environment, file_differences, make_tiny_repo, md5, run, tracked_files


@dataclass(frozen=True)
class Reproduced:
    """The tiny repository after one `dvc repro`, what that printed, its dvc.lock and tracked files as they were
    then, and an untouched copy of the repository made before it ran (same commit, another folder)."""

    repo: Path
    stdout: str
    lock: bytes
    files: dict[str, bytes]
    fresh: Path


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Reproduced:
    base = tmp_path_factory.mktemp("pipeline")
    repo = make_tiny_repo(base / "repo")
    fresh = Path(shutil.copytree(repo, base / "fresh", symlinks=True))
    with pytest.MonkeyPatch.context() as monkeypatch:  # set up before conftest's per-test `_tracking_off`
        monkeypatch.setenv("ITM_TRACKING", "off")
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        first = run(["dvc", "repro"], repo)
    return Reproduced(repo, first.stdout, (repo / "dvc.lock").read_bytes(), tracked_files(repo), fresh)


def _matchers(repo: Path) -> list[str]:
    return list(yaml.safe_load((repo / "params.yaml").read_text())["matchers"])


def _ran(stdout: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", stdout))


@pytest.mark.slow
def test_repro_then_nothing_to_do_then_an_experiment_changes_the_data(reproduced: Reproduced) -> None:
    tiny_repo = reproduced.repo
    matchers = _matchers(tiny_repo)
    stages = [
        "download",
        "detector",
        "regions",
        "tokenize",
        *(f"{s}@{m}-0" for s in ("train", "evaluate") for m in matchers),
    ]
    assert _ran(reproduced.stdout) == {*stages, "ensemble@scan_ensemble-0", "compare"}
    report = (tiny_repo / "reports" / "comparison.md").read_text()
    for name in [*matchers, "scan_ensemble"]:
        assert f"| {name} |" in report
    assert "rSum over seeds" not in report  # one seed: no spread to show
    figures = {path.name for path in (tiny_repo / "reports" / "figures").iterdir()}
    assert {"training_curves.png", "recall_bars_test.png", "attention_scan_t2i_avg.png", "views_mvam.png"} <= figures
    assert {f"retrieval_t2i_{name}.png" for name in [*matchers, "scan_ensemble"]} <= figures
    assert (tiny_repo / "models" / "detector" / "card.json").is_file()
    assert (tiny_repo / "data" / "regions" / "test" / "features.npy").is_file()
    for name in matchers:
        assert (tiny_repo / "models" / name / "seed0" / "model.pt").is_file()
        assert (tiny_repo / "data" / "scores" / name / "seed0.npz").is_file()
        assert (tiny_repo / "plots" / name / "seed0" / "recall_curve.json").is_file()
        assert (tiny_repo / "data" / "work" / "train" / name / "seed0" / "run.json").is_file()  # times, untracked
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], tiny_repo).stdout)
    shown = json.dumps(metrics)
    assert "test/gt_coverage_iou50" in shown and "val/object_ap50" in shown
    headline = next(iter(metrics.values()))["data"]["reports/comparison.json"]["data"]["test"]
    assert set(headline) == {*matchers, "scan_ensemble"} and all("rsum" in row for row in headline.values())
    assert "metrics/vsepp/seed0.json" not in shown  # each figure has one home in what DVC shows
    assert "seconds" not in shown  # times live in the runs' records, not in what DVC tracks
    shown_plots = json.loads(run(["dvc", "plots", "show", "--json"], tiny_repo).stdout)
    assert shown_plots.get("errors", []) == []  # e.g. a .gitignore beside an output, read as a plot
    charts = shown_plots["data"]
    assert "reports/recall_curves.json" in charts and "reports/rsum.json" in charts
    curves = [name for name in charts if name.endswith("recall_curve.json")]
    assert sorted(curves) == sorted(f"plots/{name}/seed0/recall_curve.json" for name in matchers)  # once each
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
    ran = _ran(one_matcher)
    assert ran == {"train@scan_t2i_avg-0", "evaluate@scan_t2i_avg-0", "ensemble@scan_ensemble-0", "compare"}, ran
    compared = json.loads(run(["dvc", "metrics", "diff", "HEAD", "--json"], tiny_repo).stdout)
    assert "test.scan_t2i_avg.rsum" in compared["reports/comparison.json"]
    plotted = json.loads(run(["dvc", "plots", "diff", "HEAD", "--json", "--split"], tiny_repo).stdout)
    assert "reports/rsum.json" in json.dumps(plotted) and "attention_scan_t2i_avg.png" in json.dumps(plotted)

    # another dataset, as far as the captions (the stages after them would run as on the first repro)
    experiment = run(["dvc", "exp", "run", "-S", "datasets.synthetic.seed=7", "tokenize"], tiny_repo)
    assert _ran(experiment.stdout) == {"download", "tokenize"}
    assert (md5(dataset_json), md5(test_captions)) != before
    assert yaml.safe_load((tiny_repo / "params.yaml").read_text())["datasets"]["synthetic"]["seed"] == 7
    # back to the committed state (the profile test below runs on it)
    run(["git", "checkout", "HEAD", "--", "params.yaml", "dvc.lock"], tiny_repo)
    run(["dvc", "checkout"], tiny_repo)
    assert (md5(dataset_json), md5(test_captions)) == before


@pytest.mark.slow
def test_a_fresh_copy_reproduces_the_same_lock_and_a_new_seed_runs_only_its_stages(reproduced: Reproduced) -> None:
    """Every tracked output is a function of code, params and data on one machine: the same commit, run again in
    another folder, writes the same bytes and so the same dvc.lock. Then `train.seeds=[0,1]` adds the new seed's own
    train, evaluate and ensemble stages and leaves seed 0's as they are; the report shows rSum mean ± std over two (one
    new seed shows all of it at half the time of the README's three)."""
    fresh = reproduced.fresh
    second = run(["dvc", "repro"], fresh)
    assert _ran(second.stdout) == _ran(reproduced.stdout)  # nothing came from elsewhere (no shared cache)
    differences = file_differences(reproduced.files, tracked_files(fresh))
    assert not differences, "outputs of the second run differ:\n" + "\n".join(differences)
    assert (fresh / "dvc.lock").read_bytes() == reproduced.lock

    run(["git", "add", "dvc.lock"], fresh)
    run(["git", "commit", "-qm", "lock"], fresh)
    two_seeds = run(["dvc", "exp", "run", "-S", "train.seeds=[0,1]"], fresh).stdout
    matchers = _matchers(fresh)
    added = {f"{stage}@{name}-1" for stage in ("train", "evaluate") for name in matchers} | {"ensemble@scan_ensemble-1"}
    ran = _ran(two_seeds)
    # Seed 0's trainings and evaluations are not run again. An ensemble stage depends on the whole data/scores folder
    # (its members' files are not known to dvc.yaml), which the new seeds' score files change, so DVC may run seed
    # 0's ensemble again; it then writes the same bytes (below).
    assert added | {"compare"} <= ran and ran - added - {"compare"} <= {"ensemble@scan_ensemble-0"}, sorted(ran)
    lock = yaml.safe_load((fresh / "dvc.lock").read_text())["stages"]
    for name, entry in yaml.safe_load(reproduced.lock)["stages"].items():
        if name == "compare":
            continue
        if name in ran:
            assert lock[name]["outs"] == entry["outs"], name  # run again, same outputs
        else:
            assert lock[name] == entry, name  # as it was: same code, params, data and outputs
    report = (fresh / "reports" / "comparison.md").read_text()
    assert "rSum over seeds" in report
    for name in [*matchers, "scan_ensemble"]:
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        assert re.search(r"\d ± \d+\.\d \(2 seeds\)", row), row


@pytest.mark.slow
def test_a_profile_runs_as_its_own_experiment_and_leaves_the_workspace_as_it_was(reproduced: Reproduced) -> None:
    """`python -m itm.profiles <file>` (what `make quick` runs) checks the profile, runs it with `dvc exp run --temp`
    and prints the experiment's table; the workspace's params, lock and reports stay as they were."""
    repo = reproduced.repo
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "state before the profile", "--allow-empty"], repo)
    profile = repo / "few_examples.yaml"
    profile.write_text("compare:\n  examples: 1\n")
    kept = {name: (repo / name).read_bytes() for name in ("params.yaml", "dvc.lock", "reports/comparison.md")}
    done = run([sys.executable, "-m", "itm.profiles", str(profile)], repo)
    assert _ran(done.stdout) == {"compare"}  # everything else restored from the cache
    name = re.search(r"as the DVC experiment (few_examples-\d{8}-\d{6})", done.stdout).group(1)
    assert f"reports/comparison.md of {name}" in done.stdout and "| vsepp |" in done.stdout
    assert {name: (repo / name).read_bytes() for name in kept} == kept
    listed = run(["dvc", "exp", "list", "--name-only"], repo).stdout.split()
    assert name in listed

    profile.write_text("compare:\n  exampels: 1\n")
    mistake = subprocess.run([sys.executable, "-m", "itm.profiles", str(profile)], cwd=repo, env=environment(),
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert mistake.returncode == 2
    assert mistake.stderr.strip() == "error: profile key compare.exampels: params.yaml has no such key"
