"""Training checkpoints that survive damage from outside, shared by the matchers' and the detector's training.

A training run writes `checkpoint.pt` in its work folder after every epoch, atomically and through a Python stream
(a full disk is an OSError naming the file); the checkpoint before it is kept beside it as `checkpoint.previous.pt`.
Reading goes through `itm.safe_load` (no code in the file runs). A checkpoint that cannot be used (not a torch file,
cut short, missing entries, weights of another shape) is named in one warning and removed, and the run resumes from
the previous one, or from the first epoch when neither can be read, instead of failing on every run until someone
deletes it. A checkpoint of another training run (another fingerprint) is left alone and not resumed from.

Each checkpoint names the MLflow run its epochs were logged to (`RUN_ID_KEY`), which the resumed stage continues.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from itm.atomic import remove_when_published, staged_file
from itm.errors import UserError
from itm.safe_load import load_torch

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.previous.pt"  # the one before: what a damaged checkpoint falls back to
FINGERPRINT_KEY = "fingerprint"  # identifies the training run a checkpoint belongs to
RUN_ID_KEY = "mlflow_run_id"  # the MLflow run its epochs were logged to, or None


def candidates(work_dir: Path) -> tuple[Path, Path]:
    """The checkpoints of `work_dir`, newest first."""
    return work_dir / CHECKPOINT, work_dir / PREVIOUS_CHECKPOINT


def save_checkpoint(work_dir: Path, state: dict[str, Any]) -> None:
    """Write `state` as `work_dir/checkpoint.pt`; the one it replaces becomes the previous one."""
    path, previous = candidates(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as tmp:
        with tmp.open("wb") as stream:
            torch.save(state, stream)
        if path.is_file():  # the complete new one is on disk: the last becomes the previous
            path.replace(previous)


def load_checkpoint(
    work_dir: Path, fingerprint: str, model: torch.nn.Module, required: tuple[str, ...]
) -> dict[str, Any] | None:
    """The newest usable checkpoint of the training run `fingerprint` in `work_dir`, or None (start afresh). A
    checkpoint that cannot be read, lacks an entry of `required` or holds weights (`model`) of other shapes than
    `model`'s is named in a warning and removed."""
    for path in candidates(work_dir):
        state = _read(path, model, required)
        if state is None:
            continue
        if state[FINGERPRINT_KEY] != fingerprint:
            log.info("%s belongs to another training run; not resuming from it", path)
            continue
        return state
    if work_dir.is_dir():
        log.info("no checkpoint of this training run in %s; starting from the first epoch", work_dir)
    return None


def checkpoint_run(work_dir: Path, fingerprint: str) -> str | None:
    """The MLflow run that the checkpoint `load_checkpoint` would resume from logged to; None without one, or when
    it logged nowhere. A damaged checkpoint is passed over here (`load_checkpoint` names and removes it)."""
    for path in candidates(work_dir):
        if not path.is_file():
            continue
        try:
            state = load_torch(path, what="checkpoint")
        except UserError:
            continue
        if isinstance(state, dict) and state.get(FINGERPRINT_KEY) == fingerprint:
            return state.get(RUN_ID_KEY)
    return None


def remove_checkpoints_when_published(work_dir: Path) -> None:
    """Remove the checkpoints once the stage's outputs are published (kept while the stage may still fail)."""
    for path in candidates(work_dir):
        remove_when_published(path)


def _problem(state: Any, model: torch.nn.Module, required: tuple[str, ...]) -> str | None:
    """Why a loaded checkpoint cannot be resumed from: not a mapping, entries missing, weights of other shapes."""
    if not isinstance(state, dict):
        return "not a checkpoint"
    missing = [key for key in (FINGERPRINT_KEY, "model", *required) if key not in state]
    if missing:
        return f"not a whole checkpoint (no {', '.join(missing)})"
    if not isinstance(state["model"], dict):
        return "not a checkpoint"
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items() if torch.is_tensor(value)}
    found = {key: tuple(value.shape) for key, value in state["model"].items() if torch.is_tensor(value)}
    return None if found == expected else "its weights do not fit this model"


def _read(path: Path, model: torch.nn.Module, required: tuple[str, ...]) -> dict[str, Any] | None:
    """The checkpoint at `path` when it is whole and fits `model`; None when there is none. A damaged one is named
    in a warning and removed."""
    if not path.is_file():
        return None
    try:
        state = load_torch(path, what="checkpoint")
        reason = _problem(state, model, required)
    except UserError as error:
        reason = str(error).removeprefix(f"{path}: ")
    if reason is None:
        return state
    log.warning("%s: %s; removed it, training goes on from the last good state", path, reason)
    path.unlink(missing_ok=True)
    return None
