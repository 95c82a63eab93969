"""The comparison of every matcher and ensemble: one row per (protocol, model), the best value per column marked.

Rows come from `metrics/<name>.json` (what `evaluate@` and `ensemble@` write) and, for single models,
`models/<name>/card.json` and `model.pt` (kind, parameter count, training time when the card records it). An
ensemble's parameter count is the sum of its members'. A dataset with several protocols (COCO: `test_5fold1k`,
`test_5k`) gets one block of rows per protocol.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from itm.errors import UserError
from itm.models.saved import CARD_FILE, load_matcher

RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
HIGHER_IS_BETTER = (*RECALLS, "rsum")
LOWER_IS_BETTER = ("i2t_medr", "t2i_medr", "ms_per_query")
HEADERS = {
    "name": "model", "type": "type", "kind": "kind",
    "i2t_r1": "i2t R@1", "i2t_r5": "i2t R@5", "i2t_r10": "i2t R@10",
    "t2i_r1": "t2i R@1", "t2i_r5": "t2i R@5", "t2i_r10": "t2i R@10", "rsum": "rSum",
    "i2t_medr": "i2t medR", "t2i_medr": "t2i medR", "parameters": "parameters",
    "train_minutes": "training min", "ms_per_query": "ms / query",
}  # fmt: skip


@dataclass(frozen=True)
class Entry:
    """One evaluated model: a single matcher or an ensemble of them."""

    name: str
    type: str  # "single" or "ensemble"
    kind: str  # the matcher kind, or "ensemble"
    metrics: Mapping[str, float]
    parameters: int | None
    train_seconds: float | None
    members: tuple[str, ...] = ()  # an ensemble's matchers


def read_metrics(path: Path) -> dict[str, float]:
    if not path.is_file():
        raise UserError(f"{path}: not found (run the evaluate stage of that model first)")
    return json.loads(path.read_text())


def parameter_count(model_dir: Path) -> int:
    """Trainable parameters of a saved matcher (shared modules counted once)."""
    matcher, _ = load_matcher(model_dir, torch.device("cpu"))
    return sum(parameter.numel() for parameter in matcher.parameters())


def read_entries(
    metrics_dir: Path, models_dir: Path, matchers: Sequence[str], ensembles: Mapping[str, Sequence[str]]
) -> list[Entry]:
    """Single matchers first (in `matchers` order), then ensembles."""
    entries, counts = [], {}
    for name in matchers:
        card_path = models_dir / name / CARD_FILE
        if not card_path.is_file():
            raise UserError(f"{card_path}: not found (run train@{name} first)")
        card = json.loads(card_path.read_text())
        counts[name] = parameter_count(models_dir / name)
        entries.append(Entry(name, "single", card["kind"], read_metrics(metrics_dir / f"{name}.json"),
                             counts[name], card.get("train_seconds")))  # fmt: skip
    for name, members in ensembles.items():
        total = sum(counts[member] for member in members) if all(m in counts for m in members) else None
        metrics = read_metrics(metrics_dir / f"{name}.json")
        entries.append(Entry(name, "ensemble", "ensemble", metrics, total, None, tuple(members)))
    return entries


def protocols(metrics: Mapping[str, float]) -> list[str]:
    """The protocol prefixes of a metrics file (`test`, or `test_5fold1k` and `test_5k`), in file order."""
    return [key.removesuffix("/rsum") for key in metrics if key.endswith("/rsum")]


def comparison_table(entries: Sequence[Entry]) -> pd.DataFrame:
    """One row per (protocol, entry), protocol-major: recalls, rSum, median ranks, parameters, training time,
    retrieval time."""
    order = list(dict.fromkeys(protocol for entry in entries for protocol in protocols(entry.metrics)))
    rows = [_row(protocol, entry) for protocol in order for entry in entries if protocol in protocols(entry.metrics)]
    return pd.DataFrame(rows)


def _row(protocol: str, entry: Entry) -> dict[str, object]:
    row: dict[str, object] = {"protocol": protocol, "name": entry.name, "type": entry.type, "kind": entry.kind}
    for column in (*HIGHER_IS_BETTER, "i2t_medr", "t2i_medr"):
        row[column] = entry.metrics.get(f"{protocol}/{column}", math.nan)
    seconds_per_query = entry.metrics.get("test/seconds_per_query")
    row["parameters"] = entry.parameters
    row["train_minutes"] = math.nan if entry.train_seconds is None else entry.train_seconds / 60
    row["ms_per_query"] = math.nan if seconds_per_query is None else 1000 * seconds_per_query
    return row


def best_values(table: pd.DataFrame) -> dict[tuple[str, str], float]:
    """(protocol, column) → the best value of that column within the protocol's rows."""
    best = {}
    for protocol, rows in table.groupby("protocol", sort=False):
        for column in HIGHER_IS_BETTER:
            best[(protocol, column)] = rows[column].max()
        for column in LOWER_IS_BETTER:
            best[(protocol, column)] = rows[column].min()
    return best


def comparison_markdown(table: pd.DataFrame) -> str:
    """A Markdown table per protocol, single models then ensembles; the best value of each column in bold."""
    best = best_values(table)
    columns = [c for c in HEADERS if c in table.columns]
    blocks = []
    for protocol, rows in table.groupby("protocol", sort=False):
        lines = [f"### {protocol}", "", "| " + " | ".join(HEADERS[c] for c in columns) + " |",
                 "|" + "|".join("---" if c in ("name", "type", "kind") else "---:" for c in columns) + "|"]  # fmt: skip
        for _, row in rows.iterrows():
            cells = [_cell(row[column], best.get((protocol, column))) for column in columns]
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    legend = "Bold: the best value of the column within the protocol (highest recall and rSum, lowest rank and time)."
    return "\n\n".join([*blocks, legend]) + "\n"


def _cell(value: object, best: float | None) -> str:
    if isinstance(value, str):
        return value
    if not _known(value):
        return "–"
    text = _number(value)
    is_best = _known(best) and text == _number(best)
    return f"**{text}**" if is_best else text


def _number(value: object) -> str:
    """Counts with thousands separators; other numbers with one decimal, or three below 1 (times in ms)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    number = float(value)  # type: ignore[arg-type]
    return f"{number:.1f}" if abs(number) >= 1 or number == 0 else f"{number:.3f}"


def comparison_metrics(table: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """The table as nested metrics {protocol: {model: {column: value}}} for a DVC metrics file (unknown values left
    out), so `dvc metrics diff` compares every model between experiments."""
    numeric = [column for column in HEADERS if column in table.columns and column not in ("name", "type", "kind")]
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for _, row in table.iterrows():
        values = {column: float(row[column]) for column in numeric if _known(row[column])}
        metrics.setdefault(str(row["protocol"]), {})[str(row["name"])] = values
    return metrics


def rsum_points(table: pd.DataFrame) -> list[dict[str, object]]:
    """One point per (model, protocol) for a DVC bar plot of rSum; the protocol joins the label when there are
    several (COCO)."""
    several = table["protocol"].nunique() > 1
    return [
        {"model": f"{row['name']} ({row['protocol']})" if several else row["name"], "type": row["type"],
         "rsum": float(row["rsum"])}
        for _, row in table.iterrows()
    ]  # fmt: skip


def read_histories(models_dir: Path, matchers: Sequence[str]) -> dict[str, list[dict[str, float]]]:
    """Each matcher's per-epoch metrics from its model card (matchers whose card has no history are left out)."""
    histories = {}
    for name in matchers:
        card = json.loads((models_dir / name / CARD_FILE).read_text())
        if card.get("history"):
            histories[name] = card["history"]
    return histories


def _known(value: object) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def recall_bars(table: pd.DataFrame, path: Path, protocol: str | None = None) -> None:
    """Grouped bars of R@1, R@5, R@10 per model, one panel per direction, for one protocol (default: the first);
    ensembles hatched; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocol = protocol or str(table["protocol"].iloc[0])
    rows = table[table["protocol"] == protocol]
    if rows.empty:
        raise ValueError(f"no rows for protocol {protocol!r}; the table has {sorted(set(table['protocol']))}")
    names = list(rows["name"])
    width = 0.8 / 3
    figure, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.1 * len(names) + 3), 4.2), sharey=True)
    for axis, (side, title) in zip(axes, (("i2t", "image → text"), ("t2i", "text → image")), strict=True):
        for offset, k in enumerate((1, 5, 10)):
            positions = [i + (offset - 1) * width for i in range(len(names))]
            bars = axis.bar(positions, rows[f"{side}_r{k}"], width, label=f"R@{k}")
            for bar, kind in zip(bars, rows["type"], strict=True):
                if kind == "ensemble":
                    bar.set_hatch("//")  # ensembles are told apart from single models
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
        axis.set_title(f"{title} ({protocol})")
        axis.set_ylim(0, 100)
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("recall (%)")
    axes[1].legend(loc="upper left")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def training_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], path: Path) -> None:
    """Training loss (left, log scale: the matchers' losses differ in scale) and validation rSum (right) per epoch,
    one line per matcher, from the model cards' `history`; written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not histories:
        raise ValueError("no training histories to plot")
    figure, (loss_axis, rsum_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, history in histories.items():
        epochs = range(1, len(history) + 1)
        loss_axis.plot(epochs, [epoch["train/loss"] for epoch in history], marker="o", markersize=3, label=name)
        rsum_axis.plot(epochs, [epoch["val/rsum"] for epoch in history], marker="o", markersize=3, label=name)
    loss_axis.set(xlabel="epoch", ylabel="training loss (epoch mean)", yscale="log", title="training loss")
    rsum_axis.set(xlabel="epoch", ylabel="validation rSum", title="validation rSum")
    for axis in (loss_axis, rsum_axis):
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
    rsum_axis.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
