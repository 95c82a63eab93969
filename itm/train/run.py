"""Training one matcher of `params.yaml` end to end: data, model, loop, validation, saved model."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from itm.atomic import staged_dir
from itm.config import MatcherParams, TrainParams
from itm.data.captions import VOCAB_FILE, captions_file, read_concepts
from itm.data.loaders import (
    CaptionRegionPairs,
    CaptionTable,
    PairCollator,
    captions_for,
    image_concepts,
    image_store,
    read_captions,
    with_regions,
)
from itm.data.pixels import ImageStore
from itm.data.regions import REGIONS_FILE, RegionStore
from itm.data.vocab import load_vocab
from itm.distributed import Context
from itm.evaluate.metrics import recall_metrics
from itm.evaluate.scoring import score_split
from itm.models import Matcher, MatcherInputs, build_matcher
from itm.tracking import Tracker, git_revision
from itm.train.batches import GlobalBatchSampler
from itm.train.loop import CHECKPOINT, fit
from itm.train.saved import save_matcher

log = logging.getLogger(__name__)

# Validation uses at most this many images (SCAN cuts its dev split to 1,000 images / 5,000 captions).
VALIDATION_IMAGES = 1000


def _digest(*paths: Path) -> str:
    sha = hashlib.sha256()
    for path in paths:
        sha.update(path.read_bytes())
    return sha.hexdigest()[:16]


def first_images(captions: CaptionTable, n_images: int) -> CaptionTable:
    """The captions of the first `n_images` distinct images, in file order."""
    _, first_seen = np.unique(captions.image_ids, return_index=True)
    kept_images = set(captions.image_ids[np.sort(first_seen)][:n_images].tolist())
    return captions.select(np.array([int(i) in kept_images for i in captions.image_ids], dtype=bool))


def retrieval_figures(
    matcher: Matcher,
    store: ImageStore,
    captions: CaptionTable,
    *,
    device: torch.device,
    batch_size: int,
    context: Context | None = None,
) -> dict[str, float]:
    """Recall@K and rSum of `matcher` on the images of `captions` (every caption a query, every image one too);
    with several processes the scoring is split over them and every process gets the same figures."""
    scored, _, caption_image = score_split(
        matcher, store, captions, batch_size=batch_size, device=device, precision="fp32", context=context
    )
    return recall_metrics(scored.matrix, caption_image)


def resolved_settings(params: MatcherParams, settings: TrainParams) -> TrainParams:
    """The training settings of one matcher: the shared ones, with the matcher's own `epochs` and `schedule` where
    it sets them."""
    own = {key: getattr(params, key) for key in ("epochs", "schedule") if getattr(params, key) is not None}
    return settings.model_copy(update=own) if own else settings


def train_matcher(
    name: str,
    params: MatcherParams,
    settings: TrainParams,
    *,
    regions_dir: Path,
    captions_dir: Path,
    out_dir: Path,
    work_dir: Path,
    tracker: Tracker,
    device: torch.device,
    workers: int,
    dataset_dir: Path | None = None,
    context: Context | None = None,
) -> dict[str, Any]:
    """Train matcher `name` on the train split, select it on val rSum, and save it to `out_dir` with its card.

    `settings` are the shared `train:` params; the matcher's own `epochs` and `schedule`, when set, replace them.
    Concept-aware matchers train on image-level concept labels and validate on each caption's own. A matcher that
    reads pixels reads the images of `dataset_dir` (data/raw/<dataset>) instead of the regions. With several
    processes (`context`), each loads its share of every global batch and only rank 0 writes the model and logs.
    """
    context = context or Context(device=device)
    settings = resolved_settings(params, settings)
    vocab = load_vocab(captions_dir / VOCAB_FILE)
    concepts = read_concepts(captions_dir)
    train_regions = RegionStore(regions_dir / "train")
    feature_dim = train_regions.feature_dim

    torch.manual_seed(settings.seed)
    inputs = MatcherInputs(feature_dim, len(vocab), concepts)
    matcher = build_matcher(params, inputs).to(device)
    if matcher.pixels is None:
        train_store, val_store = train_regions, RegionStore(regions_dir / "val")
    else:  # one store holds every split's images
        train_store = val_store = image_store(matcher, regions_dir, dataset_dir, "train")
    labelled, texts = matcher.n_concepts > 0, matcher.tokenizer is not None
    train_captions = read_captions(captions_dir, "train", concepts=labelled, texts=texts)
    train_captions = with_regions(train_captions, train_store, "train")
    if labelled:
        train_captions = image_concepts(train_captions)
    train_captions = captions_for(matcher, train_captions)
    val_captions = read_captions(captions_dir, "val", concepts=labelled, texts=texts)
    val_captions = with_regions(val_captions, val_store, "val")
    val_captions = captions_for(matcher, first_images(val_captions, VALIDATION_IMAGES))
    pairs = CaptionRegionPairs(train_captions, train_store)

    lengths = [len(tokens) for tokens in train_captions.token_ids]

    def batches(epoch: int) -> DataLoader:
        # A fixed shuffle per (seed, epoch), so a resumed run sees the same batches, and the same on every process,
        # each of which loads its share of every global batch.
        sampler = GlobalBatchSampler(
            lengths, settings.batch_size, seed=settings.seed * 100_003 + epoch, rank=context.rank,
            world_size=context.world_size, bucket_batches=settings.bucket_batches,
        )  # fmt: skip
        return DataLoader(
            pairs,
            batch_sampler=sampler,
            collate_fn=PairCollator(train_store.collate, matcher.n_concepts),
            num_workers=workers,
            pin_memory=device.type == "cuda",  # page-locked batches copy to the GPU asynchronously
        )

    def validate(model: Matcher) -> dict[str, float]:
        return retrieval_figures(
            model, val_store, val_captions, device=device, batch_size=settings.batch_size, context=context
        )

    identity = {"name": name, "params": params.model_dump(mode="json"), "train": settings.model_dump(mode="json")}
    data = _digest(captions_file(captions_dir, "train"), regions_dir / "train" / REGIONS_FILE) + vocab.digest()
    data += concepts.digest() if labelled else ""
    data += _digest(dataset_dir / "dataset.json") if matcher.pixels is not None and dataset_dir is not None else ""
    run_id = hashlib.sha256((json.dumps(identity, sort_keys=True) + data).encode()).hexdigest()[:16]
    result = fit(
        matcher, batches, validate, settings, work_dir=work_dir, run_id=run_id, tracker=tracker, device=device,
        label=name, context=context,
    )  # fmt: skip

    card = {
        "name": name,
        "kind": params.kind,
        "params": params.model_dump(mode="json"),
        "train": settings.model_dump(mode="json"),
        "feature_dim": feature_dim,
        "vocab_size": len(vocab),
        "vocab_digest": vocab.digest(),
        "concepts_digest": concepts.digest() if labelled else None,
        "images": train_store.info,
        "git_revision": git_revision(),
        "best_epoch": result.best_epoch,
        "val": result.best_metrics,
        "train_seconds": sum(figures["train/epoch_seconds"] for figures in result.history),
        "history": result.history,  # per-epoch figures (losses, learning rate, val recalls), for training curves
        "mlflow_run_id": tracker.run_id,
    }
    if context.is_main:
        with staged_dir(out_dir) as staging:
            weights = {
                key: value.cpu() if torch.is_tensor(value) else value for key, value in result.best_state.items()
            }
            save_matcher(staging, weights, card, concepts if labelled else None)
        tracker.log_metrics({f"best/val_{key}": value for key, value in result.best_metrics.items()})
        tracker.log_dict({"matcher": card["params"], "train": card["train"]}, "config.json")  # the resolved config
        tracker.log_artifact(out_dir / "model.pt")
        tracker.log_artifact(out_dir / "card.json")
        (work_dir / CHECKPOINT).unlink(missing_ok=True)
    log.info("%s: best val rsum %.2f at epoch %d", name, result.best_metrics["rsum"], result.best_epoch)
    return card
