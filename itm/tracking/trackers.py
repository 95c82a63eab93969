"""What library code may record about a run (`Tracker`), and the tracker of tests, which keeps it in memory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol


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


class RunOpener(Protocol):
    """Opens a stage's run once the stage knows which run an interrupted attempt of it logged to: `continue_run`
    (None: a new run). The run is continued when the store still has it, so a resumed stage keeps its whole history
    in one run."""

    def __call__(self, *, continue_run: str | None) -> contextlib.AbstractContextManager[Tracker]: ...


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
