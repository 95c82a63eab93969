"""Matchers: the contract (`Matcher`), the registry, and the variants, which register themselves on import."""

from itm.models import cvse, mvam, scan, uarda, vsepp  # noqa: F401  (registration on import)
from itm.models.base import Matcher
from itm.models.registry import MatcherInputs, build_matcher, list_matchers

__all__ = ["Matcher", "MatcherInputs", "build_matcher", "list_matchers"]
