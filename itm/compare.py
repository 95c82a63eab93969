"""The `compare` stage's work: one table of every matcher and ensemble, its figures, and one MLflow parent run.

Reads what the other stages wrote (`metrics/<name>.json`, `models/<name>/`, `data/scores/<name>.npz`) and writes:

- `comparison.md` and `comparison.parquet`: one row per (protocol, model), the best value per column marked; on
  Flickr30K and COCO, under each model, the figures published for its kind of model (`itm/published.csv`, type
  `published`) with the rSum difference, and models converted from released checkpoints marked imported;
- `comparison.json`: our models' metrics nested {protocol: {model: {column: value}}}, a DVC metrics file;
- `rsum.json`: one point per model of ours, a DVC bar plot;
- `figures/`: training curves, recall@K bars, and per model its retrieval examples, plus the word-region attention
  of a cross-attention matcher (SCAN, UARDA) or the per-view attention of a multi-view one (MVAM).

In MLflow the comparison is a parent run with the table and figures as artifacts and one child run per model that
carries the model's metrics and links (tags `itm.run.<stage>`, and links in its note) to the runs that trained and
evaluated it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from itm.atomic import staged_dir, staged_file, write_json, write_text
from itm.data.records import has_image_files
from itm.data.regions import RegionStore
from itm.evaluate.ensemble import ensemble_scores
from itm.evaluate.score_file import SplitScores
from itm.figures import attention_figure, missing_inputs, retrieval_figures, skipped_figure, views_figure
from itm.models.saved import CARD_FILE, load_matcher
from itm.pair_attention import is_cross_attention, is_multi_view
from itm.published import read_published
from itm.report import (
    Entry,
    comparison_markdown,
    comparison_metrics,
    comparison_table,
    read_entries,
    read_histories,
    recall_bars,
    rsum_points,
    training_curves,
    with_published,
)
from itm.tracking import Tracker

log = logging.getLogger(__name__)

MARKDOWN_FILE = "comparison.md"
TABLE_FILE = "comparison.parquet"
METRICS_FILE = "comparison.json"
RSUM_FILE = "rsum.json"
FIGURES_DIR = "figures"


@dataclass(frozen=True)
class Inputs:
    """Where the other stages' outputs are."""

    metrics_dir: Path  # metrics/
    models_dir: Path  # models/
    scores_dir: Path  # data/scores/
    regions_dir: Path  # data/regions/
    captions_dir: Path  # data/captions/
    dataset_dir: Path  # data/raw/<dataset>/


@dataclass(frozen=True)
class Examples:
    """Which test examples the figures show: the same for every model."""

    count: int = 3  # pairs per attention figure; queries per retrieval direction
    top: int = 5  # results per retrieval example
    seed: int = 0


def compare(
    inputs: Inputs,
    matchers: Sequence[str],
    ensembles: Mapping[str, Sequence[str]],
    out_dir: Path,
    *,
    dataset_kind: str,
    examples: Examples,
    tracker: Tracker,
) -> Path:
    """Write the comparison into `out_dir` (see the module docstring) and log it; returns the Markdown file.

    `dataset_kind` (synthetic, flickr30k, coco) picks the published figures shown beside ours. The figures are
    drawn into a staging folder first, so a failure leaves the previous report as it was.
    """
    published = read_published()  # checked on every run, so a broken data file fails here and not in a later run
    entries = read_entries(inputs.metrics_dir, inputs.models_dir, matchers, ensembles)
    table = comparison_table(entries)
    report = with_published(table, entries, published, dataset_kind)
    figures_dir = out_dir / FIGURES_DIR
    with staged_dir(figures_dir) as staging:
        drawn = draw_figures(inputs, entries, table, staging, examples)
    markdown = comparison_markdown(report, dataset_kind)
    write_text(out_dir / MARKDOWN_FILE, markdown)
    with staged_file(out_dir / TABLE_FILE) as tmp:
        report.to_parquet(tmp, index=False)
    write_json(out_dir / METRICS_FILE, comparison_metrics(table))
    write_json(out_dir / RSUM_FILE, rsum_points(table))
    log.info("comparison of %d models and %d figures in %s", len(entries), len(drawn), out_dir)
    log_comparison(tracker, inputs, entries, markdown, out_dir, [figures_dir / path.name for path in drawn])
    return out_dir / MARKDOWN_FILE


def draw_figures(
    inputs: Inputs, entries: Sequence[Entry], table: pd.DataFrame, folder: Path, examples: Examples
) -> list[Path]:
    """Every figure of the report, as PNG files in `folder`; returns their paths. A figure that needs what the
    pipeline does not have (the images, after a captions-only download for precomputed regions; the boxes, which
    precomputed regions lack) gets a note in its place saying so."""
    drawn = []
    histories = read_histories(inputs.models_dir, [entry.name for entry in entries if entry.type == "single"])
    if histories:
        drawn.append(folder / "training_curves.png")
        training_curves(histories, drawn[-1])
    for protocol in dict.fromkeys(table["protocol"]):
        drawn.append(folder / f"recall_bars_{protocol}.png")
        recall_bars(table, drawn[-1], protocol)
    boxes = regions_have_boxes(inputs.regions_dir)
    images = has_image_files(inputs.dataset_dir)
    missing = missing_inputs(inputs.dataset_dir, images=images, boxes=boxes)
    if missing is not None:
        needed = "the images" if not images else "region boxes"
        log.warning("figures that need %s are not drawn, a note stands in the place of each: %s", needed, missing)
    for entry in entries:
        drawn += _model_figures(inputs, entry, folder, examples, boxes=boxes, images=images)
    return drawn


def _model_figures(
    inputs: Inputs, entry: Entry, folder: Path, examples: Examples, *, boxes: bool, images: bool
) -> list[Path]:
    """A model's retrieval examples, and its attention figure when it has one (each needs the `images`, region
    attention the `boxes` too); a note in place of each that cannot be drawn."""
    drawn = []
    sources = (inputs.models_dir, inputs.regions_dir, inputs.captions_dir, inputs.dataset_dir)
    if entry.type == "single":
        matcher, _ = load_matcher(inputs.models_dir / entry.name, torch.device("cpu"))
        cross = is_cross_attention(matcher)
        if cross or is_multi_view(matcher):
            drawn.append(folder / f"{'attention' if cross else 'views'}_{entry.name}.png")
            needs_boxes = cross or matcher.pixels is None  # the views of a pixel matcher lie on its ViT patches
            missing = missing_inputs(inputs.dataset_dir, images=images, boxes=boxes or not needs_boxes)
            if missing is not None:
                skipped_figure(drawn[-1], missing)
            elif cross:
                attention_figure(sources[0] / entry.name, *sources[1:], drawn[-1], pairs=examples.count,
                                 seed=examples.seed)  # fmt: skip
            else:
                views_figure(sources[0] / entry.name, *sources[1:], drawn[-1], seed=examples.seed)
    t2i, i2t = folder / f"retrieval_t2i_{entry.name}.png", folder / f"retrieval_i2t_{entry.name}.png"
    missing = missing_inputs(inputs.dataset_dir, images=images, boxes=True)
    if missing is not None:
        skipped_figure(t2i, missing)
        skipped_figure(i2t, missing)
    else:
        scores = model_scores(inputs.scores_dir, entry)
        retrieval_figures(scores, inputs.captions_dir, inputs.dataset_dir, t2i, i2t, queries=examples.count,
                          top=examples.top, seed=examples.seed, title=entry.name)  # fmt: skip
    return [*drawn, t2i, i2t]


def regions_have_boxes(regions_dir: Path) -> bool:
    """Whether the test regions carry boxes to draw attention on (SCAN's precomputed features have none)."""
    return RegionStore(regions_dir / "test").info.get("source") != "precomp"


def model_scores(scores_dir: Path, entry: Entry) -> SplitScores:
    """A model's test similarity matrix: its own, or for an ensemble the mean of its members' (as ensemble@)."""
    if entry.type == "single":
        return SplitScores.load(scores_dir / f"{entry.name}.npz")
    return ensemble_scores([scores_dir / f"{member}.npz" for member in entry.members])


def linked_runs(inputs: Inputs, entry: Entry, tracker: Tracker) -> dict[str, str]:
    """stage → MLflow run id of the runs behind a model: `train@` (from its card) and `evaluate@` (saved with its
    scores) for a single matcher; for an ensemble its newest `ensemble@` run."""
    if entry.type == "ensemble":
        found = tracker.find_run(f"ensemble@{entry.name}")
        return {f"ensemble@{entry.name}": found} if found else {}
    runs = {}
    card = json.loads((inputs.models_dir / entry.name / CARD_FILE).read_text())
    if card.get("mlflow_run_id"):
        runs[f"train@{entry.name}"] = card["mlflow_run_id"]
    evaluated = SplitScores.load_run_id(inputs.scores_dir / f"{entry.name}.npz")
    if evaluated:
        runs[f"evaluate@{entry.name}"] = evaluated
    return runs


def log_comparison(
    tracker: Tracker,
    inputs: Inputs,
    entries: Sequence[Entry],
    markdown: str,
    out_dir: Path,
    figures: Sequence[Path],
) -> None:
    """The parent run: the table (also as its note) and figures; one child run per model with its metrics and
    links to the runs that produced it."""
    for name in (MARKDOWN_FILE, TABLE_FILE, METRICS_FILE):
        tracker.log_artifact(out_dir / name)
    for path in figures:
        tracker.log_artifact(path, FIGURES_DIR)
    tracker.set_tags({"mlflow.note.content": markdown})
    for entry in entries:
        runs = linked_runs(inputs, entry, tracker)
        tags = {"itm.model": entry.name, "itm.type": entry.type, "itm.kind": entry.kind, "itm.weights": entry.weights}
        if entry.weights_source:
            tags["itm.weights.source"] = entry.weights_source
        tags |= {f"itm.run.{stage}": run_id for stage, run_id in runs.items()}
        with tracker.child_run(entry.name, tags) as child:
            child.log_params({"kind": entry.kind, "type": entry.type, "parameters": entry.parameters,
                              "members": list(entry.members)})  # fmt: skip
            child.log_metrics(entry.metrics)
            if entry.train_seconds is not None:
                child.log_metrics({"train_seconds": entry.train_seconds})
            links = [f"- {stage}: [{run_id}]({tracker.run_link(run_id) or run_id})" for stage, run_id in runs.items()]
            child.set_tags({"mlflow.note.content": "\n".join([f"Runs behind {entry.name}:", *links])})
