"""Write outputs under a temporary name and rename them into place only when complete.

An interrupted stage then never leaves a half-written output for DVC to cache, and an existing output is only
replaced once its successor is whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np


def _replace(staged: Path, final: Path) -> None:
    """Move `staged` to `final`, replacing what is there only after the new one is in place."""
    if not final.exists():
        staged.replace(final)
        return
    retired = final.with_name(f".{final.name}.old-{os.getpid()}")
    final.replace(retired)
    try:
        staged.replace(final)
    except BaseException:
        retired.replace(final)
        raise
    if retired.is_dir():
        shutil.rmtree(retired)
    else:
        retired.unlink()


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty sibling directory of `final`; on success it becomes `final`, on failure it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield staging
        _replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


@contextlib.contextmanager
def staged_file(final: Path) -> Iterator[Path]:
    """Yield a sibling temporary path for `final`; on success it becomes `final`, on failure it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{final.name}.partial-", dir=final.parent)
    os.close(descriptor)
    staging = Path(name)
    try:
        yield staging
        _replace(staging, final)
    finally:
        staging.unlink(missing_ok=True)


def sha256_of(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` (its folder created) under a temporary name, renamed into place when complete."""
    with staged_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, document: object) -> None:
    """Write `document` as indented JSON to `path`, atomically (`write_text`): metrics, plots and cards."""
    write_text(path, json.dumps(document, indent=1))


_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write `arrays` as an uncompressed `.npz` (what `np.load` reads) atomically, with every zip entry dated
    1980-01-01: `np.savez` stamps entries with the current time, so the same arrays would give other bytes (and
    another DVC hash) on every run."""
    with staged_file(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            entry = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            with archive.open(entry, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
