"""Evaluating a trained matcher, or an ensemble of them, on the test split under the dataset's protocols."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from itm.atomic import staged_file
from itm.data.captions import VOCAB_FILE, read_concepts
from itm.data.loaders import captions_for, image_store, read_captions, with_regions
from itm.data.vocab import load_vocab
from itm.distributed import Context
from itm.errors import UserError
from itm.evaluate.completion import ConceptCompletion
from itm.evaluate.ensemble import average_scores
from itm.evaluate.metrics import recall_metrics
from itm.evaluate.protocols import evaluate_protocols, protocols_for
from itm.evaluate.scoring import retrieval_timing, score_split
from itm.train.saved import load_matcher

log = logging.getLogger(__name__)

RECALL_CURVE_FILE = "recall_curve.json"


@dataclass(frozen=True)
class SplitScores:
    """A test-split similarity matrix and the ids of its rows and columns."""

    scores: torch.Tensor  # [n_images, n_captions] float32
    image_ids: np.ndarray  # [n_images]
    caption_ids: np.ndarray  # [n_captions]
    caption_image: torch.Tensor  # [n_captions] row of each caption's image
    run_id: str | None = None  # the MLflow run of the evaluation that scored it

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with staged_file(path) as tmp, tmp.open("wb") as stream:
            np.savez(
                stream,
                scores=self.scores.numpy(),
                image_ids=self.image_ids,
                caption_ids=self.caption_ids,
                caption_image=self.caption_image.numpy(),
                run_id=np.array(self.run_id or ""),
            )

    @classmethod
    def load(cls, path: Path) -> SplitScores:
        _check_exists(path)
        with np.load(path) as saved:
            return cls(
                torch.from_numpy(saved["scores"]),
                saved["image_ids"],
                saved["caption_ids"],
                torch.from_numpy(saved["caption_image"]),
                _run_id(saved),
            )

    @staticmethod
    def load_run_id(path: Path) -> str | None:
        """The evaluation run saved with the matrix at `path`, without reading the matrix."""
        _check_exists(path)
        with np.load(path) as saved:
            return _run_id(saved)


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path}: not found (run the evaluate stage of that matcher first)")


def _run_id(saved: np.lib.npyio.NpzFile) -> str | None:
    """The saved run id; None when it is empty or the file predates it."""
    return (str(saved["run_id"]) or None) if "run_id" in saved.files else None


def evaluate_matcher(
    model_dir: Path,
    regions_dir: Path,
    captions_dir: Path,
    dataset_kind: str,
    *,
    scores_path: Path,
    device: torch.device,
    batch_size: int,
    precision: str,
    completion: ConceptCompletion | None = None,
    dataset_dir: Path | None = None,
    run_id: str | None = None,
    context: Context | None = None,
) -> dict[str, float]:
    """Score the whole test gallery, save the matrix, and return the protocol figures and retrieval times.

    Scoring autocasts to `precision` on a GPU (`itm.evaluate.scoring.autocast`). With several processes
    (`context`, each on its own `device`), every rank takes part in encoding and scoring and returns the figures;
    rank 0 alone writes the matrix.

    A concept-aware matcher labels each test caption with the concepts of its own words, completed transductively
    from neighbouring test captions when `completion` is given; its figures then include
    `test/transductive_concepts` (1 or 0) to say which was used. A matcher that reads pixels reads the test
    images from `dataset_dir` (data/raw/<dataset>). `run_id` (the evaluation's MLflow run) is saved with the matrix
    so that the comparison can link to the run.
    """
    vocab = load_vocab(captions_dir / VOCAB_FILE)
    concepts = read_concepts(captions_dir)
    matcher, _ = load_matcher(model_dir, device, vocab_digest=vocab.digest(), concepts_digest=concepts.digest())
    labelled = matcher.n_concepts > 0
    store = image_store(matcher, regions_dir, dataset_dir, "test")
    captions = read_captions(captions_dir, "test", concepts=labelled, texts=matcher.tokenizer is not None)
    captions = captions_for(matcher, with_regions(captions, store, "test"))
    scored, image_ids, caption_image = score_split(
        matcher,
        store,
        captions,
        batch_size=batch_size,
        device=device,
        precision=precision,
        completion=completion,
        context=context,
    )
    test = SplitScores(scored.matrix, np.array(image_ids), captions.caption_ids, caption_image, run_id)
    if context is None or context.is_main:
        test.save(scores_path)
    figures = figures_for(test, dataset_kind)
    figures |= {f"test/{key}": value for key, value in retrieval_timing(scored, len(captions.token_ids)).items()}
    if labelled:
        figures["test/transductive_concepts"] = float(completion is not None)
    return figures


def evaluate_ensemble(member_scores: list[Path], dataset_kind: str) -> dict[str, float]:
    """Protocol figures of the average of the members' test similarity matrices (same gallery required)."""
    members = [SplitScores.load(path) for path in member_scores]
    first = members[0]
    for path, other in zip(member_scores[1:], members[1:], strict=True):
        if not (
            np.array_equal(other.image_ids, first.image_ids) and np.array_equal(other.caption_ids, first.caption_ids)
        ):
            raise UserError(f"{path}: scored another test gallery than {member_scores[0]}; re-run its evaluation")
    averaged = average_scores([member.scores for member in members])
    return figures_for(SplitScores(averaged, first.image_ids, first.caption_ids, first.caption_image), dataset_kind)


def figures_for(test: SplitScores, dataset_kind: str) -> dict[str, float]:
    protocols = protocols_for(dataset_kind, len(test.image_ids))
    figures = evaluate_protocols(test.scores, test.caption_image, protocols)
    figures |= {"test/images": float(len(test.image_ids)), "test/captions": float(len(test.caption_ids))}
    return figures


def recall_curve(test: SplitScores, ks: tuple[int, ...] = tuple(range(1, 21))) -> list[dict[str, float]]:
    """Recall@K for K = 1..20 in both directions, over the whole test split (a DVC plot)."""
    figures = recall_metrics(test.scores, test.caption_image, ks=ks)
    return [{"k": k, "i2t": figures[f"i2t_r{k}"], "t2i": figures[f"t2i_r{k}"]} for k in ks]


def write_json(path: Path, document: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(document, indent=1))
