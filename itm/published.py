"""Published retrieval figures of the matchers we reproduce (`itm/published.csv`), checked on reading, and the key
that matches one of our models to them.

Each row of the data file is one published figure: the model as its source names it, the key it matches (`match`),
the dataset and protocol under our names, R@1/5/10 both ways and rSum, whether it is a two-model ensemble, the
protocol the source actually used when it differs from ours, where the figure was published (`source`), and how we
checked it (`checked`: `source` when read in the source itself, `second_hand` when read in another work that quotes
it, `unverified` when no copy of the source could be reached) with where we read it (`read_in`).

The key of one of our models comes from its model card's matcher params: the matcher kind, and for SCAN the
attention direction and pooling (`scan_t2i_avg`); an ensemble's is its members' keys joined by `+`, in any order.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from itm.errors import UserError

PUBLISHED_FILE = Path(__file__).with_name("published.csv")
RECALLS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
COLUMNS = ("model", "match", "dataset", "protocol", *RECALLS, "rsum", "ensemble", "protocol_detail", "source",
           "checked", "read_in")  # fmt: skip
# Our protocol names per dataset kind, as itm/evaluate/protocols.py `protocols_for` gives them (a test keeps the two
# equal); the synthetic dataset has no published figures.
PROTOCOLS = {"flickr30k": ("test",), "coco": ("test_5fold1k", "test_5k")}
CHECKED = ("source", "second_hand", "unverified")
# Six recalls each rounded to 0.1 may sum to 0.3 away from an rSum summed before rounding.
RSUM_TOLERANCE = 0.3 + 1e-6

_KEY = re.compile(r"[a-z0-9_]+(\+[a-z0-9_]+)*")
_TEXT = ("model", "protocol_detail", "source", "read_in")


@dataclass(frozen=True)
class Published:
    """One published figure (see the module docstring for the fields)."""

    model: str
    match: str  # normalised: an ensemble's member keys sorted
    dataset: str
    protocol: str
    recalls: Mapping[str, float]  # RECALLS -> percent
    rsum: float
    ensemble: bool
    protocol_detail: str
    source: str
    checked: str
    read_in: str


def model_key(params: Mapping[str, object]) -> str:
    """The key of a single model from its matcher params (a model card's `params`): `vsepp`, `scan_t2i_avg`, ..."""
    kind = str(params.get("kind", ""))
    if kind == "scan":
        return f"scan_{params.get('direction')}_{params.get('pooling')}"
    return kind


def ensemble_key(member_keys: Iterable[str]) -> str:
    """The key of an ensemble: its members' keys, sorted, joined by `+` (so the order of the members is immaterial)."""
    return "+".join(sorted(member_keys))


def read_published(path: Path = PUBLISHED_FILE) -> list[Published]:
    """Every figure of the data file, checked; a problem is a `UserError` naming the line and column."""
    if not path.is_file():
        raise UserError(f"{path}: not found (the published figures the comparison adds)")
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.reader(file)
        header = next(reader, [])
        if tuple(header) != COLUMNS:
            raise UserError(f"{path}: line 1: the header is {','.join(header)!r}; expected {','.join(COLUMNS)!r}")
        figures, seen = [], {}
        for fields in reader:
            if not fields:  # a blank line
                continue
            where = f"{path}: line {reader.line_num}"
            if len(fields) != len(COLUMNS):
                raise UserError(f"{where}: {len(fields)} fields; expected {len(COLUMNS)} ({', '.join(COLUMNS)})")
            figure = _figure(dict(zip(COLUMNS, fields, strict=True)), where)
            identity = (figure.model, figure.dataset, figure.protocol)
            if identity in seen:
                raise UserError(f"{where}, column model: {figure.model!r} on {figure.dataset} {figure.protocol} "
                                f"repeats line {seen[identity]}")  # fmt: skip
            seen[identity] = reader.line_num
            figures.append(figure)
    return figures


def _figure(row: dict[str, str], where: str) -> Published:
    """One checked row."""

    def fail(column: str, problem: str) -> UserError:
        return UserError(f"{where}, column {column}: {row[column]!r} {problem}")

    for column in _TEXT:
        if not row[column].strip():
            raise fail(column, "is empty")
        if "|" in row[column] or "\n" in row[column]:
            raise fail(column, "holds '|' or a line break, which would break the Markdown table")
    if not _KEY.fullmatch(row["match"]):
        raise fail("match", "is not a model key: lower-case [a-z0-9_] words joined by '+' (e.g. scan_t2i_avg)")
    if row["dataset"] not in PROTOCOLS:
        raise fail("dataset", f"is not one of {', '.join(PROTOCOLS)}")
    if row["protocol"] not in PROTOCOLS[row["dataset"]]:
        raise fail("protocol", f"is not a {row['dataset']} protocol ({', '.join(PROTOCOLS[row['dataset']])})")
    numbers = {column: _percent(row, column, fail) for column in (*RECALLS, "rsum")}
    for side in ("i2t", "t2i"):
        if not numbers[f"{side}_r1"] <= numbers[f"{side}_r5"] <= numbers[f"{side}_r10"]:
            raise fail(f"{side}_r5", f"and its R@1 and R@10 ({row[f'{side}_r1']}, {row[f'{side}_r10']}) do not rise")
    total = sum(numbers[column] for column in RECALLS)
    if abs(numbers["rsum"] - total) > RSUM_TOLERANCE:
        raise fail("rsum", f"is not the sum of the six recalls ({total:.1f})")
    if row["ensemble"] not in ("true", "false"):
        raise fail("ensemble", "is not true or false")
    ensemble = row["ensemble"] == "true"
    if ensemble != ("+" in row["match"]):
        raise fail("ensemble", f"disagrees with match {row['match']!r} (an ensemble's key joins its members' by '+')")
    if row["checked"] not in CHECKED:
        raise fail("checked", f"is not one of {', '.join(CHECKED)}")
    return Published(
        model=row["model"].strip(),
        match=ensemble_key(row["match"].split("+")),
        dataset=row["dataset"],
        protocol=row["protocol"],
        recalls={column: numbers[column] for column in RECALLS},
        rsum=numbers["rsum"],
        ensemble=ensemble,
        protocol_detail=row["protocol_detail"].strip(),
        source=row["source"].strip(),
        checked=row["checked"],
        read_in=row["read_in"].strip(),
    )


def _percent(row: Mapping[str, str], column: str, fail: Callable[[str, str], UserError]) -> float:
    """A recall (0-100) or an rSum (0-600)."""
    try:
        value = float(row[column])
    except ValueError:
        raise fail(column, "is not a number") from None
    limit = 600.0 if column == "rsum" else 100.0
    if not (math.isfinite(value) and 0.0 <= value <= limit):
        raise fail(column, f"is outside 0-{limit:.0f}")
    return value


def counterparts(figures: Sequence[Published], dataset: str, protocol: str, key: str) -> list[Published]:
    """The published figures of the model with `key` on `dataset` (a dataset kind) under `protocol`, in file order."""
    return [f for f in figures if f.dataset == dataset and f.protocol == protocol and f.match == key and key]
