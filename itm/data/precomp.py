"""Import precomputed bottom-up features, as SCAN released them, into the region store.

The features are SCAN's (kuanghuei/SCAN); mirrors ship them in one of two layouts, and `precomp_dir` may name:

- SCAN's folder `data/f30k_precomp/` (or `coco_precomp/`) holding the split files directly;
- VSE∞'s dataset folder `data/f30k/` (or `coco/`, its `--data_path`) holding the split files in `precomp/` and
  `id_mapping.json` beside `precomp/`; or that `precomp/` folder itself (woodfrog/vse_infty @29df9d6, README "Data"
  and `lib/datasets/image_caption.py`, which reads `<data_path>/precomp/{split}_caps.txt`, `{split}_ids.txt`,
  `{split}_ims.npy` and `<data_path>/id_mapping.json`).

Not SCAN's data root `data/` holding several `*_precomp/` folders: which one is meant is the user's to say, and the
error names the folders found. A split is three files: `{split}_ims.npy` float32 [N_img, 36, D], `{split}_caps.txt`
(5 consecutive captions per image, in image order) and `{split}_ids.txt` (one id per image or per caption: COCO ids
for COCO, indices into Karpathy's `dataset_flickr30k.json` images, i.e. our `imgid`, for Flickr30K). VSE∞'s
`id_mapping.json` maps the same ids to image file names ({"0": "1000092795.jpg", ...} for Flickr30K); only its loader
of raw images reads it, so it is optional here, and when present every imported image's file name must agree with
`dataset.json`, which catches features indexed against another split file. Our `val` comes from the `dev` split and
our `test` from `testall` when present (COCO's 5,000 test images; its `test` is only the first 1,000).

Every file is checked before anything is written, so a missing one fails in seconds rather than after the 33 GB of
COCO train; features are then copied image by image from the memory-mapped array.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np

from itm.atomic import staged_dir
from itm.data.records import SPLITS, ImageRecord, Split, read_dataset_json
from itm.data.regions import ImageRegions, StoreWriter
from itm.data.text import tokenize
from itm.errors import UserError

log = logging.getLogger(__name__)

IdField = Literal["imgid", "source_id"]
LayoutKind = Literal["scan", "vse_infty"]

CAPTIONS_PER_IMAGE = 5
# Our split <- the first SCAN split whose files exist.
SCAN_SPLITS: dict[Split, tuple[str, ...]] = {"train": ("train",), "val": ("dev",), "test": ("testall", "test")}
SPLIT_FILES = ("ims.npy", "caps.txt", "ids.txt")  # {scan_split}_{suffix}
VSE_FOLDER = "precomp"  # VSE∞: <data>/<f30k|coco>/precomp/
ID_MAPPING = "id_mapping.json"  # VSE∞: <data>/<f30k|coco>/id_mapping.json, id -> image file name
_EXAMPLES = 5  # ids quoted in an error message
_NAMES: dict[LayoutKind, str] = {"scan": "SCAN's layout", "vse_infty": "VSE∞'s layout"}
_FOLDERS: dict[LayoutKind, str] = {
    "scan": "data/<f30k|coco>_precomp/ holding {split}_ims.npy, {split}_caps.txt, {split}_ids.txt",
    "vse_infty": "data/<f30k|coco>/precomp/ holding {split}_ims.npy, {split}_caps.txt, {split}_ids.txt, with "
    "id_mapping.json beside precomp/",
}


@dataclass(frozen=True)
class PrecompLayout:
    """Where a release's files are: the folder of the split files, and VSE∞'s id mapping when there is one."""

    kind: LayoutKind
    files_dir: Path  # holds {split}_ims.npy, {split}_caps.txt, {split}_ids.txt
    id_mapping: Path | None  # id_mapping.json: SCAN id -> image file name (VSE∞), when present

    @property
    def name(self) -> str:
        return _NAMES[self.kind]

    @property
    def expected(self) -> str:
        """The layout as an error message states it."""
        return f"{self.name}: {_FOLDERS[self.kind]}"

    def file(self, scan_split: str, suffix: str) -> Path:
        return self.files_dir / f"{scan_split}_{suffix}"


@dataclass(frozen=True)
class SplitPlan:
    """How one of our splits is filled: which SCAN split, and the SCAN row of each of our records."""

    split: Split
    scan_split: str
    ims_path: Path
    records: list[ImageRecord]  # sorted by imgid: the order written
    rows: list[int]  # SCAN row of each record
    n_boxes: int
    feature_dim: int
    skipped: int  # SCAN images not in our split


def import_precomp(precomp_dir: Path, dataset_json: Path, out_dir: Path, *, id_field: IdField) -> dict[str, int]:
    """Write `out_dir/{train,val,test}/` from precomputed features in either layout; returns image/box counts per
    split.

    `id_field` names the record attribute that the release's ids refer to: `source_id` (COCO ids) for COCO,
    `imgid` (Karpathy indices) for Flickr30K. Every record must be found in its SCAN split; SCAN images outside our
    split are skipped. Nothing is left under `out_dir` if any check fails.
    """
    layout = find_layout(precomp_dir)
    scan_splits = {split: check_split_files(layout, split) for split in SPLITS}  # every file, before reading any
    file_names = read_id_mapping(layout.id_mapping) if layout.id_mapping else None
    checked = f"image file names checked against {layout.id_mapping}" if layout.id_mapping else "no id_mapping.json"
    log.info("%s: %s, split files in %s, %s", precomp_dir, layout.name, layout.files_dir, checked)
    records = sorted(read_dataset_json(dataset_json), key=lambda record: record.imgid)
    plans = [
        plan_split(layout, split, scan_splits[split], [r for r in records if r.split == split], id_field, file_names)
        for split in SPLITS
    ]
    dims = {plan.feature_dim for plan in plans}
    if len(dims) > 1:
        found = ", ".join(f"{plan.scan_split}: {plan.feature_dim}" for plan in plans)
        raise UserError(f"{layout.files_dir}: the SCAN splits have different feature dimensions ({found})")
    summary: dict[str, int] = {}
    with staged_dir(out_dir) as staging:
        for plan in plans:
            info = {"source": "precomp", "precomp_dir": str(precomp_dir), "layout": layout.kind,
                    "scan_split": plan.scan_split}  # fmt: skip
            write_split(plan, staging / plan.split, info)
            summary |= {
                f"{plan.split}/images": len(plan.records),
                f"{plan.split}/boxes": len(plan.records) * plan.n_boxes,
                f"{plan.split}/skipped": plan.skipped,
            }
    return summary


def find_layout(precomp_dir: Path) -> PrecompLayout:
    """The layout `precomp_dir` follows: VSE∞'s dataset folder (it holds `precomp/`), VSE∞'s `precomp/` folder, or
    otherwise SCAN's `*_precomp/` folder."""
    if not precomp_dir.is_dir():
        raise UserError(
            f"{precomp_dir}: regions.precomp_dir is not a folder (expected SCAN's {_FOLDERS['scan']}; "
            f"or VSE∞'s {_FOLDERS['vse_infty']}; or VSE∞'s data/<f30k|coco>/ itself)"
        )
    if (precomp_dir / VSE_FOLDER).is_dir():
        files_dir, dataset_root = precomp_dir / VSE_FOLDER, precomp_dir
    elif precomp_dir.name == VSE_FOLDER:
        files_dir, dataset_root = precomp_dir, precomp_dir.parent
    else:
        _refuse_data_root(precomp_dir)
        mapping = precomp_dir / ID_MAPPING  # not SCAN's, but a mirror may have added VSE∞'s
        return PrecompLayout("scan", precomp_dir, mapping if mapping.is_file() else None)
    mappings = [path for path in (dataset_root / ID_MAPPING, files_dir / ID_MAPPING) if path.is_file()]
    return PrecompLayout("vse_infty", files_dir, mappings[0] if mappings else None)


def _refuse_data_root(folder: Path) -> None:
    """A folder with no split files but release folders inside is a data root: name the folders to choose from."""
    if any(folder.glob("*_ims.npy")):
        return
    inside = sorted(
        child.name + "/"
        for child in folder.iterdir()
        if child.is_dir() and (child.name.endswith("_precomp") or (child / VSE_FOLDER).is_dir())
    )
    if inside:
        raise UserError(
            f"{folder}: holds no split files but the release folders {', '.join(inside)}: "
            f"set regions.precomp_dir to the one of this dataset, e.g. {folder / inside[0]}"
        )


def check_split_files(layout: PrecompLayout, split: Split) -> str:
    """The SCAN split that fills ours (the first candidate whose `_ims.npy` exists), once its three files are
    found."""
    candidates = SCAN_SPLITS[split]
    found = [scan_split for scan_split in candidates if layout.file(scan_split, "ims.npy").is_file()]
    if not found:
        names = " or ".join(f"{scan_split}_ims.npy" for scan_split in candidates)
        raise UserError(f"{layout.files_dir}: no {names} for our {split} split ({layout.expected})")
    for suffix in SPLIT_FILES:
        path = layout.file(found[0], suffix)
        if not path.is_file():
            raise UserError(f"{path}: not found, needed for our {split} split ({layout.expected})")
    return found[0]


def read_id_mapping(path: Path) -> dict[int, str]:
    """VSE∞'s `id_mapping.json`: {"<id>": "<image file name>"} with the ids of `{split}_ids.txt`."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(document, dict):
            raise TypeError(f"a mapping of ids to file names, not a {type(document).__name__}")
        return {int(key): str(name) for key, name in document.items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as error:
        raise UserError(f"{path}: not a readable id -> file name mapping ({type(error).__name__}: {error})") from None


def plan_split(
    layout: PrecompLayout,
    split: Split,
    scan_split: str,
    records: list[ImageRecord],
    id_field: IdField,
    file_names: dict[int, str] | None = None,
) -> SplitPlan:
    """Check one SCAN split against our records and find each record's SCAN row (reads ids and captions only);
    with `file_names` (VSE∞'s id mapping), each record's image file name must be the one its id maps to."""
    ims_path = layout.file(scan_split, "ims.npy")
    ims = load_ims(ims_path)
    n_images = ims.shape[0]
    ids_path = layout.file(scan_split, "ids.txt")
    ids = read_ids(ids_path, n_images)
    captions = read_captions(layout.file(scan_split, "caps.txt"), n_images)

    row_of: dict[int, int] = {}
    for row, scan_id in enumerate(ids):
        row_of.setdefault(scan_id, row)  # a repeated id keeps its first row
    keys = [_record_key(record, id_field, layout.files_dir) for record in records]
    missing = [key for key in keys if key not in row_of]
    if missing:
        examples = ", ".join(str(key) for key in missing[:_EXAMPLES])
        raise UserError(
            f"{split}: {len(missing)} of {len(records)} images are not in SCAN's {scan_split} split "
            f"({ids_path}), e.g. {id_field} {examples}"
        )
    if file_names is not None:
        _check_file_names(layout, file_names, split, records, keys, id_field)
    rows = [row_of[key] for key in keys]
    skipped = n_images - len(set(rows))
    if skipped:
        log.info("%s: %d images of SCAN's %s are not in our split; skipped", split, skipped, scan_split)
    _warn_caption_differences(split, scan_split, records, [captions[row] for row in rows])
    return SplitPlan(split, scan_split, ims_path, records, rows, int(ims.shape[1]), int(ims.shape[2]), skipped)


def _check_file_names(
    layout: PrecompLayout,
    file_names: dict[int, str],
    split: Split,
    records: list[ImageRecord],
    keys: list[int],
    field: IdField,
) -> None:
    """Each record's image file must be the one the id mapping names (folders aside: COCO's dataset.json keeps
    train2014/ or val2014/ in the file name)."""
    differing = [
        (key, record.filename, file_names.get(key))
        for record, key in zip(records, keys, strict=True)
        if PurePosixPath(file_names.get(key, "")).name != PurePosixPath(record.filename).name
    ]
    if differing:
        key, ours, theirs = differing[0]
        there = f"{theirs!r} there" if theirs is not None else "absent there"
        raise UserError(
            f"{layout.id_mapping}: {len(differing)} of {len(records)} {split} images have another file name than in "
            f"dataset.json, e.g. {field} {key}: {there}, {ours!r} in dataset.json (were the features made with "
            "another split file?)"
        )


def write_split(plan: SplitPlan, folder: Path, info: dict[str, str]) -> None:
    """Copy the planned images, in record order, into a region store folder (one image in memory at a time)."""
    ims = load_ims(plan.ims_path)
    n = plan.n_boxes
    unknown_boxes = np.full((n, 4), np.nan, dtype=np.float32)
    unknown_ids = np.full(n, -1, dtype=np.int16)
    unknown_confidence = np.full(n, np.nan, dtype=np.float32)
    writer = StoreWriter(folder, len(plan.records) * n, plan.feature_dim, info)
    for record, row in zip(plan.records, plan.rows, strict=True):
        regions = ImageRegions(
            image_id=record.imgid,
            width=0,
            height=0,
            features=np.asarray(ims[row], dtype=np.float16),
            boxes=unknown_boxes,
            object_ids=unknown_ids,
            object_confidence=unknown_confidence,
            attribute_ids=unknown_ids,
            attribute_confidence=unknown_confidence,
        )
        writer.add(regions)
    writer.close()


def load_ims(path: Path) -> np.ndarray:
    """`{split}_ims.npy` memory-mapped, checked to be [N_img, n_boxes, D]."""
    if not path.is_file():
        raise UserError(f"{path}: not found")
    try:
        ims = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: not a readable .npy array ({error})") from None
    if ims.ndim != 3:
        raise UserError(f"{path}: expected an array of rank 3 [images, boxes, dim], found shape {ims.shape}")
    return ims


def read_ids(path: Path, n_images: int) -> list[int]:
    """One id per image from `{split}_ids.txt`, which holds one line per image or one per caption (5 equal lines)."""
    lines = _read_lines(path)
    try:
        ids = [int(line) for line in lines]
    except ValueError as error:
        raise UserError(f"{path}: not one integer id per line ({error})") from None
    if len(ids) == n_images:
        return ids
    if len(ids) == CAPTIONS_PER_IMAGE * n_images:
        groups = np.asarray(ids, dtype=np.int64).reshape(n_images, CAPTIONS_PER_IMAGE)
        unequal = np.flatnonzero((groups != groups[:, :1]).any(axis=1))
        if len(unequal):
            raise UserError(
                f"{path}: the {CAPTIONS_PER_IMAGE} caption ids of {len(unequal)} images are not all equal "
                f"(first at line {unequal[0] * CAPTIONS_PER_IMAGE + 1})"
            )
        return groups[:, 0].tolist()
    raise UserError(
        f"{path}: {len(ids)} ids for {n_images} images in the _ims.npy "
        f"(expected {n_images} or {CAPTIONS_PER_IMAGE * n_images})"
    )


def read_captions(path: Path, n_images: int) -> list[list[str]]:
    """The 5 captions of each image from `{split}_caps.txt`."""
    lines = _read_lines(path)
    if len(lines) != CAPTIONS_PER_IMAGE * n_images:
        raise UserError(
            f"{path}: {len(lines)} captions for {n_images} images in the _ims.npy "
            f"(expected {CAPTIONS_PER_IMAGE} per image, {CAPTIONS_PER_IMAGE * n_images})"
        )
    return [lines[i : i + CAPTIONS_PER_IMAGE] for i in range(0, len(lines), CAPTIONS_PER_IMAGE)]


def _read_lines(path: Path) -> list[str]:
    """The lines of a text file, split on newlines only (captions may hold other Unicode line separators)."""
    if not path.is_file():
        raise UserError(f"{path}: not found")
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def _record_key(record: ImageRecord, id_field: IdField, precomp_dir: Path) -> int:
    key = getattr(record, id_field)
    if key is None:
        raise UserError(
            f"image {record.imgid} has no {id_field}, which SCAN's ids in {precomp_dir} refer to "
            "(COCO needs the COCO id in dataset.json)"
        )
    return int(key)


def _warn_caption_differences(
    split: Split, scan_split: str, records: list[ImageRecord], scan_captions: list[list[str]]
) -> None:
    """Log how many images have a SCAN caption that none of our captions matches after tokenization.

    Only a warning: SCAN's text preprocessing differs slightly, and images with more than 5 captions keep a subset.
    """
    differing = [
        record.imgid
        for record, captions in zip(records, scan_captions, strict=True)
        if not {tuple(tokenize(caption)) for caption in captions}
        <= {tuple(sentence.tokens) for sentence in record.sentences}
    ]
    if differing:
        log.warning(
            "%s: captions of %d of %d images differ from SCAN's %s_caps.txt after tokenization (e.g. imgid %s)",
            split,
            len(differing),
            len(records),
            scan_split,
            ", ".join(str(imgid) for imgid in differing[:_EXAMPLES]),
        )
