"""The comparison table: rows per protocol and model, parameter counts from saved models, best values in bold."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pandas as pd
import pytest
import torch
from pydantic import TypeAdapter

from itm.config import MatcherParams
from itm.errors import UserError
from itm.evaluate.statistics import (
    RECALL_KEYS,
    Bootstrap,
    Pair,
    PairedTest,
    PairwiseComparison,
    Significance,
    ci_keys,
)
from itm.models import MatcherInputs, build_matcher
from itm.models.saved import save_matcher
from itm.report import (
    INTERVAL_COLUMNS,
    PAIRWISE_COLUMNS,
    Entry,
    Timing,
    Uncertainty,
    comparison_markdown,
    comparison_metrics,
    comparison_table,
    pairwise_table,
    read_entries,
    timing_markdown,
    with_groups,
)
from itm.seeds import seed_path


def _recalls(protocol: str, base: float) -> dict[str, float]:
    figures = {f"{protocol}/{side}_r{k}": base + k for side in ("i2t", "t2i") for k in (1, 5, 10)}
    figures |= {f"{protocol}/i2t_medr": 10 - base / 10, f"{protocol}/t2i_medr": 20 - base / 10}
    return figures | {f"{protocol}/rsum": sum(v for k, v in figures.items() if "_r" in k and "medr" not in k)}


def _save(models: Path, name: str, kind: str, seed: int = 0, training: dict[str, object] | None = None) -> int:
    """A small matcher saved as train@<name>-<seed> writes it (models/<name>/seed<seed>/); returns its parameters."""
    params = TypeAdapter(MatcherParams).validate_python({"kind": kind, "embed_dim": 8, "word_dim": 4})
    matcher = build_matcher(params, MatcherInputs(5, 10))
    card = {"name": name, "kind": kind, "params": params.model_dump(mode="json"), "seed": seed, "feature_dim": 5,
            "vocab_size": 10, "vocab_digest": "x"} | ({"training": training} if training else {})  # fmt: skip
    save_matcher(seed_path(models, name, seed), matcher.state_dict(), card)
    return sum(p.numel() for p in matcher.parameters())


def _write_metrics(metrics: Path, name: str, figures: dict[str, float], seed: int = 0) -> None:
    """metrics/<name>/seed<seed>.json, as evaluate@ and ensemble@ write it."""
    path = seed_path(metrics, name, seed, ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures))


def _training(epochs: int, stopped: str) -> dict[str, object]:
    """A card's `training` summary (itm.train.run.training_summary)."""
    return {"epochs": epochs, "best_epoch": epochs - 1, "stopped": stopped, "max_epochs": 12, "patience": 2,
            "min_delta": 0.0, "warmup_epochs": 0, "pairs_seen": 3000 * epochs}  # fmt: skip


def test_rows_per_protocol_with_counts_and_best_values(tmp_path: Path) -> None:
    metrics, models = tmp_path / "metrics", tmp_path / "models"
    sizes = {"a": _save(models, "a", "vsepp", training=_training(7, "plateau")),
             "b": _save(models, "b", "scan", training=_training(12, "cap"))}  # fmt: skip
    for name, base in (("a", 10.0), ("b", 20.0), ("ab", 30.0)):
        _write_metrics(metrics, name, _recalls("test_5fold1k", base) | _recalls("test_5k", base - 5))
    table = comparison_table(read_entries(metrics, models, ["a", "b"], {"ab": ["a", "b"]}))
    assert list(table["protocol"]) == ["test_5fold1k"] * 3 + ["test_5k"] * 3
    assert list(table["name"][:3]) == ["a", "b", "ab"] and list(table["type"][:3]) == ["single", "single", "ensemble"]
    assert list(table["parameters"][:3]) == [sizes["a"], sizes["b"], sizes["a"] + sizes["b"]]
    assert list(table["training"][:2]) == ["7, plateau", "12, cap"] and pd.isna(table["training"][2])  # ensemble
    assert not {"train_minutes", "ms_per_query"} & set(table.columns)  # times differ on every run: timing.md
    assert list(table["seeds"]) == [1] * 6 and table["rsum_seeds"].isna().all()
    assert table["rsum_seeds_mean"].tolist() == table["rsum"].tolist() and table["rsum_seeds_std"].isna().all()
    markdown = comparison_markdown(table)
    assert markdown.count("### test_5") == 2
    header = next(line for line in markdown.splitlines() if line.startswith("| model |"))
    assert header.endswith("| parameters | epochs |") and "rSum over seeds" not in header  # one seed: no spread
    ensemble_row = next(line for line in markdown.splitlines() if line.startswith("| ab |"))
    assert "**" + f"{_recalls('test_5fold1k', 30.0)['test_5fold1k/rsum']:.1f}" + "**" in ensemble_row  # best rSum
    assert ensemble_row.endswith(f"| {sizes['a'] + sizes['b']:,} | – |")  # no epochs of its own
    rows = {line.split(" |")[0]: line for line in markdown.splitlines() if line.startswith(("| a |", "| b |"))}
    assert rows["| a"].endswith("| 7, plateau |") and rows["| b"].endswith("| 12, cap |")
    assert "at the epoch cap (cap: it may not have converged)" in markdown


def test_several_seeds_add_the_spread_of_rsum(tmp_path: Path) -> None:
    metrics, models = tmp_path / "metrics", tmp_path / "models"
    _save(models, "a", "vsepp", seed=3, training=_training(4, "plateau"))  # only the first seed's model is read
    _save(models, "b", "vsepp", seed=3)
    rsums: dict[str, list[float]] = {"a": [], "b": []}
    for seed, base in ((3, 10.0), (5, 14.0), (8, 12.5)):
        for name, shift in (("a", 0.0), ("b", 20.0)):
            figures = _recalls("test", base + shift)
            rsums[name].append(figures["test/rsum"])
            _write_metrics(metrics, name, figures, seed)
        _write_metrics(metrics, "ab", _recalls("test", 40.0 + seed), seed)
    entries = read_entries(metrics, models, ["a", "b"], {"ab": ["a", "b"]}, seeds=(3, 5, 8))
    assert [entry.seed for entry in entries] == [3, 3, 3]
    assert entries[0].model_dir == models / "a" / "seed3" and entries[0].metrics == _recalls("test", 10.0)
    assert entries[0].seed_rsums == {"test": tuple(rsums["a"])}
    table = comparison_table(entries)
    row = table.set_index("name").loc["a"]
    assert row["rsum"] == rsums["a"][0] and row["seeds"] == 3
    assert row["rsum_seeds_mean"] == pytest.approx(statistics.fmean(rsums["a"]))
    assert row["rsum_seeds_std"] == pytest.approx(statistics.stdev(rsums["a"]))  # sample standard deviation
    mean, std = statistics.fmean(rsums["a"]), statistics.stdev(rsums["a"])
    assert row["rsum_seeds"] == f"{mean:.1f} ± {std:.1f} (3 seeds)"
    ensemble = [_recalls("test", 40.0 + seed)["test/rsum"] for seed in (3, 5, 8)]
    assert table.set_index("name").loc["ab", "rsum_seeds"].startswith(f"{statistics.fmean(ensemble):.1f} ± ")

    lines = comparison_markdown(table).splitlines()
    header = next(line for line in lines if line.startswith("| model |"))
    assert "| rSum | rSum over seeds | i2t medR |" in header
    row_a = next(line for line in lines if line.startswith("| a |"))
    assert f"| {mean:.1f} ± {std:.1f} (3 seeds) |" in row_a and row_a.endswith("| 4, plateau |")

    with pytest.raises(UserError, match=r"a/seed7\.json: not found"):  # every seed's metrics must be there
        read_entries(metrics, models, ["a"], {}, seeds=(3, 7))


def test_missing_inputs_are_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"a/seed0/card\.json: not found \(run train@a-0 first\)"):
        read_entries(tmp_path, tmp_path, ["a"], {})
    torch.manual_seed(0)
    _save(tmp_path / "models", "a", "vsepp")
    with pytest.raises(UserError, match=r"metrics/a/seed0\.json: not found"):
        read_entries(tmp_path / "metrics", tmp_path / "models", ["a"], {})


def test_recall_bars_are_written_per_protocol(tmp_path: Path) -> None:
    from PIL import Image

    from itm.report import recall_bars

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
    _save(models, "plain", "vsepp"), _save(models, "completed", "scan")  # what the metrics say decides
    _write_metrics(metrics, "plain", _recalls("test", 10.0))
    _write_metrics(metrics, "completed", _recalls("test", 20.0) | {"test/transductive_concepts": 1.0})
    _write_metrics(metrics, "both", _recalls("test", 30.0))
    entries = read_entries(metrics, models, ["plain", "completed"], {"both": ["plain", "completed"]})
    table = comparison_table(entries)
    assert list(table["evaluation"]) == ["fair", "transductive (CVSE completion)", "transductive (CVSE completion)"]
    rows = [line for line in comparison_markdown(table).splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| model | type | kind | evaluation |")
    assert rows[1].startswith("| plain | single | vsepp | fair |")
    assert rows[2].startswith("| completed | single | scan | transductive (CVSE completion) |")


# --- intervals, groups and pairwise tests ---------------------------------------------------------------------------


def _with_intervals(figures: dict[str, float], half_width: float) -> dict[str, float]:
    """Hand-made metrics with an interval of ±`half_width` around each R@K and rSum."""
    bounds = {}
    for key, value in figures.items():
        if key.rsplit("/", 1)[1] in (*RECALL_KEYS, "rsum"):
            bounds |= {f"{key}_ci_low": value - half_width, f"{key}_ci_high": value + half_width}
    return figures | bounds


def _comparison(protocol: str = "test") -> dict[str, PairwiseComparison]:
    """b and c cannot be told apart, a beats both."""
    rsum = {"a": 400.0, "b": 300.0, "c": 299.0}
    pairs = (
        Pair("a", "b", PairedTest(100.0, 90.0, 110.0, 0.0002), 0.0006, True),
        Pair("a", "c", PairedTest(101.0, 91.0, 111.0, 0.0002), 0.0006, True),
        Pair("b", "c", PairedTest(1.0, -4.5, 6.25, 0.7), 0.7, False),
    )
    return {protocol: PairwiseComparison(("a", "b", "c"), rsum, pairs, {"a": "a", "b": "b", "c": "b"})}


def _entries() -> list[Entry]:
    return [Entry(name, "single", "vsepp", _with_intervals(_recalls("test", base), 2.5), 10, None)
            for name, base in (("c", 10.0), ("a", 30.0), ("b", 20.0))]  # fmt: skip


def test_every_recall_and_rsum_carries_its_interval_and_groups_follow_rsum() -> None:
    table = with_groups(comparison_table(_entries()), _comparison())
    columns = list(table.columns)
    assert columns[columns.index("i2t_r1") : columns.index("i2t_r1") + 3] == ["i2t_r1", *ci_keys("i2t_r1")]
    assert columns[columns.index("rsum") : columns.index("rsum") + 4] == ["rsum", *ci_keys("rsum"), "group"]
    assert set(INTERVAL_COLUMNS) <= set(columns) and len(INTERVAL_COLUMNS) == 14
    row = table[table["name"] == "a"].iloc[0]
    assert (row["rsum_ci_low"], row["rsum"], row["rsum_ci_high"]) == (row["rsum"] - 2.5, row["rsum"], row["rsum"] + 2.5)
    assert list(table["group"]) == ["b", "a", "b"]

    metrics = comparison_metrics(table)["test"]["a"]  # the DVC metrics file: each bound after its figure
    keys = list(metrics)
    assert keys[keys.index("rsum") : keys.index("rsum") + 3] == ["rsum", "rsum_ci_low", "rsum_ci_high"]
    assert "group" not in metrics


def test_markdown_shows_intervals_groups_and_every_pair_under_its_table() -> None:
    table = with_groups(comparison_table(_entries()), _comparison())
    pairs = pairwise_table(_comparison())
    assert list(pairs.columns) == list(PAIRWISE_COLUMNS) and len(pairs) == 3
    uncertainty = Uncertainty(Bootstrap(resamples=1000, confidence=0.95), Significance(resamples=10000), pairs)
    markdown = comparison_markdown(table, "synthetic", uncertainty)
    lines = markdown.splitlines()
    header = next(line for line in lines if line.startswith("| model |"))
    assert "| rSum | group | i2t medR |" in header
    row_a = next(line for line in lines if line.startswith("| a |"))
    rsum_a = _recalls("test", 30.0)["test/rsum"]
    assert f"| **{rsum_a:.1f}** [{rsum_a - 2.5:.1f}, {rsum_a + 2.5:.1f}] | a |" in row_a  # best in bold, then bounds
    assert "| **40.0** [37.5, 42.5] |" in row_a  # i2t R@10 of the best model
    row_c = next(line for line in lines if line.startswith("| c |"))
    assert "| 11.0 [8.5, 13.5] |" in row_c and row_c.count("[") == 7  # six recalls and rSum

    table_end = max(index for index, line in enumerate(lines) if line.startswith("| "))
    listed = [line for line in lines if line.startswith("- ")]
    assert lines.index(listed[0]) > table_end  # the pairs stand under the table, not in it
    assert listed == [
        "- a − b: +100.0 [90.0, 110.0], p < 0.001 *",
        "- a − c: +101.0 [91.0, 111.0], p < 0.001 *",
        "- b − c: +1.0 [-4.5, 6.2], p = 0.700",
    ]
    assert "Pairwise rSum differences in `test` (95 % interval of the difference; p Holm-adjusted over 3 pairs;" in (
        markdown
    )
    note = next(line for line in lines if line.startswith("Brackets: "))
    assert "95 % percentile bootstrap" in note and "1,000 resamples" in note and "10,000 resamples" in note
    assert "Holm-adjusted over all pairs of the protocol" in note and "α = 0.05" in note
    assert "not their spread over training seeds" in note
    assert "can reach α" not in markdown

    too_few = Uncertainty(uncertainty.intervals, Significance(resamples=100), pairs)
    assert "raise compare.significance.resamples to at least 119." in comparison_markdown(table, None, too_few)


def test_published_rows_have_no_interval_and_no_group(tmp_path: Path) -> None:
    from itm.published import read_published
    from itm.report import with_published

    entries = [Entry("a", "single", "scan", _with_intervals(_recalls("test", 50.0), 1.0), 1, None,
                     key="scan_t2i_avg")]  # fmt: skip
    comparison = {"test": PairwiseComparison(("a",), {"a": 362.0}, (), {"a": "a"})}
    table = with_groups(comparison_table(entries), comparison)
    report = with_published(table, entries, read_published(), "flickr30k")
    assert report["type"].tolist() == ["single", "published"]
    published = report.iloc[1]
    assert pd.isna(published["group"]) and all(math.isnan(published[column]) for column in INTERVAL_COLUMNS)
    markdown = comparison_markdown(report, "flickr30k", Uncertainty(Bootstrap(), Significance(), pairwise_table({})))
    published_line = next(line for line in markdown.splitlines() if line.startswith("| ↳ "))
    assert "[" not in published_line.split("|", 2)[2] and "| 446.2 | – |" in published_line
    report.to_parquet(tmp_path / "comparison.parquet", index=False)
    assert {*INTERVAL_COLUMNS, "group"} <= set(pd.read_parquet(tmp_path / "comparison.parquet").columns)


def test_a_table_without_intervals_reads_as_before() -> None:
    entries = [Entry("a", "single", "vsepp", _recalls("test", 10.0), 1, None)]
    markdown = comparison_markdown(comparison_table(entries))
    assert "[" not in markdown and "group" not in markdown and "Brackets" not in markdown


def test_timing_lists_the_recorded_times_and_a_dash_where_there_is_no_record() -> None:
    timings = [Timing("a", 0, train_seconds=90.0, seconds_per_query=0.002, encode_seconds=3.5), Timing("b", 1)]
    environment = {"cpu": "Some CPU", "threads": 2, "cpu_capability": "AVX2", "gpus": [], "torch": "2.5.1"}
    lines = timing_markdown(timings, environment).splitlines()
    assert lines[0] == "# Times of the runs behind the comparison"
    assert any(line.startswith("Measured on Some CPU (2 threads, CPU kernels AVX2), no GPU, torch 2.5.1.")
               for line in lines)  # fmt: skip
    assert "| model | seed | training min | ms / query | encoding s |" in lines
    assert "| a | 0 | 1.5 | 2.0 | 3.5 |" in lines  # minutes, milliseconds, seconds
    assert "| b | 1 | – | – | – |" in lines  # no record of the run that made b's outputs
    assert "Measured on" not in timing_markdown(timings, None)
