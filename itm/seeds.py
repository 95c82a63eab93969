"""Where one training seed's outputs live: `<root>/<name>/seed<seed>` (a model folder, plots) or with a suffix
(`metrics/<name>/seed<seed>.json`, `data/scores/<name>/seed<seed>.npz`), as dvc.yaml's `train@<name>-<seed>`,
`evaluate@<name>-<seed>` and `ensemble@<name>-<seed>` stages write them."""

from __future__ import annotations

from pathlib import Path


def seed_path(root: Path, name: str, seed: int, suffix: str = "") -> Path:
    """`root/name/seed<seed><suffix>`."""
    return root / name / f"seed{seed}{suffix}"
