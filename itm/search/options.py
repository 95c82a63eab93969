"""How a search ranks, and the choices the `itm search` command offers: kept free of torch, so that the command's
`--help` and its argument checks run before any model code is imported."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from itm.errors import UserError

ShortlistBy = Literal["hard", "pooled"]
QueryKind = Literal["text", "image"]

SHORTLIST_BY: tuple[ShortlistBy, ...] = ("hard", "pooled")
DEFAULT_SHORTLIST_BY: ShortlistBy = "hard"
DEFAULT_SHORTLIST = 100


@dataclass(frozen=True)
class Options:
    """How a search ranks: result count, shortlist size (0: score everything) and the shortlist score."""

    top: int = 5
    shortlist: int = DEFAULT_SHORTLIST
    shortlist_by: ShortlistBy = DEFAULT_SHORTLIST_BY

    def __post_init__(self) -> None:
        if self.top < 1:
            raise UserError(f"--top must be at least 1, got {self.top}")
        if self.shortlist < 0:
            raise UserError(f"--shortlist must be 0 (score everything) or positive, got {self.shortlist}")
        if self.shortlist_by not in SHORTLIST_BY:
            raise UserError(f"--shortlist-by {self.shortlist_by!r} is not one of {', '.join(SHORTLIST_BY)}")
