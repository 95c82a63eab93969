"""`itm experiments`: the comparison's figure of every model across DVC's experiments, turned (itm/experiments.py)."""

from __future__ import annotations

import pytest

from itm import commands, experiments
from itm.experiments import transposed_table

WORKSPACE = {
    "Experiment": None,
    "rev": "workspace",
    "typ": "workspace",
    "test.vsepp.rsum": 109.38,
    "test.naaf.rsum": 360.9,
}
BASELINE = {
    "Experiment": "main",
    "rev": "6e2068d0a1b2",
    "typ": "baseline",
    "test.vsepp.rsum": 109.38,
    "test.naaf.rsum": 360.9,
}
QUICK = {  # a key DVC prefixed with its file (another file has the same key), a model the others lack, one missing
    "Experiment": "quick-20261202-101010", "rev": "a1b2c3d", "typ": "branch_commit",
    "reports/comparison.json:test.vsepp.rsum": 40.25, "test.cvse.rsum": 12.0, "test.vsepp.i2t_r1": 3.0,
}  # fmt: skip
DETECTOR_ONLY = {"Experiment": "det-e8-s0", "rev": "b2c3d4e", "typ": "branch_commit", "val/object_ap50": 0.5}


def test_models_run_down_and_experiments_across() -> None:
    table = transposed_table([WORKSPACE, BASELINE, QUICK, DETECTOR_ONLY])
    assert table.splitlines() == [
        "test rsum  workspace   main  quick-20261202-101010",
        "---------  ---------  -----  ---------------------",
        "vsepp          109.4  109.4                   40.2",
        "naaf           360.9  360.9                      –",
        "cvse               –      –                   12.0",
    ]


def test_another_figure_and_protocol_and_none_found() -> None:
    assert transposed_table([QUICK], figure="i2t_r1").splitlines()[2].split() == ["vsepp", "3.0"]
    five_k = {"Experiment": "coco", "test_5k.vsepp.rsum": 200.0, "test.vsepp.rsum": float("nan")}
    assert transposed_table([five_k], protocol="test_5k").splitlines()[0] == "test_5k rsum   coco"
    assert transposed_table([five_k]) == ""  # NaN is no figure
    assert transposed_table([DETECTOR_ONLY]) == ""


def test_the_command_prints_the_table_or_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    asked = []
    monkeypatch.setattr(experiments, "experiment_rows", lambda num: asked.append(num) or [WORKSPACE, QUICK])
    commands.main(["experiments", "-n", "3"])
    assert asked == [3] and capsys.readouterr().out.splitlines()[2].startswith("vsepp")
    with pytest.raises(SystemExit) as stopped:
        commands.main(["experiments", "--figure", "nope"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "error: itm experiments: no experiment has test.<model>.nope in its metrics\n"
