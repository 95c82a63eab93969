"""Published checkpoints as ordinary trained models: `train@<name>` converts the weights a matcher block names
(`weights:`) instead of training, and writes `models/<name>/` as training does, so that `evaluate@`, `compare` and
`itm search` treat it like any other model.

The checkpoint is fetched and checked against its sha256, read without running code (`itm.safe_load`), checked
to be of the named layout, mapped onto our modules (a tensor missing, unexpected or of another shape is named), and
saved with its own vocabulary: captions are then tokenised and encoded as the checkpoint was trained. The card
records where it came from (source, sha256, layout), the original options, epoch and best rSum, and the model's
recall on our val split.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from itm import environment
from itm.atomic import staged_dir
from itm.config import CvseParams, DownloadParams, MatcherParams, PublishedWeights, VseInftyParams
from itm.data.concepts import Concepts
from itm.data.download import fetch
from itm.data.splits import DataFolders
from itm.data.vocab import Vocab
from itm.errors import UserError
from itm.models import Matcher, build_matcher, save_matcher
from itm.models.registry import MatcherInputs
from itm.safe_load import NAMESPACE_STAND_IN, Record, load_torch
from itm.tracking import Tracker
from itm.train.published.cvse import CvseConcepts, cvse_params, cvse_state_dict, is_cvse_checkpoint, read_cvse_concepts
from itm.train.published.scan import is_scan_checkpoint, scan_params, scan_state_dict
from itm.train.published.vocabulary import read_published_vocab
from itm.train.published.vse_infty import (
    APPENDED_ROWS,
    check_vocabulary,
    is_vse_infty_checkpoint,
    vse_infty_params,
    vse_infty_state_dict,
)
from itm.train.run import VALIDATION_IMAGES, retrieval_metrics

log = logging.getLogger(__name__)

VALIDATION_BATCH = 128


def import_published(
    name: str,
    params: MatcherParams,
    *,
    data: DataFolders,
    out_dir: Path,
    work_dir: Path,
    download: DownloadParams,
    tracker: Tracker,
    device: torch.device,
) -> dict[str, Any]:
    """Convert the checkpoint `params.weights` names into `out_dir` (model.pt and card.json); returns the card.
    `work_dir` caches downloads."""
    weights = params.weights
    assert weights is not None  # the stage converts only blocks with weights
    options = {"retries": download.retries, "backoff_seconds": download.backoff_seconds}
    options |= {"timeout_seconds": download.timeout_seconds}
    path = fetch(weights.source, work_dir, sha256=weights.sha256, **options)
    remote = weights.vocab
    assert remote.source is not None  # enforced by the params schema
    vocab_path = fetch(remote.source, work_dir, size=remote.size, md5=remote.md5, sha256=remote.sha256, **options)
    concepts = None
    if weights.concepts is not None:  # layout cvse: its concept files
        files = [weights.concepts.categories, weights.concepts.adjacency, weights.concepts.word_vectors]
        paths = [fetch(str(f.source), work_dir, size=f.size, md5=f.md5, sha256=f.sha256, **options) for f in files]
        concepts = read_cvse_concepts(*paths, lemmas=weights.concepts.lemmas)
    content = load_torch(path, NAMESPACE_STAND_IN, what="checkpoint")
    vocab = read_published_vocab(vocab_path)

    converted = convert_checkpoint(path, weights, content, params, vocab, concepts=concepts)
    if converted.feature_dim != data.feature_dim:
        raise UserError(f"{path}: trained on {converted.feature_dim}-d region features, but {data.regions_dir} holds "
                        f"{data.feature_dim}-d ones")  # fmt: skip
    matcher = converted.matcher.to(device).eval()

    val = data.split("val", matcher.reads)
    metrics = retrieval_metrics(
        matcher, val.store, val.captions.of_first_images(VALIDATION_IMAGES), device=device, batch_size=VALIDATION_BATCH
    )
    card = _card(name, converted, weights, content, vocab, metrics)
    with staged_dir(out_dir) as staging:
        save_matcher(staging, {key: value.cpu() for key, value in matcher.state_dict().items()}, card,
                     concepts=converted.concepts, vocab=vocab)  # fmt: skip
    tracker.log_metrics({f"best/val_{key}": value for key, value in metrics.items()})
    tracker.log_dict({"matcher": card["params"], "weights": card["weights"], "options": card["options"]},
                     "config.json")  # fmt: skip
    tracker.log_artifact(out_dir / "card.json")
    log.info("%s: converted %s (%s layout); val rsum %.2f", name, path.name, weights.layout, metrics["rsum"])
    if concepts is not None:
        log.info("%s: captions' concepts by %s lemmas", name, concepts.lemmas)
    return card


@dataclass(frozen=True)
class Converted:
    """A published checkpoint as our matcher (on the CPU, reading captions through the checkpoint's vocabulary)."""

    matcher: Matcher
    params: MatcherParams  # the block's, with what the checkpoint's options fix
    options: dict[str, Any]  # the options it was trained with
    feature_dim: int  # the region features it reads
    concepts: Concepts | None = None  # its concept vocabulary (layout cvse), saved with the model


def convert_checkpoint(
    path: Path, weights: PublishedWeights, content: Any, block: MatcherParams, vocab: Vocab, *,
    concepts: CvseConcepts | None = None,
) -> Converted:  # fmt: skip
    """The matcher of a checkpoint's `content` (as `itm.safe_load.load_torch` read it from `path`) in
    `weights.layout`, with `vocab` its vocabulary (and for layout cvse `concepts`, its concept files); a `UserError`
    when the content is not of that layout, the vocabulary is not its own, or a tensor does not map."""
    params, state, options = _converted(path, weights, content, block, vocab, concepts)
    embedded = next(value for key, value in state.items() if key.endswith("embed.weight")).shape[0]
    appended = APPENDED_ROWS if weights.layout == "vse_infty" else 0  # VSE∞'s <mask>, which our encoder appends too
    if embedded != len(vocab) + appended:
        words = f"{len(vocab)} words" + (f" (+ {appended} appended)" if appended else "")
        raise UserError(f"{weights.vocab.source}: {words}, but the checkpoint embeds {embedded}: not its vocabulary")
    feature_dim = int(options["img_dim"])
    ours = None if concepts is None else concepts.as_concepts()
    matcher = build_matcher(params, MatcherInputs(feature_dim, len(vocab), ours, read_pretrained=False))
    load_weights(matcher, state, path)
    matcher.use_vocabulary(vocab)
    return Converted(matcher.eval(), params, options, feature_dim, ours)


def _converted(
    path: Path, weights: PublishedWeights, content: Any, block: MatcherParams, vocab: Vocab,
    concepts: CvseConcepts | None,
) -> tuple[MatcherParams, dict[str, Tensor], dict[str, Any]]:  # fmt: skip
    """The matcher params, our state dict and the training options of a checkpoint of `weights.layout`."""
    if weights.layout == "scan":
        if not is_scan_checkpoint(content):
            raise UserError(f"{path}: not a SCAN checkpoint (layout scan), {_describe(content)}")
        trained_with = _options(path, content["opt"])
        return scan_params(path, trained_with, block), scan_state_dict(path, content["model"]), trained_with  # type: ignore[arg-type]
    if weights.layout == "cvse":
        if not is_cvse_checkpoint(content):
            raise UserError(f"{path}: not a CVSE checkpoint (layout cvse), {_describe(content)}")
        assert concepts is not None and isinstance(block, CvseParams)  # the params schema requires both
        trained_with = _options(path, content["opt"])
        params = cvse_params(path, trained_with, block, concepts)
        return params, cvse_state_dict(path, content["model"], params, concepts, vocab.words), trained_with
    if weights.layout == "vse_infty":
        if not is_vse_infty_checkpoint(content):
            raise UserError(f"{path}: not a VSE∞ checkpoint (layout vse_infty), {_describe(content)}")
        assert isinstance(block, VseInftyParams)  # the params schema ties the layout to the kind
        check_vocabulary(vocab, str(weights.vocab.source))
        trained_with = _options(path, content["opt"])
        params = vse_infty_params(path, trained_with, content["model"], block)
        return params, vse_infty_state_dict(path, content["model"]), trained_with
    raise UserError(f"weights.layout {weights.layout!r} has no converter")


def _describe(content: Any) -> str:
    """What a checkpoint of the wrong layout holds, for the error message."""
    if not isinstance(content, Mapping):
        return f"but a {type(content).__name__}"
    model = content.get("model")
    if isinstance(model, list | tuple):
        return f"whose `model` holds {len(model)} state dicts, the first with {', '.join(sorted(model[0])[:4])}…"
    return f"with keys {', '.join(map(str, list(content)[:6]))}"


def _options(path: Path, options: Any) -> dict[str, Any]:
    if isinstance(options, Record):
        return vars(options)
    if isinstance(options, Mapping):
        return dict(options)
    raise UserError(f"{path}: its `opt` is a {type(options).__name__}, not the training options")


def load_weights(matcher: Matcher, state: Mapping[str, Tensor], path: Path) -> None:
    """Load `state` into `matcher` exactly: every tensor present, none left over, each of its shape; a `UserError`
    naming the tensors otherwise."""
    expected = matcher.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{key} {tuple(state[key].shape)} (expected {tuple(expected[key].shape)})"
                 for key in sorted(set(state) & set(expected)) if state[key].shape != expected[key].shape]  # fmt: skip
    problems = [f"{label}: {', '.join(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]  # fmt: skip
    if problems:
        raise UserError(f"{path}: does not map onto the matcher ({'; '.join(problems)})")
    matcher.load_state_dict({key: value.to(expected[key].dtype) for key, value in state.items()})


def _card(
    name: str,
    converted: Converted,
    weights: PublishedWeights,
    content: Mapping[str, Any],
    vocab: Vocab,
    metrics: Mapping[str, float],
) -> dict[str, Any]:
    return {
        "name": name,
        "kind": converted.params.kind,
        "params": converted.params.model_dump(mode="json"),
        "weights": {"source": weights.source, "sha256": weights.sha256, "layout": weights.layout},
        "options": {key: _json_value(value) for key, value in converted.options.items()},
        "epoch": _json_value(content.get("epoch")),
        "best_rsum": _json_value(content.get("best_rsum")),
        "feature_dim": converted.feature_dim,
        "vocab_size": len(vocab),
        "vocab_digest": vocab.digest(),
        "tokenization": vocab.tokenization,
        "concepts_digest": None,
        "environment": environment.record(),
        "val": dict(metrics),
        "history": [],
    }


def _json_value(value: Any) -> Any:
    """A JSON value for an option (numpy scalars as numbers, anything else unusual as its text)."""
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_json_value(item) for item in value]
    return str(value)
