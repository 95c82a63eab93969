"""Matchers: the contract (`Matcher`), the registry, the variants (which register themselves on import), and
saved matchers on disk."""

from itm.models import cvse, mvam, naaf, scan, uarda, vse_infty, vsepp  # noqa: F401  (registration on import)
from itm.models.base import Matcher
from itm.models.registry import MatcherInputs, build_matcher, inputs_for_training, list_matchers
from itm.models.saved import load_matcher, save_matcher

__all__ = ["Matcher", "MatcherInputs", "build_matcher", "inputs_for_training", "list_matchers", "load_matcher",
           "save_matcher"]  # fmt: skip
