"""The `compare` stage's work: one table of every matcher and ensemble, its figures, and one MLflow parent run.

Reads what the other stages wrote for every seed of `train.seeds` (`metrics/<name>/seed<seed>.json`,
`models/<name>/seed<seed>/`, `data/scores/<name>/seed<seed>.npz`; rows, tests and figures use the first seed, the
others add the spread of rSum over seeds) and writes:

- `comparison.md` and `comparison.parquet`: one row per (protocol, model), the best value per column marked, each
  R@K and rSum with its bootstrap interval and a `group` column of letters from the pairwise tests; on Flickr30K and
  COCO, under each model, the figures published for its kind of model (`itm/published.csv`, type `published`) with
  the rSum difference, and models converted from released checkpoints marked imported; in the Markdown, under each
  protocol's table, every pair of models with its rSum difference, interval and adjusted p-value;
- `comparison.json`: our models' metrics nested {protocol: {model: {column: value}}}, a DVC metrics file;
- `rsum.json`: one point per model of ours, a DVC bar plot;
- `recall_curves.json`: recall@K for K = 1..20 of every model of ours, both directions, one DVC chart of them all;
- `figures/`: training curves, recall@K bars, and per model its retrieval examples, plus the word-region attention
  of a cross-attention matcher (SCAN, UARDA) or the per-view attention of a multi-view one (MVAM);
- `timing.md`, not a DVC output: the training and retrieval times the runs recorded of themselves
  (`data/work/<stage>/<name>/seed<seed>/run.json`, itm/measurements.py), which change on every run.

The pairwise tests read the test similarity matrices (`data/scores/`; an ensemble's is the mean of its members') and
resample the same test queries for every model (itm/evaluate/statistics.py).

In MLflow the comparison is a parent run with the table, the pairwise tests (`pairwise.json`) and figures as
artifacts and one child run per model that carries the model's metrics, its times, its group letters and links
(tags `itm.run.<stage>`, and links in its note) to the runs that trained and evaluated it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from itm.atomic import staged_dir, staged_file, write_json, write_text
from itm.data.records import has_image_files
from itm.data.regions import RegionStore
from itm.errors import UserError
from itm.evaluate.ensemble import ensemble_scores
from itm.evaluate.metrics import recall_curve
from itm.evaluate.protocols import protocols_for
from itm.evaluate.score_file import SplitScores
from itm.evaluate.statistics import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_SIGNIFICANCE,
    Bootstrap,
    FoldRanks,
    PairwiseComparison,
    Significance,
    compare_models,
    protocol_ranks,
    resamples_needed,
    smallest_adjusted_p,
)
from itm.figures import attention_figure, missing_inputs, retrieval_figures, skipped_figure, views_figure
from itm.measurements import read_record
from itm.models.saved import CARD_FILE, MODEL_FILE, load_matcher
from itm.pair_attention import is_cross_attention, is_multi_view
from itm.published import read_published
from itm.report import (
    Entry,
    Timing,
    Uncertainty,
    comparison_markdown,
    comparison_metrics,
    comparison_table,
    pairwise_table,
    read_entries,
    read_histories,
    recall_bars,
    rsum_points,
    timing_markdown,
    training_curves,
    with_groups,
    with_published,
)
from itm.seeds import seed_path
from itm.tracking import Tracker

log = logging.getLogger(__name__)

MARKDOWN_FILE = "comparison.md"
TABLE_FILE = "comparison.parquet"
METRICS_FILE = "comparison.json"
RSUM_FILE = "rsum.json"
RECALL_CURVES_FILE = "recall_curves.json"
CURVE_DIRECTIONS = {"i2t": "image to text", "t2i": "text to image"}
PAIRWISE_FILE = "pairwise.json"  # MLflow artifact of the parent run: every pair's test, and the groups
FIGURES_DIR = "figures"
MODEL_FIGURES = ("retrieval_t2i", "retrieval_i2t", "attention", "views")  # <kind>_<model>.png, one model's figures
TIMING_FILE = "timing.md"  # measured times: beside the outputs, not one of them


@dataclass(frozen=True)
class Inputs:
    """Where the other stages' outputs are."""

    metrics_dir: Path  # metrics/
    models_dir: Path  # models/
    scores_dir: Path  # data/scores/
    regions_dir: Path  # data/regions/
    captions_dir: Path  # data/captions/
    dataset_dir: Path  # data/raw/<dataset>/
    work_dir: Path | None = None  # data/work/: the runs' records of their times and MLflow runs
    seeds: tuple[int, ...] = (0,)  # train.seeds; the first is the one shown


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
    intervals: Bootstrap = DEFAULT_BOOTSTRAP,
    significance: Significance = DEFAULT_SIGNIFICANCE,
) -> Path:
    """Write the comparison into `out_dir` (see the module docstring) and log it; returns the Markdown file.

    `dataset_kind` (synthetic, flickr30k, coco) picks the published figures shown beside ours and the protocols of
    the pairwise tests (`significance`); `intervals` are the settings the metrics files' intervals were made with
    (evaluate.bootstrap), which the report states. The figures are drawn into a staging folder first, so a failure
    leaves the previous report as it was.
    """
    published = read_published()  # checked on every run, so a broken data file fails here and not in a later run
    entries = read_entries(inputs.metrics_dir, inputs.models_dir, matchers, ensembles, inputs.seeds)
    comparisons = pairwise_comparisons(inputs.scores_dir, entries, dataset_kind, significance)
    table = with_groups(comparison_table(entries), comparisons)
    report = with_published(table, entries, published, dataset_kind)
    figures_dir = out_dir / FIGURES_DIR
    with staged_dir(figures_dir) as staging:
        drawn = draw_figures(inputs, entries, table, staging, examples)
    markdown = comparison_markdown(
        report, dataset_kind, Uncertainty(intervals, significance, pairwise_table(comparisons))
    )
    write_text(out_dir / MARKDOWN_FILE, markdown)
    with staged_file(out_dir / TABLE_FILE) as tmp:
        report.to_parquet(tmp, index=False)
    write_json(out_dir / METRICS_FILE, comparison_metrics(table))
    write_json(out_dir / RSUM_FILE, rsum_points(table))
    write_json(out_dir / RECALL_CURVES_FILE, recall_curves(inputs.scores_dir, entries))
    records = run_records(inputs, entries)
    timings = read_timings(entries, records)
    write_text(out_dir / TIMING_FILE, timing_markdown(timings, _environment(entries)))
    log.info("comparison of %d models and %d figures in %s", len(entries), len(drawn), out_dir)
    figures = [figures_dir / path.name for path in drawn]
    log_comparison(tracker, inputs, entries, markdown, out_dir, figures, comparisons, timings, records)
    return out_dir / MARKDOWN_FILE


def pairwise_comparisons(
    scores_dir: Path, entries: Sequence[Entry], dataset_kind: str, significance: Significance
) -> dict[str, PairwiseComparison]:
    """protocol -> the paired bootstrap tests of every pair of `entries` and their groups (`compare_models`), from
    each model's test similarity matrix (`model_scores`), which must all score the same test gallery."""
    started = time.perf_counter()
    ranks: dict[str, dict[str, tuple[FoldRanks, ...]]] = {}  # protocol -> model -> ranks per fold
    first: tuple[str, np.ndarray, np.ndarray] | None = None  # the first model's name, image and caption ids
    for entry in entries:
        scores = model_scores(scores_dir, entry)  # one matrix in memory at a time: only the ranks are kept
        if first is None:
            first = (entry.name, scores.image_ids, scores.caption_ids)
        elif not (np.array_equal(scores.image_ids, first[1]) and np.array_equal(scores.caption_ids, first[2])):
            raise UserError(
                f"{scores_dir}: {entry.name} scored another test gallery than {first[0]}, so their queries cannot be "
                "paired; re-run the evaluation of the older one"
            )
        for protocol in protocols_for(dataset_kind, len(scores.image_ids)):
            folds = protocol_ranks(scores.scores, scores.caption_image, protocol)
            ranks.setdefault(protocol.name, {})[entry.name] = folds
    comparisons = {protocol: compare_models(models, significance) for protocol, models in ranks.items()}
    for protocol, result in comparisons.items():
        n_pairs = len(result.pairs)
        if smallest_adjusted_p(n_pairs, significance) > significance.alpha:
            log.warning("%s: with %d resamples none of the %d pairs can be significant after the %s correction; "
                        "set compare.significance.resamples to at least %d", protocol, significance.resamples,
                        n_pairs, significance.correction, resamples_needed(n_pairs, significance))  # fmt: skip
    log.info("pairwise tests of %d models (%d resamples) in %.1f s", len(entries), significance.resamples,
             time.perf_counter() - started)  # fmt: skip
    return comparisons


def draw_figures(
    inputs: Inputs, entries: Sequence[Entry], table: pd.DataFrame, folder: Path, examples: Examples
) -> list[Path]:
    """Every figure of the report, as PNG files in `folder`; returns their paths. A figure that needs what the
    pipeline does not have (the images, after a captions-only download for precomputed regions; the boxes, which
    precomputed regions lack) gets a note in its place saying so."""
    drawn = []
    histories = read_histories({entry.name: entry.model_dir for entry in entries if entry.model_dir is not None})
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
    if entry.model_dir is not None:
        matcher, _ = load_matcher(entry.model_dir, torch.device("cpu"))
        cross = is_cross_attention(matcher)
        if cross or is_multi_view(matcher):
            drawn.append(folder / f"{'attention' if cross else 'views'}_{entry.name}.png")
            needs_boxes = cross or matcher.pixels is None  # the views of a pixel matcher lie on its ViT patches
            missing = missing_inputs(inputs.dataset_dir, images=images, boxes=boxes or not needs_boxes)
            if missing is not None:
                skipped_figure(drawn[-1], missing)
            elif cross:
                attention_figure(entry.model_dir, *sources[1:], drawn[-1], pairs=examples.count,
                                 seed=examples.seed)  # fmt: skip
            else:
                views_figure(entry.model_dir, *sources[1:], drawn[-1], seed=examples.seed)
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


def recall_curves(scores_dir: Path, entries: Sequence[Entry]) -> list[dict[str, object]]:
    """Rows {model, direction, k, recall} of every model's recall@K curve over the whole test split (its first
    seed's matrix, as the table), for a DVC chart of every model together."""
    rows: list[dict[str, object]] = []
    for entry in entries:
        for point in recall_curve(model_scores(scores_dir, entry)):
            rows += [
                {"model": entry.name, "direction": label, "k": point["k"], "recall": point[side]}
                for side, label in CURVE_DIRECTIONS.items()
            ]
    return rows


def figures_of(name: str, figures: Sequence[Path]) -> list[Path]:
    """The figures drawn for model `name` alone (`_model_figures`): its retrieval examples, attention or views."""
    stems = {f"{kind}_{name}" for kind in MODEL_FIGURES}
    return [path for path in figures if path.stem in stems]


def regions_have_boxes(regions_dir: Path) -> bool:
    """Whether the test regions carry boxes to draw attention on (SCAN's precomputed features have none)."""
    return RegionStore(regions_dir / "test").info.get("source") != "precomp"


def model_scores(scores_dir: Path, entry: Entry) -> SplitScores:
    """A model's test similarity matrix (its seed's): its own, or for an ensemble the mean of its members' (as
    ensemble@)."""
    if entry.type == "single":
        return SplitScores.load(seed_path(scores_dir, entry.name, entry.seed, ".npz"))
    return ensemble_scores([seed_path(scores_dir, member, entry.seed, ".npz") for member in entry.members])


def _records(inputs: Inputs, entry: Entry) -> dict[str, dict]:
    """stage -> the record its run kept of itself (times, MLflow run), for the outputs now in the workspace."""
    if inputs.work_dir is None or entry.model_dir is None:
        return {}
    stage = f"{entry.name}-{entry.seed}"
    found = {
        f"train@{stage}": read_record(seed_path(inputs.work_dir / "train", entry.name, entry.seed),
                                      entry.model_dir / MODEL_FILE),
        f"evaluate@{stage}": read_record(seed_path(inputs.work_dir / "evaluate", entry.name, entry.seed),
                                         seed_path(inputs.scores_dir, entry.name, entry.seed, ".npz")),
    }  # fmt: skip
    return {name: record for name, record in found.items() if record is not None}


Records = Mapping[str, Mapping[str, dict]]  # model name -> stage -> the record its run kept


def run_records(inputs: Inputs, entries: Sequence[Entry]) -> Records:
    """Every model's `_records`, read once (each read hashes the output it measures)."""
    return {entry.name: _records(inputs, entry) for entry in entries}


def read_timings(entries: Sequence[Entry], records: Records) -> list[Timing]:
    """The times the runs behind each single model recorded (none for ensembles, which train nothing)."""
    timings = []
    for entry in entries:
        if entry.model_dir is None:
            continue
        trained = records[entry.name].get(f"train@{entry.name}-{entry.seed}", {})
        evaluated = records[entry.name].get(f"evaluate@{entry.name}-{entry.seed}", {})
        per_query, encoding = evaluated.get("test/seconds_per_query"), evaluated.get("test/encode_seconds")
        timings.append(Timing(entry.name, entry.seed, trained.get("train_seconds"), per_query, encoding))
    return timings


def _environment(entries: Sequence[Entry]) -> dict | None:
    """The environment the first trained model's card records (where the times were measured)."""
    for entry in entries:
        if entry.model_dir is not None and entry.training:
            return json.loads((entry.model_dir / CARD_FILE).read_text()).get("environment")
    return None


def linked_runs(entry: Entry, tracker: Tracker, records: Mapping[str, dict]) -> dict[str, str]:
    """stage → MLflow run id of the runs behind a model: `train@` and `evaluate@` (from `records`, those the runs
    kept of themselves, itm/measurements.py) for a single matcher; for an ensemble its newest `ensemble@` run."""
    if entry.type == "ensemble":
        stage = f"ensemble@{entry.name}-{entry.seed}"
        found = tracker.find_run(stage)
        return {stage: found} if found else {}
    return {stage: record["mlflow_run_id"] for stage, record in records.items() if record.get("mlflow_run_id")}


def log_comparison(
    tracker: Tracker,
    inputs: Inputs,
    entries: Sequence[Entry],
    markdown: str,
    out_dir: Path,
    figures: Sequence[Path],
    comparisons: Mapping[str, PairwiseComparison] | None = None,
    timings: Sequence[Timing] = (),
    records: Records | None = None,
) -> None:
    """The parent run: the table (also as its note), the pairwise tests and groups (`pairwise.json`) and figures;
    one child run per model with its metrics, its own figures, its group letters per protocol (tags
    `itm.group.<protocol>`) and links to the runs that produced it (from `records`, read here when the caller has
    not read them)."""
    comparisons = comparisons or {}
    records = run_records(inputs, entries) if records is None else records
    for name in (MARKDOWN_FILE, TABLE_FILE, METRICS_FILE, TIMING_FILE):
        if (out_dir / name).is_file():
            tracker.log_artifact(out_dir / name)
    measured = {timing.name: timing for timing in timings}
    for path in figures:
        tracker.log_artifact(path, FIGURES_DIR)
    if comparisons:
        pairs = pairwise_table(comparisons).to_dict(orient="records")
        groups = {protocol: result.groups for protocol, result in comparisons.items()}
        tracker.log_dict({"pairs": pairs, "groups": groups}, PAIRWISE_FILE)
    tracker.set_tags({"mlflow.note.content": markdown})
    for entry in entries:
        runs = linked_runs(entry, tracker, records[entry.name])
        tags = {"itm.model": entry.name, "itm.type": entry.type, "itm.kind": entry.kind, "itm.weights": entry.weights}
        tags |= {f"itm.group.{protocol}": result.groups[entry.name] for protocol, result in comparisons.items()
                 if entry.name in result.groups}  # fmt: skip
        if entry.weights_source:
            tags["itm.weights.source"] = entry.weights_source
        tags |= {f"itm.run.{stage}": run_id for stage, run_id in runs.items()}
        with tracker.child_run(entry.name, tags) as child:
            child.log_params({"kind": entry.kind, "type": entry.type, "parameters": entry.parameters,
                              "members": list(entry.members)})  # fmt: skip
            child.log_metrics(entry.metrics)
            timing = measured.get(entry.name)
            times = {} if timing is None else {"train_seconds": timing.train_seconds,
                                               "test/seconds_per_query": timing.seconds_per_query}  # fmt: skip
            child.log_metrics({key: value for key, value in times.items() if value is not None})
            for path in figures_of(entry.name, figures):
                child.log_artifact(path, FIGURES_DIR)
            links = [f"- {stage}: [{run_id}]({tracker.run_link(run_id) or run_id})" for stage, run_id in runs.items()]
            child.set_tags({"mlflow.note.content": "\n".join([f"Runs behind {entry.name}:", *links])})
