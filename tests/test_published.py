"""Published figures beside ours: the data file is checked on reading, each of our models gets the figures of its kind
on its dataset and protocol with the rSum difference, imported models are marked, and synthetic data says it has none.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from pydantic import TypeAdapter

from itm.config import MatcherParams
from itm.errors import UserError
from itm.evaluate.protocols import protocols_for
from itm.models import MatcherInputs, build_matcher
from itm.models.saved import save_matcher
from itm.published import (
    COLUMNS,
    PROTOCOLS,
    RECALLS,
    counterparts,
    ensemble_key,
    model_key,
    read_published,
)
from itm.report import (
    Entry,
    comparison_markdown,
    comparison_metrics,
    comparison_table,
    read_entries,
    rsum_points,
    with_published,
)
from itm.seeds import seed_path
from itm.tracking import NullTracker

SCAN_T2I_AVG = "SCAN t-i AVG (λ1=9)"
SCAN_I2T_LSE = "SCAN i-t LSE (λ1=4, λ2=5)"
SCAN_STAR = "SCAN* (t-i AVG + i-t LSE)"


def _recalls(protocol: str, base: float) -> dict[str, float]:
    """Six recalls base+1, base+5, base+10 per direction, their rSum and median ranks."""
    figures = {f"{protocol}/{side}_r{k}": base + k for side in ("i2t", "t2i") for k in (1, 5, 10)}
    return figures | {f"{protocol}/rsum": 6 * base + 32, f"{protocol}/i2t_medr": 3.0, f"{protocol}/t2i_medr": 4.0}


def test_the_data_file_holds_the_figures_the_comparison_needs() -> None:
    figures = read_published()
    found = {(f.match, f.dataset, f.protocol) for f in figures}
    star = ensemble_key(["scan_t2i_avg", "scan_i2t_lse"])
    for dataset, protocol in (("flickr30k", "test"), ("coco", "test_5fold1k")):
        for key in ("vsepp", "scan_t2i_avg", "scan_i2t_avg", "scan_i2t_lse", star, "cvse", "vse_infty"):
            assert (key, dataset, protocol) in found, (key, dataset, protocol)
    for key in ("vsepp", "scan_i2t_lse", star, "vse_infty"):
        assert (key, "coco", "test_5k") in found, key
    for figure in figures:
        assert abs(sum(figure.recalls.values()) - figure.rsum) <= 0.3 + 1e-6, figure.model
        assert figure.ensemble == (figure.match == star)
    cvse = counterparts(figures, "flickr30k", "test", "cvse")
    assert [f.rsum for f in cvse] == [487.7, 482.5, 476.7]  # README as first published, corrected, VSE∞'s re-run
    assert "not 5-fold" in counterparts(figures, "coco", "test_5fold1k", "cvse")[0].protocol_detail


def test_the_data_files_protocols_are_the_evaluations() -> None:
    assert tuple(p.name for p in protocols_for("flickr30k", 1000)) == PROTOCOLS["flickr30k"]
    assert tuple(p.name for p in protocols_for("coco", 5000)) == PROTOCOLS["coco"]


def test_model_keys_come_from_the_matcher_params() -> None:
    scan = TypeAdapter(MatcherParams).validate_python({"kind": "scan", "direction": "i2t", "pooling": "lse"})
    assert model_key(scan.model_dump(mode="json")) == "scan_i2t_lse"
    assert model_key({"kind": "vsepp", "bidirectional": True}) == "vsepp"
    assert ensemble_key(["scan_t2i_avg", "scan_i2t_lse"]) == ensemble_key(["scan_i2t_lse", "scan_t2i_avg"])


def _save(models: Path, name: str, params: dict[str, object], weights: dict[str, str] | None = None) -> None:
    matcher_params = TypeAdapter(MatcherParams).validate_python(params | {"embed_dim": 8, "word_dim": 4})
    matcher = build_matcher(matcher_params, MatcherInputs(5, 10))
    card = {"name": name, "kind": matcher_params.kind, "params": matcher_params.model_dump(mode="json"),
            "feature_dim": 5, "vocab_size": 10, "vocab_digest": "x"}  # fmt: skip
    save_matcher(seed_path(models, name, 0), matcher.state_dict(), card | ({"weights": weights} if weights else {}))


@pytest.fixture
def flickr30k_entries(tmp_path: Path) -> list[Entry]:
    """A trained SCAN t-i AVG (`t2i`), an imported SCAN i-t LSE (`i2t`) and their ensemble, on Flickr30K `test`."""
    metrics, models = tmp_path / "metrics", tmp_path / "models"
    _save(models, "t2i", {"kind": "scan", "direction": "t2i", "pooling": "avg"})
    weights = {"source": "https://example.org/scan_f30k_i2t.pth.tar", "sha256": "0" * 64, "layout": "scan"}
    _save(models, "i2t", {"kind": "scan", "direction": "i2t", "pooling": "lse"}, weights)
    for name, base in (("t2i", 50.0), ("i2t", 40.0), ("ens", 60.0)):
        (metrics / name).mkdir(parents=True)
        seed_path(metrics, name, 0, ".json").write_text(json.dumps(_recalls("test", base)))
    return read_entries(metrics, models, ["t2i", "i2t"], {"ens": ["t2i", "i2t"]})


def test_published_rows_stand_under_their_counterparts_with_the_rsum_difference(
    flickr30k_entries: list[Entry], tmp_path: Path
) -> None:
    table = comparison_table(flickr30k_entries)
    report = with_published(table, flickr30k_entries, read_published(), "flickr30k")
    assert list(report["name"]) == ["t2i", SCAN_T2I_AVG, "i2t", SCAN_I2T_LSE, "ens", SCAN_STAR]
    assert list(report["type"]) == ["single", "published", "single", "published", "ensemble", "published"]
    published = report[report["type"] == "published"].set_index("name")
    assert list(published["published_for"]) == ["t2i", "i2t", "ens"]
    assert published.loc[SCAN_T2I_AVG, "rsum_diff"] == pytest.approx((6 * 50 + 32) - 446.2)
    assert published.loc[SCAN_STAR, "rsum_diff"] == pytest.approx((6 * 60 + 32) - 465.0)
    assert published.loc[SCAN_T2I_AVG, "i2t_r1"] == 61.8 and published.loc[SCAN_STAR, "t2i_r10"] == 85.2
    assert published.loc[SCAN_T2I_AVG, "checked"] == "second_hand"
    assert list(report["weights"][report["type"] != "published"]) == ["trained", "imported", "mixed"]

    markdown = comparison_markdown(report, "flickr30k")
    lines = markdown.splitlines()
    header = next(line for line in lines if line.startswith("| model |"))
    assert "| rSum | Δ rSum |" in header
    first = lines.index(next(line for line in lines if line.startswith("| t2i |")))
    assert lines[first + 1].startswith(f"| ↳ {SCAN_T2I_AVG} [1] | published | scan | as published | 61.8 | 87.5 |")
    assert "| 446.2 | -114.2 |" in lines[first + 1]
    assert "**" not in lines[first + 1]  # published rows are never the best value, though higher than ours
    assert next(line for line in lines if line.startswith("| ens |")).count("**") >= 2  # ours are
    assert next(line for line in lines if line.startswith("| i2t |")).startswith("| i2t | single, imported | scan |")
    assert next(line for line in lines if line.startswith("| ens |")).startswith("| ens | ensemble, partly imported |")
    assert "i2t from https://example.org/scan_f30k_i2t.pth.tar" in markdown
    note = next(line for line in lines if line.startswith("1. "))
    assert note.startswith(f"1. {SCAN_T2I_AVG}, `test`: Lee et al., ECCV 2018 (SCAN), Table 1; second-hand, read in")
    assert "no published figures" not in markdown

    # the DVC metrics and the rSum plot hold our models only; the Parquet table holds everything
    assert list(comparison_metrics(report)["test"]) == ["t2i", "i2t", "ens"]
    assert [point["model"] for point in rsum_points(report)] == ["t2i", "i2t", "ens"]
    report.to_parquet(tmp_path / "comparison.parquet", index=False)
    back = pd.read_parquet(tmp_path / "comparison.parquet")
    assert list(back["type"]) == list(report["type"]) and back["parameters"].iloc[1] is pd.NA


def test_the_compare_stage_writes_published_rows_to_the_table_but_not_the_metrics(
    flickr30k_entries: list[Entry], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import itm.compare

    monkeypatch.setattr(itm.compare, "draw_figures", lambda *args: [])  # figures: their own tests
    monkeypatch.setattr(itm.compare, "log_comparison", lambda *args: None)
    monkeypatch.setattr(itm.compare, "pairwise_comparisons", lambda *args: {})  # tests: test_compare.py
    monkeypatch.setattr(itm.compare, "recall_curves", lambda *args: [])  # test_compare.py
    inputs = itm.compare.Inputs(tmp_path / "metrics", tmp_path / "models", tmp_path, tmp_path, tmp_path, tmp_path)
    out = tmp_path / "reports"
    examples = itm.compare.Examples()
    itm.compare.compare(inputs, ["t2i", "i2t"], {"ens": ["t2i", "i2t"]}, out, dataset_kind="flickr30k",
                        examples=examples, tracker=NullTracker())  # fmt: skip
    assert f"↳ {SCAN_STAR} [3]" in (out / "comparison.md").read_text()
    assert list(pd.read_parquet(out / "comparison.parquet")["type"]).count("published") == 3
    assert list(json.loads((out / "comparison.json").read_text())["test"]) == ["t2i", "i2t", "ens"]
    assert [point["model"] for point in json.loads((out / "rsum.json").read_text())] == ["t2i", "i2t", "ens"]


def test_synthetic_data_has_no_published_figures_and_says_so_in_one_line(flickr30k_entries: list[Entry]) -> None:
    table = comparison_table(flickr30k_entries)
    report = with_published(table, flickr30k_entries, read_published(), "synthetic")
    assert list(report["name"]) == ["t2i", "i2t", "ens"]
    markdown = comparison_markdown(report, "synthetic")
    notes = [line for line in markdown.splitlines() if "published figures" in line]
    assert notes == ["There are no published figures for the synthetic dataset: every row is one of our models."]
    assert "Δ rSum" not in markdown and "↳" not in markdown
    assert comparison_markdown(table) == comparison_markdown(table, None)  # without a dataset, no note


def test_coco_figures_follow_the_protocol() -> None:
    metrics = _recalls("test_5fold1k", 70.0) | _recalls("test_5k", 40.0)
    entries = [Entry("t2i", "single", "scan", metrics, 1, None, key="scan_t2i_avg"),
               Entry("lse", "single", "scan", metrics, 1, None, key="scan_i2t_lse"),
               Entry("mvam", "single", "mvam", metrics, 1, None, key="mvam")]  # fmt: skip
    report = with_published(comparison_table(entries), entries, read_published(), "coco")
    by_protocol = {p: list(rows["name"]) for p, rows in report.groupby("protocol", sort=False)}
    assert by_protocol["test_5fold1k"] == ["t2i", "SCAN t-i AVG (λ1=9)", "lse", "SCAN i-t LSE (λ1=4, λ2=20)", "mvam"]
    assert by_protocol["test_5k"] == ["t2i", "lse", "SCAN i-t LSE (λ1=4, λ2=20)", "mvam"]  # no 5K t-i AVG figure
    markdown = comparison_markdown(report, "coco")
    assert "unverified: methods.md §3.2" in markdown  # the 1K i-t LSE figure could not be checked


def test_no_counterpart_on_a_real_dataset_is_said_too() -> None:
    entries = [Entry("mvam", "single", "mvam", _recalls("test", 10.0), 1, None, key="mvam")]
    report = with_published(comparison_table(entries), entries, read_published(), "flickr30k")
    assert "None of these models has published figures on Flickr30K" in comparison_markdown(report, "flickr30k")


GOOD = (
    "SCAN t-i AVG,scan_t2i_avg,flickr30k,test,61.8,87.5,93.7,45.8,74.4,83.0,446.2,false,"
    "BUTD regions,SCAN Table 1,second_hand,a survey"
)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (GOOD.replace("61.8", "6l.8"), "line 2, column i2t_r1: '6l.8' is not a number"),
        (GOOD.replace("87.5", "101.0").replace("446.2", "459.7"), "line 2, column i2t_r5: '101.0' is outside 0-100"),
        (GOOD.replace("446.2", "447.2"), "line 2, column rsum: '447.2' is not the sum of the six recalls (446.2)"),
        (GOOD.replace(",test,", ",test_5k,"), "line 2, column protocol: 'test_5k' is not a flickr30k protocol (test)"),
        (GOOD.replace("flickr30k", "flickr8k"), "line 2, column dataset: 'flickr8k' is not one of flickr30k, coco"),
        (GOOD.replace(",false,", ",true,"), "line 2, column ensemble: 'true' disagrees with match 'scan_t2i_avg'"),
        (GOOD.replace("scan_t2i_avg", "SCAN t-i"), "line 2, column match: 'SCAN t-i' is not a model key"),
        (GOOD.replace("BUTD regions", "BUTD | regions"), "line 2, column protocol_detail: 'BUTD | regions' holds '|'"),
        (GOOD.replace("second_hand", "seen"), "line 2, column checked: 'seen' is not one of source, second_hand"),
        (GOOD.replace("87.5,93.7", "93.7,87.5"), "line 2, column i2t_r5: '93.7' and its R@1 and R@10"),
        (GOOD.replace(",a survey", ""), "line 2: 15 fields; expected 16"),
        (GOOD + "\n" + GOOD, "line 3, column model: 'SCAN t-i AVG' on flickr30k test repeats line 2"),
    ],
)
def test_a_malformed_data_file_is_one_line_naming_row_and_column(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "published.csv"
    path.write_text(",".join(COLUMNS) + "\n" + row + "\n")
    with pytest.raises(UserError) as raised:
        read_published(path)
    assert str(raised.value).startswith(f"{path}: {message}")
    assert "\n" not in str(raised.value)


def test_a_wrong_header_or_a_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "published.csv"
    path.write_text(",".join(c for c in COLUMNS if c != "read_in") + "\n" + GOOD + "\n")
    with pytest.raises(UserError, match=r"published\.csv: line 1: the header is .*; expected .*read_in'$"):
        read_published(path)
    with pytest.raises(UserError, match=r"nowhere\.csv: not found"):
        read_published(tmp_path / "nowhere.csv")
    path.write_text(",".join(COLUMNS) + "\n" + GOOD + "\n")
    (figure,) = read_published(path)
    assert figure.recalls == dict(zip(RECALLS, (61.8, 87.5, 93.7, 45.8, 74.4, 83.0), strict=True))
