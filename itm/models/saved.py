"""A trained matcher on disk: `models/<matcher>/model.pt` rebuilds itself from what it stores.

The file holds the best weights, the resolved params block (with its `kind`), the region feature size, the
vocabulary size and digest, the git revision and the validation metrics, and for a concept-aware matcher the concept
vocabulary with its co-occurrence counts; `card.json` beside it repeats everything but the weights and the concepts,
plus the MLflow run id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import TypeAdapter, ValidationError

from itm.atomic import staged_file, write_json
from itm.config import MatcherParams
from itm.data.concepts import Concepts
from itm.data.splits import DataFolders
from itm.data.vocab import Vocab
from itm.errors import UserError
from itm.models.base import Matcher
from itm.models.registry import MatcherInputs, build_matcher
from itm.safe_load import first_line, load_torch

MODEL_FILE = "model.pt"
CARD_FILE = "card.json"


def save_matcher(
    folder: Path,
    state_dict: dict[str, torch.Tensor],
    card: dict[str, Any],
    concepts: Concepts | None = None,
    vocab: Vocab | None = None,
) -> None:
    """Write `model.pt` (weights + card, the concept vocabulary of a concept-aware matcher, and the word vocabulary
    of a matcher with its own, e.g. a published model's) and `card.json`."""
    folder.mkdir(parents=True, exist_ok=True)
    saved: dict[str, Any] = {"state_dict": state_dict, "card": card}
    if vocab is not None:
        saved["vocab"] = {"words": list(vocab.words), "min_count": vocab.min_count, "tokenization": vocab.tokenization}
    if concepts is not None:
        saved["concepts"] = {
            "words": list(concepts.words),
            "caption_counts": list(concepts.caption_counts),
            "cooccurrence": torch.from_numpy(np.ascontiguousarray(concepts.cooccurrence, dtype=np.int64)),
            "n_captions": concepts.n_captions,
        }
    # torch writes through the Python stream, so a full disk is an OSError (a path gives an opaque RuntimeError)
    with staged_file(folder / MODEL_FILE) as tmp, tmp.open("wb") as stream:
        torch.save(saved, stream)
    write_json(folder / CARD_FILE, card)


def load_matcher(folder: Path, device: torch.device, data: DataFolders | None = None) -> tuple[Matcher, dict]:
    """The saved matcher in eval mode, and its card. With `data`, refuses a model trained on another vocabulary
    than data's captions (unless it keeps its own) or (for a matcher that uses concepts) another concept
    vocabulary."""
    data_vocab = None if data is None else data.vocab.digest()  # the captions' files are checked first
    concepts_digest = None if data is None else data.concepts.digest()
    path = folder / MODEL_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found (run the train stage first)")
    saved = _read_saved(path)
    card = saved["card"]
    own_vocab = _stored_vocab(saved.get("vocab"))
    if own_vocab is not None and own_vocab.digest() != card["vocab_digest"]:
        raise UserError(f"{path}: its vocabulary is not the one its card names ({card['vocab_digest']})")
    vocab_digest = None if own_vocab is not None else data_vocab  # a model with its own reads the captions' text
    if vocab_digest is not None and card["vocab_digest"] != vocab_digest:
        raise UserError(
            f"{path}: trained with vocabulary {card['vocab_digest']}, but the captions use {vocab_digest}; retrain it"
        )
    trained_concepts = card.get("concepts_digest")
    if concepts_digest is not None and trained_concepts is not None and trained_concepts != concepts_digest:
        raise UserError(
            f"{path}: trained with concepts {trained_concepts}, but the captions use {concepts_digest}; retrain it"
        )
    try:
        params = TypeAdapter(MatcherParams).validate_python(card["params"])
    except ValidationError as error:
        raise UserError(f"{path}: its card's params are not valid ({first_line(error)}); {_AGAIN}") from None
    stored = saved.get("concepts")
    concepts = None
    if stored is not None:
        concepts = Concepts(
            tuple(stored["words"]), tuple(stored["caption_counts"]), stored["cooccurrence"].numpy(),
            stored["n_captions"],
        )  # fmt: skip
    inputs = MatcherInputs(card["feature_dim"], card["vocab_size"], concepts, read_pretrained=False)
    matcher = build_matcher(params, inputs)
    try:
        matcher.load_state_dict(saved["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as error:  # missing, extra or misshapen tensors
        raise UserError(f"{path}: its weights do not fit the matcher its card describes ({first_line(error)}); "
                        f"{_AGAIN}") from None  # fmt: skip
    if own_vocab is not None:
        matcher.use_vocabulary(own_vocab)
    return matcher.to(device).eval(), card


_AGAIN = "run its train stage again, or restore it with `dvc checkout`"
_CARD_KEYS = ("params", "feature_dim", "vocab_size", "vocab_digest")


def _read_saved(path: Path) -> dict[str, Any]:
    """The content of a matcher's `model.pt`, read without running code (`itm.safe_load`); a damaged file, or one
    that holds something else (the detector's weights), is a `UserError` naming it and what to do."""
    try:
        saved = load_torch(path, what="trained matcher")
    except UserError as error:
        raise UserError(f"{error}; {_AGAIN}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("card"), dict) or "state_dict" not in saved:
        raise UserError(
            f"{path}: not a trained matcher (it holds no card and weights; the detector's model.pt?): pass a "
            "matcher's folder, models/<matcher>/seed<seed>"
        )
    missing = [key for key in _CARD_KEYS if key not in saved["card"]]
    if missing:
        raise UserError(f"{path}: its card lacks {', '.join(missing)}; {_AGAIN}")
    return saved


def _stored_vocab(stored: dict[str, Any] | None) -> Vocab | None:
    if stored is None:
        return None
    return Vocab(tuple(stored["words"]), int(stored["min_count"]), stored["tokenization"])
