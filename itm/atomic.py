"""Write outputs under a temporary name and rename them into place only when complete.

An interrupted stage then never leaves a half-written output for DVC to cache, and an existing output is only
replaced once its successor is whole. Beyond one output:

- `check_writable` is what a stage calls on its output, metrics and work paths before any work, so that a path it
  cannot write fails in seconds, not after hours of training or extraction;
- `replaced_together` makes a stage's outputs one change: inside it, each output's earlier version is kept aside
  until the block ends, and if the block fails every output of the block is put back as it was (the regions stage
  does not leave a new region store beside a missing metrics file); work folders are removed only when it succeeds
  (`remove_when_published`), so a failed stage resumes from them;
- a full disk, a quota or a read-only file system while an output is written is one `UserError` naming the output;
- temporaries get the permissions of any new file or folder (0666 or 0777 less the umask), not the private 0600 and
  0700 of `tempfile`, so that an output is as readable as the user's umask says.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from itm.errors import UserError

log = logging.getLogger(__name__)

# Faults of the disk rather than of the path: a retry cannot help, the user must make room or write elsewhere.
DISK_FAULTS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def is_disk_fault(error: BaseException) -> bool:
    """Whether `error` says the disk is full, the quota is spent or the file system is read-only."""
    return isinstance(error, OSError) and error.errno in DISK_FAULTS


def disk_fault_message(path: object, error: OSError) -> str:
    """The one line for a disk fault while writing `path`: what happened and what to do."""
    return (
        f"{path}: {error.strerror or os.strerror(error.errno or 0)} while writing it; make room on its disk (or "
        "write it elsewhere) and run again: earlier outputs are kept"
    )


def _umask() -> int:
    """The process's umask. Linux shows it in /proc without changing it; elsewhere it is set and put back."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --- checking before the work ---------------------------------------------------------------------------------------


def check_writable(*, files: Iterable[Path] = (), folders: Iterable[Path] = ()) -> None:
    """Refuse, with a `UserError` naming the path, any output that could not be written: its nearest existing
    folder is not a folder or cannot take a new file, or a file output is an existing folder (which publishing
    would replace). Nothing is created: a missing folder is only checked to be creatable."""
    files, folders = list(files), list(folders)
    for path in files:
        if path.is_dir():
            raise UserError(f"{path}: is a folder, but a file is written there; give a file's path")
    for path in [*files, *folders]:
        problem = _write_problem(path)
        if problem is not None:
            raise UserError(f"{path}: cannot be written ({problem}); choose another path or fix that folder")


def _write_problem(path: Path) -> str | None:
    """Why `path` could not be written, or None. The folder that will take it (its nearest existing ancestor: the
    rest is created) must take a new file; an existing folder output must take one too (work folders are written
    into, output folders are emptied when replaced)."""
    existing = path.parent
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    probed = [existing, path] if path.is_dir() else [existing]
    for folder in probed:
        try:
            descriptor, name = tempfile.mkstemp(prefix=".itm-write-check-", dir=folder)
        except OSError as error:
            return f"{error.strerror}: {folder}"
        os.close(descriptor)
        Path(name).unlink()
    return None


# --- replacing outputs together -------------------------------------------------------------------------------------


@dataclass
class _Publication:
    """The outputs of one `replaced_together` block: what each replaced, and the work to remove on success."""

    outputs: tuple[Path, ...]  # absolute (not resolved: an output may be a link into DVC's cache)
    replaced: list[tuple[Path, Path | None]] = field(default_factory=list)  # (output, its earlier version, aside)
    removals: list[Path] = field(default_factory=list)

    def covers(self, final: Path) -> bool:
        """Whether `final` is one of the block's outputs or lies in one (a plot in the plots folder)."""
        final = final.absolute()
        return any(final == output or output in final.parents for output in self.outputs)

    def publish(self, staged: Path, final: Path) -> None:
        """Move `staged` to `final`, keeping what was there aside until the block ends."""
        aside = None
        if os.path.lexists(final):
            aside = final.with_name(f".{final.name}.old-{os.getpid()}-{len(self.replaced)}")
            final.replace(aside)
        try:
            staged.replace(final)
        except BaseException:
            if aside is not None:
                aside.replace(final)
            raise
        self.replaced.append((final, aside))

    def commit(self) -> None:
        for _, aside in self.replaced:
            if aside is not None:
                _remove(aside)
        for path in self.removals:
            _remove(path)

    def roll_back(self) -> None:
        """Put every output back as it was before the block, the last replaced first."""
        for final, aside in reversed(self.replaced):
            try:
                _remove(final)
                if aside is not None:
                    aside.replace(final)
            except OSError as error:  # keep rolling the others back; say where the earlier version is
                log.error("%s: could not be put back (%s); its earlier version is %s", final, error, aside)


_publication: ContextVar[_Publication | None] = ContextVar("itm_atomic_publication", default=None)


@contextlib.contextmanager
def replaced_together(*outputs: Path) -> Iterator[None]:
    """Within the block, `outputs` (files or folders) are replaced together or not at all: each output published
    in the block keeps its earlier version aside, and if the block raises (a failure, a full disk, an interrupt),
    every one of them is put back. Work registered with `remove_when_published` is removed only on success."""
    publication = _Publication(tuple(output.absolute() for output in outputs))
    token = _publication.set(publication)
    try:
        yield
    except BaseException:
        publication.roll_back()
        raise
    finally:
        _publication.reset(token)
    publication.commit()


def remove_when_published(path: Path) -> None:
    """Remove the work file or folder `path` now, or, inside `replaced_together`, once the block has succeeded:
    a stage whose outputs are put back must still find the work to resume from."""
    publication = _publication.get()
    if publication is None:
        _remove(path)
    else:
        publication.removals.append(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# --- one output -----------------------------------------------------------------------------------------------------


def _publish(staged: Path, final: Path) -> None:
    publication = _publication.get()
    if publication is not None and publication.covers(final):
        publication.publish(staged, final)
    else:
        _replace(staged, final)


def _replace(staged: Path, final: Path) -> None:
    """Move `staged` to `final`, replacing what is there only after the new one is in place."""
    if not os.path.lexists(final):
        staged.replace(final)
        return
    retired = final.with_name(f".{final.name}.old-{os.getpid()}")
    final.replace(retired)
    try:
        staged.replace(final)
    except BaseException:
        retired.replace(final)
        raise
    _remove(retired)


@contextlib.contextmanager
def _named_faults(final: Path) -> Iterator[None]:
    """A disk fault, or a folder that cannot take the temporary, becomes one `UserError` naming `final`."""
    try:
        yield
    except OSError as error:
        if is_disk_fault(error):
            raise UserError(disk_fault_message(final, error)) from None
        raise


def _staging_folder(final: Path) -> None:
    """Create `final`'s folder; an outside fault there is a `UserError` naming `final`."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if is_disk_fault(error):
            raise UserError(disk_fault_message(final, error)) from None
        raise UserError(f"{final}: cannot be written ({error.strerror}: {error.filename})") from None


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty sibling directory of `final`; on success it becomes `final`, on failure it is removed."""
    _staging_folder(final)
    with _named_faults(final):
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        staging.chmod(0o777 & ~_umask())
        with _named_faults(final):
            yield staging
        _publish(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


@contextlib.contextmanager
def staged_file(final: Path) -> Iterator[Path]:
    """Yield a sibling temporary path for `final`; on success it becomes `final`, on failure it is removed. A
    folder at `final` is refused: publishing would replace it, and everything in it."""
    if final.is_dir():
        raise UserError(f"{final}: is a folder, but a file is written there; give a file's path")
    _staging_folder(final)
    with _named_faults(final):
        descriptor, name = tempfile.mkstemp(prefix=f".{final.name}.partial-", dir=final.parent)
    staging = Path(name)
    try:
        os.fchmod(descriptor, 0o666 & ~_umask())
        os.close(descriptor)
        with _named_faults(final):
            yield staging
        _publish(staging, final)
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
