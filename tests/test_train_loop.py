"""The shared training loop: best-by-rSum selection, early stopping on the validation plateau, the hinge warm-up, an
interrupted run resumes to the same result, NaN stops it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itm.config import TrainParams, load_params
from itm.data.batches import Captions, Regions
from itm.errors import UserError
from itm.models.base import Encoded, Matcher
from itm.models.losses import ContrastiveLoss
from itm.tracking import NullTracker
from itm.train import loop
from itm.train.loop import CAP, PLATEAU, epochs_without_progress, fit, learning_rate, stop_reason
from itm.train.run import resolved_settings
from tests.conftest import REPO


class _MeanImage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.project = nn.Linear(6, 8)

    def forward(self, regions: Regions) -> Encoded:
        mean = (regions.features.float() * regions.mask[..., None]).sum(1) / regions.mask.sum(1, keepdim=True)
        pooled = F.normalize(self.project(mean), dim=-1)
        return Encoded(pooled[:, None], torch.ones(len(pooled), 1, dtype=torch.bool), pooled)


class _BagText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(20, 8, mode="mean")

    def forward(self, captions: Captions) -> Encoded:
        pooled = F.normalize(self.embed(captions.tokens), dim=-1)
        return Encoded(pooled[:, None], torch.ones(len(pooled), 1, dtype=torch.bool), pooled)


class _Cosine(nn.Module):
    def forward(self, images: Encoded, captions: Encoded) -> Tensor:
        return images.pooled @ captions.pooled.T


class _Hinge(nn.Module):
    def forward(self, scores: Tensor, *_encodings: Encoded) -> dict[str, Tensor]:
        positives = scores.diag()
        cost = (0.2 + scores - positives[None, :]).clamp(min=0) + (0.2 + scores - positives[:, None]).clamp(min=0)
        loss = cost.masked_fill(torch.eye(len(scores), dtype=torch.bool), 0).sum()
        return {"loss": loss}


def _matcher() -> Matcher:
    torch.manual_seed(0)
    return Matcher(_MeanImage(), _BagText(), _Cosine(), _Hinge())


def _batches(epoch: int) -> list[tuple[Regions, Captions]]:
    generator = torch.Generator().manual_seed(epoch)
    out = []
    for _ in range(3):
        features = torch.randn(4, 5, 6, generator=generator).half()
        mask = torch.ones(4, 5, dtype=torch.bool)
        tokens = torch.randint(1, 20, (4, 7), generator=generator)
        out.append((Regions(features, mask), Captions(tokens, torch.full((4,), 7))))
    return out


SETTINGS = TrainParams(max_epochs=4, patience=None, batch_size=4, learning_rate=1.0e-2, decay_epochs=2)


def _validate(matcher: Matcher) -> dict[str, float]:
    # A stand-in figure that changes with the weights, so best-epoch selection has something to pick.
    return {"rsum": float(matcher.image_encoder.project.weight.detach().sum())}


def _fit(
    matcher: Matcher, work: Path, tracker: NullTracker, settings: TrainParams = SETTINGS, validate=_validate
) -> loop.FitResult:
    return fit(
        matcher, _batches, validate, settings, work_dir=work, fingerprint="r1", tracker=tracker,
        device=torch.device("cpu"), label="toy",
    )  # fmt: skip


def test_selects_the_best_epoch_and_logs_every_epoch(tmp_path: Path) -> None:
    tracker = NullTracker()
    result = _fit(_matcher(), tmp_path, tracker)
    assert [step for _, step in tracker.metrics] == [1, 2, 3, 4]
    rsums = [figures["val/rsum"] for figures in result.history]
    assert result.best_epoch == 1 + max(range(4), key=lambda i: rsums[i])
    assert result.best_metrics["rsum"] == max(rsums)
    assert all(math.isfinite(figures["train/loss"]) for figures in result.history)
    assert result.stopped == CAP and result.epochs == 4 and result.pairs_seen == 4 * 3 * 4  # epochs x batches x 4
    assert not any("seconds" in key for figures in result.history for key in figures)  # times are kept apart
    assert len(result.epoch_seconds) == 4 and all(seconds > 0 for seconds in result.epoch_seconds)


def test_resume_reaches_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight = _fit(_matcher(), tmp_path / "a", NullTracker())
    real = loop._train_one_epoch

    def interrupted(*args, **kwargs):
        if args[2] == 2:  # the epoch index
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _fit(_matcher(), tmp_path / "b", NullTracker())
    monkeypatch.setattr(loop, "_train_one_epoch", real)
    tracker = NullTracker()
    resumed = _fit(_matcher(), tmp_path / "b", tracker)
    assert [step for _, step in tracker.metrics] == [3, 4]

    def results(history: list[dict]) -> list[dict]:
        return [
            {k: v for k, v in figures.items() if not k.endswith(("_per_second", "_seconds"))} for figures in history
        ]

    assert resumed.best_epoch == straight.best_epoch and results(resumed.history) == results(straight.history)
    for name, value in straight.best_state.items():
        assert torch.equal(value, resumed.best_state[name]), name


def test_a_non_finite_loss_stops_with_a_clear_message(tmp_path: Path) -> None:
    matcher = _matcher()
    with torch.no_grad():
        matcher.image_encoder.project.weight.fill_(float("nan"))
    with pytest.raises(UserError, match=r"toy: the loss became nan in epoch 1, batch 1"):
        _fit(matcher, tmp_path, NullTracker())


def test_learning_rate_schedules() -> None:
    assert [learning_rate(SETTINGS, e) for e in range(4)] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3])
    cosine = SETTINGS.model_copy(update={"schedule": "cosine"})
    assert learning_rate(cosine, 0) == pytest.approx(1e-2) and learning_rate(cosine, 2) == pytest.approx(5e-3)


class _CountingHinge(_Hinge):
    """A loss that reports after each epoch how many batches it saw in training."""

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    def forward(self, scores: Tensor, *encodings: Encoded) -> dict[str, Tensor]:
        self.batches += 1
        return super().forward(scores, *encodings)

    def end_epoch(self) -> dict[str, float]:
        seen, self.batches = self.batches, 0
        return {"batches_seen": float(seen)}


def test_a_loss_reports_after_every_epoch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    matcher = Matcher(_MeanImage(), _BagText(), _Cosine(), _CountingHinge())
    tracker = NullTracker()
    _fit(matcher, tmp_path, tracker)
    assert [figures["train/batches_seen"] for figures, _ in tracker.metrics] == [3.0] * 4
    assert _matcher().end_epoch() == {}  # a loss without the hook reports nothing


class _Scripted:
    """Validation figures read from a script, one per call."""

    def __init__(self, rsums: list[float]) -> None:
        self.rsums = iter(rsums)

    def __call__(self, matcher: Matcher) -> dict[str, float]:
        return {"rsum": next(self.rsums)}


def test_progress_counts_only_gains_above_min_delta() -> None:
    assert epochs_without_progress([], 1.0) == 0
    assert epochs_without_progress([1.0, 5.0, 5.5, 4.0], 1.0) == 2  # 5.5 is not 1 point above 5
    assert epochs_without_progress([1.0, 5.0, 5.5, 4.0], 0.0) == 1
    plateau = SETTINGS.model_copy(update={"patience": 2, "min_delta": 1.0, "max_epochs": 10})
    assert stop_reason([1.0, 5.0, 5.5], plateau) is None
    assert stop_reason([1.0, 5.0, 5.5, 4.0], plateau) == PLATEAU
    assert stop_reason([float(n) * 2 for n in range(10)], plateau) == CAP
    assert stop_reason([1.0] * 9, SETTINGS.model_copy(update={"max_epochs": 10})) is None  # no patience: to the cap


def test_stops_on_the_plateau_and_keeps_the_best_epoch(tmp_path: Path) -> None:
    settings = SETTINGS.model_copy(update={"patience": 2, "min_delta": 1.0, "max_epochs": 10})
    scripted = _Scripted([1.0, 5.0, 5.5, 4.0, 3.0, 9.0])
    result = _fit(_matcher(), tmp_path, NullTracker(), settings, scripted)
    assert result.stopped == PLATEAU and result.epochs == 4  # epochs 3 and 4 gained less than min_delta
    assert result.best_epoch == 3 and result.best_metrics["rsum"] == 5.5  # any gain still selects the weights
    assert list(scripted.rsums) == [3.0, 9.0]  # the fifth epoch never ran


def test_a_resumed_run_stops_where_it_would_have(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = SETTINGS.model_copy(update={"patience": 1, "max_epochs": 10})
    straight = _fit(_matcher(), tmp_path / "a", NullTracker(), settings)
    assert straight.stopped == PLATEAU and straight.epochs < 10
    real = loop._train_one_epoch

    def interrupted(*args, **kwargs):
        if args[2] == straight.epochs - 1:  # the last epoch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_one_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _fit(_matcher(), tmp_path / "b", NullTracker(), settings)
    monkeypatch.setattr(loop, "_train_one_epoch", real)
    resumed = _fit(_matcher(), tmp_path / "b", NullTracker(), settings)
    assert (resumed.epochs, resumed.best_epoch, resumed.stopped) == (straight.epochs, straight.best_epoch, PLATEAU)
    assert resumed.history == straight.history


def test_the_warmup_sums_every_violation_then_takes_the_hardest(tmp_path: Path) -> None:
    hinge = ContrastiveLoss(0.2, max_violation=True)
    scores = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    hinge.warming_up = True
    assert torch.equal(hinge(scores)["loss"], ContrastiveLoss(0.2, max_violation=False)(scores)["loss"])
    hinge.warming_up = False
    assert hinge(scores)["loss"] < ContrastiveLoss(0.2, max_violation=False)(scores)["loss"]

    torch.manual_seed(0)
    matcher = Matcher(_MeanImage(), _BagText(), _Cosine(), ContrastiveLoss(0.2, max_violation=True))
    settings = SETTINGS.model_copy(update={"warmup_epochs": 2})
    result = _fit(matcher, tmp_path, NullTracker(), settings)
    assert [figures["train/warmup"] for figures in result.history] == [1.0, 1.0, 0.0, 0.0]
    assert not matcher.loss.warming_up  # the trained model ranks with its own loss setting


def test_the_epoch_limit_caps_every_matcher_whatever_its_own_max_epochs() -> None:
    params = load_params(REPO / "params.yaml")
    own = {name: block.max_epochs for name, block in params.matchers.items() if block.max_epochs is not None}
    unlimited = {name: resolved_settings(block, params.train).max_epochs for name, block in params.matchers.items()}
    assert all(unlimited[name] == own.get(name, params.train.max_epochs) for name in params.matchers)
    own_cap = params.matchers["vsepp"].model_copy(update={"max_epochs": 20})
    assert resolved_settings(own_cap, params.train).max_epochs == 20
    limited = params.train.model_copy(update={"epoch_limit": 1})
    assert {resolved_settings(block, limited).max_epochs for block in [*params.matchers.values(), own_cap]} == {1}
    roomy = params.train.model_copy(update={"epoch_limit": 1000})  # a limit above a matcher's own cap changes nothing
    assert {name: resolved_settings(block, roomy).max_epochs for name, block in params.matchers.items()} == unlimited
