"""`itm experiments`: one figure of every model across DVC's experiments, a row per model and a column per
experiment, narrow enough for a terminal.

`dvc exp show` puts each model's figure in its own column (`test.<model>.rsum` of reports/comparison.json), so ten
models make a table about 200 characters wide whatever `--keep` selects. This reads the same rows (`dvc.api.exp_show`,
the workspace, the commit and its experiments) and turns the table: models down, experiments across.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

MISSING = "–"
BASELINE_TYPES = ("baseline", "branch_base", "branch_commit")


def figure_columns(row: Mapping[str, Any], protocol: str, figure: str) -> dict[str, float]:
    """model -> value of every `<protocol>.<model>.<figure>` key of one `exp_show` row (the nested keys of
    reports/comparison.json; DVC prefixes a key with its file only when two files share it)."""
    found = {}
    for key, value in row.items():
        name = key.rsplit(":", 1)[-1]
        parts = name.split(".")
        if len(parts) == 3 and parts[0] == protocol and parts[2] == figure and _is_number(value):
            found[parts[1]] = float(value)
    return found


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def column_label(row: Mapping[str, Any]) -> str:
    """The experiment's name, `workspace`, or the short commit of a baseline row."""
    name = str(row.get("Experiment") or "").strip()
    if name:
        return name
    rev = str(row.get("rev") or "")
    return rev[:7] if row.get("typ") in BASELINE_TYPES and rev != "workspace" else rev


def transposed_table(rows: Sequence[Mapping[str, Any]], protocol: str = "test", figure: str = "rsum") -> str:
    """A plain-text table: one line per model (in the order first met), one column per row of `rows` that has the
    figure for at least one model; `–` where an experiment lacks a model. An empty string when no row has it."""
    columns: list[tuple[str, dict[str, float]]] = []
    models: list[str] = []
    for row in rows:
        values = figure_columns(row, protocol, figure)
        if not values:
            continue
        columns.append((column_label(row), values))
        models += [model for model in values if model not in models]
    if not columns:
        return ""
    header = [f"{protocol} {figure}", *(label for label, _ in columns)]
    body = [[model, *(_cell(values.get(model)) for _, values in columns)] for model in models]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [_line(header, widths), _line(["-" * width for width in widths], widths)]
    lines += [_line(line, widths) for line in body]
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return MISSING if value is None else f"{value:.1f}"


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    padded = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
    return "  ".join([cells[0].ljust(widths[0]), *padded])


def experiment_rows(commits: int = 1) -> list[dict[str, Any]]:
    """`dvc exp show`'s rows for the repository in the working directory: the workspace, and the last `commits`
    commits (first parents, from HEAD; all of them when negative) with their experiments."""
    import dvc.api  # only this command needs DVC's Python side

    return list(dvc.api.exp_show(num=commits))
