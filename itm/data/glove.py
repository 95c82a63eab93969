"""Word vectors from a GloVe text file (one `word v1 ... vD` line per word, as nlp.stanford.edu/projects/glove ships
them), read once for the few words a model needs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from itm.errors import UserError

log = logging.getLogger(__name__)


def read_word_vectors(path: Path, words: Sequence[str], dim: int) -> dict[str, np.ndarray]:
    """The vectors of `words` found in `path` (the first line of a word wins), as float32 [dim] arrays.

    Lines are split only when their first field is wanted, so a 5 GB file streams at disk speed. A wanted line whose
    vector does not have `dim` numbers is an error naming the line.
    """
    if not path.is_file():
        raise UserError(f"{path}: GloVe file not found")
    wanted = set(words)
    found: dict[str, np.ndarray] = {}
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            word, _, rest = line.partition(" ")
            if word not in wanted or word in found:
                continue
            try:
                vector = np.array(rest.split(), dtype=np.float32)
            except ValueError:
                raise UserError(f"{path}:{number}: the vector of {word!r} is not a list of numbers") from None
            if vector.shape != (dim,):
                raise UserError(f"{path}:{number}: {word!r} has a {len(vector)}-d vector; expected {dim}-d")
            found[word] = vector
            if len(found) == len(wanted):
                break
    log.info("%s: vectors for %d of %d words", path, len(found), len(wanted))
    return found
