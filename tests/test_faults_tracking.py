"""Faults from outside the code, in MLflow tracking: a store that cannot be reached, is not MLflow or cannot be
written stops a stage at once in one line; a store that dies mid-run costs no work, and what could not be logged is
sent later (`itm tracking sync`, or the next stage); stages starting together create a fresh sqlite store once; a
run whose process was killed is ended KILLED, and a resumed training continues its run with the whole history.

Everything runs on 127.0.0.1. A server that dies is MLflow's own tracking server (its Flask app, in a thread of the
test process) stopped and started again on the same port; a killed process is a forked child sent SIGKILL. A folder
that cannot be written is a chmod 0500 one; as root, the child that meets it runs without the capabilities that let
root write anywhere (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so the folder is unwritable for it as for anyone else.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from itm import commands
from itm.checkpoints import CHECKPOINT, checkpoint_run
from itm.errors import UserError
from itm.tracking import NullTracker, runs, start_run
from itm.train import loop
from tests.conftest import REPO
from tests.interruptions import interrupted_in_epoch
from tests.test_detector_stages import _detector as run_detector_stage
from tests.test_detector_stages import _params as detector_params
from tests.test_detector_train import detector_interrupted_in_epoch
from tests.test_matcher_stages import _train, prepared  # noqa: F401 - `prepared`: params, captions, oracle regions
from tests.test_train_loop import _fit, _matcher, _validate

# MLflow's server, imported here to serve from a thread, says this of Starlette's future on import
pytestmark = pytest.mark.filterwarnings("ignore:starlette.middleware.wsgi is deprecated")

EXPERIMENT = "itm-faults"
STAGE = "train@toy-0"
LOCAL = Path("data") / "work" / "tracking"  # where runs keep what their store did not take


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A DVC repository to run stages in, with tracking on (its default store: mlflow.db in it)."""
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ITM_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    return tmp_path


def _free_port() -> int:
    """A port of 127.0.0.1 nothing listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _runs(uri: str) -> list[Any]:
    client = _client(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id]) if experiment is not None else []


def _steps(uri: str, run_id: str, key: str = "val/rsum") -> list[int]:
    return sorted(metric.step for metric in _client(uri).get_metric_history(run_id, key))


# 4. A store that cannot be reached, is not MLflow, or cannot be written: one line before any work.


def test_an_unreachable_store_stops_the_stage_before_its_work_in_one_line(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started, worked = time.monotonic(), []
    with pytest.raises(UserError) as raised, start_run("tokenize"):
        worked.append(True)
    assert time.monotonic() - started < 10 and not worked  # MLflow alone: 5 minutes of retries, then a traceback
    message = str(raised.value)
    assert message.startswith(f"tracking store {uri}: cannot connect (Connection refused); start the server")
    assert "\n" not in message and "ITM_TRACKING=off" in message


class _NotMlflow(BaseHTTPRequestHandler):
    """A web server that is not MLflow: every path is an HTML page saying 404."""

    def _not_found(self) -> None:
        page = b"<html><body><h1>404 Not Found</h1></body></html>"
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def do_GET(self) -> None:
        self._not_found()

    def do_POST(self) -> None:
        self._not_found()

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""


def test_a_server_that_is_not_mlflow_stops_the_stage_before_its_work_in_one_line(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotMlflow)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    worked = []
    try:
        with pytest.raises(UserError) as raised, start_run("tokenize"):
            worked.append(True)
    finally:
        server.shutdown()
        server.server_close()
    assert not worked
    assert str(raised.value).startswith(f"tracking store {uri}: answered HTTP 404 to MLflow's REST API: not an MLflow")


_OPEN_A_RUN = """
from itm.stage_runner import run_stage
from itm.tracking import start_run


def main(argv):
    with start_run("tokenize"):
        print("the stage's work ran")


run_stage(main, [])
"""


def _without_root_overrides() -> None:
    """In the child, before it runs Python: give up the capabilities that let root write where the permission bits
    say no (PR_CAPBSET_DROP of CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), so that a 0500 folder is unwritable."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_an_sqlite_store_in_an_unwritable_folder_stops_the_stage_at_once_in_one_line(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    uri = f"sqlite:///{locked}/mlflow.db"
    env = os.environ | {"ITM_TRACKING": "on", "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", _OPEN_A_RUN]
    locked.chmod(0o500)
    started = time.monotonic()
    try:
        try:
            done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
                                  preexec_fn=_without_root_overrides if os.geteuid() == 0 else None)  # fmt: skip
            unwritable = True
        except subprocess.SubprocessError as error:  # root that may not give up its capabilities: it can write there
            if isinstance(error, subprocess.TimeoutExpired):
                raise
            done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
            unwritable = False
    finally:
        locked.chmod(0o700)
    if not unwritable:
        assert done.returncode == 0 and "the stage's work ran" in done.stdout, done.stderr
        return
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and "the stage's work ran" not in done.stdout, done.stderr
    assert errors == [
        f"error: tracking store {uri}: cannot write in {locked} (Permission denied); make the folder writable or set "
        "MLFLOW_TRACKING_URI to another store (ITM_TRACKING=off logs nothing)"
    ]
    assert "Traceback" not in done.stderr and time.monotonic() - started < 30  # MLflow alone: minutes of retries


# 5. A store that dies mid-run: the stage goes on, what it logs is kept, and sent later.


class MlflowServer:
    """MLflow's own tracking server (its Flask app, served from a thread of this process) on a fixed port of
    127.0.0.1, backed by an sqlite file, with artifacts in a local folder: `stop` is a server dying, `start` its
    return on the same address."""

    def __init__(self, folder: Path) -> None:
        from mlflow.server import handlers
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        self.uri = f"http://127.0.0.1:{_free_port()}"
        self._handlers = handlers
        # set directly: the server's own set-up would also point this process's client at its sqlite file
        handlers._tracking_store = SqlAlchemyStore(f"sqlite:///{folder}/server.db", str(folder / "artifacts"))
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        from mlflow.server import app
        from werkzeug.serving import make_server

        self._server = make_server("127.0.0.1", int(self.uri.rsplit(":", 1)[1]), app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.01,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def close(self) -> None:
        self.stop()
        self._handlers._tracking_store = None


@pytest.fixture
def mlflow_server(repo: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowServer]:
    """A running MLflow server, the repository's tracking store (`MLFLOW_TRACKING_URI`)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = MlflowServer(repo / "server")
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    try:
        yield server
    finally:
        server.close()


def _model_folder(repo: Path) -> Path:
    folder = repo / "models" / "toy" / "seed0"
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"weights")
    (folder / "card.json").write_text('{"name": "toy"}')
    return folder


def test_a_store_that_dies_mid_training_costs_no_work_and_one_command_sends_the_rest(
    repo: Path, mlflow_server: MlflowServer, capsys: pytest.CaptureFixture[str]
) -> None:
    validated = []

    def validate_then_the_server_dies(matcher: Any) -> dict[str, float]:
        validated.append(True)
        if len(validated) == 2:  # in epoch 2, once epoch 1 is logged
            mlflow_server.stop()
        return _validate(matcher)

    folder = _model_folder(repo)
    started = time.monotonic()
    with start_run(STAGE, params={"train": {"max_epochs": 4}}) as tracker:
        result = _fit(_matcher(), repo / "work", tracker, validate=validate_then_the_server_dies)
        model_id = tracker.log_model(folder, "toy", params={"dim": 8}, metrics={"best/val_rsum": 1.0}, tags={})
        tracker.log_artifact(folder / "model.pt", "model")
        tracker.set_tags({"itm.stopped": "cap"})
        run_id = tracker.run_id
    # Before: every call retried for minutes (8.5 in all), then the stage failed without its model.
    assert time.monotonic() - started < 40
    assert result.epochs == 4 and (repo / "work" / CHECKPOINT).is_file() and model_id is None
    kept = repo / LOCAL / run_id
    assert (kept / "pending.jsonl").is_file() and not (kept / "sent.json").exists()
    capsys.readouterr()

    with pytest.raises(SystemExit) as stopped:  # still away: one line, and what is kept stays
        commands.main(["tracking", "sync"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: tracking store {mlflow_server.uri}: cannot connect")
    assert kept.is_dir()

    mlflow_server.start()
    commands.main(["tracking", "sync"])
    assert f"run {run_id} ({STAGE}) at {mlflow_server.uri}:" in capsys.readouterr().out
    client = _client(mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["itm.stopped"] == "cap"
    assert _steps(mlflow_server.uri, run_id) == [1, 2, 3, 4]
    assert {item.path for item in client.list_artifacts(run_id, "model")} == {"model/model.pt"}
    models = client.search_logged_models([run.info.experiment_id])
    assert [(model.name, model.status, model.source_run_id) for model in models] == [("toy", "READY", run_id)]
    assert not kept.exists()
    commands.main(["tracking", "sync"])
    assert "nothing to send" in capsys.readouterr().out


def test_the_next_stage_sends_what_a_run_kept_while_its_store_was_away(repo: Path, mlflow_server: MlflowServer) -> None:
    with start_run("evaluate@toy-0") as tracker:
        tracker.log_metrics({"test/rsum": 1.0}, step=1)
        mlflow_server.stop()
        tracker.log_metrics({"test/rsum": 2.0}, step=2)
        tracker.log_dict({"a": 1}, "figures.json")
        with tracker.child_run("toy", {"itm.model": "toy"}) as child:  # a child opened while the store is away
            child.log_metrics({"test/rsum": 3.0})
        run_id = tracker.run_id
    mlflow_server.start()
    with start_run("compare") as tracker:
        pass
    client = _client(mlflow_server.uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert _steps(mlflow_server.uri, run_id, "test/rsum") == [1, 2]
    assert [item.path for item in client.list_artifacts(run_id)] == ["figures.json"]
    children = [run for run in _runs(mlflow_server.uri) if run.data.tags.get("mlflow.parentRunId") == run_id]
    assert [(run.info.run_name, run.info.status, run.data.metrics) for run in children] == [
        ("toy", "FINISHED", {"test/rsum": 3.0})
    ]
    assert children[0].data.tags["itm.stage"] == "evaluate@toy-0"  # inherited from its parent, as before
    assert list((repo / LOCAL).iterdir()) == []


def test_a_run_whose_store_comes_back_sends_what_it_kept_and_goes_on_logging(
    repo: Path, mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runs, "RECONNECT_SECONDS", 0)  # try the store again at the next call
    with start_run("evaluate@toy-0") as tracker:
        tracker.log_metrics({"test/rsum": 1.0}, step=1)
        mlflow_server.stop()
        tracker.log_metrics({"test/rsum": 2.0}, step=2)  # kept
        kept = repo / LOCAL / tracker.run_id
        assert (kept / "pending.jsonl").is_file()
        mlflow_server.start()
        tracker.log_metrics({"test/rsum": 3.0}, step=3)  # the kept step 2 first, then this one
        run_id = tracker.run_id
    assert _client(mlflow_server.uri).get_run(run_id).info.status == "FINISHED"
    assert _steps(mlflow_server.uri, run_id, "test/rsum") == [1, 2, 3] and not kept.exists()


def test_a_request_the_store_refuses_is_left_out_and_the_stage_goes_on(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with start_run("tokenize") as tracker:
        tracker.log_params({"min_count": 4})
        tracker.log_params({"min_count": 5})  # MLflow refuses to change a param
        tracker.log_metrics({"captions/train": 15.0})
        run_id = tracker.run_id
    uri = f"sqlite:///{repo}/mlflow.db"
    run = _client(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"min_count": "4"}
    assert run.data.metrics == {"captions/train": 15.0}
    assert any("refused params" in record.getMessage() for record in caplog.records)
    assert list((repo / LOCAL).iterdir()) == []  # a run that ends with nothing kept leaves no folder


# 6. Stages starting together on a fresh sqlite store.


def _open_a_run_with_the_others(stage: str, together: Any, outcomes: Any) -> None:
    together.wait(timeout=60)
    try:
        with start_run(stage) as tracker:
            outcomes.put(("opened", tracker.run_id))
    except Exception as error:  # what the test reports
        outcomes.put(("failed", f"{type(error).__name__}: {str(error).splitlines()[0]}"))


def test_stages_starting_together_on_a_fresh_sqlite_store_all_open_their_runs(repo: Path) -> None:
    # imported before the fork, so that the stages start together
    import mlflow.store.tracking.sqlalchemy_store
    import mlflow.tracking.context.registry  # noqa: F401

    processes = 4
    fork = multiprocessing.get_context("fork")
    together, outcomes = fork.Barrier(processes), fork.Queue()
    children = [
        fork.Process(target=_open_a_run_with_the_others, args=(f"train@m{i}-0", together, outcomes))
        for i in range(processes)
    ]
    for child in children:
        child.start()
    results = [outcomes.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=30)
    assert [kind for kind, _ in results] == ["opened"] * processes, results  # before: duplicate column name: step
    runs = _runs(f"sqlite:///{repo}/mlflow.db")
    assert sorted(run.info.status for run in runs) == ["FINISHED"] * processes


# 7. A run left by a killed process, and a resumed training.


def _open_a_run_and_wait(stage: str, opened: Any) -> None:
    with start_run(stage) as tracker:
        tracker.log_metrics({"val/rsum": 1.0}, step=1)
        opened.put(tracker.run_id)
        time.sleep(120)  # until killed


def _killed_while_logging(stage: str) -> str:
    """The run a forked process opened for `stage`, then sent SIGKILL with the run open."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401 - imported once, before the fork

    fork = multiprocessing.get_context("fork")
    opened = fork.Queue()
    child = fork.Process(target=_open_a_run_and_wait, args=(stage, opened))
    child.start()
    try:
        run_id = opened.get(timeout=120)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=30)
    return run_id


def test_a_run_left_open_by_a_killed_process_is_ended_killed(repo: Path) -> None:
    run_id = _killed_while_logging("evaluate@toy-0")
    uri = f"sqlite:///{repo}/mlflow.db"
    assert _client(uri).get_run(run_id).info.status == "RUNNING"  # what kill -9 leaves
    with start_run("compare"):
        pass
    assert _client(uri).get_run(run_id).info.status == "KILLED"
    assert list((repo / LOCAL).iterdir()) == []


def test_a_stage_resumed_after_kill_9_continues_its_run(repo: Path) -> None:
    run_id = _killed_while_logging(STAGE)
    with start_run(STAGE, continue_run=run_id) as tracker:
        assert tracker.run_id == run_id
        tracker.log_metrics({"val/rsum": 2.0}, step=2)
    uri = f"sqlite:///{repo}/mlflow.db"
    assert [(run.info.run_id, run.info.status) for run in _runs(uri)] == [(run_id, "FINISHED")]
    assert _steps(uri, run_id) == [1, 2]


def _interrupted_in_the_third_epoch(monkeypatch: pytest.MonkeyPatch) -> contextlib.AbstractContextManager[None]:
    """A training inside is interrupted (Ctrl-C) in its third epoch, after two checkpoints."""
    return interrupted_in_epoch(monkeypatch, loop, 2, epoch_argument=2)


def test_a_resumed_training_continues_its_run_with_the_whole_history(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = repo / "work"
    with _interrupted_in_the_third_epoch(monkeypatch), start_run(STAGE, params={"seed": 0}) as tracker:
        first = tracker.run_id
        _fit(_matcher(), work, tracker)
    uri = f"sqlite:///{repo}/mlflow.db"
    assert _client(uri).get_run(first).info.status == "KILLED"
    resumed = checkpoint_run(work, "r1")  # what the train stage continues (the fingerprint of `_fit`)
    assert resumed == first
    with start_run(STAGE, params={"seed": 0}, continue_run=resumed) as tracker:
        _fit(_matcher(), work, tracker)
    assert [(run.info.run_id, run.info.status) for run in _runs(uri)] == [(first, "FINISHED")]
    assert _steps(uri, first) == [1, 2, 3, 4] and _steps(uri, first, "train/epoch_seconds") == [1, 2, 3, 4]


@pytest.mark.slow
def test_the_detector_stage_resumed_continues_its_run(
    repo: Path, tiny_synthetic: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The detector stage stopped in its second epoch and run again: one run, FINISHED, with both epochs."""
    params = detector_params(repo, lambda raw: raw["detector"]["train"].update(epochs=2))
    with detector_interrupted_in_epoch(monkeypatch, 1):
        run_detector_stage(params, tiny_synthetic, repo / "detector", repo)
    run_detector_stage(params, tiny_synthetic, repo / "detector", repo)
    uri = f"sqlite:///{repo}/mlflow.db"
    runs = _runs(uri)
    assert [(run.info.run_name, run.info.status) for run in runs] == [("detector", "FINISHED")]
    assert _steps(uri, runs[0].info.run_id, "train/loss") == [1, 2]  # before: a KILLED run, and one with epoch 2


def test_a_resumed_training_in_a_new_run_logs_the_earlier_epochs_to_it(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = repo / "work"
    with _interrupted_in_the_third_epoch(monkeypatch):
        _fit(_matcher(), work, NullTracker())  # logged nowhere: no run to continue
    assert checkpoint_run(work, "r1") is None
    with start_run(STAGE) as tracker:
        _fit(_matcher(), work, tracker)
        run_id = tracker.run_id
    assert _steps(f"sqlite:///{repo}/mlflow.db", run_id) == [1, 2, 3, 4]  # before: only the epochs after the resume


def test_what_a_run_keeps_is_plain_json_lines_naming_copies_of_its_files(
    repo: Path, mlflow_server: MlflowServer
) -> None:
    folder = _model_folder(repo)
    with start_run("evaluate@toy-0") as tracker:
        mlflow_server.stop()
        tracker.log_artifact(folder / "model.pt", "model")
        run_id = tracker.run_id
    (folder / "model.pt").write_bytes(b"a later stage's weights")  # replaced before it could be sent
    kept = repo / LOCAL / run_id
    records = [json.loads(line) for line in (kept / "pending.jsonl").read_text().splitlines()]
    assert [record["kind"] for record in records] == ["artifact", "end"]
    assert (kept / records[0]["path"]).read_bytes() == b"weights"
    mlflow_server.start()
    commands.main(["tracking", "sync"])
    downloaded = _client(mlflow_server.uri).download_artifacts(run_id, "model/model.pt", str(repo))
    assert Path(downloaded).read_bytes() == b"weights"


@pytest.mark.slow
def test_the_train_stage_resumed_continues_its_run(
    repo: Path,
    prepared: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stage itself, stopped after its first checkpoint and run again: one run, both epochs, one model."""
    saved = loop._save

    def save_then_stop(*args: Any, **kwargs: Any) -> None:
        saved(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save", save_then_stop)
    work = repo / "work" / "train" / "vsepp"
    arguments = ("--out", str(repo / "models" / "vsepp"), "--work", str(work))
    with pytest.raises(KeyboardInterrupt):
        _train(prepared, "vsepp", *arguments)
    monkeypatch.setattr(loop, "_save", saved)
    _train(prepared, "vsepp", *arguments)
    uri = f"sqlite:///{repo}/mlflow.db"
    runs = _runs(uri)
    assert [(run.info.run_name, run.info.status) for run in runs] == [("train@vsepp-0", "FINISHED")]
    assert _steps(uri, runs[0].info.run_id) == [1, 2]
    assert len(_client(uri).search_logged_models([runs[0].info.experiment_id])) == 1
