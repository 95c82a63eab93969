"""Experiment tracking behind a small interface: MLflow for real runs, a null tracker for tests.

Library code receives a `Tracker` and never imports mlflow. Stages open one run each with `start_run`, tagged with
the stage name, the git revision and, inside `dvc exp run`, the experiment name.

The default store is `sqlite:///<repository>/mlflow.db` with an absolute path, so runs from `dvc exp run --temp`
or `--queue` (which execute in copies under `<repository>/.dvc/tmp/exps/`) land in the same database as the
workspace's. `MLFLOW_TRACKING_URI` overrides it, e.g. with a team's `mlflow server`. `ITM_TRACKING=off` turns
tracking off (the null tracker), which the test suite uses.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from itm import environment
from itm.errors import UserError

log = logging.getLogger(__name__)

EXPERIMENT = "itm"
# MLflow 3 opens an experiment on the view of its kind: model training (runs), not GenAI (traces).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# What a run's figures follow from, in the repository: a change here marks the run's revision `-dirty`.
RUN_INPUTS = ("itm", "stages", "params.yaml", "dvc.yaml", "pyproject.toml", "uv.lock")
_EXPERIMENT_TEMP_DIR = Path(".dvc") / "tmp" / "exps"
MODEL_TYPE = "itm-matcher"  # the type of the logged models of trained matchers
MODEL_URI_SCHEMES = ("runs:/", "models:/")  # MLflow URIs a command's --model accepts besides a folder
RUN_MODEL_DIR = "model"  # a train run's model.pt and card.json: runs:/<run id>/model


class Tracker(Protocol):
    """What library code may record about a run."""

    run_id: str | None  # the MLflow run, when there is one

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...

    def log_dict(self, data: Mapping[str, Any], name: str) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def child_run(self, name: str, tags: Mapping[str, str] | None = None) -> contextlib.AbstractContextManager[Tracker]:
        """A run nested under this one (MLflow shows it below its parent)."""
        ...

    def log_model(
        self, folder: Path, name: str, params: Mapping[str, Any], metrics: Mapping[str, float], tags: Mapping[str, str]
    ) -> str | None:
        """Log the saved model in `folder` as a model of this run (MLflow 3's logged models: `models:/<id>`), with
        `params`, `metrics` (also logged to the run) and `tags` attached to it; its id, None when nothing is logged."""
        ...

    def find_run(self, stage: str) -> str | None:
        """The newest finished run of `stage` (e.g. `ensemble@scan_ensemble`) in this run's experiment, from the same
        `dvc exp` experiment when inside one; None when there is none."""
        ...

    def run_link(self, run_id: str) -> str | None:
        """A link to run `run_id` in the MLflow UI, relative to the UI's address."""
        ...


class NullTracker:
    """Keeps what it is given in memory and sends it nowhere; tests read it back."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[dict[str, float], int | None]] = []
        self.artifacts: list[tuple[Path, str | None]] = []
        self.dicts: dict[str, Mapping[str, Any]] = {}
        self.tags: dict[str, str] = {}
        self.children: dict[str, NullTracker] = {}
        self.models: dict[str, Path] = {}

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.params.update(flatten(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.append((dict(metrics), step))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((path, artifact_path))

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        self.dicts[name] = data

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.tags.update(tags)

    @contextlib.contextmanager
    def child_run(self, name: str, tags: Mapping[str, str] | None = None) -> Iterator[Tracker]:
        child = NullTracker()
        child.tags.update(tags or {})
        self.children[name] = child
        yield child

    def log_model(
        self, folder: Path, name: str, params: Mapping[str, Any], metrics: Mapping[str, float], tags: Mapping[str, str]
    ) -> str | None:
        self.models[name] = folder
        self.log_metrics(metrics)
        return None

    def find_run(self, stage: str) -> str | None:
        return None

    def run_link(self, run_id: str) -> str | None:
        return None


class MlflowTracker:
    """Logs to one MLflow run."""

    def __init__(self, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self._client = MlflowClient()

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        # MLflow params are flat strings of bounded length; the full structure also goes in as a JSON artifact.
        mlflow.log_params({key: _param_value(value) for key, value in flatten(params).items()}, run_id=self.run_id)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics({key: float(value) for key, value in metrics.items()}, step=step, run_id=self.run_id)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        self._client.log_dict(self.run_id, dict(data), name)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self._client.set_tag(self.run_id, key, value)

    @contextlib.contextmanager
    def child_run(self, name: str, tags: Mapping[str, str] | None = None) -> Iterator[Tracker]:
        import mlflow

        parent = self._client.get_run(self.run_id)
        with mlflow.start_run(
            run_name=name,
            experiment_id=parent.info.experiment_id,
            nested=True,
            parent_run_id=self.run_id,
            tags={key: value for key, value in parent.data.tags.items() if key.startswith("itm.")} | dict(tags or {}),
        ) as run:
            yield MlflowTracker(run.info.run_id)

    def log_model(
        self, folder: Path, name: str, params: Mapping[str, Any], metrics: Mapping[str, float], tags: Mapping[str, str]
    ) -> str | None:
        import mlflow

        experiment = self._client.get_run(self.run_id).info.experiment_id
        flat = {key: _param_value(value) for key, value in flatten(params).items()}
        model = self._client.create_logged_model(experiment, name=name, source_run_id=self.run_id, params=flat,
                                                 tags=dict(tags), model_type=MODEL_TYPE)  # fmt: skip
        try:
            self._client.log_model_artifacts(model.model_id, str(folder))
            values = {key: float(value) for key, value in metrics.items()}
            mlflow.log_metrics(values, run_id=self.run_id, model_id=model.model_id)
        except BaseException:
            self._client.finalize_logged_model(model.model_id, "FAILED")
            raise
        self._client.finalize_logged_model(model.model_id, "READY")
        return model.model_id

    def find_run(self, stage: str) -> str | None:
        experiment = self._client.get_run(self.run_id).info.experiment_id
        conditions = [f"tags.`itm.stage` = '{stage}'", "attributes.status = 'FINISHED'"]
        if os.environ.get("DVC_EXP_NAME"):
            conditions.append(f"tags.`itm.dvc_exp_name` = '{os.environ['DVC_EXP_NAME']}'")
        runs = self._client.search_runs(
            [experiment], " and ".join(conditions), order_by=["attributes.start_time DESC"], max_results=1
        )
        return runs[0].info.run_id if runs else None

    def run_link(self, run_id: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            experiment = self._client.get_run(run_id).info.experiment_id
        except MlflowException:  # e.g. logged to another tracking store
            return None
        return f"#/experiments/{experiment}/runs/{run_id}"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:6000]


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


def git_revision() -> str:
    """The commit being run, with `-dirty` when the code or the params differ from it (`RUN_INPUTS`: not the
    outputs DVC rewrites, such as dvc.lock and the metrics); `unknown` outside git."""
    try:
        revision = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", *(f":/{path}" for path in RUN_INPUTS)))
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{revision}-dirty" if dirty else revision


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=30)
    return done.stdout.strip()


def run_tags(stage: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The stage, the git revision, the `dvc exp` experiment, and what the numbers depend on beyond code, params
    and data (`itm.env.*`: torch, CUDA, CPU kernels, threads, GPUs; itm/environment.py)."""
    revision = git_revision()
    tags = {"itm.stage": stage, "itm.git_revision": revision, "mlflow.source.git.commit": revision.split("-")[0]}
    tags |= {f"itm.env.{key}": _tag_value(value) for key, value in environment.record().items()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["itm.dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags | dict(extra or {})


def _tag_value(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _use_experiment(name: str, artifact_root: Path | None) -> None:
    """Select the experiment, creating it with its artifacts beside the default store when that store is ours.

    Without an explicit location MLflow puts artifacts under the working directory, which for the first run of a
    `dvc exp run --temp` would be a throw-away copy of the repository.
    """
    import mlflow

    if artifact_root is not None and mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=artifact_root.as_uri(), tags=EXPERIMENT_KIND)
    experiment = mlflow.set_experiment(name)
    for key, value in EXPERIMENT_KIND.items():
        if experiment.tags.get(key) != value:  # an experiment made elsewhere (another store, an older version)
            mlflow.set_experiment_tag(key, value)


@contextlib.contextmanager
def start_run(
    stage: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None
) -> Iterator[Tracker]:
    """Open a tracking run for one stage and record `params` (flat, and whole as `params.json`).

    The run ends FAILED if the stage raises.
    """
    with _open_tracker(stage, tags) as tracker:
        if params is not None:
            tracker.log_params(params)
            tracker.log_dict(params, "params.json")
        yield tracker


def start_run_on_main(
    is_main: bool, stage: str, params: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None
) -> contextlib.AbstractContextManager[Tracker]:
    """`start_run` in the process that logs (rank 0 of a distributed stage); a `NullTracker` in the others."""
    return start_run(stage, params, tags) if is_main else contextlib.nullcontext(NullTracker())


def _open_tracker(stage: str, tags: Mapping[str, str] | None) -> contextlib.AbstractContextManager[Tracker]:
    if os.environ.get("ITM_TRACKING", "").lower() in {"off", "0", "false", "none"}:
        return contextlib.nullcontext(NullTracker())
    return _mlflow_run(stage, tags)


@contextlib.contextmanager
def _mlflow_run(stage: str, tags: Mapping[str, str] | None) -> Iterator[Tracker]:
    import mlflow

    uri = tracking_uri()
    own_store = "MLFLOW_TRACKING_URI" not in os.environ  # read before mlflow.set_tracking_uri, which sets it
    mlflow.set_tracking_uri(uri)
    _use_experiment(
        os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT), repository_root() / "mlruns" if own_store else None
    )
    with mlflow.start_run(run_name=stage, tags=run_tags(stage, tags)) as run:
        log.info("MLflow run %s (%s) at %s", run.info.run_id, stage, uri)
        yield MlflowTracker(run.info.run_id)


def is_model_uri(text: str) -> bool:
    """Whether `text` names a model in MLflow (`runs:/<train run id>/model`, `models:/<model id>`,
    `models:/<registered name>/<version>`) rather than a folder."""
    return text.startswith(MODEL_URI_SCHEMES)


def download_model(uri: str, into: Path) -> Path:
    """The files of the MLflow model `uri` (a train run's artifacts, or a logged or registered model), downloaded
    from the tracking store (`tracking_uri()`) into the folder `into`; a URI that names nothing is one line."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri())
    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(into)))
    except (MlflowException, OSError) as error:
        raise UserError(f"{uri}: cannot download it from {tracking_uri()}: {str(error).splitlines()[0]}") from None
    return folder
