"""The one tokenizer used everywhere: captions, vocabularies and concept labels all go through `tokenize`."""

from __future__ import annotations

import re

# Letters and digits, keeping in-word apostrophes and hyphens ("man's", "t-shirt"); punctuation is dropped.
# SCAN uses nltk.word_tokenize, which keeps punctuation as tokens; retrieval models gain nothing from them.
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens of `text`."""
    return _WORD.findall(text.lower())
