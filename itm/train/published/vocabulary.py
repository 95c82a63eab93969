"""The vocabulary a published checkpoint's word ids refer to (kuanghuei/SCAN `vocab.py`, which CVSE copies).

SCAN writes it as JSON (`serialize_vocab`: {"word2idx": {word: id}, "idx2word": {"id": word}, "idx": n}); CVSE
ships the older pickle of the `Vocabulary` object itself (`vocab/<data>_precomp_vocab.pkl`: a Python 2 pickle of
`__main__.Vocabulary` with the same three attributes). The pickle is read by `itm.safe_load`, with a plain record
standing in for `Vocabulary`, so nothing in it runs. Both vocabularies were built from captions split by
`nltk.tokenize.word_tokenize(caption.lower())`, keeping words seen at least 4 times (`build_vocab(threshold=4)`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from itm.data.vocab import SPECIALS, Vocab
from itm.errors import UserError
from itm.safe_load import Record, load_pickle

SCAN_MIN_COUNT = 4  # kuanghuei/SCAN vocab.py main(): build_vocab(..., threshold=4)
# the module names a pickled `Vocabulary` is found under: SCAN's and CVSE's `vocab.py` run as a script or imported
VOCABULARY_STAND_INS = {f"{module}.Vocabulary": Record for module in ("__main__", "vocab")}


def read_published_vocab(path: Path) -> Vocab:
    """The vocabulary of a SCAN-family `.json` or `.pkl` file, with NLTK tokenisation; a `UserError` naming the
    file when it is not one."""
    if path.suffix == ".json":
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"{path}: not a readable vocabulary JSON ({type(error).__name__}: {error})") from None
    else:
        loaded = load_pickle(path, VOCABULARY_STAND_INS, what="vocabulary pickle")
        document = vars(loaded) if isinstance(loaded, Record) else loaded
    return Vocab(_words(path, document), SCAN_MIN_COUNT, tokenization="nltk")


def _words(path: Path, document: Any) -> tuple[str, ...]:
    """The words by id, checked: ids 0..n-1 with no gap, word2idx agreeing, the four specials first."""
    if not isinstance(document, Mapping) or not isinstance(document.get("idx2word"), Mapping):
        raise UserError(f"{path}: not a SCAN vocabulary (no `idx2word` mapping of ids to words)")
    try:
        by_id = {int(key): word for key, word in document["idx2word"].items()}
    except (TypeError, ValueError):
        raise UserError(f"{path}: `idx2word` has a key that is not a word id") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise UserError(f"{path}: the word ids are not 0..{len(by_id) - 1} without gaps")
    words = tuple(str(by_id[i]) for i in range(len(by_id)))
    word2idx = document.get("word2idx")
    if isinstance(word2idx, Mapping) and any(word2idx.get(word) != i for i, word in enumerate(words)):
        raise UserError(f"{path}: `word2idx` and `idx2word` disagree")
    if words[: len(SPECIALS)] != SPECIALS:
        raise UserError(f"{path}: the first ids are {words[: len(SPECIALS)]}, not {SPECIALS}")
    return words
