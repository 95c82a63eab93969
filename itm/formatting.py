"""Figures as a log line reads them: `name value` pairs, floats to four significant digits, integers whole."""

from __future__ import annotations

from collections.abc import Mapping


def format_value(value: object) -> str:
    """An integer (or a whole float count) as it is, another float to 4 significant digits, anything else as str."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}".replace(",", " ") if abs(value) >= 10_000 else str(value)
    return f"{value:.4g}"


def format_figures(figures: Mapping[str, object]) -> str:
    """`a 0.9557, b 5000, c 0` for {"a": 0.95573..., "b": 5000, "c": 0.0}."""
    return ", ".join(f"{key} {format_value(value)}" for key, value in figures.items())
