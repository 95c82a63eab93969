"""Caption text to tokens. Every caption, vocabulary and concept label goes through `tokenize`, in the tokenisation
of the vocabulary it is encoded with (`itm.data.vocab.Vocab.tokenization`):

- `words` (the pipeline's own): lower-case words, punctuation dropped;
- `nltk`: what kuanghuei/SCAN `data.py` and BruceW91/CVSE `data.py` feed their vocabularies,
  `nltk.tokenize.word_tokenize(caption.lower())`, punctuation kept as tokens. NLTK's `word_tokenize` of those years
  (3.2-3.4) splits sentences with Punkt's English model and each sentence with `TreebankWordTokenizer`. The English
  model is a separate download, so sentences are split here by Punkt without a trained model: the same cuts except
  after abbreviations it would have learnt ("dr. smith"), which captions rarely hold.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Literal

Tokenization = Literal["words", "nltk"]
TOKENIZATIONS: tuple[Tokenization, ...] = ("words", "nltk")

# Letters and digits, keeping in-word apostrophes and hyphens ("man's", "t-shirt"); punctuation is dropped.
# Retrieval models gain nothing from punctuation tokens.
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")


def tokenize(text: str, tokenization: Tokenization = "words") -> list[str]:
    """Lower-case tokens of `text` in the given tokenisation."""
    if tokenization == "words":
        return _WORD.findall(text.lower())
    if tokenization == "nltk":
        return _nltk_word_tokenize(text.lower())
    raise ValueError(f"tokenization must be one of {TOKENIZATIONS}, got {tokenization!r}")


def _nltk_word_tokenize(text: str) -> list[str]:
    sentences, words = _nltk_tokenizers()
    return [token for sentence in sentences.tokenize(text) for token in words.tokenize(sentence)]


@cache
def _nltk_tokenizers():  # type: ignore[no-untyped-def]
    from nltk.tokenize import TreebankWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer(), TreebankWordTokenizer()
