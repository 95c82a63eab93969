"""Matcher builders registered by the `kind` of their params block."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from itm.data.concepts import Concepts
from itm.data.glove import read_word_vectors
from itm.models.base import Matcher


@dataclass(frozen=True)
class MatcherInputs:
    """What a builder needs besides its params block: the data's sizes, for concept-aware matchers the concept
    vocabulary with its train co-occurrence counts, and pretrained word vectors. Builders read no files: the
    caller reads what the params name (`inputs_for_training`).

    `read_pretrained` is True when building a matcher to train (an open_clip backbone loads its `clip_checkpoint`)
    and False when rebuilding a saved one, whose stored weights and buffers replace whatever the builder initialises.
    """

    feature_dim: int
    vocab_size: int
    concepts: Concepts | None = None
    word_vectors: Mapping[str, np.ndarray] = field(default_factory=dict)  # word -> pretrained vector (GloVe)
    read_pretrained: bool = True


def inputs_for_training(params: Any, feature_dim: int, vocab_size: int, concepts: Concepts) -> MatcherInputs:
    """The inputs of a matcher to train: with the concept words' vectors from the GloVe file its params name
    (`glove_path`, `concept_input_dim`-d vectors), when they name one."""
    glove_path = getattr(params, "glove_path", None)
    vectors = (
        {} if glove_path is None else read_word_vectors(Path(glove_path), concepts.words, params.concept_input_dim)
    )
    return MatcherInputs(feature_dim, vocab_size, concepts, vectors)


Builder = Callable[[Any, MatcherInputs], Matcher]
B = TypeVar("B", bound=Builder)

_BUILDERS: dict[str, Builder] = {}


def register_matcher(kind: str) -> Callable[[B], B]:
    """Decorator: register `builder(params, inputs: MatcherInputs) -> Matcher` under `kind`."""

    def wrap(builder: B) -> B:
        if kind in _BUILDERS:
            raise ValueError(f"matcher kind {kind!r} is already registered by {_BUILDERS[kind].__module__}")
        _BUILDERS[kind] = builder
        return builder

    return wrap


def list_matchers() -> list[str]:
    """Registered kinds, sorted."""
    return sorted(_BUILDERS)


def build_matcher(params: Any, inputs: MatcherInputs) -> Matcher:
    """The matcher described by a `matchers:` block (its `kind` picks the builder)."""
    try:
        builder = _BUILDERS[params.kind]
    except KeyError:
        raise ValueError(f"no builder for matcher kind {params.kind!r}; registered: {list_matchers()}") from None
    return builder(params, inputs)
