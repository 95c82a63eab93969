"""A run's local folder, `data/work/tracking/<key>/` in the repository: proof that its process is alive, and what
the run could not send to its store.

- `lock`: the process that has the run open holds an exclusive lock on this file. The system drops the lock when
  the process ends, however it ends (`kill -9` too), so a folder whose lock can be taken is a run left behind.
- `run.json`: the store's URI, the run id and the stage; for a run opened while its store was away, no run id yet
  but what to create the run with (`create`).
- `pending.jsonl`: what could not be sent, one record a line (itm/tracking/records.py), oldest first, with copies of
  the files it names under `files/`; `sent.json`: how many of those lines have reached the store since.

A run that ends with nothing pending removes its folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

LOCAL_ROOT = Path("data") / "work" / "tracking"  # in the repository
LOCAL_KEY_PREFIX = "local-"  # the key of a run not yet created in its store (else the key is the run id)
LOCK_FILE, RECORD_FILE, PENDING_FILE, SENT_FILE, FILES_DIR = "lock", "run.json", "pending.jsonl", "sent.json", "files"
_STALE_SECONDS = 3600


class LocalRun:
    """A run's local folder, locked by this process until `release` or `remove`."""

    def __init__(self, folder: Path, lock: int, record: dict[str, Any]) -> None:
        self.folder = folder
        self.record = record
        self._lock = lock

    @classmethod
    def create(cls, root: Path, key: str, record: Mapping[str, Any]) -> LocalRun:
        """A new folder `root/key` holding `record`, locked before it appears under its name, so that no other
        process can take it for one left behind."""
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".new-", dir=root))
        lock = _hold(staging / LOCK_FILE)  # nobody else knows the folder yet: at once
        content = {**record, "created": time.time_ns()}
        _write_json(staging / RECORD_FILE, content)
        try:
            staging.rename(root / key)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            os.close(lock)
            raise
        return cls(root / key, lock, content)

    @classmethod
    def take(cls, folder: Path) -> LocalRun | None:
        """The folder of a run left behind, now locked by this process; None while a live process holds it, or when
        it is gone."""
        try:
            lock = _try_hold(folder / LOCK_FILE)
        except OSError:  # removed meanwhile
            return None
        if lock is None:
            return None
        try:
            record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # removed meanwhile, by the process that held it before
            os.close(lock)
            return None
        return cls(folder, lock, record)

    @classmethod
    def left_behind(cls, root: Path) -> tuple[list[LocalRun], int]:
        """Every run folder under `root` whose process is gone, taken, oldest first; and how many are still held by
        live processes."""
        if not root.is_dir():
            return [], 0
        _sweep(root)
        taken, held = [], 0
        for folder in sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")):
            run = cls.take(folder)
            if run is None:
                held += folder.exists()
            else:
                taken.append(run)
        return sorted(taken, key=lambda run: run.record.get("created", 0)), held

    @staticmethod
    def recorded_run_id(folder: Path) -> str | None:
        """The run id in the record of `folder`, whoever holds it; None when it has none yet, or no record."""
        try:
            return json.loads((folder / RECORD_FILE).read_text(encoding="utf-8")).get("run_id")
        except (OSError, ValueError):
            return None

    @property
    def key(self) -> str:
        return self.folder.name

    @property
    def uri(self) -> str:
        return self.record["uri"]

    @property
    def run_id(self) -> str | None:
        return self.record.get("run_id")

    @property
    def stage(self) -> str:
        return self.record.get("stage", "?")

    def set_run_id(self, run_id: str) -> None:
        """Record the id of the run just created in the store for this folder."""
        self.record = {key: value for key, value in self.record.items() if key != "create"} | {"run_id": run_id}
        _write_json(self.folder / RECORD_FILE, self.record)

    def keep(self, entry: Mapping[str, Any]) -> None:
        """Append `entry` to what is pending, with a copy of the file or folder it names (a later stage may replace
        the original before it is sent)."""
        kept = dict(entry)
        for field in ("path", "folder"):
            if field in kept:
                source = Path(kept[field])
                copy = self.folder / FILES_DIR / uuid.uuid4().hex / source.name
                copy.parent.mkdir(parents=True)
                if source.is_dir():
                    shutil.copytree(source, copy)
                else:
                    shutil.copy2(source, copy)
                kept[field] = copy.relative_to(self.folder).as_posix()
        line = (json.dumps(kept) + "\n").encode()
        with (self.folder / PENDING_FILE).open("ab", buffering=0) as pending:  # one write: a kill leaves no half line
            pending.write(line)

    def pending(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """What is still to be sent, oldest first, each with the number of lines sent once it is."""
        lines = self._lines()
        for number in range(self._sent(), len(lines)):
            for entry in _parsed(lines[number : number + 1]):
                yield number + 1, entry

    @property
    def has_pending(self) -> bool:
        return len(self._lines()) > self._sent()

    @property
    def ended(self) -> bool:
        """Whether the run's end is among what it kept (sent or not): its process ended it while the store was away,
        rather than dying with the run open."""
        return any(entry.get("kind") == "end" for entry in _parsed(self._lines()))

    def mark_sent(self, lines: int) -> None:
        """Record that the first `lines` lines of what is pending have reached the store."""
        _write_json(self.folder / SENT_FILE, {"lines": lines})

    def release(self) -> None:
        """Unlock the folder and leave it as it is, for a later process to send or end."""
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def remove(self) -> None:
        """Delete the folder (renamed away first, so no other process finds it half deleted), then unlock it."""
        gone = self.folder.with_name(f".gone-{uuid.uuid4().hex}")
        self.folder.rename(gone)
        shutil.rmtree(gone, ignore_errors=True)
        self.release()

    def _lines(self) -> list[str]:
        try:
            return (self.folder / PENDING_FILE).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []

    def _sent(self) -> int:
        try:
            return int(json.loads((self.folder / SENT_FILE).read_text(encoding="utf-8"))["lines"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0


def _sweep(root: Path) -> None:
    """Remove what processes killed while creating or removing a folder left: folders renamed away, and staging
    folders older than `_STALE_SECONDS` (a younger one may be a process's, between its creation and its lock)."""
    for path in root.iterdir():
        try:
            stale = path.name.startswith(".new-") and time.time() - path.stat().st_mtime > _STALE_SECONDS
        except FileNotFoundError:  # removed meanwhile
            continue
        if path.name.startswith(".gone-") or stale:
            shutil.rmtree(path, ignore_errors=True)


def _hold(path: Path) -> int:
    """A descriptor of `path` holding an exclusive lock on it (waiting for it)."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    return descriptor


def _try_hold(path: Path) -> int | None:
    """A descriptor of `path` holding an exclusive lock on it; None when another process holds one."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


def _parsed(lines: list[str]) -> Iterator[dict[str, Any]]:
    """The records of `lines`, leaving out a line cut short when its process was killed mid-write."""
    for line in lines:
        try:
            yield json.loads(line)
        except ValueError:
            continue


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write `data` under a temporary name and rename it into place, so a reader never sees half of it."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    temporary.write_text(json.dumps(data), encoding="utf-8")
    temporary.replace(path)
