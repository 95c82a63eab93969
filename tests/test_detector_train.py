"""Training the detector: finite losses, figures in range, and an interrupted run resumes to the same weights."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch

from itm.config import DetectorArchitecture, DetectorTraining
from itm.detect import train
from itm.detect.data import read_annotations, read_vocabularies
from itm.detect.metrics import Detections, GroundTruth, average_precision, mean_ap
from itm.detect.train import learning_rate_factor, train_detector
from itm.tracking import NullTracker
from tests.conftest import TINY_DETECTOR
from tests.interruptions import interrupted_in_epoch

TRAINING = DetectorTraining(epochs=2, batch_size=8, learning_rate=0.01, warmup_iterations=4, max_images=32)


def detector_interrupted_in_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> AbstractContextManager[None]:
    """A detector training inside is interrupted (Ctrl-C) in its epoch `epoch` (0-based)."""
    return interrupted_in_epoch(monkeypatch, train, epoch, epoch_argument=5)


def _train(dataset: Path, work: Path, tracker: NullTracker, training: DetectorTraining = TRAINING):
    vocabularies = read_vocabularies(dataset)
    return train_detector(
        read_annotations(dataset, "train", vocabularies),
        read_annotations(dataset, "val", vocabularies),
        vocabularies,
        DetectorArchitecture(**TINY_DETECTOR),
        training,
        work_dir=work,
        data_digest="tiny",
        tracker=tracker,
        device=torch.device("cpu"),
    )


@pytest.mark.slow
def test_interrupted_training_resumes_to_the_same_weights(
    tiny_synthetic: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker = NullTracker()
    straight, validation = _train(tiny_synthetic, tmp_path / "a", tracker)
    epochs_logged = [step for _, step in tracker.metrics]
    assert epochs_logged == [1, 2]
    assert all(torch.isfinite(torch.tensor(v)) for metrics, _ in tracker.metrics for v in metrics.values())
    assert 0.0 <= validation.object_ap50 <= 1.0 and 0.0 <= validation.attribute_accuracy <= 1.0

    with detector_interrupted_in_epoch(monkeypatch, 1):
        _train(tiny_synthetic, tmp_path / "b", NullTracker())
    assert (tmp_path / "b" / "checkpoint.pt").is_file()
    resumed_tracker = NullTracker()
    resumed, _ = _train(tiny_synthetic, tmp_path / "b", resumed_tracker)
    assert [step for _, step in resumed_tracker.metrics] == [2]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_learning_rate_warms_up_then_steps_down() -> None:
    factors = [learning_rate_factor(i, total=100, warmup=10, decay_at=(0.5, 0.8)) for i in (0, 5, 10, 49, 50, 80)]
    assert factors == pytest.approx([0.001, 0.5005, 1.0, 1.0, 0.1, 0.01])


def test_average_precision_by_hand() -> None:
    # Two ground-truth boxes; detections ranked: hit, miss, hit -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    truth = [GroundTruth(torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 30]]), torch.tensor([1, 1]))]
    found = [
        Detections(
            torch.tensor([[0.0, 0, 10, 10], [50.0, 50, 60, 60], [20.0, 20, 30, 30]]),
            torch.tensor([0.9, 0.8, 0.7]),
            torch.tensor([1, 1, 1]),
        )
    ]
    mean, per_class = mean_ap(found, truth, [1, 2])
    assert per_class == {1: pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)} and mean == per_class[1]
    assert average_precision(torch.tensor([0.5, 1.0]).numpy(), torch.tensor([1.0, 1.0]).numpy()) == 1.0
