"""What a matcher reads of a split, prepared in one place for training, evaluation, search, figures and benchmarks.

A matcher declares what it reads (`Reads`: bottom-up regions or the images' pixels, the pipeline vocabulary's token
ids or its own tokenizer's, concept labels or not); `DataFolders` reads the pipeline's folders accordingly:

    data = DataFolders(Path("data/regions"), Path("data/captions"), Path("data/raw/synthetic"))
    test = data.split("test", matcher.reads)  # test.store: where its images are; test.captions: what it reads
    data.vocab, data.concepts                 # the tokenize stage's vocabulary and concept vocabulary

Every file is read once per `DataFolders`, each split's image store opened once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from itm.data.batches import ConceptLabeller, PixelSpec, Tokenizer
from itm.data.captions import VOCAB_FILE, read_concepts
from itm.data.concepts import Concepts
from itm.data.loaders import CaptionTable, read_captions, with_stored_images
from itm.data.pixels import ImageStore, PixelStore
from itm.data.regions import RegionStore
from itm.data.vocab import Vocab, load_vocab
from itm.errors import UserError


@dataclass(frozen=True)
class Reads:
    """What a matcher reads of a split besides its weights (`Matcher.reads`)."""

    pixels: PixelSpec | None = None  # the images themselves, prepared as the spec says; None: bottom-up regions
    tokenizer: Tokenizer | None = None  # its own token ids of the caption text; None: the pipeline vocabulary's
    n_concepts: int = 0  # > 0: concept labels over that many concepts
    labeller: ConceptLabeller | None = None  # the labels from its own token ids; None: the tokenize stage's labels


@dataclass(frozen=True)
class SplitData:
    """One split as a matcher reads it: where its images are, and the captions whose image is there."""

    store: ImageStore
    captions: CaptionTable


class DataFolders:
    """The pipeline's data: the region store (`data/regions`), the captions (`data/captions`) and, for matchers
    that read the images themselves, the downloaded dataset (`data/raw/<dataset>`)."""

    def __init__(self, regions_dir: Path, captions_dir: Path, dataset_dir: Path | None = None) -> None:
        self.regions_dir, self.captions_dir, self.dataset_dir = regions_dir, captions_dir, dataset_dir
        self._stores: dict[tuple[str, PixelSpec | None], ImageStore] = {}

    @cached_property
    def vocab(self) -> Vocab:
        return load_vocab(self.captions_dir / VOCAB_FILE)

    @cached_property
    def concepts(self) -> Concepts:
        return read_concepts(self.captions_dir)

    @property
    def feature_dim(self) -> int:
        """The size of a region feature (of the train split's region store)."""
        return self.regions("train").feature_dim

    def regions(self, split: str) -> RegionStore:
        """The split's bottom-up region store."""
        store = self.store(split, Reads())
        assert isinstance(store, RegionStore)
        return store

    def store(self, split: str, reads: Reads) -> ImageStore:
        """Where a matcher reads the split's images: the region store, or the dataset's image files prepared as
        `reads.pixels` says (one store holds every split's images)."""
        key = (split if reads.pixels is None else "*", reads.pixels)
        if key not in self._stores:
            self._stores[key] = self._open_store(split, reads.pixels)
        return self._stores[key]

    def _open_store(self, split: str, pixels: PixelSpec | None) -> ImageStore:
        if pixels is None:
            return RegionStore(self.regions_dir / split)
        if self.dataset_dir is None:
            raise UserError("this matcher reads the images themselves: pass --dataset data/raw/<dataset>")
        return PixelStore(self.dataset_dir, pixels)

    def captions(self, split: str, reads: Reads, *, texts: bool = False) -> CaptionTable:
        """Every caption of the split in file order, with the token ids the matcher reads and, when it reads them,
        each caption's concept labels (the tokenize stage's, or those its own labeller gives its token ids); with
        `texts` (or a tokenizer of its own), the raw text too."""
        stored_labels = reads.n_concepts > 0 and reads.labeller is None
        table = read_captions(
            self.captions_dir, split, concepts=stored_labels, texts=texts or reads.tokenizer is not None
        )
        if reads.tokenizer is not None:
            table = table.tokenized(reads.tokenizer)
        if reads.n_concepts > 0 and reads.labeller is not None:
            table = table.with_concepts(reads.labeller(table.token_ids))
        return table

    def split(self, split: str, reads: Reads, *, texts: bool = False) -> SplitData:
        """The split's image store and its captions whose image is in it (see `captions`); images that failed
        extraction are left out with a warning."""
        store = self.store(split, reads)
        return SplitData(store, with_stored_images(self.captions(split, reads, texts=texts), store, split))
