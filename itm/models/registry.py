"""Matcher builders registered by the `kind` of their params block."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from itm.models.base import Matcher

Builder = Callable[..., Matcher]
B = TypeVar("B", bound=Builder)

_BUILDERS: dict[str, Builder] = {}


def register_matcher(kind: str) -> Callable[[B], B]:
    """Decorator: register `builder(params, *, feature_dim, vocab_size) -> Matcher` under `kind`."""

    def wrap(builder: B) -> B:
        if kind in _BUILDERS:
            raise ValueError(f"matcher kind {kind!r} is already registered by {_BUILDERS[kind].__module__}")
        _BUILDERS[kind] = builder
        return builder

    return wrap


def list_matchers() -> list[str]:
    """Registered kinds, sorted."""
    return sorted(_BUILDERS)


def build_matcher(params: Any, *, feature_dim: int, vocab_size: int) -> Matcher:
    """The matcher described by a `matchers:` block (its `kind` picks the builder)."""
    try:
        builder = _BUILDERS[params.kind]
    except KeyError:
        raise ValueError(f"no builder for matcher kind {params.kind!r}; registered: {list_matchers()}") from None
    return builder(params, feature_dim=feature_dim, vocab_size=vocab_size)
