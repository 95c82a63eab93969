"""The evaluation protocols of each dataset: which images and captions of the test split are ranked together.

Conventions of kuanghuei/SCAN `evaluation.evalrank`, followed by VSE∞ `eval.py` and CVSE (methods.md §1):
- Flickr30K: the 1,000-image test split as one gallery (`split='test'`), here named `test`;
- MS-COCO 1K: `split='testall', fold5=True`: five folds of 1,000 consecutive images of the 5,000-image test split
  (`img_embs[i*5000:(i+1)*5000:5]`) with their captions, every metric (rSum included) averaged over the folds;
  here `test_5fold1k`;
- MS-COCO 5K: `split='testall', fold5=False`: the whole 5,000-image split; here `test_5k`.
The 1,000-image COCO `test` shortcut is one fold and reads higher (Paranioar/SGRAF#7, BruceW91/CVSE#15), so a COCO
test split of any other size than 5,000 is refused rather than reported as "1K".
Our synthetic dataset has a single gallery like Flickr30K.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from itm.errors import UserError
from itm.evaluate.metrics import recall_metrics
from itm.evaluate.score_file import SplitScores

COCO_TEST_IMAGES = 5000
COCO_FOLD_IMAGES = 1000
SINGLE_GALLERY_KINDS = ("synthetic", "flickr30k")
DATASET_KINDS = (*SINGLE_GALLERY_KINDS, "coco")

_SAFE_NAME = re.compile(r"[\w.\- ]+")  # MLflow metric names allow [/\w.\- ]; "/" separates protocol and metric


@dataclass(frozen=True)
class Fold:
    """One gallery: a set of test images (indices into the test split's image rows) and all their captions."""

    images: Tensor  # [n] int64 rows of the test similarity matrix

    def select(self, scores: Tensor, caption_image: Tensor) -> tuple[Tensor, Tensor]:
        """The fold's block of `scores` [n, m] and its captions' images renumbered into the fold's rows [m].

        The fold's captions are every caption whose image is in the fold, in their test-split order.
        """
        caption_image = caption_image.to(scores.device, torch.int64)
        images = self.images.to(scores.device)
        if len(images) and int(images.max()) >= scores.shape[0]:
            raise ValueError(f"fold image row {int(images.max())} is outside the {scores.shape[0]} scored images")
        row_in_fold = torch.full((scores.shape[0],), -1, dtype=torch.int64, device=scores.device)  # [n_img]
        row_in_fold[images] = torch.arange(len(images), device=scores.device)
        captions = torch.nonzero(row_in_fold[caption_image] >= 0).squeeze(1)  # [m] caption columns of the fold
        block = scores if _is_all(images, scores.shape[0]) else scores.index_select(0, images)
        block = block if _is_all(captions, scores.shape[1]) else block.index_select(1, captions)
        return block, row_in_fold[caption_image[captions]]


def _is_all(indices: Tensor, n: int) -> bool:
    """Whether `indices` is 0..n-1 in order (the whole axis: no copy of a 5K matrix needed)."""
    return len(indices) == n and bool((indices == torch.arange(n, device=indices.device)).all())


@dataclass(frozen=True)
class Protocol:
    """A named evaluation protocol: its metrics are the means over its folds of those of `recall_metrics`."""

    name: str
    folds: tuple[Fold, ...]

    def __post_init__(self) -> None:
        if not _SAFE_NAME.fullmatch(self.name):
            raise ValueError(f"protocol name {self.name!r} is not a safe metric name ([\\w.\\- ]+)")
        if not self.folds:
            raise ValueError(f"protocol {self.name!r} has no folds")


def protocols_for(dataset_kind: str, n_test_images: int) -> list[Protocol]:
    """The protocols reported for a dataset kind, over a test split of `n_test_images` images (in split order)."""
    if dataset_kind in SINGLE_GALLERY_KINDS:
        return [Protocol("test", (Fold(torch.arange(n_test_images)),))]
    if dataset_kind != "coco":
        raise UserError(f"dataset kind {dataset_kind!r} has no evaluation protocol; choose one of {DATASET_KINDS}")
    if n_test_images != COCO_TEST_IMAGES:
        raise UserError(
            f"the COCO test split has {n_test_images} images with regions; the 5-fold 1K and 5K protocols need the "
            f"{COCO_TEST_IMAGES}-image Karpathy test split (SCAN `testall`), and the 1,000-image SCAN `test` "
            "shortcut is not the 1K protocol (Paranioar/SGRAF#7); extract regions for every test image"
        )
    folds = tuple(
        Fold(torch.arange(start, start + COCO_FOLD_IMAGES)) for start in range(0, COCO_TEST_IMAGES, COCO_FOLD_IMAGES)
    )
    return [Protocol("test_5fold1k", folds), Protocol("test_5k", (Fold(torch.arange(COCO_TEST_IMAGES)),))]


def evaluate_protocols(scores: Tensor, caption_image: Tensor, protocols: Sequence[Protocol]) -> dict[str, float]:
    """`<protocol>/<metric>` for every protocol: each metric averaged over the protocol's folds (SCAN's
    `np.array(results).mean(axis=0)` over the five COCO folds, VSE∞ likewise).

    `scores` [n_img, n_cap] is the whole test split; `caption_image` [n_cap] gives each caption's image row.
    """
    metrics: dict[str, float] = {}
    for protocol in protocols:
        per_fold = [recall_metrics(*fold.select(scores, caption_image)) for fold in protocol.folds]
        for key in per_fold[0]:
            metrics[f"{protocol.name}/{key}"] = sum(fold[key] for fold in per_fold) / len(per_fold)
    return metrics


def protocol_metrics(test: SplitScores, dataset_kind: str) -> dict[str, float]:
    """The metrics of the dataset's test protocols, with the gallery's size."""
    protocols = protocols_for(dataset_kind, len(test.image_ids))
    metrics = evaluate_protocols(test.scores, test.caption_image, protocols)
    metrics |= {"test/images": float(len(test.image_ids)), "test/captions": float(len(test.caption_ids))}
    return metrics
