"""The word vocabulary: built from train captions only, saved as `vocab.json`; or imported with a published model.

A vocabulary knows how its captions are tokenised (`tokenization`, see itm.data.text): word ids only mean the
words they were trained on when a caption is split the same way, so text is always encoded through its vocabulary
(`encode_text`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from itm.atomic import staged_file
from itm.data.text import TOKENIZATIONS, Tokenization, tokenize
from itm.errors import UserError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # ids 0..3, in this order


@dataclass(frozen=True)
class Vocab:
    """Token <-> id mapping. Ids 0..3 are the specials; words follow by descending train count, then by spelling."""

    words: tuple[str, ...]  # every token, specials included, indexed by id
    min_count: int
    tokenization: Tokenization = "words"

    def __post_init__(self) -> None:
        if self.words[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}")
        if self.tokenization not in TOKENIZATIONS:
            raise ValueError(f"tokenization must be one of {TOKENIZATIONS}, got {self.tokenization!r}")
        object.__setattr__(self, "_ids", {word: i for i, word in enumerate(self.words)})

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Token ids framed by <start> and <end>, as SCAN and VSE++ feed their text encoders."""
        ids: dict[str, int] = self._ids  # type: ignore[attr-defined]
        unk = ids[UNK]
        return [ids[START], *(ids.get(token, unk) for token in tokens), ids[END]]

    def tokenize(self, text: str) -> list[str]:
        """The tokens of a caption, split as this vocabulary's captions were."""
        return tokenize(text, self.tokenization)

    def encode_text(self, texts: Sequence[str]) -> list[list[int]]:
        """Captions to token ids (framed, as `encode`), each tokenised as this vocabulary's captions were."""
        return [self.encode(self.tokenize(text)) for text in texts]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.words[i] for i in ids]

    def digest(self) -> str:
        """A short content hash, stored in checkpoints so a model is never paired with the wrong vocabulary: of the
        words and, for another tokenisation than the pipeline's own, of that too."""
        text = "\n".join(self.words) + ("" if self.tokenization == "words" else f"\n#{self.tokenization}")
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_vocab(token_lists: Iterable[Sequence[str]], min_count: int) -> Vocab:
    """Words seen at least `min_count` times."""
    counts = Counter(token for tokens in token_lists for token in tokens)
    kept = sorted((word for word, n in counts.items() if n >= min_count), key=lambda word: (-counts[word], word))
    return Vocab(words=SPECIALS + tuple(word for word in kept if word not in SPECIALS), min_count=min_count)


def save_vocab(vocab: Vocab, path: Path) -> None:
    document = {"words": list(vocab.words), "min_count": vocab.min_count, "tokenization": vocab.tokenization}
    document["digest"] = vocab.digest()
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(document, ensure_ascii=False, indent=0))


def load_vocab(path: Path) -> Vocab:
    try:
        document = json.loads(path.read_text())
        tokenization = document.get("tokenization", "words")
        return Vocab(words=tuple(document["words"]), min_count=int(document["min_count"]), tokenization=tokenization)
    except FileNotFoundError:
        raise UserError(f"{path}: vocabulary not found (run the tokenize stage first)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: not a valid vocab.json ({error})") from None
