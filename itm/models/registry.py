"""Matcher builders registered by the `kind` of their params block."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from itm.data.concepts import Concepts
from itm.models.base import Matcher


@dataclass(frozen=True)
class MatcherInputs:
    """What a builder needs besides its params block: the data's sizes and, for concept-aware matchers, the concept
    vocabulary with its train co-occurrence counts.

    `read_pretrained` is True when building a matcher to train (read pretrained inputs such as a GloVe file) and
    False when rebuilding a saved one, whose stored weights and buffers replace whatever the builder initialises.
    """

    feature_dim: int
    vocab_size: int
    concepts: Concepts | None = None
    read_pretrained: bool = True


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
