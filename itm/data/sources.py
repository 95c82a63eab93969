"""Materialise the dataset named in params: generate the synthetic set or download a real one."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from itm.config import DownloadParams, KarpathyDataset, MatcherParams, SyntheticDataset
from itm.data.karpathy import prepare_karpathy
from itm.data.records import DATASET_JSON, read_dataset_json
from itm.data.synthetic import generate_synthetic


def materialise(
    name: str,
    dataset: SyntheticDataset | KarpathyDataset,
    out_dir: Path,
    *,
    cache_dir: Path,
    download: DownloadParams,
    precomputed_regions: bool = False,
    pixel_matchers: Sequence[str] = (),
) -> dict[str, int]:
    """Write `dataset` to `out_dir` in the Karpathy layout; returns image and caption counts per split.

    With `precomputed_regions` (`regions.source: precomp`) a real dataset whose image archives are all unset is
    downloaded without its images (captions and splits only), unless one of `pixel_matchers` reads them.
    """
    if isinstance(dataset, SyntheticDataset):
        generate_synthetic(out_dir, **dataset.model_dump(exclude={"kind"}))
    else:
        prepare_karpathy(
            name,
            dataset,
            out_dir,
            cache_dir=cache_dir,
            retries=download.retries,
            backoff_seconds=download.backoff_seconds,
            timeout_seconds=download.timeout_seconds,
            precomputed_regions=precomputed_regions,
            pixel_matchers=pixel_matchers,
        )
    return dataset_summary(out_dir)


def pixel_matchers(matchers: Mapping[str, MatcherParams]) -> list[str]:
    """The matchers whose image encoder reads the images themselves rather than the regions (MVAM over open_clip)."""
    return [name for name, params in matchers.items() if params.kind == "mvam" and params.backbone == "open_clip"]


def dataset_summary(dataset_dir: Path) -> dict[str, int]:
    """Images and captions per split of a materialised dataset."""
    records = read_dataset_json(dataset_dir / DATASET_JSON)
    images = Counter(record.split for record in records)
    captions = Counter()
    for record in records:
        captions[record.split] += len(record.sentences)
    return {f"images/{split}": n for split, n in images.items()} | {f"captions/{s}": n for s, n in captions.items()}
