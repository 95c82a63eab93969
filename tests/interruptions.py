"""Trainings interrupted (Ctrl-C) in a chosen epoch, for the resume tests of the matchers and the detector."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest


@contextlib.contextmanager
def interrupted_in_epoch(
    monkeypatch: pytest.MonkeyPatch, module: ModuleType, epoch: int, epoch_argument: int
) -> Iterator[None]:
    """A training inside is interrupted in its epoch `epoch` (0-based), after the checkpoints of the epochs before:
    `module._train_one_epoch`, whose positional argument `epoch_argument` is the epoch index, raises
    KeyboardInterrupt there (expected by the block), and is itself again afterwards."""
    real = module._train_one_epoch

    def stop_in_the_epoch(*args: Any, **kwargs: Any) -> Any:
        if args[epoch_argument] == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "_train_one_epoch", stop_in_the_epoch)
    with pytest.raises(KeyboardInterrupt):
        yield
    monkeypatch.setattr(module, "_train_one_epoch", real)
