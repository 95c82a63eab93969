"""A trained matcher on disk: `models/<matcher>/model.pt` rebuilds itself from what it stores.

The file holds the best weights, the resolved params block (with its `kind`), the region feature size, the
vocabulary size and digest, the git revision and the validation figures; `card.json` beside it repeats everything
but the weights, plus the MLflow run id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import TypeAdapter

from itm.atomic import staged_file
from itm.config import MatcherParams
from itm.errors import UserError
from itm.models import Matcher, build_matcher

MODEL_FILE = "model.pt"
CARD_FILE = "card.json"


def save_matcher(folder: Path, state_dict: dict[str, torch.Tensor], card: dict[str, Any]) -> None:
    """Write `model.pt` (weights + card) and `card.json` into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    with staged_file(folder / MODEL_FILE) as tmp:
        torch.save({"state_dict": state_dict, "card": card}, tmp)
    with staged_file(folder / CARD_FILE) as tmp:
        tmp.write_text(json.dumps(card, indent=1))


def load_matcher(folder: Path, device: torch.device, *, vocab_digest: str | None = None) -> tuple[Matcher, dict]:
    """The saved matcher in eval mode, and its card; refuses a model trained on another vocabulary."""
    path = folder / MODEL_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found (run the train stage first)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    card = saved["card"]
    if vocab_digest is not None and card["vocab_digest"] != vocab_digest:
        raise UserError(
            f"{path}: trained with vocabulary {card['vocab_digest']}, but the captions use {vocab_digest}; retrain it"
        )
    params = TypeAdapter(MatcherParams).validate_python(card["params"])
    matcher = build_matcher(params, feature_dim=card["feature_dim"], vocab_size=card["vocab_size"])
    matcher.load_state_dict(saved["state_dict"])
    return matcher.to(device).eval(), card
