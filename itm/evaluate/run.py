"""Evaluating a trained matcher, or an ensemble of them, on the test split under the dataset's protocols."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from itm.data.splits import DataFolders
from itm.distributed import Context
from itm.evaluate.completion import ConceptCompletion
from itm.evaluate.protocols import protocol_metrics
from itm.evaluate.score_file import SplitScores
from itm.evaluate.scoring import retrieval_timing, score_split
from itm.evaluate.statistics import DEFAULT_BOOTSTRAP, Bootstrap, protocol_intervals, with_intervals
from itm.models.saved import load_matcher

log = logging.getLogger(__name__)

RECALL_CURVE_FILE = "recall_curve.json"


@dataclass(frozen=True)
class Evaluation:
    """What `evaluate@` computed (the metrics file: the same on every run on one machine) and what it measured."""

    metrics: dict[str, float]
    timing: dict[str, float]  # retrieval seconds per query, scoring and encoding seconds


def evaluate_matcher(
    model_dir: Path,
    data: DataFolders,
    dataset_kind: str,
    *,
    scores_path: Path,
    device: torch.device,
    batch_size: int,
    precision: str,
    bootstrap: Bootstrap = DEFAULT_BOOTSTRAP,
    completion: ConceptCompletion | None = None,
    context: Context | None = None,
) -> Evaluation:
    """Score the whole test gallery, save the matrix, and return the protocol metrics, each R@K and rSum with its
    `bootstrap` interval (`<protocol>/<figure>_ci_low`, `_ci_high`, itm/evaluate/statistics.py), and apart from
    them the retrieval times (which differ on every run, itm/measurements.py).

    Scoring autocasts to `precision` on a GPU (`itm.evaluate.scoring.score_matrix`). With several processes
    (`context`, each on its own `device`), every rank takes part in encoding and scoring and returns the metrics;
    rank 0 alone writes the matrix.

    A concept-aware matcher labels each test caption with the concepts of its own words, completed transductively
    from neighbouring test captions when `completion` is given (CVSE's protocol; `completion.rule` names its
    dataset rule); its metrics then include `test/transductive_concepts` (1 or 0) to say which was used. A matcher
    that reads pixels reads the test images from `data.dataset_dir` (data/raw/<dataset>).
    """
    matcher, _ = load_matcher(model_dir, device, data)
    test = data.split("test", matcher.reads)
    scored, image_ids, caption_image = score_split(
        matcher,
        test.store,
        test.captions,
        batch_size=batch_size,
        device=device,
        precision=precision,
        completion=completion,
        context=context,
    )
    scores = SplitScores(scored.matrix, np.array(image_ids), test.captions.caption_ids, caption_image)
    if context is None or context.is_main:
        scores.save(scores_path)
    metrics = with_intervals(
        protocol_metrics(scores, dataset_kind), protocol_intervals(scores, dataset_kind, bootstrap)
    )
    timing = retrieval_timing(scored, len(test.captions))
    if matcher.n_concepts > 0:
        metrics["test/transductive_concepts"] = float(completion is not None)
    return Evaluation(metrics, {f"test/{key}": value for key, value in timing.items()})
