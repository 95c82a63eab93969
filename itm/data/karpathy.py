"""Flickr30K and MS-COCO 2014 in Karpathy's splits: fetch the split file and image archives, write `dataset.json`.

Retrieval results are only comparable across papers on the same splits, so captions and splits come from
Karpathy's `dataset_{flickr30k,coco}.json` and the images from the datasets' own archives. The output has the
normalised layout of `itm.data.records`: `dataset.json` beside an `images/` folder, COCO's `restval` folded into
`train`, and the same number of captions for every image.

With precomputed region features (`regions.source: precomp`) the images are not needed for training or evaluation,
and Flickr30K's are only had through a request form: when no image archive is set, only the split file is fetched
and the output is `dataset.json` alone (a captions-only download; the figures that need pixels are then skipped).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from itm.atomic import staged_dir
from itm.config import KarpathyDataset, RemoteFile
from itm.data.download import extract, fetch, read_member
from itm.data.records import DATASET_JSON, IMAGES_DIR, SPLITS, ImageRecord, Sentence, Split, write_dataset_json
from itm.errors import UserError

log = logging.getLogger(__name__)

FLICKR30K_REQUEST_FORM = "https://forms.illinois.edu/sec/229675"

# Karpathy's split names -> ours: restval is the part of COCO val2014 that Karpathy gave to training.
_SPLIT_NAMES: dict[str, Split] = {"train": "train", "val": "val", "test": "test", "restval": "train"}
_SHOWN_NAMES = 5  # missing images named in an error


def parse_karpathy(document: dict, *, captions_per_image: int) -> list[ImageRecord]:
    """Records from Karpathy's original JSON, sorted by `imgid`, each with its first `captions_per_image` captions.

    COCO's `filepath` (train2014/val2014) becomes the first folder of `filename`, and `cocoid` the `source_id`.
    """
    images = document.get("images") if isinstance(document, dict) else None
    if not isinstance(images, list):
        raise UserError("Karpathy JSON: expected a mapping with an 'images' list")
    records = [_parse_image(image, index, captions_per_image) for index, image in enumerate(images)]
    records.sort(key=lambda record: record.imgid)
    _check_unique(records)
    return records


def _parse_image(image: Any, index: int, captions_per_image: int) -> ImageRecord:
    try:
        filename = str(image["filename"])
        if image.get("filepath"):
            filename = f"{image['filepath']}/{filename}"
        split = _split(image["split"], filename)
        sentences = [Sentence(int(s["sentid"]), str(s["raw"])) for s in image["sentences"]]
        if len(sentences) < captions_per_image:
            raise UserError(
                f"Karpathy JSON: image {filename!r} has {len(sentences)} caption(s), "
                f"fewer than captions_per_image ({captions_per_image})"
            )
        cocoid = image.get("cocoid")
        return ImageRecord(
            imgid=int(image["imgid"]),
            filename=filename,
            split=split,
            sentences=tuple(sentences[:captions_per_image]),
            source_id=int(cocoid) if cocoid is not None else None,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise UserError(f"Karpathy JSON: images[{index}] is malformed ({type(error).__name__}: {error})") from None


def _split(name: Any, filename: str) -> Split:
    if name not in _SPLIT_NAMES:
        raise UserError(
            f"Karpathy JSON: image {filename!r} has split {name!r}, expected one of {', '.join(_SPLIT_NAMES)}"
        )
    return _SPLIT_NAMES[name]


def _check_unique(records: list[ImageRecord]) -> None:
    for field in ("imgid", "filename"):
        counts = Counter(getattr(record, field) for record in records)
        repeated = [value for value, count in counts.items() if count > 1]
        if repeated:
            raise UserError(f"Karpathy JSON: {field} {repeated[0]!r} occurs {counts[repeated[0]]} times")


def prepare_karpathy(
    name: str,
    dataset: KarpathyDataset,
    out_dir: Path,
    *,
    cache_dir: Path,
    retries: int,
    backoff_seconds: float,
    timeout_seconds: float,
    precomputed_regions: bool = False,
    pixel_matchers: Sequence[str] = (),
) -> None:
    """Fetch `dataset`'s split file and image archives and write `out_dir/dataset.json` and `out_dir/images/`.

    Downloads go to `cache_dir` and are reused from there. `out_dir` appears (or is replaced) only when every
    image of the split file was found in the archives; on any failure it is left as it was. With
    `precomputed_regions` and no image archive set, only the split file is fetched and `out_dir` holds
    `dataset.json` alone, unless a matcher of `pixel_matchers` (those that read the images themselves) needs them.
    """
    with_images = _check_sources(name, dataset, precomputed_regions, pixel_matchers)
    options = {"retries": retries, "backoff_seconds": backoff_seconds, "timeout_seconds": timeout_seconds}
    records = _load_records(dataset, cache_dir, options)
    fetched = dataset.images if with_images else ()
    archives = [(_fetch(archive, cache_dir, options), archive.strip_prefix) for archive in fetched]
    with staged_dir(out_dir) as staging:
        if with_images:
            images_dir = staging / IMAGES_DIR
            extracted = []
            for path, strip_prefix in archives:
                extracted += extract(path, images_dir, strip_prefix=strip_prefix)
            _check_images(name, records, images_dir, extracted)
        write_dataset_json(staging / DATASET_JSON, name, records)
    counts = Counter(record.split for record in records)
    contents = "images" if with_images else "images' captions (no image files)"
    log.info("%s: %s %s in %s", name, ", ".join(f"{split} {counts[split]}" for split in SPLITS), contents, out_dir)


def _check_sources(
    name: str, dataset: KarpathyDataset, precomputed_regions: bool, pixel_matchers: Sequence[str]
) -> bool:
    """Fail before any download if a needed source is not set in params.yaml; returns whether to fetch the images.

    The image archives may all stay unset when the regions come precomputed, unless a matcher reads the images.
    """
    if dataset.karpathy.source is None:
        raise UserError(f"params.yaml: datasets.{name}.karpathy.source is not set (Karpathy's caption_datasets.zip)")
    unset = [index for index, archive in enumerate(dataset.images) if archive.source is None]
    if not unset:
        return True
    where = f" (request it at {FLICKR30K_REQUEST_FORM})" if dataset.kind == "flickr30k" else ""
    if precomputed_regions and len(unset) == len(dataset.images):
        if pixel_matchers:
            raise UserError(
                f"params.yaml: matchers.{pixel_matchers[0]} reads the images themselves (backbone: open_clip), but "
                f"datasets.{name}.images[0].source is not set, and with regions.source: precomp only captions are "
                f"downloaded: give the URL or local path of the image archive{where}, or use backbone: own"
            )
        log.info(
            "%s: regions.source is precomp and no image archive is set: fetching captions and splits only "
            "(the figures that need the images will be skipped)",
            name,
        )
        return False
    hint = (
        "; or unset every images[].source to download captions only (regions.source is precomp)"
        if precomputed_regions
        else "; or use regions.source: precomp with SCAN's precomputed features, which needs captions only"
    )
    raise UserError(
        f"params.yaml: datasets.{name}.images[{unset[0]}].source is not set: "
        f"give the URL or local path of the image archive{where}{hint}"
    )


def _fetch(remote: RemoteFile, cache_dir: Path, options: dict[str, Any]) -> Path:
    assert remote.source is not None  # checked by _check_sources
    return fetch(remote.source, cache_dir, size=remote.size, md5=remote.md5, sha256=remote.sha256, **options)


def _load_records(dataset: KarpathyDataset, cache_dir: Path, options: dict[str, Any]) -> list[ImageRecord]:
    """Fetch and parse the split file, naming it in any error about its content."""
    split_file = dataset.karpathy
    path = _fetch(split_file, cache_dir, options)
    label = f"{path}:{split_file.member}" if split_file.member else str(path)
    data = read_member(path, split_file.member) if split_file.member else path.read_bytes()
    try:
        document = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{label}: not valid JSON ({error})") from None
    try:
        return parse_karpathy(document, captions_per_image=dataset.captions_per_image)
    except UserError as error:
        raise UserError(f"{label}: {error}") from None


def _check_images(name: str, records: list[ImageRecord], images_dir: Path, extracted: list[str]) -> None:
    """Every record's image must have come out of the archives."""
    missing = [record.filename for record in records if not (images_dir / record.filename).is_file()]
    if not missing:
        return
    shown = ", ".join(missing[:_SHOWN_NAMES]) + (" ..." if len(missing) > _SHOWN_NAMES else "")
    sample = f"; the archives gave e.g. {extracted[0]!r}" if extracted else "; the archives gave no files"
    raise UserError(
        f"{len(missing)} of {len(records)} images of the split file are missing from the archives ({shown}){sample}: "
        f"an archive may be incomplete, or datasets.{name}.images[].strip_prefix may be wrong"
    )
