"""The search index: one split of the pipeline's data (region or pixel store, captions, image files, vocabulary)
with the trained matcher that searches it, loaded as `evaluate` loads them; galleries are encoded on demand. Also the
discovery of the trained models (`models/<matcher>/seed<seed>`, as `train@<matcher>-<seed>` writes them) named when a
model folder is missing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from itm.data.loaders import CaptionTable
from itm.data.pixels import ImageStore
from itm.data.records import IMAGES_DIR, read_dataset_json
from itm.data.splits import DataFolders
from itm.data.vocab import Vocab
from itm.errors import UserError
from itm.evaluate.scoring import encode_captions, encode_images
from itm.models.base import Encoded, Matcher
from itm.models.saved import CARD_FILE, MODEL_FILE, load_matcher
from itm.pair_attention import is_cross_attention


@dataclass
class SearchIndex:
    """One split of the pipeline's data, ready to be searched with one matcher; galleries are encoded on demand."""

    name: str
    matcher: Matcher
    device: torch.device
    split: str
    store: ImageStore
    captions: CaptionTable  # the split's captions whose image is in the store, with text (and concepts)
    image_ids: list[int]  # gallery rows: the captions' images in first-appearance order (as `evaluate`)
    files: dict[int, Path]  # image id -> file, for every image of the split
    vocab: Vocab
    concept_words: tuple[str, ...]
    batch_size: int = 128
    _images: Encoded | None = field(default=None, repr=False)
    _captions: Encoded | None = field(default=None, repr=False)

    @property
    def cross_attention(self) -> bool:
        return is_cross_attention(self.matcher)

    def gallery_images(self) -> Encoded:
        """Every image of the split, encoded (on the CPU)."""
        if self._images is None:
            self._images = encode_images(
                self.matcher, self.store, self.image_ids, batch_size=self.batch_size, device=self.device
            )
        return self._images

    def gallery_captions(self) -> Encoded:
        """Every caption of the split, encoded (on the CPU)."""
        if self._captions is None:
            self._captions = encode_captions(
                self.matcher, self.captions.token_ids, batch_size=self.batch_size, device=self.device,
                concept_ids=self.captions.concept_ids,
            )  # fmt: skip
        return self._captions


def open_index(
    model_dir: Path, data: DataFolders, split: str, *, device: torch.device, batch_size: int = 128
) -> SearchIndex:
    """The matcher of `model_dir` (a model folder, `models/<matcher>/seed<seed>`) and the split it searches, loaded as
    `evaluate_matcher` loads them (`data.dataset_dir` is required: the search shows the image files)."""
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: no such model folder{_known_models(model_dir)}")
    if not is_matcher_folder(model_dir):
        raise UserError(f"{model_dir}: not a trained matcher's folder{_known_models(model_dir / MODEL_FILE)}")
    if data.dataset_dir is None:
        raise ValueError("the search index needs the dataset folder (data/raw/<dataset>)")
    matcher, card = load_matcher(model_dir, device, data)
    searched = data.split(split, matcher.reads, texts=True)
    records = read_dataset_json(data.dataset_dir / "dataset.json")
    files = {r.imgid: data.dataset_dir / IMAGES_DIR / r.filename for r in records if r.split == split}
    return SearchIndex(
        name=card.get("name", model_dir.name),
        matcher=matcher,
        device=device,
        split=split,
        store=searched.store,
        captions=searched.captions,
        image_ids=list(dict.fromkeys(int(i) for i in searched.captions.image_ids)),
        files=files,
        vocab=data.vocab,
        concept_words=data.concepts.words,
        batch_size=batch_size,
    )


def _known_models(missing: Path) -> str:
    """' (trained models in <dir>: a/seed0, b/seed0)' for the error message about `missing`, or '' when there are
    none: the model folders one or two levels under its parent, else under its grandparent (`models/` for a missing
    `models/<matcher>/seed<seed>` of an unknown matcher)."""
    for root in (missing.parent, missing.parent.parent):
        if root.is_dir():
            found = [*root.glob("*"), *root.glob("*/seed*")]
            names = sorted(str(folder.relative_to(root)) for folder in found if is_matcher_folder(folder))
            if names:
                return f" (trained models in {root}: {', '.join(names)})"
    return ""


def refuse_other_model(folder: Path) -> None:
    """A folder with a `model.pt` that is not a trained matcher's (the detector's, or one whose card is missing or
    damaged) is named for what it is, rather than searched for `seed<seed>` folders it does not have."""
    if not (folder / MODEL_FILE).is_file() or is_matcher_folder(folder):
        return
    try:
        card = json.loads((folder / CARD_FILE).read_text())
    except (OSError, ValueError):
        card = None
    detector = isinstance(card, dict) and "architecture" in card
    what = "the region detector's folder" if detector else f"a folder whose {CARD_FILE} is not a matcher's card"
    raise UserError(
        f"{folder}: {what}, not a trained matcher's; pass models/<matcher>/seed<seed>"
        f"{_known_models(folder / MODEL_FILE)}"
    )


def is_matcher_folder(folder: Path) -> bool:
    """A trained matcher's folder (the detector's has a model.pt too, but its card has no matcher params)."""
    card = folder / CARD_FILE
    try:
        return (folder / MODEL_FILE).is_file() and "params" in json.loads(card.read_text())
    except (OSError, ValueError):
        return False
