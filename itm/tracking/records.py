"""What a run logs, as plain records (dicts that JSON can hold), and how one record is sent to MLflow.

A tracker turns every call into a record and sends it at once; a record its store could not take is kept as it is
in the run's local folder (itm/tracking/local.py) and later sent by the same `send`, so what is logged late is what
would have been logged on time (metrics keep their step and time). A record's `path` or `folder` is absolute when
made; once kept it is relative to the run's folder, which holds a copy.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from itm.tracking.models import MODEL_TYPE
from itm.tracking.trackers import flatten

if TYPE_CHECKING:
    from mlflow import MlflowClient

Record = dict[str, Any]


def params(values: Mapping[str, Any]) -> Record:
    # MLflow params are flat strings of bounded length; stages log the full structure as a JSON artifact too.
    return {"kind": "params", "params": {key: param_value(value) for key, value in flatten(values).items()}}


def metrics(values: Mapping[str, float], step: int | None) -> Record:
    figures = {key: float(value) for key, value in values.items()}
    return {"kind": "metrics", "metrics": figures, "step": step or 0, "timestamp": _now()}


def tags(values: Mapping[str, str]) -> Record:
    return {"kind": "tags", "tags": {key: str(value) for key, value in values.items()}}


def dictionary(data: Mapping[str, Any], name: str) -> Record:
    return {"kind": "dict", "data": dict(data), "name": name}


def artifact(path: Path, artifact_path: str | None) -> Record:
    return {"kind": "artifact", "path": str(Path(path).absolute()), "artifact_path": artifact_path}


def model(
    folder: Path, name: str, values: Mapping[str, Any], figures: Mapping[str, float], labels: Mapping[str, str]
) -> Record:
    flat = {key: param_value(value) for key, value in flatten(values).items()}
    return {"kind": "model", "folder": str(Path(folder).absolute()), "name": name, "params": flat,
            "metrics": {key: float(value) for key, value in figures.items()}, "tags": dict(labels)}  # fmt: skip


def end(status: str) -> Record:
    """The end of the run: `FINISHED`, `FAILED` or `KILLED`."""
    return {"kind": "end", "status": status, "end_time": _now()}


def describe(record: Record) -> str:
    """The record in a few words, for log lines."""
    kind = record["kind"]
    if kind == "metrics":
        return f"the metrics of step {record['step']}"
    if kind in ("artifact", "model"):
        return f"{kind} {Path(record.get('path') or record['folder']).name}"
    return {"params": "params", "tags": "tags", "dict": f"{record.get('name')}", "end": "the run's end"}[kind]


def send(client: MlflowClient, run_id: str, record: Record, base: Path) -> str | None:
    """Log `record` to run `run_id` (its files relative to `base` once kept); a logged model's id, else None."""
    return _SENDERS[record["kind"]](client, run_id, record, base)


def param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:6000]


def _now() -> int:
    return int(time.time() * 1000)


def _send_params(client: MlflowClient, run_id: str, record: Record, base: Path) -> None:
    from mlflow.entities import Param

    client.log_batch(run_id, params=[Param(key, value) for key, value in record["params"].items()])


def _send_metrics(client: MlflowClient, run_id: str, record: Record, base: Path) -> None:
    from mlflow.entities import Metric

    at, step = record["timestamp"], record["step"]
    client.log_batch(run_id, metrics=[Metric(key, value, at, step) for key, value in record["metrics"].items()])


def _send_tags(client: MlflowClient, run_id: str, record: Record, base: Path) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in record["tags"].items()])


def _send_dict(client: MlflowClient, run_id: str, record: Record, base: Path) -> None:
    client.log_dict(run_id, record["data"], record["name"])


def _send_artifact(client: MlflowClient, run_id: str, record: Record, base: Path) -> None:
    client.log_artifact(run_id, str(base / record["path"]), record["artifact_path"])


def _send_model(client: MlflowClient, run_id: str, record: Record, base: Path) -> str:
    """MLflow 3's logged model: created PENDING, its files and metrics added, then READY (FAILED when that fails)."""
    from mlflow.entities import Metric

    experiment = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(
        experiment, name=record["name"], source_run_id=run_id, params=record["params"], tags=record["tags"],
        model_type=MODEL_TYPE,
    )  # fmt: skip
    try:
        client.log_model_artifacts(logged.model_id, str(base / record["folder"]))
        at = _now()
        figures = [Metric(key, value, at, 0, model_id=logged.model_id) for key, value in record["metrics"].items()]
        client.log_batch(run_id, metrics=figures)
    except BaseException:
        with contextlib.suppress(Exception):  # the store may be gone: the model stays PENDING there
            client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    return logged.model_id


def _send_end(client: MlflowClient, run_id: str, record: Record, base: Path) -> None:
    client.set_terminated(run_id, record["status"], record["end_time"])


_SENDERS: dict[str, Callable[[MlflowClient, str, Record, Path], str | None]] = {
    "params": _send_params,
    "metrics": _send_metrics,
    "tags": _send_tags,
    "dict": _send_dict,
    "artifact": _send_artifact,
    "model": _send_model,
    "end": _send_end,
}
