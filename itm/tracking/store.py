"""Where runs go and whether the store there can take them: the tracking URI, short HTTP timeouts, the check every
stage makes before its work, the lock under which a fresh sqlite store is created, and what a store's errors mean.

MLflow's own defaults wait up to 120 s for an answer and retry 7 times with doubling pauses: about 5 minutes per
request to a server that is gone, then a traceback. Here the check before a stage's work is one try of at most
`CHECK_TIMEOUT_SECONDS`, and every later request a few short tries (`SHORT_REQUESTS`), after which the run keeps what
it logs locally (itm/tracking/runs.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from itm.errors import UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient

_EXPERIMENT_TEMP_DIR = Path(".dvc") / "tmp" / "exps"
# At most about a minute per request once the server is gone (3 tries of 20 s, 1 s and 2 s apart); a value already
# in the environment wins.
SHORT_REQUESTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
CHECK_TIMEOUT_SECONDS = 10
_RETRIES, _TIMEOUT = "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"
_OFF = "ITM_TRACKING=off logs nothing"
# MLflow errors whose HTTP status says the store was there but could not take the request now: worth sending again
_NOT_NOW = (401, 403, 408, 429)


def repository_root(start: Path | None = None) -> Path:
    """The DVC repository a stage runs in; for `dvc exp` temporary copies, the repository they were copied from."""
    here = (start or Path.cwd()).resolve()
    root = next((p for p in (here, *here.parents) if (p / ".dvc").is_dir()), here)
    parts = root.parts
    marker = _EXPERIMENT_TEMP_DIR.parts
    for i in range(len(parts) - len(marker)):
        if parts[i : i + len(marker)] == marker:
            return Path(*parts[:i])
    return root


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else the repository's sqlite store (absolute path)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repository_root() / 'mlflow.db'}"


def use_short_requests() -> None:
    """Bound MLflow's HTTP requests in this process (and the processes it starts) to `SHORT_REQUESTS`, unless the
    environment sets them."""
    for key, value in SHORT_REQUESTS.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def single_try(seconds: float = CHECK_TIMEOUT_SECONDS) -> Iterator[None]:
    """MLflow's HTTP requests made inside: one try each, given at most `seconds` (less when the environment says
    less)."""
    timeout = min(int(os.environ.get(_TIMEOUT, seconds)), int(seconds))
    saved = {key: os.environ.get(key) for key in (_RETRIES, _TIMEOUT)}
    os.environ.update({_RETRIES: "0", _TIMEOUT: str(timeout)})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_store(uri: str) -> MlflowClient:
    """A client of the store at `uri` once the store has answered one request in time (which creates a fresh sqlite
    store, under `store_lock`). A store that cannot be reached, is not MLflow, or cannot be written is a `UserError`
    naming `uri` and what failed."""
    path = sqlite_path(uri)
    if path is not None:
        _check_writable(uri, path)
    from mlflow import MlflowClient

    try:
        with store_lock(uri), single_try():
            client = MlflowClient(uri)  # which opens the store: a fresh sqlite one gets its tables here
            client.search_experiments(max_results=1)
    except Exception as error:  # whatever the store raised is its failure, told in one line
        reason = failure_reason(error, CHECK_TIMEOUT_SECONDS)
        advice = "check the file" if path is not None else "start the server"
        advice += " or set MLFLOW_TRACKING_URI to another store"
        raise UserError(f"tracking store {uri}: {reason}; {advice} ({_OFF})") from None
    return client


def _check_writable(uri: str, path: Path) -> None:
    """An sqlite store writes its folder (journals beside the file) and its file: tried here by doing it, which
    tells the truth for every user, root included, and every file system."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as error:
        raise UserError(
            f"tracking store {uri}: cannot write in {path.parent} ({error.strerror}); make the folder writable or "
            f"set MLFLOW_TRACKING_URI to another store ({_OFF})"
        ) from None
    try:
        if path.exists():
            with path.open("r+b"):
                pass
    except OSError as error:
        raise UserError(
            f"tracking store {uri}: cannot write {path} ({error.strerror}); make it writable or set "
            f"MLFLOW_TRACKING_URI to another store ({_OFF})"
        ) from None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """For an sqlite store, an exclusive lock on its folder: MLflow creates a fresh store's tables without one, so
    stages starting together failed with `duplicate column name: step`; under it, one creates them and the others
    find them (and the experiment) made. Other stores take no lock."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    descriptor = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # which releases the lock


def sqlite_path(uri: str) -> Path | None:
    """The database file of an `sqlite:///` URI; None for another store or an in-memory database."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path).absolute() if path and path != ":memory:" else None


def failure_reason(error: BaseException, timeout: float | None = None) -> str:
    """What went wrong with a store, in a few words, out of MLflow's long messages."""
    text = str(error)
    if match := re.search(r"\[Errno -?\d+\] ([^'\"()]+)", text):
        return f"cannot connect ({match.group(1).strip()})"
    if re.search(r"timed out|timeout", text, re.IGNORECASE):
        return f"no answer within {timeout:g} s" if timeout else "no answer in time"
    if match := re.search(r"error code (\d+) != 200", text):
        return f"answered HTTP {match.group(1)} to MLflow's REST API: not an MLflow tracking server"
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


def is_unavailable(error: BaseException) -> bool:
    """Whether `error` says the store could not be reached or could not take a request now, so that the request is
    worth keeping and sending again later (rather than refused, which sending again would repeat)."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return status >= 500 or status in _NOT_NOW
    return isinstance(error, OSError)  # requests' errors are OSErrors: refused, reset, timed out, name unknown


def is_refusal(error: BaseException) -> bool:
    """Whether `error` is the store refusing a request (an MLflow error that is not `is_unavailable`)."""
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and not is_unavailable(error)
