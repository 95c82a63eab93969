"""The CVSE concept vocabulary: frequent content words of the train captions and how often they co-occur.

Following CVSE (Wang et al., ECCV 2020; BruceW91/CVSE `category_concepts.json`), concepts are the `top_k` most
frequent caption words that are nouns, verbs or adjectives. Without a part-of-speech tagger (nltk's needs a
download), function words are removed with scikit-learn's English stop-word list instead, which leaves mostly
those three classes. Words are used as tokenized, without lemmatisation. Frequency is counted per caption (how
many train captions contain the word), and so is co-occurrence: entry (i, j) is the number of train captions that
contain both concept i and concept j, so the diagonal holds each concept's own count. CVSE's graph builder turns
this into P(c_j | c_i) = cooc[i, j] / cooc[i, i].
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # scikit-learn takes seconds to import; only the tokenize stage needs it
    from scipy import sparse
    from sklearn.feature_extraction.text import CountVectorizer


@dataclass(frozen=True)
class Concepts:
    """The concept words and their train statistics."""

    words: tuple[str, ...]
    caption_counts: tuple[int, ...]  # train captions containing each word
    cooccurrence: np.ndarray  # [K, K] int64, train captions containing both words
    n_captions: int

    def __len__(self) -> int:
        return len(self.words)

    def digest(self) -> str:
        """A short content hash of the words and their statistics, stored with a model that uses them."""
        sha = hashlib.sha256("\n".join(self.words).encode())
        sha.update(np.ascontiguousarray(self.cooccurrence, dtype=np.int64).tobytes())
        return sha.hexdigest()[:16]


def _vectorizer(vocabulary: Sequence[str] | None = None) -> CountVectorizer:
    from sklearn.feature_extraction.text import CountVectorizer

    # Captions arrive tokenized by itm.data.text.tokenize; the analyzer hands the tokens through unchanged.
    return CountVectorizer(analyzer=_identity, binary=True, vocabulary=vocabulary, dtype=np.int64)


def _identity(tokens: Sequence[str]) -> Sequence[str]:
    return tokens


def _is_content_word(word: str, stop_words: frozenset[str]) -> bool:
    return len(word) > 1 and not word.isdigit() and word not in stop_words


def build_concepts(train_tokens: Sequence[Sequence[str]], top_k: int, stop_words: str) -> Concepts:
    """The `top_k` most frequent content words of the train captions (ties broken by spelling)."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    excluded = frozenset(ENGLISH_STOP_WORDS) if stop_words == "english" else frozenset()
    counts_vectorizer = _vectorizer()
    presence = counts_vectorizer.fit_transform(train_tokens)  # [captions, words], 1 where the caption has the word
    words = counts_vectorizer.get_feature_names_out()
    frequency = np.asarray(presence.sum(axis=0)).ravel()
    candidates = [i for i, word in enumerate(words) if _is_content_word(word, excluded)]
    chosen = sorted(candidates, key=lambda i: (-frequency[i], words[i]))[:top_k]
    concept_words = tuple(str(words[i]) for i in chosen)
    labels = concept_matrix(train_tokens, concept_words)
    cooccurrence = (labels.T @ labels).toarray().astype(np.int64)
    return Concepts(
        words=concept_words,
        caption_counts=tuple(int(frequency[i]) for i in chosen),
        cooccurrence=cooccurrence,
        n_captions=len(train_tokens),
    )


def concept_matrix(token_lists: Sequence[Sequence[str]], words: Sequence[str]) -> sparse.csr_matrix:
    """[captions, K] binary matrix: which concepts each caption mentions."""
    return _vectorizer(vocabulary=list(words)).transform(token_lists).tocsr()


def concept_labels(token_lists: Sequence[Sequence[str]], words: Sequence[str]) -> list[list[int]]:
    """For each caption, the ids of the concepts it mentions (ascending)."""
    matrix = concept_matrix(token_lists, words)
    matrix.sort_indices()
    return [matrix.indices[matrix.indptr[i] : matrix.indptr[i + 1]].tolist() for i in range(matrix.shape[0])]
