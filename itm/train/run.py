"""Training one matcher of `params.yaml` end to end: data, model, loop, saved model."""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from itm import environment
from itm.atomic import staged_dir
from itm.checkpoints import checkpoint_run, remove_checkpoints_when_published
from itm.config import MatcherParams, MvamParams, TrainParams
from itm.data.captions import captions_file
from itm.data.loaders import CaptionImagePairs, CaptionTable, PairCollator, image_concepts
from itm.data.pixels import ImageStore
from itm.data.records import DATASET_JSON
from itm.data.regions import REGIONS_FILE
from itm.data.splits import DataFolders, SplitData
from itm.distributed import Context
from itm.evaluate.metrics import recall_metrics
from itm.evaluate.scoring import score_split
from itm.measurements import write_record
from itm.models import Matcher, build_matcher, inputs_for_training, save_matcher
from itm.models.saved import MODEL_FILE
from itm.tracking import RUN_MODEL_DIR, RunOpener, Tracker
from itm.train.batches import GlobalBatchSampler
from itm.train.loop import FitResult, fit
from itm.train.progress import no_progress_warning, training_progress

log = logging.getLogger(__name__)

# Validation uses at most this many images (SCAN cuts its dev split to 1,000 images / 5,000 captions).
VALIDATION_IMAGES = 1000


def retrieval_metrics(
    matcher: Matcher,
    store: ImageStore,
    captions: CaptionTable,
    *,
    device: torch.device,
    batch_size: int,
    context: Context | None = None,
) -> dict[str, float]:
    """Recall@K and rSum of `matcher` on the images of `captions` (every caption a query, every image one too);
    with several processes the scoring is split over them and every process gets the same metrics."""
    scored, _, caption_image = score_split(
        matcher, store, captions, batch_size=batch_size, device=device, precision="fp32", context=context
    )
    return recall_metrics(scored.matrix, caption_image)


# The `train:` settings a matcher block may set for itself (MatcherCommon).
OWN_SETTINGS = ("max_epochs", "schedule", "learning_rate", "decay_epochs", "warmup_epochs", "optimizer", "weight_decay")


def resolved_settings(params: MatcherParams, settings: TrainParams) -> TrainParams:
    """The training settings of one matcher: the shared ones, with the matcher's own recipe (`OWN_SETTINGS`) where
    it sets it, and its `max_epochs` no more than the shared `epoch_limit` when there is one."""
    own = {key: getattr(params, key) for key in OWN_SETTINGS if getattr(params, key) is not None}
    resolved = settings.model_copy(update=own) if own else settings
    limit = resolved.epoch_limit
    if limit is not None and resolved.max_epochs > limit:
        resolved = resolved.model_copy(update={"max_epochs": limit})
    return resolved


def train_matcher(
    name: str,
    params: MatcherParams,
    settings: TrainParams,
    *,
    seed: int,
    data: DataFolders,
    out_dir: Path,
    work_dir: Path,
    open_run: RunOpener,
    device: torch.device,
    workers: int,
    context: Context | None = None,
) -> dict[str, Any]:
    """Train matcher `name` on the train split, select it on val rSum, and save it to `out_dir` with its card;
    logged to the run `open_run` opens, which continues the run of the checkpoint it resumes from.

    `settings` are the shared `train:` params; the matcher's own recipe (`OWN_SETTINGS`), when set, replaces them.
    `seed` (one of `settings.seeds`) fixes the initialisation and the order of the batches.
    Concept-aware matchers train on image-level concept labels and validate on each caption's own. A matcher that
    reads pixels reads the images of `data.dataset_dir` (data/raw/<dataset>) instead of the regions. With several
    processes (`context`), each loads its share of every global batch and only rank 0 writes the model and logs.
    """
    context = context or Context(device=device)
    settings = resolved_settings(params, settings)
    torch.manual_seed(seed)
    matcher = build_matcher(params, inputs_for_training(params, data.feature_dim, len(data.vocab), data.concepts))
    matcher = matcher.to(device)
    fingerprint = training_fingerprint(name, params, settings, seed, data, matcher)
    resumed_run = checkpoint_run(work_dir, fingerprint) if context.is_main else None
    with open_run(continue_run=resumed_run) as tracker:
        return _train(name, params, settings, matcher, fingerprint, seed=seed, data=data, out_dir=out_dir,
                      work_dir=work_dir, tracker=tracker, device=device, workers=workers, context=context)  # fmt: skip


def _train(
    name: str,
    params: MatcherParams,
    settings: TrainParams,
    matcher: Matcher,
    fingerprint: str,
    *,
    seed: int,
    data: DataFolders,
    out_dir: Path,
    work_dir: Path,
    tracker: Tracker,
    device: torch.device,
    workers: int,
    context: Context,
) -> dict[str, Any]:
    """`train_matcher` once its matcher is built (with `settings` resolved) and its run is open."""
    train, val = training_splits(data, matcher)
    warn_if_views_outnumber_tokens(name, params, train)

    def batches(epoch: int) -> DataLoader:
        # A fixed shuffle per (seed, epoch), so a resumed run sees the same batches, and the same on every process,
        # each of which loads its share of every global batch.
        sampler = GlobalBatchSampler(
            [len(tokens) for tokens in train.captions.token_ids], settings.batch_size,
            seed=seed * 100_003 + epoch, rank=context.rank, world_size=context.world_size,
            bucket_batches=settings.bucket_batches,
        )  # fmt: skip
        return DataLoader(
            CaptionImagePairs(train.captions, train.store),
            batch_sampler=sampler,
            collate_fn=PairCollator(train.store.collate, matcher.n_concepts),
            num_workers=workers,
            pin_memory=device.type == "cuda",  # page-locked batches copy to the GPU asynchronously
        )

    def validate(model: Matcher) -> dict[str, float]:
        return retrieval_metrics(
            model, val.store, val.captions, device=device, batch_size=settings.batch_size, context=context
        )

    result = fit(
        matcher, batches, validate, settings, work_dir=work_dir, fingerprint=fingerprint, tracker=tracker,
        device=device, label=name, context=context,
    )  # fmt: skip

    labelled = matcher.n_concepts > 0
    val_captions_per_image = np.unique(val.captions.image_ids, return_counts=True)[1].tolist()
    card = {
        "name": name,
        "kind": params.kind,
        "params": params.model_dump(mode="json"),
        "seed": seed,
        "train": settings.model_dump(mode="json", exclude={"seeds"}),
        "feature_dim": data.feature_dim,
        "vocab_size": len(data.vocab),
        "vocab_digest": data.vocab.digest(),
        "concepts_digest": data.concepts.digest() if labelled else None,
        "images": train.store.info,
        "environment": environment.record(),
        "best_epoch": result.best_epoch,
        "val": result.best_metrics,
        "training": training_summary(result, settings, val_captions_per_image),
        "history": result.history,  # per-epoch metrics (losses, learning rate, val recalls), for training curves
    }
    if context.is_main:
        with staged_dir(out_dir) as staging:
            weights = {
                key: value.cpu() if torch.is_tensor(value) else value for key, value in result.best_state.items()
            }
            save_matcher(staging, weights, card, data.concepts if labelled else None)
        write_record(work_dir, out_dir / MODEL_FILE, measurements(result, tracker))
        best = {f"best/val_{key}": value for key, value in result.best_metrics.items()}
        tags = {"itm.matcher": name, "itm.kind": params.kind, "itm.seed": str(seed)}
        tracker.log_model(out_dir, name, params=card["params"], metrics=best, tags=tags)  # models:/<id>, metrics linked
        tracker.log_metrics({"train_seconds": sum(result.epoch_seconds), "pairs_seen": float(result.pairs_seen)})
        progress = card["training"]["progress"]
        tracker.set_tags({"itm.stopped": str(result.stopped), "itm.epochs": str(result.epochs),
                          "itm.progress": progress["verdict"]})  # fmt: skip
        warning = no_progress_warning(name, progress, settings.learning_rate)
        if warning is not None:
            log.warning("%s", warning)
        tracker.log_dict(card["environment"], "environment.json")
        tracker.log_dict({"matcher": card["params"], "train": card["train"]}, "config.json")  # the resolved config
        tracker.log_artifact(out_dir / "model.pt", RUN_MODEL_DIR)  # runs:/<run id>/model
        tracker.log_artifact(out_dir / "card.json", RUN_MODEL_DIR)
        remove_checkpoints_when_published(work_dir)  # kept while the stage may still fail and resume
    log.info("%s: best val rsum %.2f at epoch %d", name, result.best_metrics["rsum"], result.best_epoch)
    return card


def warn_if_views_outnumber_tokens(name: str, params: MatcherParams, train: SplitData) -> None:
    """MVAM's views each attend over one side's tokens: with more views than an image has regions, or than a
    caption has words, several views attend over the same few tokens. Said once, at the start of training."""
    if not isinstance(params, MvamParams) or params.backbone != "own":
        return
    info = train.store.info
    sides = {"words per caption (median)": statistics.median(len(ids) for ids in train.captions.token_ids)}
    if info.get("images"):
        sides["regions per image (mean)"] = info["boxes"] / info["images"]
    for side, count in sides.items():
        if params.views > count:
            log.warning(
                "%s: its %d views outnumber the %s, %.1f: several views attend over the same tokens",
                name, params.views, side, count,
            )  # fmt: skip


def training_summary(result: FitResult, settings: TrainParams, val_captions_per_image: list[int]) -> dict[str, Any]:
    """How training ended and what it cost, for the card: the epochs run, the best one, whether it stopped on the
    validation plateau or at the epoch cap, the caption-image pairs it trained on, and whether it made any progress
    (itm/train/progress.py: judged against chance on the validation split, whose images have these caption counts)."""
    return {
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
        "stopped": result.stopped,
        "max_epochs": settings.max_epochs,
        "patience": settings.patience,
        "min_delta": settings.min_delta,
        "warmup_epochs": settings.warmup_epochs,
        "pairs_seen": result.pairs_seen,
        "progress": training_progress(result.history, val_captions_per_image),
    }


def measurements(result: FitResult, tracker: Tracker) -> dict[str, Any]:
    """What this run measured of itself (itm/measurements.py): wall-clock times and its MLflow run."""
    return {
        "mlflow_run_id": tracker.run_id,
        "train_seconds": sum(result.epoch_seconds),
        "epoch_seconds": result.epoch_seconds,
    }


def training_splits(data: DataFolders, matcher: Matcher) -> tuple[SplitData, SplitData]:
    """The train split (concept-aware matchers: each caption labelled with its whole image's concepts) and the
    first `VALIDATION_IMAGES` images of the val split (each caption labelled with its own concepts)."""
    train, val = data.split("train", matcher.reads), data.split("val", matcher.reads)
    if matcher.n_concepts > 0:
        train = SplitData(train.store, image_concepts(train.captions))
    return train, SplitData(val.store, val.captions.of_first_images(VALIDATION_IMAGES))


def training_fingerprint(
    name: str, params: MatcherParams, settings: TrainParams, seed: int, data: DataFolders, matcher: Matcher
) -> str:
    """What identifies a training run, so that a checkpoint resumes only the run it came from: the matcher's
    name, params, training settings and seed (not the other seeds), and digests of the data it reads."""
    identity = {"name": name, "params": params.model_dump(mode="json"), "seed": seed,
                "train": settings.model_dump(mode="json", exclude={"seeds"})}  # fmt: skip
    inputs = _digest(captions_file(data.captions_dir, "train"), data.regions_dir / "train" / REGIONS_FILE)
    inputs += data.vocab.digest()
    inputs += data.concepts.digest() if matcher.n_concepts > 0 else ""
    if matcher.pixels is not None and data.dataset_dir is not None:
        inputs += _digest(data.dataset_dir / DATASET_JSON)
    return hashlib.sha256((json.dumps(identity, sort_keys=True) + inputs).encode()).hexdigest()[:16]


def _digest(*paths: Path) -> str:
    sha = hashlib.sha256()
    for path in paths:
        sha.update(path.read_bytes())
    return sha.hexdigest()[:16]
