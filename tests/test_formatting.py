"""Figures in log lines (itm/formatting.py)."""

from __future__ import annotations

from itm.formatting import format_figures, format_value


def test_floats_to_four_significant_digits_counts_whole() -> None:
    figures = {"coverage": 0.9557317476048893, "captions": 5000, "pairs": 145000, "unknown": 0.0, "flag": True}
    assert format_figures(figures) == "coverage 0.9557, captions 5000, pairs 145 000, unknown 0, flag True"


def test_large_and_small_floats_stay_readable() -> None:
    assert [format_value(v) for v in (1234.5678, 1.0e-7, float("nan"), "fp32")] == ["1235", "1e-07", "nan", "fp32"]
