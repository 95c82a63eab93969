"""The comparison table: rows per protocol and model, parameter counts from saved models, best values in bold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import TypeAdapter

from itm.config import MatcherParams
from itm.errors import UserError
from itm.models import MatcherInputs, build_matcher
from itm.models.saved import save_matcher
from itm.report import comparison_markdown, comparison_table, read_entries


def _recalls(protocol: str, base: float) -> dict[str, float]:
    figures = {f"{protocol}/{side}_r{k}": base + k for side in ("i2t", "t2i") for k in (1, 5, 10)}
    figures |= {f"{protocol}/i2t_medr": 10 - base / 10, f"{protocol}/t2i_medr": 20 - base / 10}
    return figures | {f"{protocol}/rsum": sum(v for k, v in figures.items() if "_r" in k and "medr" not in k)}


def _save(models: Path, name: str, kind: str) -> int:
    params = TypeAdapter(MatcherParams).validate_python({"kind": kind, "embed_dim": 8, "word_dim": 4})
    matcher = build_matcher(params, MatcherInputs(5, 10))
    card = {"name": name, "kind": kind, "params": params.model_dump(mode="json"), "feature_dim": 5, "vocab_size": 10,
            "vocab_digest": "x", "train_seconds": 90.0}  # fmt: skip
    save_matcher(models / name, matcher.state_dict(), card)
    return sum(p.numel() for p in matcher.parameters())


def test_rows_per_protocol_with_counts_and_best_values(tmp_path: Path) -> None:
    metrics, models = tmp_path / "metrics", tmp_path / "models"
    metrics.mkdir()
    sizes = {"a": _save(models, "a", "vsepp"), "b": _save(models, "b", "scan")}
    for name, base in (("a", 10.0), ("b", 20.0), ("ab", 30.0)):
        figures = _recalls("test_5fold1k", base) | _recalls("test_5k", base - 5)
        if name != "ab":
            figures["test/seconds_per_query"] = 0.001 if name == "a" else 0.002
        (metrics / f"{name}.json").write_text(json.dumps(figures))
    table = comparison_table(read_entries(metrics, models, ["a", "b"], {"ab": ["a", "b"]}))
    assert list(table["protocol"]) == ["test_5fold1k"] * 3 + ["test_5k"] * 3
    assert list(table["name"][:3]) == ["a", "b", "ab"] and list(table["type"][:3]) == ["single", "single", "ensemble"]
    assert list(table["parameters"][:3]) == [sizes["a"], sizes["b"], sizes["a"] + sizes["b"]]
    assert table["train_minutes"][0] == pytest.approx(1.5)
    assert table["ms_per_query"][0] == pytest.approx(1.0)
    markdown = comparison_markdown(table)
    assert markdown.count("### test_5") == 2
    ensemble_row = next(line for line in markdown.splitlines() if line.startswith("| ab |"))
    assert "**" + f"{_recalls('test_5fold1k', 30.0)['test_5fold1k/rsum']:.1f}" + "**" in ensemble_row  # best rSum
    single_row = next(line for line in markdown.splitlines() if line.startswith("| a |"))
    assert "**1.0** |" in single_row  # the fastest retrieval; the ensemble's is unknown: "–"
    assert ensemble_row.rstrip(" |").endswith("–")


def test_missing_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"card\.json: not found"):
        read_entries(tmp_path, tmp_path, ["a"], {})
    torch.manual_seed(0)
    _save(tmp_path / "models", "a", "vsepp")
    with pytest.raises(UserError, match=r"a\.json: not found"):
        read_entries(tmp_path / "metrics", tmp_path / "models", ["a"], {})


def test_recall_bars_are_written_per_protocol(tmp_path: Path) -> None:
    from PIL import Image

    from itm.report import Entry, recall_bars

    entries = [Entry(n, "single", "vsepp", _recalls("test_5k", b) | _recalls("test_5fold1k", b + 1), 1, None)
               for n, b in (("a", 10.0), ("b", 40.0))]  # fmt: skip
    table = comparison_table(entries)
    recall_bars(table, tmp_path / "bars.png", protocol="test_5fold1k")
    with Image.open(tmp_path / "bars.png") as image:
        assert image.format == "PNG" and image.width > image.height > 300
    with pytest.raises(ValueError, match="no rows for protocol 'test_1k'"):
        recall_bars(table, tmp_path / "none.png", protocol="test_1k")


def test_training_curves_take_every_matchers_history(tmp_path: Path) -> None:
    from PIL import Image

    from itm.report import training_curves

    histories = {"a": [{"train/loss": 50.0 - e, "val/rsum": 10.0 * e} for e in range(3)],
                 "b": [{"train/loss": 2.0 - 0.1 * e, "val/rsum": 20.0 * e} for e in range(10)]}  # fmt: skip
    training_curves(histories, tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG" and image.width > image.height > 300
    with pytest.raises(ValueError, match="no training histories"):
        training_curves({}, tmp_path / "none.png")


def test_each_row_says_whether_its_test_labels_used_other_test_captions(tmp_path: Path) -> None:
    metrics, models = tmp_path / "metrics", tmp_path / "models"
    metrics.mkdir()
    _save(models, "plain", "vsepp"), _save(models, "completed", "scan")  # what the metrics say decides
    (metrics / "plain.json").write_text(json.dumps(_recalls("test", 10.0)))
    (metrics / "completed.json").write_text(json.dumps(_recalls("test", 20.0) | {"test/transductive_concepts": 1.0}))
    (metrics / "both.json").write_text(json.dumps(_recalls("test", 30.0)))
    entries = read_entries(metrics, models, ["plain", "completed"], {"both": ["plain", "completed"]})
    table = comparison_table(entries)
    assert list(table["evaluation"]) == ["fair", "transductive (CVSE completion)", "transductive (CVSE completion)"]
    rows = [line for line in comparison_markdown(table).splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| model | type | kind | evaluation |")
    assert rows[1].startswith("| plain | single | vsepp | fair |")
    assert rows[2].startswith("| completed | single | scan | transductive (CVSE completion) |")
