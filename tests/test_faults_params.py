"""Params that a loose schema lets through and that fail later, or never fail at all (issue "Faults from outside the
code", items 12-14): each is refused at load time in one line naming the key, or, where a run cannot be judged
before it trains (no progress), warned about and recorded in the model card."""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import Tensor, nn

from itm.config import load_params, parse_params
from itm.detect import train as detector_train
from itm.errors import UserError
from itm.evaluate.metrics import recall_metrics
from itm.profiles import read_profile, run_profile
from itm.train import run
from itm.train.progress import chance_level, training_progress
from stages import detector as detector_stage
from tests.conftest import REPO
from tests.test_matcher_stages import _train, prepared  # noqa: F401 (a fixture: the tiny training data)

PARAMS_TEXT = (REPO / "params.yaml").read_text(encoding="utf-8")
RAW = yaml.safe_load(PARAMS_TEXT)


def _mutated(change: Callable[[dict], Any]) -> dict:
    raw = copy.deepcopy(RAW)
    change(raw)
    return raw


def _refusal(raw: dict) -> str:
    with pytest.raises(UserError) as caught:
        parse_params(raw)
    return str(caught.value)


# --- item 12: values the code downstream cannot take ----------------------------------------------------------------

OUT_OF_RANGE = [
    (
        lambda r: r["datasets"]["synthetic"].update(seed=-1),  # numpy: "expected non-negative integer"
        "params.yaml: datasets.synthetic.seed: must be >= 0, got -1",
    ),
    (
        lambda r: r["train"].update(seeds=[0, 2**70]),  # torch.manual_seed: "Overflow when unpacking long"
        "params.yaml: train.seeds[1]: must be <= 4294967295, got 1180591620717411303424",
    ),
    (
        lambda r: r["detector"]["train"].update(seed=2**32),
        "params.yaml: detector.train.seed: must be <= 4294967295, got 4294967296",
    ),
    (
        lambda r: r["evaluate"]["bootstrap"].update(seed=-3),
        "params.yaml: evaluate.bootstrap.seed: must be >= 0, got -3",
    ),
    (lambda r: r["compare"].update(seed=-1), "params.yaml: compare.seed: must be >= 0, got -1"),
    (
        lambda r: r["compare"]["significance"].update(seed=2**40),
        "params.yaml: compare.significance.seed: must be <= 4294967295, got 1099511627776",
    ),
    (
        lambda r: r["matchers"]["scan_t2i_avg"].update(embed_dim=10**12),  # an allocation of terabytes
        "params.yaml: matchers.scan_t2i_avg.embed_dim: must be <= 8192, got 1000000000000",
    ),
    (
        lambda r: r["matchers"]["vsepp"].update(word_dim=10**9),
        "params.yaml: matchers.vsepp.word_dim: must be <= 8192, got 1000000000",
    ),
    (
        lambda r: r["detector"]["architectures"]["small"].update(anchor_scales=[2.0, -4.0, 6.0]),
        "params.yaml: detector.architectures.small.anchor_scales[1]: must be > 0.0, got -4.0",
    ),
    (
        lambda r: r["detector"]["architectures"]["butd"].update(anchor_ratios=[0.0, 1.0]),
        "params.yaml: detector.architectures.butd.anchor_ratios[0]: must be > 0.0, got 0.0",
    ),
    (
        lambda r: r["detector"]["architectures"]["small"].update(min_size=512, max_size=64),
        "params.yaml: detector.architectures.small: min_size (512) must not exceed max_size (64)",
    ),
]


@pytest.mark.parametrize(("change", "expected"), OUT_OF_RANGE)
def test_a_value_the_code_cannot_take_is_one_line_naming_the_key(change: Callable, expected: str) -> None:
    assert _refusal(_mutated(change)) == expected


def test_each_decay_point_outside_the_training_is_named() -> None:
    message = _refusal(_mutated(lambda r: r["detector"]["train"].update(decay_at=[1.5, -2])))
    assert message.splitlines() == [
        "params.yaml: detector.train.decay_at[0]: must be < 1.0, got 1.5",
        "params.yaml: detector.train.decay_at[1]: must be > 0.0, got -2",
    ]


def _latin1(text: str) -> bytes:
    return text.encode("latin-1")


def test_a_params_file_that_is_not_utf8_is_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes(PARAMS_TEXT.encode() + _latin1("# réglages\n"))
    line = PARAMS_TEXT.count("\n") + 1
    with pytest.raises(UserError) as caught:
        load_params(path)
    assert str(caught.value) == f"{path}: not UTF-8 text (byte 0xe9 on line {line}); save it as UTF-8"


def test_a_profile_that_is_not_utf8_is_one_line_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "quick.yaml"
    path.write_bytes(_latin1("# café\ntrain: {epoch_limit: 1}\n"))
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: not UTF-8 text \(byte 0xe9 on line 1\)"):
        read_profile(path)


def _with_line_after(anchor: str, added: str) -> tuple[str, int]:
    """The committed params.yaml with `added` inserted after its first line `anchor`, and the new line's number."""
    lines = PARAMS_TEXT.splitlines(keepends=True)
    at = lines.index(anchor) + 1
    return "".join([*lines[:at], added, *lines[at:]]), at + 1


@pytest.mark.parametrize(
    ("anchor", "added", "key"),
    [
        ("    seed: 0\n", "    seed: 1\n", "datasets.synthetic.seed"),  # the first `seed:` is the synthetic set's
        ("dataset: synthetic\n", "dataset: coco\n", "dataset"),
        ("        md5: 0da8c0bd3d6becc4dcb32757491aca88\n", "        md5: null\n", "datasets.coco.images[0].md5"),
    ],
)
def test_a_duplicate_key_is_refused_with_both_lines(tmp_path: Path, anchor: str, added: str, key: str) -> None:
    """PyYAML keeps the last value silently (a stage run directly would use it); DVC refuses the file."""
    text, line = _with_line_after(anchor, added)
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as caught:
        load_params(path)
    assert str(caught.value) == (
        f"{path}: line {line}: duplicate key {key} (first at line {line - 1}); keep one (DVC refuses the file)"
    )


def test_a_duplicate_section_in_a_profile_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "quick.yaml"
    path.write_text("train:\n  epoch_limit: 1\nregions: {min_boxes: 3}\ntrain:\n  batch_size: 8\n", encoding="utf-8")
    with pytest.raises(UserError) as caught:
        read_profile(path)
    assert str(caught.value) == (
        f"{path}: line 4: duplicate key train (first at line 1); keep one (DVC refuses the file)"
    )


def test_a_profile_run_refuses_a_params_file_with_a_duplicate_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make quick` reads params.yaml too: the duplicate is named before DVC is started."""
    params_path = tmp_path / "params.yaml"
    params_path.write_text(PARAMS_TEXT + "train:\n  epoch_limit: 3\n", encoding="utf-8")  # a second train section
    first, line = PARAMS_TEXT.splitlines().index("train:") + 1, PARAMS_TEXT.count("\n") + 1

    def no_dvc(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("DVC was started on a params.yaml with a duplicate key")

    monkeypatch.setattr("itm.profiles.subprocess.run", no_dvc)
    with pytest.raises(UserError, match=rf"line {line}: duplicate key train \(first at line {first}\)"):
        run_profile(REPO / "profiles" / "quick.yaml", params_path)


class _ExplodingDetector(nn.Module):
    """A detector whose loss is NaN from the first batch (what a diverging learning rate leads to)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {"loss_objectness": self.weight * 0.5, "loss_box_reg": self.weight * math.nan}


def test_a_non_finite_detector_loss_stops_with_one_line() -> None:
    model = _ExplodingDetector()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    batches = [([torch.zeros(3, 8, 8)], [{"boxes": torch.zeros(0, 4)}])] * 2
    with pytest.raises(UserError) as caught:
        detector_train._train_one_epoch(model, batches, optimizer, schedule, torch.device("cpu"), 0, 3)
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        "detector: the loss became nan in epoch 1, batch 1 (loss_objectness=0.5, loss_box_reg=nan); lower "
        "detector.train.learning_rate or raise detector.train.warmup_iterations"
    )


# --- item 13: a missing section is an error, never the most expensive default --------------------------------------

SECTIONS = ["download", "detector", "regions", "tokenize", "matchers", "train", "evaluate", "compare"]


@pytest.mark.parametrize("section", SECTIONS)
def test_a_missing_section_is_named(section: str) -> None:
    assert _refusal(_mutated(lambda r: r.pop(section))) == f"params.yaml: {section}: required section is missing"


def test_a_missing_detector_architecture_is_named() -> None:
    message = _refusal(_mutated(lambda r: r["detector"].pop("architecture")))
    assert message == "params.yaml: detector.architecture: required key is missing"


def test_the_detector_stage_without_its_section_stops_before_training(tmp_path: Path) -> None:
    raw = _mutated(lambda r: r.pop("detector"))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw), encoding="utf-8")
    out, work = tmp_path / "models" / "detector", tmp_path / "work"
    arguments = ["--params", str(params), "--dataset", str(tmp_path / "raw"), "--out", str(out),
                 "--metrics", str(tmp_path / "detector.json"), "--work", str(work)]  # fmt: skip
    with pytest.raises(UserError, match=r"params\.yaml: detector: required section is missing$"):
        detector_stage.main(arguments)
    assert not out.exists() and not work.exists()


# --- item 14: learning rates bounded; a run that makes no progress says so ------------------------------------------

LEARNING_RATES = [
    (lambda r: r["train"].update(learning_rate=1.0e3), "params.yaml: train.learning_rate: must be <= 1.0, got 1000.0"),
    (
        lambda r: r["matchers"]["naaf"].update(learning_rate=1.0e30),
        "params.yaml: matchers.naaf.learning_rate: must be <= 1.0, got 1e+30",
    ),
    (
        lambda r: r["matchers"]["vsepp"].update(learning_rate=2.0),
        "params.yaml: matchers.vsepp.learning_rate: must be <= 1.0, got 2.0",
    ),
    (
        lambda r: r["detector"]["train"].update(learning_rate=1.0e30),
        "params.yaml: detector.train.learning_rate: must be <= 1.0, got 1e+30",
    ),
]


@pytest.mark.parametrize(("change", "expected"), LEARNING_RATES)
def test_a_learning_rate_above_the_bound_is_named(change: Callable, expected: str) -> None:
    assert _refusal(_mutated(change)) == expected


def test_the_chance_level_by_hand_and_by_random_scores() -> None:
    # One caption per image: R@K = K / n both ways.
    assert chance_level([1] * 100).rsum == pytest.approx(2 * (1 + 5 + 10))
    # 1,000 images x 5 captions (the synthetic test split): t2i 1.6 and i2t just under it (README: "about 3").
    assert 3.1 < chance_level([5] * 1000).rsum < 3.2
    # 10 images x 5 captions: R@10 of text-to-image is 100 whatever the scores.
    generator = torch.Generator().manual_seed(0)
    caption_image = torch.arange(10).repeat_interleave(5)
    sampled = torch.tensor(
        [recall_metrics(torch.rand(10, 50, generator=generator), caption_image)["rsum"] for _ in range(400)]
    )
    chance = chance_level([5] * 10)
    assert float(sampled.mean()) == pytest.approx(chance.rsum, rel=0.02)
    assert chance.spread < float(sampled.std()) < 1.3 * chance.spread  # the directions share the scores


def _epoch(rsum: float, loss: float, warmup: bool = False) -> dict[str, float]:
    return {"val/rsum": rsum, "train/loss": loss, "train/warmup": float(warmup)}


JUDGED, TINY = [5] * 300, [5] * 10  # validation splits of 300 images (ceiling 16.5) and of 10 (rSum not judged)


def _signs(history: list[dict[str, float]], split: list[int] = JUDGED) -> tuple[str, bool | None, bool | None]:
    judged = training_progress(history, split)
    assert judged["chance_rsum"] == chance_level(split).rsum and judged["chance_spread"] == chance_level(split).spread
    return judged["verdict"], judged["rsum_at_chance"], judged["loss_flat"]


def test_progress_verdicts() -> None:
    # At 1e30 every score ties, which ranks against the ground truth: rSum 0 (100 on 10 images), the loss flat.
    assert _signs([_epoch(0.0, 12.8), _epoch(0.0, 12.8), _epoch(0.0, 12.8)]) == ("none", True, True)
    assert _signs([_epoch(100.0, 396.9, True), _epoch(100.0, 396.8, True)], TINY) == ("none", None, True)
    assert _signs([_epoch(12.0, 12.8), _epoch(60.0, 9.0)]) == ("progress", False, False)
    # No better than chance in any epoch, even with a falling loss: no progress.
    assert _signs([_epoch(16.0, 12.8), _epoch(9.0, 11.0)]) == ("none", True, False)
    # Above chance from the random start, but the loss never moves: no progress either.
    assert _signs([_epoch(80.0, 5.0), _epoch(80.0, 5.0 * (1 + 1e-4))]) == ("none", False, True)
    # The warm-up's loss (every violation) and the hardest negative's are different losses: not compared.
    switched = [_epoch(80.0, 40.0, warmup=True), _epoch(81.0, 2.0), _epoch(90.0, 1.5)]
    assert _signs(switched) == ("progress", False, False)
    assert _signs(switched[:2], TINY) == ("unknown", None, None)  # one epoch of each loss, 10 images: no judgement
    assert _signs([_epoch(80.0, 40.0)]) == ("progress", False, None)  # one epoch: rSum alone


def _card(model_dir: Path) -> dict:
    return json.loads((model_dir / "card.json").read_text())


@pytest.mark.slow
def test_a_collapsed_training_warns_and_says_so_in_its_card(
    prepared: Path,  # noqa: F811 (the fixture imported above)
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At a learning rate of 1e30 (past the schema's bound, so set behind its back) the hinge on normalised vectors
    stays finite and the run ends with exit 0: the embeddings collapse, every score ties (rSum 100, below the 281 of
    chance on 10 images, too few to judge by) and the loss stays flat. The run says so instead of passing for a
    trained model."""
    real = run.resolved_settings
    monkeypatch.setattr(
        run, "resolved_settings", lambda *args: real(*args).model_copy(update={"learning_rate": 1.0e30})
    )
    with caplog.at_level(logging.WARNING, logger="itm.train.run"):
        card = _card(_train(prepared, "vsepp"))
    verdict = card["training"]["progress"]
    assert (verdict["verdict"], verdict["rsum_at_chance"], verdict["loss_flat"]) == ("none", None, True), verdict
    assert [epoch["val/rsum"] for epoch in card["history"]] == [100.0, 100.0]  # below chance: every score ties
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("vsepp: training made no progress"), warnings
    assert "train.learning_rate" in warnings[0]


@pytest.mark.slow
def test_an_ordinary_training_makes_progress_without_a_warning(
    prepared: Path,  # noqa: F811 (the fixture imported above)
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="itm.train.run"):
        card = _card(_train(prepared, "vsepp"))  # two epochs of its warm-up loss: one pair to compare
    assert card["training"]["progress"]["verdict"] == "progress", card["training"]["progress"]
    assert not [record for record in caplog.records if record.name == "itm.train.run"]
