"""Materialise the dataset named in params: generate the synthetic set or download a real one."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from itm.config import DownloadParams, KarpathyDataset, SyntheticDataset
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
) -> dict[str, int]:
    """Write `dataset` to `out_dir` in the Karpathy layout; returns image and caption counts per split."""
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
        )
    return dataset_summary(out_dir)


def dataset_summary(dataset_dir: Path) -> dict[str, int]:
    """Images and captions per split of a materialised dataset."""
    records = read_dataset_json(dataset_dir / DATASET_JSON)
    images = Counter(record.split for record in records)
    captions = Counter()
    for record in records:
        captions[record.split] += len(record.sentences)
    return {f"images/{split}": n for split, n in images.items()} | {f"captions/{s}": n for s, n in captions.items()}
