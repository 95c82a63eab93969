"""MLflow runs: a stage's run opened (or an interrupted one continued), logged to, and ended; and what happens when
the store fails.

Tracking never costs a stage its work. A stage checks its store before it starts (itm/tracking/store.py). When the
store stops answering later, the run keeps what it logs in its local folder (itm/tracking/local.py), goes on, and
tries the store again every `RECONNECT_SECONDS`; what is still kept when the run ends is sent by the next stage that
starts with the same store, or by `itm tracking sync` (`send_kept`). A run whose process died without ending it
(`kill -9`, a lost machine) is ended KILLED the same way, unless its stage continues it: a resumed training
continues the run its checkpoint names (`RunOpener`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from itm.errors import UserError
from itm.tracking import records
from itm.tracking.local import LOCAL_KEY_PREFIX, LOCAL_ROOT, LocalRun
from itm.tracking.pages import run_page
from itm.tracking.store import (
    check_store,
    failure_reason,
    is_refusal,
    is_unavailable,
    repository_root,
    single_try,
    store_lock,
    tracking_uri,
    use_short_requests,
)
from itm.tracking.tags import run_tags
from itm.tracking.trackers import NullTracker, Tracker

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)
_Answer = TypeVar("_Answer")

EXPERIMENT = "itm"
# Earlier MLflow 3 releases open an experiment on the view of its kind: model training (runs), not GenAI (traces);
# 3.17 decides by a switch in the browser, which the addresses itm prints set (ui.py).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
RECONNECT_SECONDS = 300  # how often a run whose store stopped answering tries it again


@dataclass(frozen=True)
class Store:
    """A tracking store that answered: its URI and client, the experiment the runs go to, and the folder of the
    runs' local folders."""

    uri: str
    client: MlflowClient
    experiment_id: str
    local_root: Path


@contextlib.contextmanager
def start_run(
    stage: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    *,
    continue_run: str | None = None,
) -> Iterator[Tracker]:
    """Open a tracking run for one stage and record `params` (flat, and whole as `params.json`); with
    `continue_run`, continue that run of the stage instead when the store has it.

    The store is checked first: one that does not answer is a `UserError` before any work. The run ends FAILED if
    the stage raises, KILLED if it is interrupted.
    """
    with _open_tracker(stage, tags, continue_run) as tracker:
        if params is not None:
            tracker.log_params(params)
            tracker.log_dict(params, "params.json")
        yield tracker


def start_run_on_main(
    is_main: bool,
    stage: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    *,
    continue_run: str | None = None,
) -> contextlib.AbstractContextManager[Tracker]:
    """`start_run` in the process that logs (rank 0 of a distributed stage); a `NullTracker` in the others."""
    if not is_main:
        return contextlib.nullcontext(NullTracker())
    return start_run(stage, params, tags, continue_run=continue_run)


def _open_tracker(
    stage: str, tags: Mapping[str, str] | None, continue_run: str | None
) -> contextlib.AbstractContextManager[Tracker]:
    if os.environ.get("ITM_TRACKING", "").lower() in {"off", "0", "false", "none"}:
        return contextlib.nullcontext(NullTracker())
    return _mlflow_run(stage, tags, continue_run)


@contextlib.contextmanager
def _mlflow_run(stage: str, tags: Mapping[str, str] | None, continue_run: str | None) -> Iterator[Tracker]:
    import mlflow

    uri = tracking_uri()
    own_store = "MLFLOW_TRACKING_URI" not in os.environ  # read before mlflow.set_tracking_uri, which sets it
    use_short_requests()
    store = _connect(uri, own_store)
    mlflow.set_tracking_uri(uri)
    _settle_left_behind(store, keep=continue_run)
    labels = run_tags(stage, tags)
    try:
        tracker = _continued(store, continue_run, stage, labels) if continue_run else None
        tracker = tracker or _new_run(store, stage, labels)
    except Exception as error:
        if not is_unavailable(error):
            raise
        raise UserError(f"tracking store {uri}: {failure_reason(error)} when opening the run of {stage}") from None
    log.info("MLflow run %s (%s) at %s", tracker.run_id, stage, uri)
    with _ending(tracker):
        yield tracker


def _connect(uri: str, own_store: bool) -> Store:
    """The store at `uri`, checked, with the experiment (`MLFLOW_EXPERIMENT_NAME`, default `itm`) selected and
    created if need be: with its artifacts beside the default store when `own_store` (without an explicit location
    MLflow puts them under the working folder, which for the first run of a `dvc exp run --temp` would be a
    throw-away copy of the repository)."""
    client = check_store(uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    root = repository_root()
    try:
        with store_lock(uri):
            experiment_id = _experiment_id(client, name, root / "mlruns" if own_store else None)
    except UserError as error:
        raise UserError(f"tracking store {uri}: {error}") from None
    except Exception as error:
        if not (is_unavailable(error) or is_refusal(error)):
            raise
        raise UserError(f"tracking store {uri}: {failure_reason(error)} when selecting experiment {name!r}") from None
    return Store(uri, client, experiment_id, root / LOCAL_ROOT)


def _experiment_id(client: MlflowClient, name: str, artifact_root: Path | None) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = artifact_root.as_uri() if artifact_root is not None else None
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except MlflowException as error:  # another process created it meanwhile (a store without `store_lock`)
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise UserError(f"experiment {name!r} is deleted: restore it, or set MLFLOW_EXPERIMENT_NAME to another")
    for key, value in EXPERIMENT_KIND.items():
        if experiment.tags.get(key) != value:  # an experiment made elsewhere (another store, an older version)
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


@contextlib.contextmanager
def _ending(tracker: MlflowTracker) -> Iterator[MlflowTracker]:
    """Yield `tracker`, then end its run: FINISHED, KILLED when interrupted (Ctrl-C, SIGTERM), FAILED on an error."""
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")


class MlflowTracker:
    """Logs to one MLflow run. Each call becomes a record (itm/tracking/records.py) sent at once. When the store does
    not answer, the record is kept in the run's local folder and the run goes on without the store, trying it again
    every `RECONNECT_SECONDS`; a record the store refuses is left out with a warning. Either way the stage goes on."""

    def __init__(self, store: Store, local: LocalRun, tags: Mapping[str, str], away_until: float | None = None) -> None:
        self._store = store
        self._local = local
        self._tags = dict(tags)  # the run's tags so far, whose `itm.*` its children inherit
        self._away_until = away_until  # while the store is away: when to try it again (time.monotonic)

    @property
    def run_id(self) -> str | None:
        """The MLflow run; None for a run opened while the store was away, until it is created there."""
        return self._local.run_id

    @property
    def key(self) -> str:
        """The name of the run's local folder: its run id, or a local key until it has one."""
        return self._local.key

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._send(records.params(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._send(records.metrics(metrics, step))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._send(records.artifact(path, artifact_path))

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        self._send(records.dictionary(data, name))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._tags.update(tags)
        self._send(records.tags(tags))

    def log_model(
        self, folder: Path, name: str, params: Mapping[str, Any], metrics: Mapping[str, float], tags: Mapping[str, str]
    ) -> str | None:
        return self._send(records.model(folder, name, params, metrics, tags))

    @contextlib.contextmanager
    def child_run(self, name: str, tags: Mapping[str, str] | None = None) -> Iterator[Tracker]:
        inherited = {key: value for key, value in self._tags.items() if key.startswith("itm.")}
        with _ending(_new_run(self._store, name, inherited | dict(tags or {}), parent=self)) as child:
            yield child

    def find_run(self, stage: str) -> str | None:
        conditions = [f"tags.`itm.stage` = '{stage}'", "attributes.status = 'FINISHED'"]
        if os.environ.get("DVC_EXP_NAME"):
            conditions.append(f"tags.`itm.dvc_exp_name` = '{os.environ['DVC_EXP_NAME']}'")
        query, newest = " and ".join(conditions), ["attributes.start_time DESC"]
        experiments = [self._store.experiment_id]
        runs = self._ask(lambda client: client.search_runs(experiments, query, order_by=newest, max_results=1))
        return runs[0].info.run_id if runs else None

    def run_link(self, run_id: str) -> str | None:
        run = self._ask(lambda client: client.get_run(run_id))  # None: e.g. logged to another tracking store
        return run_page(run.info.experiment_id, run_id) if run is not None else None

    @property
    def away(self) -> bool:
        """Whether the run is going on without its store."""
        return self._away_until is not None

    def end(self, status: str) -> None:
        """End the run with `status`; its local folder goes, unless something in it is still to be sent."""
        self._send(records.end(status))
        if self._local.has_pending:
            log.warning("MLflow run %s (%s) ended %s; what its store %s did not take is kept in %s: `itm tracking "
                        "sync` sends it, as does the next stage to start", self.key, self._local.stage, status,
                        self._store.uri, self._local.folder)  # fmt: skip
            self._local.release()
        else:
            self._local.remove()

    def _send(self, record: records.Record) -> str | None:
        """Send `record` (its result: a logged model's id), or keep it while the store is away."""
        if self.away and not self._store_is_back():
            self._keep(record)
            return None
        try:
            return records.send(self._store.client, self.run_id, record, self._local.folder)
        except Exception as error:
            if is_unavailable(error):
                self._went_away(error)
                self._keep(record)
            elif is_refusal(error):
                log.warning("tracking store %s refused %s of run %s: %s; left out", self._store.uri,
                            records.describe(record), self.key, failure_reason(error))  # fmt: skip
            else:
                raise
            return None

    def _ask(self, question: Callable[[MlflowClient], _Answer]) -> _Answer | None:
        """The store's answer to `question(client)`; None while the store is away or when it refuses."""
        if self.away and not self._store_is_back():
            return None
        try:
            return question(self._store.client)
        except Exception as error:
            if is_unavailable(error):
                self._went_away(error)
            elif not is_refusal(error):
                raise
            return None

    def _keep(self, record: records.Record) -> None:
        try:
            self._local.keep(record)
        except OSError as error:  # the local disk failed too: the record is lost, the stage goes on
            log.error("run %s: cannot keep %s in %s (%s): it is lost", self.key, records.describe(record),
                      self._local.folder, error)  # fmt: skip

    def _went_away(self, error: BaseException) -> None:
        self._away_until = time.monotonic() + RECONNECT_SECONDS
        log.warning("tracking store %s did not answer (%s): run %s (%s) goes on without it, keeping what it logs in "
                    "%s until the store answers again (`itm tracking sync` sends it too)", self._store.uri,
                    failure_reason(error), self.key, self._local.stage, self._local.folder)  # fmt: skip

    def _store_is_back(self) -> bool:
        """Whether the store answers again (tried at most every `RECONNECT_SECONDS`, one short try); when it does,
        what the run kept is sent first."""
        if self._away_until is None or time.monotonic() < self._away_until:
            return False
        try:
            with single_try():
                self._store.client.search_experiments(max_results=1)
            _send_local_run(self._store.client, self._local, self._store.local_root)
        except _ParentNotSentError:
            self._away_until = time.monotonic() + RECONNECT_SECONDS
            return False
        except Exception as error:
            if not is_unavailable(error):
                raise
            self._away_until = time.monotonic() + RECONNECT_SECONDS
            return False
        self._away_until = None
        log.info("tracking store %s answers again: run %s sent what it kept", self._store.uri, self.key)
        return True


def _new_run(store: Store, name: str, tags: Mapping[str, str], parent: MlflowTracker | None = None) -> MlflowTracker:
    """A new run (a stage's, or a child of `parent`) created in the store; a child opened while the store is away
    is kept locally, to be created there later with what it logs."""
    from mlflow.tracking.context.registry import resolve_tags

    labels = resolve_tags(dict(tags) | {"mlflow.runName": name})  # as mlflow.start_run: user, source, ...
    started = int(time.time() * 1000)
    if parent is not None and (parent.run_id is None or parent.away):
        return _kept_child(store, name, labels, started, parent)
    if parent is not None:
        labels["mlflow.parentRunId"] = parent.run_id
    try:
        run = store.client.create_run(store.experiment_id, start_time=started, tags=labels, run_name=name)
    except Exception as error:
        if parent is None or not is_unavailable(error):
            raise
        parent._went_away(error)
        return _kept_child(store, name, labels, started, parent)
    record = {"uri": store.uri, "run_id": run.info.run_id, "stage": name}
    return MlflowTracker(store, LocalRun.create(store.local_root, run.info.run_id, record), labels)


def _kept_child(store: Store, name: str, labels: dict[str, str], started: int, parent: MlflowTracker) -> MlflowTracker:
    """A child run opened while the store is away: its local folder says what to create it with, under which
    parent (the parent's run id, or its local key when the parent is not in the store either)."""
    create = {"experiment_id": store.experiment_id, "run_name": name, "start_time": started,
              "tags": {key: value for key, value in labels.items() if key != "mlflow.parentRunId"},
              "parent": parent.run_id or parent.key}  # fmt: skip
    record = {"uri": store.uri, "run_id": None, "stage": name, "create": create}
    local = LocalRun.create(store.local_root, f"{LOCAL_KEY_PREFIX}{uuid.uuid4().hex}", record)
    return MlflowTracker(store, local, labels, away_until=time.monotonic() + RECONNECT_SECONDS)


def _continued(store: Store, run_id: str, stage: str, tags: Mapping[str, str]) -> MlflowTracker | None:
    """Run `run_id` reopened for `stage` (RUNNING again, its tags brought up to date), when the store has it in the
    experiment as a run of `stage` and no live process has it open; None otherwise."""
    from mlflow.entities import RunTag

    try:
        run = store.client.get_run(run_id)
    except Exception as error:
        if is_refusal(error):  # not in this store
            return None
        raise
    info = run.info
    if info.lifecycle_stage != "active" or info.experiment_id != store.experiment_id:
        return None
    if run.data.tags.get("itm.stage") != stage:
        return None
    local = _local_folder(store, run_id, stage)
    if local is None:
        log.warning("MLflow run %s (%s) is open in another process: starting a new run", run_id, stage)
        return None
    _send_local_run(store.client, local, store.local_root)
    store.client.update_run(run_id, status="RUNNING")
    store.client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    log.info("continuing MLflow run %s (%s), which an interrupted attempt of the stage logged to", run_id, stage)
    return MlflowTracker(store, local, dict(run.data.tags) | dict(tags))


def _local_folder(store: Store, run_id: str, stage: str) -> LocalRun | None:
    """The local folder of run `run_id`, taken over from a process that died, or new; None while a live process
    holds it."""
    folder = store.local_root / run_id
    if folder.exists():
        return LocalRun.take(folder)
    try:
        return LocalRun.create(store.local_root, run_id, {"uri": store.uri, "run_id": run_id, "stage": stage})
    except OSError:  # another process created it meanwhile
        return None


class _ParentNotSentError(Exception):
    """A run kept locally whose parent run is not in the store yet: it is sent after its parent."""


def _send_local_run(client: MlflowClient, local: LocalRun, root: Path, created: dict[str, str] | None = None) -> int:
    """Send what `local` kept, creating its run first if it was opened while the store was away (`created`: the
    runs created so far, by local key, for its parent); the number of records sent. A record the store refuses is
    left out with a warning; when the store stops answering, the error propagates and the rest stays kept."""
    if local.run_id is None:
        _create_kept_run(client, local, root, created if created is not None else {})
    sent = 0
    for lines, record in local.pending():
        try:
            records.send(client, local.run_id, record, local.folder)
        except Exception as error:
            if not is_refusal(error):
                raise
            log.warning("tracking store %s refused %s of run %s: %s; left out", local.uri, records.describe(record),
                        local.run_id, failure_reason(error))  # fmt: skip
        local.mark_sent(lines)
        sent += 1
    return sent


def _create_kept_run(client: MlflowClient, local: LocalRun, root: Path, created: dict[str, str]) -> None:
    create = local.record["create"]
    parent = create.get("parent")
    if parent and parent.startswith(LOCAL_KEY_PREFIX):  # a child of a run opened while the store was away too
        parent = created.get(parent) or LocalRun.recorded_run_id(root / parent)
        if parent is None:
            raise _ParentNotSentError(create["parent"])
    labels = dict(create["tags"]) | ({"mlflow.parentRunId": parent} if parent else {})
    run = client.create_run(create["experiment_id"], start_time=create["start_time"], tags=labels,
                            run_name=create["run_name"])  # fmt: skip
    created[local.key] = run.info.run_id
    local.set_run_id(run.info.run_id)


@dataclass
class Settled:
    """What sending the runs left behind did: lines saying what was sent or ended, and what could not be."""

    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    still_open: int = 0  # runs whose process is alive, left alone
    created: dict[str, str] = field(default_factory=dict)  # runs created from their local folders, by local key


def _settle_left_behind(store: Store, keep: str | None = None) -> Settled:
    """For the runs this store's stages left behind in their local folders: send what they kept, and end as KILLED
    those whose process died with the run open (all but `keep`, a run about to be continued). A store that stops
    answering stops this with a warning; the stage goes on."""
    runs, held = LocalRun.left_behind(store.local_root)
    settled = Settled(still_open=held)
    try:
        for local in runs:
            if local.uri == store.uri:
                _settle(store.client, local, store.local_root, keep, settled)
    except Exception as error:
        if not is_unavailable(error):
            raise
        failed = f"tracking store {store.uri}: {failure_reason(error)}; what runs kept waits in {store.local_root}"
        log.warning("%s", failed)
        settled.failed.append(failed)
    finally:
        for local in runs:
            local.release()
    return settled


def _settle(client: MlflowClient, local: LocalRun, root: Path, keep: str | None, settled: Settled) -> None:
    """Send what `local` kept; end its run KILLED when its process died with it open (unless it is `keep`, which
    its stage continues); remove the folder once nothing is left to do with it."""
    try:
        sent = _send_local_run(client, local, root, settled.created)
    except _ParentNotSentError:
        return
    continued = local.run_id == keep and not local.ended
    killed = not local.ended and not continued and _end_killed(client, local.run_id)
    if not continued:
        local.remove()
    what = [f"{sent} kept records sent"] if sent else []
    what += ["ended KILLED, as its process died with the run open"] if killed else []
    if what:
        settled.done.append(f"run {local.run_id} ({local.stage}) at {local.uri}: {'; '.join(what)}")
        log.info("MLflow %s", settled.done[-1])


def _end_killed(client: MlflowClient, run_id: str) -> bool:
    """End run `run_id` as KILLED if the store still has it RUNNING; whether it did."""
    try:
        status = client.get_run(run_id).info.status
    except Exception as error:
        if is_refusal(error):  # deleted meanwhile
            return False
        raise
    if status != "RUNNING":
        return False
    client.set_terminated(run_id, "KILLED")
    return True


def send_kept(root: Path | None = None) -> Settled:
    """`itm tracking sync`: send what every run left in the local folders under `root` (default: the repository's)
    to its store, and end as KILLED the runs whose process died with the run open. A store that does not answer is
    a line in `failed`; the runs of the other stores are sent all the same."""
    root = root or repository_root() / LOCAL_ROOT
    use_short_requests()
    runs, held = LocalRun.left_behind(root)
    for local in runs:
        local.release()
    settled = Settled(still_open=held)
    for uri in dict.fromkeys(local.uri for local in runs):
        try:
            store = Store(uri, check_store(uri), experiment_id="", local_root=root)  # no experiment needed to send
        except UserError as error:
            waiting = sum(local.uri == uri for local in runs)
            settled.failed.append(f"{error}; what {waiting} run{'s' * (waiting != 1)} kept stays in {root}")
            continue
        found = _settle_left_behind(store)
        settled.done += found.done
        settled.failed += found.failed
    return settled
