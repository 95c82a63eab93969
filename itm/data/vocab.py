"""The word vocabulary: built from train captions only, saved as `vocab.json`."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from itm.atomic import staged_file
from itm.errors import UserError

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # ids 0..3, in this order


@dataclass(frozen=True)
class Vocab:
    """Token <-> id mapping. Ids 0..3 are the specials; words follow by descending train count, then by spelling."""

    words: tuple[str, ...]  # every token, specials included, indexed by id
    min_count: int

    def __post_init__(self) -> None:
        if self.words[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}")
        object.__setattr__(self, "_ids", {word: i for i, word in enumerate(self.words)})

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Token ids framed by <start> and <end>, as SCAN and VSE++ feed their text encoders."""
        ids: dict[str, int] = self._ids  # type: ignore[attr-defined]
        unk = ids[UNK]
        return [ids[START], *(ids.get(token, unk) for token in tokens), ids[END]]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.words[i] for i in ids]

    def digest(self) -> str:
        """A short content hash, stored in checkpoints so a model is never paired with the wrong vocabulary."""
        return hashlib.sha256("\n".join(self.words).encode()).hexdigest()[:16]


def build_vocab(token_lists: Iterable[Sequence[str]], min_count: int) -> Vocab:
    """Words seen at least `min_count` times."""
    counts = Counter(token for tokens in token_lists for token in tokens)
    kept = sorted((word for word, n in counts.items() if n >= min_count), key=lambda word: (-counts[word], word))
    return Vocab(words=SPECIALS + tuple(word for word in kept if word not in SPECIALS), min_count=min_count)


def save_vocab(vocab: Vocab, path: Path) -> None:
    document = {"words": list(vocab.words), "min_count": vocab.min_count, "digest": vocab.digest()}
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(document, ensure_ascii=False, indent=0))


def load_vocab(path: Path) -> Vocab:
    try:
        document = json.loads(path.read_text())
        return Vocab(words=tuple(document["words"]), min_count=int(document["min_count"]))
    except FileNotFoundError:
        raise UserError(f"{path}: vocabulary not found (run the tokenize stage first)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: not a valid vocab.json ({error})") from None
