"""The training loop every matcher shares: Adam, step or cosine decay, gradient clipping, autocast on a GPU.

With several processes the matcher is wrapped in DistributedDataParallel; every process computes the loss of the
whole global batch (`Matcher.forward` with the context), DDP averages the gradients, and rank 0 alone writes
checkpoints and logs. Validation runs on every process (the scoring is split over them) so that all of them keep
the same best weights.

After every epoch the loop validates (the caller's function returns validation metrics with "rsum"), keeps the best
weights by validation rSum (SCAN's model selection), and writes a checkpoint atomically. Training stops at
`max_epochs`, or earlier when `patience` epochs in a row brought no validation rSum above the best by more than
`min_delta` (the plateau); `FitResult.stopped` says which. During the first `warmup_epochs` epochs every hinge loss
of the matcher sums the violations of all negatives instead of taking the hardest (VSE∞'s warm-up).

A run that finds a checkpoint of the same training run (same fingerprint) resumes after its last finished epoch and
ends exactly where an uninterrupted run would (same weights, same best epoch, same stopping epoch) on CPU. A damaged
checkpoint falls back to the previous one (`itm.checkpoints`). A checkpoint names the MLflow run its epochs were
logged to (`checkpoint_run`), which the resumed stage continues; when the run logging now is another one, the resumed
epochs are logged to it again, so that one run holds the whole history.

The per-epoch `history` holds what the run computed (losses, learning rate, validation recalls, pairs seen) and is
the same on every run on the same machine; wall-clock times are kept apart (`epoch_seconds`), because they are not.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from itm.checkpoints import FINGERPRINT_KEY, RUN_ID_KEY, load_checkpoint, save_checkpoint
from itm.config import TrainParams
from itm.data.batches import Captions, Images
from itm.device import autocast, running_precision
from itm.distributed import Context
from itm.errors import UserError
from itm.models.base import Matcher
from itm.models.losses import ContrastiveLoss
from itm.tracking import Tracker
from itm.train.batch_norm import with_global_batch_norm

log = logging.getLogger(__name__)

Batches = Callable[[int], Iterable[tuple[Images, Captions]]]  # epoch -> this process's batches of the epoch
Validate = Callable[[Matcher], dict[str, float]]


PLATEAU, CAP = "plateau", "cap"  # why training stopped
TIMING_KEYS = ("train/epoch_seconds", "train/captions_per_second")  # per-epoch measurements, not results


@dataclass
class FitResult:
    """The best weights by validation rSum, what happened per epoch, and why training stopped."""

    best_state: dict[str, Tensor]
    best_epoch: int  # 1-based
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch, without wall-clock times
    epoch_seconds: list[float] = field(default_factory=list)  # per epoch: training and validation
    stopped: str | None = None  # PLATEAU or CAP once training has ended
    logged_to: str | None = None  # the MLflow run the epochs of `history` were logged to, when resumed

    @property
    def epochs(self) -> int:
        return len(self.history)

    @property
    def pairs_seen(self) -> int:
        """Caption-image pairs trained on, over all epochs (the compute spent, with the epochs)."""
        return int(sum(metrics["train/pairs"] for metrics in self.history))


def learning_rate(settings: TrainParams, epoch: int) -> float:
    """Learning rate of a 0-based epoch: x0.1 every `decay_epochs` (SCAN `adjust_learning_rate`) or cosine annealing
    over `max_epochs`."""
    if settings.schedule == "step":
        return settings.learning_rate * 0.1 ** (epoch // settings.decay_epochs)
    return settings.learning_rate * 0.5 * (1.0 + math.cos(math.pi * epoch / settings.max_epochs))


def epochs_without_progress(rsums: list[float], min_delta: float) -> int:
    """Epochs since the last one whose validation rSum beat every earlier one by more than `min_delta` (the first
    epoch always counts as progress)."""
    best, since = -math.inf, 0
    for rsum in rsums:
        if rsum > best + min_delta:
            best, since = rsum, 0
        else:
            since += 1
    return since


def stop_reason(rsums: list[float], settings: TrainParams) -> str | None:
    """PLATEAU when the last `patience` epochs made no progress, CAP at `max_epochs`, else None (go on)."""
    if (
        settings.patience is not None
        and rsums
        and epochs_without_progress(rsums, settings.min_delta) >= settings.patience
    ):
        return PLATEAU
    return CAP if len(rsums) >= settings.max_epochs else None


def warm_up_hinge_losses(matcher: nn.Module, active: bool) -> None:
    """Make every hinge loss of `matcher` sum all violations (`active`) or use its own `max_violation` again."""
    for module in matcher.modules():
        if isinstance(module, ContrastiveLoss):
            module.warming_up = active


def fit(
    matcher: Matcher,
    batches: Batches,
    validate: Validate,
    settings: TrainParams,
    *,
    work_dir: Path,
    fingerprint: str,
    tracker: Tracker,
    device: torch.device,
    label: str,
    context: Context | None = None,
) -> FitResult:
    """Train `matcher` (already on `device`) until its validation rSum plateaus or `settings.max_epochs`, resuming
    from the checkpoint in `work_dir` when it has the same `fingerprint` (what identifies the training run)."""
    context = context or Context(device=device)
    optimizer = build_optimizer(matcher, settings)
    precision = running_precision(settings.precision, device)
    scaler = gradient_scaler(precision, device)
    state = _resume(work_dir, fingerprint, matcher, optimizer, scaler)
    result = state or FitResult(copy.deepcopy(matcher.state_dict()), 0, {"rsum": -math.inf})
    _log_history(tracker, result)
    model: Matcher | DistributedDataParallel = matcher
    if context.distributed:  # every process starts from rank 0's weights: DDP broadcasts them when it wraps
        model = DistributedDataParallel(with_global_batch_norm(matcher, context))
    result.stopped = stop_reason(_rsums(result), settings)
    while result.stopped is None:
        epoch = result.epochs  # 0-based
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, epoch)
        warm_up_hinge_losses(matcher, epoch < settings.warmup_epochs)
        started = time.perf_counter()
        step = TrainingStep(model, optimizer, scaler, settings.grad_clip, device, precision, context)
        train_metrics = _train_one_epoch(step, batches(epoch), epoch, settings.max_epochs, label)
        train_metrics |= {f"train/{key}": value for key, value in matcher.end_epoch().items()}
        matcher.eval()
        val_metrics = validate(matcher)
        metrics = train_metrics | {f"val/{key}": value for key, value in val_metrics.items()}
        seconds = time.perf_counter() - started  # training and validation
        tracker.log_metrics(metrics | {"train/epoch_seconds": seconds}, step=epoch + 1)
        result.history.append({key: value for key, value in metrics.items() if key not in TIMING_KEYS})
        result.epoch_seconds.append(seconds)
        if val_metrics["rsum"] > result.best_metrics["rsum"]:
            result.best_state = copy.deepcopy(matcher.state_dict())
            result.best_epoch, result.best_metrics = epoch + 1, val_metrics
        result.stopped = stop_reason(_rsums(result), settings)
        log.info("%s epoch %d/%d: val rsum %.2f (best %.2f at epoch %d)%s", label, epoch + 1, settings.max_epochs,
                 val_metrics["rsum"], result.best_metrics["rsum"], result.best_epoch,
                 "; stopping on the plateau" if result.stopped == PLATEAU else "")  # fmt: skip
        if context.is_main:
            _save(work_dir, fingerprint, matcher, optimizer, scaler, result, tracker.run_id)
        context.barrier()  # a checkpoint is complete before any process can stop
    warm_up_hinge_losses(matcher, False)
    return result


def _log_history(tracker: Tracker, result: FitResult) -> None:
    """The resumed epochs logged again when the run logging now is not the one they were logged to (the store no
    longer has that one, or it is in another store), so that one run holds the whole history."""
    if tracker.run_id is None or tracker.run_id == result.logged_to:
        return
    for epoch, (metrics, seconds) in enumerate(zip(result.history, result.epoch_seconds, strict=True), start=1):
        tracker.log_metrics(metrics | {"train/epoch_seconds": seconds}, step=epoch)


def _rsums(result: FitResult) -> list[float]:
    return [metrics["val/rsum"] for metrics in result.history]


def build_optimizer(matcher: nn.Module, settings: TrainParams) -> torch.optim.Optimizer:
    """Adam (SCAN, VSE++, CVSE) or AdamW (VSE∞, woodfrog/vse_infty `lib/vse.py`) over every parameter."""
    kind = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    return kind(matcher.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)


def gradient_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (bf16 has fp32's range and needs none; fp32 neither)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


@dataclass(frozen=True)
class Stepped:
    """What one optimisation step computed."""

    losses: dict[str, Tensor]  # the named loss terms, total under "loss"
    grad_norm: Tensor | None  # the gradient norm before clipping; None when the loss was not finite (no step taken)


@dataclass(frozen=True)
class TrainingStep:
    """One optimisation step: forward under autocast, backward (scaled for fp16), clipping, Adam."""

    model: nn.Module  # the matcher, or its DDP (or compiled) wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    grad_clip: float  # the largest gradient norm
    device: torch.device
    precision: str  # the autocast precision (`running_precision`: fp32 on a CPU in training)
    context: Context

    def __call__(self, images: Images, captions: Captions) -> Stepped:
        images, captions = images.to(self.device), captions.to(self.device)
        with autocast(self.precision, self.device):
            losses = self.model(images, captions, self.context)
        if not torch.isfinite(losses["loss"]):  # the loss of the global batch: every process stops alike
            return Stepped(losses, None)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["loss"]).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return Stepped(losses, grad_norm)


def _train_one_epoch(
    step: TrainingStep, batches: Iterable[tuple[Images, Captions]], epoch: int, epochs: int, label: str
) -> dict[str, float]:
    step.model.train()
    sums: dict[str, float] = defaultdict(float)
    seen, started = 0, time.perf_counter()
    bar = tqdm(batches, desc=f"{label} epoch {epoch + 1}/{epochs}", unit="batch", mininterval=5,
               disable=not step.context.is_main)  # fmt: skip
    for iteration, (images, captions) in enumerate(bar):
        losses = step(images, captions).losses
        loss = losses["loss"]
        if not torch.isfinite(loss):
            last = f"{sums['loss'] / seen:.4g}" if seen else "none"
            raise UserError(
                f"{label}: the loss became {loss.item()} in epoch {epoch + 1}, batch {iteration + 1} (mean so far "
                f"{last}); lower train.learning_rate or train.grad_clip"
            )
        batch = len(captions) * step.context.world_size  # the global batch, whose loss this is
        for key, value in losses.items():
            sums[key] += float(value.detach()) * batch
        seen += batch
        rate = seen / (time.perf_counter() - started)
        bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", captions_per_s=f"{rate:.0f}", refresh=False)
    elapsed = time.perf_counter() - started
    metrics = {f"train/{key}": value / seen for key, value in sums.items()}
    rate_now = step.optimizer.param_groups[0]["lr"]
    metrics |= {"train/pairs": float(seen), "train/learning_rate": rate_now}
    metrics |= {"train/captions_per_second": seen / elapsed, "train/warmup": float(_warming_up(step.model))}
    return metrics


def _warming_up(model: nn.Module) -> bool:
    return any(getattr(module, "warming_up", False) for module in model.modules())


def _save(
    work_dir: Path,
    fingerprint: str,
    matcher: Matcher,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    result: FitResult,
    run_id: str | None = None,
) -> None:
    save_checkpoint(
        work_dir,
        {
            FINGERPRINT_KEY: fingerprint,
            RUN_ID_KEY: run_id,
            "model": matcher.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "best_state": result.best_state,
            "best_epoch": result.best_epoch,
            "best_metrics": result.best_metrics,
            "history": result.history,
            "epoch_seconds": result.epoch_seconds,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        },
    )


_CHECKPOINT_KEYS = ("optimizer", "scaler", "best_state", "best_epoch", "best_metrics", "history",
                    "epoch_seconds", "rng", "cuda_rng")  # fmt: skip


def _resume(
    work_dir: Path, fingerprint: str, matcher: Matcher, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler
) -> FitResult | None:
    """The state of this training run from its newest usable checkpoint in `work_dir`, or None (start from the
    first epoch)."""
    state = load_checkpoint(work_dir, fingerprint, matcher, _CHECKPOINT_KEYS)
    if state is None:
        return None
    matcher.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    log.info("resuming after epoch %d from %s", len(state["history"]), work_dir)
    return FitResult(
        state["best_state"], state["best_epoch"], state["best_metrics"], state["history"], state["epoch_seconds"],
        logged_to=state.get(RUN_ID_KEY),
    )  # fmt: skip
