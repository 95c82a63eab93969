"""A detector on disk: `model.pt` (state dict, frozen batch norm) and `card.json` describing it.

The card records the architecture, the class and attribute names (without background / "no attribute"), where the
weights came from, the sha256 of `model.pt`, validation metrics, and the numeric environment it was made in
(itm/environment.py: a trained detector depends on the CPU kernels and threads); `load_detector` rebuilds the model
from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from itm import environment
from itm.atomic import sha256_of, staged_file, write_json
from itm.config import DetectorArchitecture
from itm.detect.model import BottomUpDetector, build_detector
from itm.errors import UserError
from itm.safe_load import first_line, load_torch

MODEL_FILE = "model.pt"
CARD_FILE = "card.json"


def save_detector(
    folder: Path,
    model: BottomUpDetector,
    architecture: DetectorArchitecture,
    classes: list[str] | None,
    attributes: list[str] | None,
    *,
    source: dict[str, Any],
    validation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `model.pt` and `card.json` into `folder`; returns the card."""
    folder.mkdir(parents=True, exist_ok=True)
    with staged_file(folder / MODEL_FILE) as tmp, tmp.open("wb") as stream:  # a full disk is then an OSError
        torch.save(model.state_dict(), stream)
    predictor = model.roi_heads.box_predictor
    card = {
        "architecture": architecture.model_dump(mode="json"),
        "num_classes": predictor.cls_score.out_features,
        "num_attributes": model.roi_heads.attribute_head.attr_score.out_features,
        "feature_dim": architecture.feature_dim,
        "classes": classes,
        "attributes": attributes,
        "source": source,
        "sha256": sha256_of(folder / MODEL_FILE),
        "validation": validation,
        "environment": environment.record(),
    }
    write_card(folder, card)
    return card


def write_card(folder: Path, card: dict[str, Any]) -> None:
    write_json(folder / CARD_FILE, card)


_AGAIN = "run the detector stage again, or restore it with `dvc checkout`"


def read_card(folder: Path) -> dict[str, Any]:
    path = folder / CARD_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found (run the detector stage first)")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{path}: not readable JSON ({first_line(error)}); {_AGAIN}") from None
    if not isinstance(card, dict):
        raise UserError(f"{path}: not a detector's card; {_AGAIN}")
    return card


def load_detector(folder: Path, device: torch.device) -> tuple[BottomUpDetector, dict[str, Any]]:
    """The saved detector in eval mode on `device`, and its card; refuses weights whose sha256 differs."""
    card = read_card(folder)
    if card.get("source", {}).get("kind") == "none":
        raise UserError(f"{folder}: no detector was built (detector.weights is 'none'); regions need one")
    missing = [key for key in ("sha256", "architecture", "num_classes", "num_attributes") if key not in card]
    if missing:
        lacks = ", ".join(missing)
        raise UserError(f"{folder}: not a detector's folder (its card lacks {lacks}); pass models/detector")
    weights = folder / MODEL_FILE
    if not weights.is_file() or sha256_of(weights) != card["sha256"]:
        raise UserError(f"{weights}: missing or not the file its card describes (sha256 {card['sha256']}); {_AGAIN}")
    architecture = DetectorArchitecture.model_validate(card["architecture"])
    model = build_detector(architecture, card["num_classes"], card["num_attributes"])
    state = load_torch(weights, what="detector")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise UserError(f"{weights}: its weights do not fit the detector its card describes ({first_line(error)}); "
                        f"{_AGAIN}") from None  # fmt: skip
    return model.to(device).eval(), card
