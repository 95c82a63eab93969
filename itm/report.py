"""The comparison of every matcher and ensemble: one row per (protocol, model), the best value per column marked.

Rows come from `metrics/<name>/seed<seed>.json` (what `evaluate@` and `ensemble@` write) and, for single models,
`models/<name>/seed<seed>/card.json` and `model.pt` (kind, parameter count, how training ended: epochs run and
whether it stopped on the validation plateau or at the epoch cap). A row shows the first seed of `train.seeds`; with
several seeds it adds the mean and standard deviation of rSum over them (`rsum_seeds_mean`, `rsum_seeds_std`,
`seeds`). An ensemble's parameter count is the sum of its members'. A dataset with several protocols (COCO:
`test_5fold1k`, `test_5k`) gets one block of rows per protocol. Wall-clock times are not in the table (they differ
on every run): `timing_markdown` lists them apart.

On Flickr30K and COCO, `with_published` adds under each of our rows the figures published for the same kind of model
on the same protocol (`itm/published.csv`, type `published`), with the rSum difference ours − published; they are
never the best value of a column. A model whose card names the released checkpoint it was converted from
(`weights`) is marked imported.

Uncertainty (itm/evaluate/statistics.py): every R@K and rSum of ours carries the bootstrap interval its metrics file
holds (`<figure>_ci_low`, `_ci_high` columns; `332.0 [325.1, 338.4]` in Markdown); `with_groups` adds the `group`
letters of the pairwise tests, and `comparison_markdown` lists every pair of a protocol under its table
(`pairwise_table`). Published rows have neither.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from itm.errors import UserError
from itm.evaluate.statistics import (
    Bootstrap,
    PairwiseComparison,
    Significance,
    ci_keys,
    resamples_needed,
    smallest_adjusted_p,
)
from itm.models.saved import CARD_FILE, load_matcher
from itm.published import Published, counterparts, ensemble_key, model_key
from itm.seeds import seed_path

RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
HIGHER_IS_BETTER = (*RECALLS, "rsum")
WITH_INTERVALS = HIGHER_IS_BETTER  # the columns whose metrics carry a bootstrap interval
INTERVAL_COLUMNS = tuple(bound for column in WITH_INTERVALS for bound in ci_keys(column))
LOWER_IS_BETTER = ("i2t_medr", "t2i_medr")
HEADERS = {
    "name": "model", "type": "type", "kind": "kind", "evaluation": "evaluation",
    "i2t_r1": "i2t R@1", "i2t_r5": "i2t R@5", "i2t_r10": "i2t R@10",
    "t2i_r1": "t2i R@1", "t2i_r5": "t2i R@5", "t2i_r10": "t2i R@10", "rsum": "rSum", "group": "group",
    "rsum_seeds": "rSum over seeds", "rsum_diff": "Δ rSum",
    "i2t_medr": "i2t medR", "t2i_medr": "t2i medR", "parameters": "parameters", "training": "epochs",
}  # fmt: skip
TEXT_COLUMNS = ("name", "type", "kind", "evaluation", "group", "rsum_seeds", "training")
# How a row's test figures were computed: the fair protocol (every query on its own), or with CVSE's transductive
# completion of concept labels from the other test captions (`evaluate.transductive_concepts`).
FAIR, TRANSDUCTIVE = "fair", "transductive (CVSE completion)"
# What a published row carries besides its figures: which of our rows it stands under, ours − published, and its
# provenance (the columns of itm/published.csv).
PUBLISHED_COLUMNS = ("published_for", "rsum_diff", "protocol_detail", "source", "checked", "read_in")
DATASET_NAMES = {"flickr30k": "Flickr30K", "coco": "MS-COCO", "synthetic": "the synthetic dataset"}
WEIGHTS_MARKS = {"imported": ", imported", "mixed": ", partly imported"}  # after the type in the Markdown table


@dataclass(frozen=True)
class Entry:
    """One evaluated model: a single matcher or an ensemble of them."""

    name: str
    type: str  # "single" or "ensemble"
    kind: str  # the matcher kind, or "ensemble"
    metrics: Mapping[str, float]  # those of the first seed
    parameters: int | None
    model_dir: Path | None = None  # a single model's folder (the first seed's)
    seed: int = 0  # the seed whose model and metrics the row shows
    training: Mapping[str, object] | None = None  # the card's `training`: epochs, best_epoch, stopped, pairs_seen
    seed_rsums: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # protocol -> rSum of every seed
    members: tuple[str, ...] = ()  # an ensemble's matchers
    key: str = ""  # the model key published figures match (itm.published.model_key, ensemble_key)
    weights: str = "trained"  # "imported" from a released checkpoint (the card's `weights`); an ensemble: "mixed"
    weights_source: str | None = None  # where an imported single model's checkpoint came from
    evaluation: str = FAIR  # FAIR, or TRANSDUCTIVE when the test labels used other test captions

    @staticmethod
    def evaluation_of(metrics: Mapping[str, float]) -> str:
        return TRANSDUCTIVE if metrics.get("test/transductive_concepts") == 1 else FAIR


def read_metrics(path: Path) -> dict[str, float]:
    if not path.is_file():
        raise UserError(f"{path}: not found (run the evaluate stage of that model first)")
    return json.loads(path.read_text())


def parameter_count(model_dir: Path) -> int:
    """Trainable parameters of a saved matcher (shared modules counted once)."""
    matcher, _ = load_matcher(model_dir, torch.device("cpu"))
    return sum(parameter.numel() for parameter in matcher.parameters())


def read_entries(
    metrics_dir: Path,
    models_dir: Path,
    matchers: Sequence[str],
    ensembles: Mapping[str, Sequence[str]],
    seeds: Sequence[int] = (0,),
) -> list[Entry]:
    """Single matchers first (in `matchers` order), then ensembles; each with the first seed's model and metrics
    and the rSum of every seed."""
    first = seeds[0]
    singles: dict[str, Entry] = {}
    for name in matchers:
        model_dir = seed_path(models_dir, name, first)
        card_path = model_dir / CARD_FILE
        if not card_path.is_file():
            raise UserError(f"{card_path}: not found (run train@{name}-{first} first)")
        card = json.loads(card_path.read_text())
        imported = card.get("weights")
        metrics = read_metrics(seed_path(metrics_dir, name, first, ".json"))
        singles[name] = Entry(
            name, "single", card["kind"], metrics, parameter_count(model_dir), model_dir, first, card.get("training"),
            seed_rsums=_seed_rsums(metrics_dir, name, seeds),
            key=model_key(card.get("params") or {"kind": card["kind"]}),
            weights="imported" if imported else "trained",
            weights_source=str(imported.get("source") or "unnamed source") if isinstance(imported, dict) else None,
            evaluation=Entry.evaluation_of(metrics),
        )  # fmt: skip
    entries = list(singles.values())
    for name, members in ensembles.items():
        known = [singles[member] for member in members if member in singles]
        complete = len(known) == len(members)
        total = sum(member.parameters or 0 for member in known) if complete else None
        imported = sum(member.weights == "imported" for member in known)
        weights = "trained" if not imported else "imported" if imported == len(members) else "mixed"
        metrics = read_metrics(seed_path(metrics_dir, name, first, ".json"))
        transductive = any(member.evaluation == TRANSDUCTIVE for member in known)
        entries.append(Entry(name, "ensemble", "ensemble", metrics, total, seed=first,
                             seed_rsums=_seed_rsums(metrics_dir, name, seeds), members=tuple(members),
                             key=ensemble_key(member.key for member in known) if complete else "",
                             weights=weights, evaluation=TRANSDUCTIVE if transductive else FAIR))  # fmt: skip
    return entries


def _seed_rsums(metrics_dir: Path, name: str, seeds: Sequence[int]) -> dict[str, tuple[float, ...]]:
    """protocol -> the rSum of each seed's metrics file, in `seeds` order."""
    per_seed = [read_metrics(seed_path(metrics_dir, name, seed, ".json")) for seed in seeds]
    return {protocol: tuple(metrics[f"{protocol}/rsum"] for metrics in per_seed) for protocol in protocols(per_seed[0])}


def protocols(metrics: Mapping[str, float]) -> list[str]:
    """The protocol prefixes of a metrics file (`test`, or `test_5fold1k` and `test_5k`), in file order."""
    return [key.removesuffix("/rsum") for key in metrics if key.endswith("/rsum")]


def comparison_table(entries: Sequence[Entry]) -> pd.DataFrame:
    """One row per (protocol, entry), protocol-major: recalls, rSum (with the spread over seeds), median ranks,
    parameters, how training ended."""
    order = list(dict.fromkeys(protocol for entry in entries for protocol in protocols(entry.metrics)))
    rows = [_row(protocol, entry) for protocol in order for entry in entries if protocol in protocols(entry.metrics)]
    return _typed(pd.DataFrame(rows))


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    """Parameter counts stay integers where some are unknown (an ensemble of missing members, a published row)."""
    return table.astype({"parameters": "Int64"}) if "parameters" in table.columns else table


def _row(protocol: str, entry: Entry) -> dict[str, object]:
    row: dict[str, object] = {"protocol": protocol, "name": entry.name, "type": entry.type, "kind": entry.kind,
                              "weights": entry.weights, "weights_source": entry.weights_source,
                              "evaluation": entry.evaluation}  # fmt: skip
    for column in (*HIGHER_IS_BETTER, "i2t_medr", "t2i_medr"):
        row[column] = entry.metrics.get(f"{protocol}/{column}", math.nan)
        if column in WITH_INTERVALS:  # each bound right after its figure; NaN for a metrics file without intervals
            row |= {bound: entry.metrics.get(f"{protocol}/{bound}", math.nan) for bound in ci_keys(column)}
    rsums = entry.seed_rsums.get(protocol, ())
    row["seeds"] = len(rsums)
    row["rsum_seeds_mean"] = statistics.fmean(rsums) if rsums else math.nan
    row["rsum_seeds_std"] = statistics.stdev(rsums) if len(rsums) > 1 else math.nan  # sample standard deviation
    row["rsum_seeds"] = _over_seeds(rsums)
    row["parameters"] = entry.parameters
    row["training"] = _training(entry.training)
    return row


def _over_seeds(rsums: Sequence[float]) -> str | None:
    """`331.2 ± 4.1 (3 seeds)`: mean ± sample standard deviation; None for a single seed."""
    if len(rsums) < 2:
        return None
    return f"{statistics.fmean(rsums):.1f} ± {statistics.stdev(rsums):.1f} ({len(rsums)} seeds)"


def _training(training: Mapping[str, object] | None) -> str | None:
    """`7, plateau` or `12, cap`: the epochs a model trained and why it stopped; None when it was not trained here."""
    if not training:
        return None
    return f"{training['epochs']}, {training['stopped']}"


def with_groups(table: pd.DataFrame, comparisons: Mapping[str, PairwiseComparison]) -> pd.DataFrame:
    """`table` with a `group` column after rSum: each model's letters within its protocol (`compare_models`); models
    sharing a letter have rSums the pairwise tests cannot tell apart. None where a protocol was not tested."""
    groups = [comparisons[str(protocol)].groups.get(str(name)) if str(protocol) in comparisons else None
              for protocol, name in zip(table["protocol"], table["name"], strict=True)]  # fmt: skip
    after = [column for column in (ci_keys("rsum")[1], "rsum") if column in table.columns]
    position = table.columns.get_loc(after[0]) + 1 if after else len(table.columns)
    grouped = table.drop(columns="group") if "group" in table.columns else table.copy()
    grouped.insert(min(position, len(grouped.columns)), "group", groups)
    return grouped


PAIRWISE_COLUMNS = ("protocol", "better", "worse", "rsum_better", "rsum_worse", "rsum_diff", "ci_low", "ci_high",
                    "p_value", "p_adjusted", "significant")  # fmt: skip


def pairwise_table(comparisons: Mapping[str, PairwiseComparison]) -> pd.DataFrame:
    """One row per pair of models of each protocol: `better` has the higher rSum, `rsum_diff` = better - worse with
    its interval (`ci_low`, `ci_high`), the p-value before (`p_value`) and after (`p_adjusted`) the correction over
    the protocol's pairs, and whether it is `significant`."""
    rows = [
        {"protocol": protocol, "better": pair.better, "worse": pair.worse, "rsum_better": result.rsum[pair.better],
         "rsum_worse": result.rsum[pair.worse], "rsum_diff": pair.test.difference, "ci_low": pair.test.ci_low,
         "ci_high": pair.test.ci_high, "p_value": pair.test.p_value, "p_adjusted": pair.p_adjusted,
         "significant": pair.significant}
        for protocol, result in comparisons.items()
        for pair in result.pairs
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=list(PAIRWISE_COLUMNS))


@dataclass(frozen=True)
class Uncertainty:
    """What the Markdown report says of its intervals and pairwise tests: their settings, and the pairs."""

    intervals: Bootstrap  # those of the metrics files (evaluate.bootstrap)
    significance: Significance  # compare.significance
    pairs: pd.DataFrame  # pairwise_table


def with_published(
    table: pd.DataFrame, entries: Sequence[Entry], figures: Sequence[Published], dataset_kind: str
) -> pd.DataFrame:
    """`table` with, under each of our rows, the published figures of the same kind of model on the same dataset
    and protocol (type `published`, named as their source names them), and the columns of PUBLISHED_COLUMNS:
    `published_for` names our row, `rsum_diff` is our rSum minus the published one. No figures on synthetic data."""
    keys = {entry.name: entry.key for entry in entries}
    rows: list[dict[str, object]] = []
    for _, ours in table.iterrows():
        rows.append(ours.to_dict() | dict.fromkeys(PUBLISHED_COLUMNS))
        for figure in counterparts(figures, dataset_kind, str(ours["protocol"]), keys.get(str(ours["name"]), "")):
            row: dict[str, object] = {"protocol": ours["protocol"], "name": figure.model, "type": "published",
                                      "kind": ours["kind"], "weights": None, "weights_source": None,
                                      "evaluation": "as published"}  # fmt: skip
            row |= dict(figure.recalls) | {"rsum": figure.rsum, "published_for": ours["name"],
                                           "rsum_diff": float(ours["rsum"]) - figure.rsum}  # fmt: skip
            row |= {column: getattr(figure, column) for column in ("protocol_detail", "source", "checked", "read_in")}
            rows.append(row)
    columns = [*table.columns, *(column for column in PUBLISHED_COLUMNS if column not in table.columns)]
    return _typed(pd.DataFrame(rows, columns=columns))


def _ours(table: pd.DataFrame) -> pd.DataFrame:
    """Our rows only (no published ones)."""
    return table[table["type"] != "published"] if "type" in table.columns else table


def best_values(table: pd.DataFrame) -> dict[tuple[str, str], float]:
    """(protocol, column) → the best value of that column within the protocol's rows of our own models."""
    best = {}
    for protocol, rows in _ours(table).groupby("protocol", sort=False):
        for column in HIGHER_IS_BETTER:
            best[(protocol, column)] = rows[column].max()
        for column in LOWER_IS_BETTER:
            best[(protocol, column)] = rows[column].min()
    return best


def comparison_markdown(
    table: pd.DataFrame, dataset_kind: str | None = None, uncertainty: Uncertainty | None = None
) -> str:
    """A Markdown table per protocol, single models then ensembles; the best value of each column in bold, each
    R@K and rSum of ours followed by its interval when the metrics hold one.

    Published rows (`with_published`) stand under our row they correspond to, with a numbered note on where the
    figure comes from; given `dataset_kind`, a line also says when there are no published figures to show. Given
    `uncertainty`, each table is followed by the list of its pairwise tests, and a paragraph says how the intervals
    and tests were made and what they measure.
    """
    best = best_values(table)
    published = table[table["type"] == "published"] if "type" in table.columns else table.iloc[:0]
    optional = {
        "rsum_diff": not published.empty,  # shown when there are published rows, or several seeds
        "rsum_seeds": "rsum_seeds" in table.columns and bool(_ours(table)["rsum_seeds"].map(_known).any()),
    }
    columns = [c for c in HEADERS if c in table.columns and optional.get(c, True)]
    notes: dict[tuple[str, str], int] = {}  # (published model, protocol) -> its note's number
    blocks = []
    for protocol, rows in table.groupby("protocol", sort=False):
        lines = [f"### {protocol}", "", "| " + " | ".join(HEADERS[c] for c in columns) + " |",
                 "|" + "|".join("---" if c in TEXT_COLUMNS else "---:" for c in columns) + "|"]  # fmt: skip
        for _, row in rows.iterrows():
            if row["type"] == "published":
                number = notes.setdefault((str(row["name"]), str(protocol)), len(notes) + 1)
                cells = [_published_cell(row, column, number) for column in columns]
            else:
                cells = [_with_interval(row, column, best.get((protocol, column))) for column in columns]
                if "type" in columns:
                    cells[columns.index("type")] += WEIGHTS_MARKS.get(str(row.get("weights")), "")
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
        if uncertainty is not None:
            blocks += _pairwise_lines(uncertainty, str(protocol))
    legend = "Bold: the best value of the column within the protocol (highest recall and rSum, lowest rank)."
    legend += (" Epochs: those trained, and whether training stopped on the validation plateau or at the epoch cap "
               "(cap: it may not have converged).")  # fmt: skip
    if not published.empty:
        legend += " Published rows are never bold; Δ rSum is ours − published."
    statistics = _uncertainty_notes(table, uncertainty)
    return "\n\n".join([*blocks, *_notes(table, published, notes, dataset_kind), legend, *statistics]) + "\n"


def _with_interval(row: pd.Series, column: str, best: float | None) -> str:
    """A cell of our row: the value (bold when best), then `[low, high]` when the column has a known interval."""
    text = _cell(row[column], best)
    low, high = (row.get(bound) for bound in ci_keys(column))
    if column in WITH_INTERVALS and _known(low) and _known(high):
        text += f" [{_number(low)}, {_number(high)}]"
    return text


def _pairwise_lines(uncertainty: Uncertainty, protocol: str) -> list[str]:
    """The pairs of one protocol, best rSum first: `a − b: +12.4 [4.1, 20.7], p = 0.004 *`."""
    pairs = uncertainty.pairs[uncertainty.pairs["protocol"] == protocol]
    if pairs.empty:
        return []
    settings = uncertainty.significance
    adjusted = ("not adjusted" if settings.correction == "none"
                else f"{CORRECTION_NAMES[settings.correction]}-adjusted over {len(pairs)} pairs")  # fmt: skip
    lines = [f"Pairwise rSum differences in `{protocol}` ({_percent(1 - settings.alpha)} interval of the difference; "
             f"p {adjusted}; * significant at α = {settings.alpha:g}):", ""]  # fmt: skip
    for _, pair in pairs.iterrows():
        interval = f"[{pair['ci_low']:.1f}, {pair['ci_high']:.1f}]"
        mark = " *" if pair["significant"] else ""
        lines.append(f"- {pair['better']} − {pair['worse']}: {pair['rsum_diff']:+.1f} {interval}, "
                     f"p {_p_value(pair['p_adjusted'])}{mark}")  # fmt: skip
    return ["\n".join(lines)]


CORRECTION_NAMES = {"holm": "Holm", "bonferroni": "Bonferroni"}


def _p_value(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g} %"


def _uncertainty_notes(table: pd.DataFrame, uncertainty: Uncertainty | None) -> list[str]:
    """The paragraph under the tables on the intervals and pairwise tests: how they were made, what they measure."""
    if uncertainty is None:
        return []
    intervals, tests = uncertainty.intervals, uncertainty.significance
    correction = (f"{CORRECTION_NAMES[tests.correction]}-adjusted over all pairs of the protocol"
                  if tests.correction != "none" else "not adjusted for the number of pairs")  # fmt: skip
    text = (
        f"Brackets: {_percent(intervals.confidence)} percentile bootstrap intervals over the test queries "
        f"({intervals.resamples:,} resamples of the image queries and of the caption queries, within each fold where "
        "a protocol has several); they measure how the figures of these trained models would move on another test set "
        "of the same size, not their spread over training seeds or region detectors. Groups and pairs: paired "
        f"bootstrap test of each rSum difference ({tests.resamples:,} resamples of the same queries for both models, "
        f"seed {tests.seed}; two-sided p = 2 (1 + min(#d* ≤ 0, #d* ≥ 0)) / (B + 1)), {correction}, significant at "
        f"α = {tests.alpha:g}; models that share a group letter cannot be told apart."
    )
    paragraphs = [text]
    for protocol, pairs in uncertainty.pairs.groupby("protocol", sort=False):
        if smallest_adjusted_p(len(pairs), tests) > tests.alpha:
            paragraphs.append(
                f"With {tests.resamples:,} resamples no pair of the {len(pairs)} of `{protocol}` can reach α after "
                f"the correction: raise compare.significance.resamples to at least "
                f"{resamples_needed(len(pairs), tests):,}."
            )
    return paragraphs


def _published_cell(row: pd.Series, column: str, number: int) -> str:
    if column == "name":
        return f"↳ {row['name']} [{number}]"
    if column == "rsum_diff":
        return f"{row[column]:+.1f}"
    return _cell(row[column], None)


def _notes(
    table: pd.DataFrame, published: pd.DataFrame, numbers: Mapping[tuple[str, str], int], dataset_kind: str | None
) -> list[str]:
    """The paragraphs under the tables: imported checkpoints, and the published figures' sources (or their absence)."""
    paragraphs = []
    if "weights_source" in table.columns:
        ours = _ours(table)
        sources = dict(zip(ours["name"], ours["weights_source"], strict=True))
        imported = [f"{name} from {source}" for name, source in sources.items() if _known(source)]
        if imported:
            paragraphs.append("Imported (weights converted from a released checkpoint, not trained here; an ensemble "
                              f"of imported members is marked too): {'; '.join(imported)}.")  # fmt: skip
    if dataset_kind is not None and published.empty:
        name = DATASET_NAMES.get(dataset_kind, dataset_kind)
        if dataset_kind in ("flickr30k", "coco"):
            paragraphs.append(f"None of these models has published figures on {name} in itm/published.csv.")
        else:
            paragraphs.append(f"There are no published figures for {name}: every row is one of our models.")
    if not published.empty:
        lines = ["Published figures (type `published`, under our model of the same kind):", ""]
        seen = set()
        for _, row in published.iterrows():
            identity = (str(row["name"]), str(row["protocol"]))
            if identity in seen:
                continue
            seen.add(identity)
            lines.append(f"{numbers[identity]}. {row['name']}, `{row['protocol']}`: {row['source']}; "
                         f"{_checked(row)}. Protocol: {row['protocol_detail']}.")  # fmt: skip
        paragraphs.append("\n".join(lines))
    return paragraphs


def _checked(row: pd.Series) -> str:
    if row["checked"] == "source":
        return f"read in the source ({row['read_in']})"
    if row["checked"] == "second_hand":
        return f"second-hand, read in {row['read_in']}"
    return f"unverified: {row['read_in']}"


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
    numeric = [column for column in HEADERS if column in table.columns and column not in (*TEXT_COLUMNS, "rsum_diff")]
    numeric = [bound for column in numeric for bound in (column, *ci_keys(column)) if bound in table.columns]
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for _, row in _ours(table).iterrows():
        values = {column: float(row[column]) for column in numeric if _known(row[column])}
        metrics.setdefault(str(row["protocol"]), {})[str(row["name"])] = values
    return metrics


def rsum_points(table: pd.DataFrame) -> list[dict[str, object]]:
    """One point per (model, protocol) for a DVC bar plot of rSum; the protocol joins the label when there are
    several (COCO)."""
    ours = _ours(table)
    several = ours["protocol"].nunique() > 1
    return [
        {"model": f"{row['name']} ({row['protocol']})" if several else row["name"], "type": row["type"],
         "rsum": float(row["rsum"])}
        for _, row in ours.iterrows()
    ]  # fmt: skip


def read_histories(model_dirs: Mapping[str, Path]) -> dict[str, list[dict[str, float]]]:
    """Each matcher's per-epoch metrics from its model card (name -> model folder; matchers whose card has no
    history are left out)."""
    histories = {}
    for name, model_dir in model_dirs.items():
        card = json.loads((model_dir / CARD_FILE).read_text())
        if card.get("history"):
            histories[name] = card["history"]
    return histories


def _known(value: object) -> bool:
    """Not None, NaN or pandas' NA."""
    return value is not None and value is not pd.NA and not (isinstance(value, float) and math.isnan(value))


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


@dataclass(frozen=True)
class Timing:
    """What the runs behind one model measured of themselves (itm/measurements.py); None where no record of the
    run that made the current output exists (e.g. DVC restored it from its run-cache)."""

    name: str
    seed: int
    train_seconds: float | None = None
    seconds_per_query: float | None = None  # test text-to-image scoring per query
    encode_seconds: float | None = None  # the test gallery's images and captions, once


def timing_markdown(timings: Sequence[Timing], environment: Mapping[str, object] | None) -> str:
    """`reports/timing.md`: training minutes and retrieval times per model, measured on the machine the table names.
    Apart from the comparison because times change on every run; the comparison itself does not."""
    lines = ["# Times of the runs behind the comparison", ""]
    if environment:
        gpus = ", ".join(map(str, environment.get("gpus") or [])) or "no GPU"  # type: ignore[call-overload]
        lines += [f"Measured on {environment.get('cpu')} ({environment.get('threads')} threads, CPU kernels "
                  f"{environment.get('cpu_capability')}), {gpus}, torch {environment.get('torch')}. Times move from "
                  "run to run and machine to machine; the comparison's figures do not depend on them.", ""]  # fmt: skip
    lines += ["| model | seed | training min | ms / query | encoding s |", "|---|---:|---:|---:|---:|"]
    for timing in timings:
        minutes = None if timing.train_seconds is None else timing.train_seconds / 60
        per_query = None if timing.seconds_per_query is None else 1000 * timing.seconds_per_query
        cells = [_cell(value, None) for value in (minutes, per_query, timing.encode_seconds)]
        lines.append(f"| {timing.name} | {timing.seed} | " + " | ".join(cells) + " |")
    lines += ["", "–: no record of the run that made the current output (e.g. DVC restored it from its run-cache)."]
    return "\n".join(lines) + "\n"
