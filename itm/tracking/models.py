"""Trained matchers in MLflow: the URIs that name one, and downloading its files."""

from __future__ import annotations

from pathlib import Path

from itm.errors import UserError
from itm.tracking.store import tracking_uri, use_short_requests

MODEL_TYPE = "itm-matcher"  # the type of the logged models of trained matchers
MODEL_URI_SCHEMES = ("runs:/", "models:/")  # MLflow URIs a command's --model accepts besides a folder
RUN_MODEL_DIR = "model"  # a train run's model.pt and card.json: runs:/<run id>/model


def is_model_uri(text: str) -> bool:
    """Whether `text` names a model in MLflow (`runs:/<train run id>/model`, `models:/<model id>`,
    `models:/<registered name>/<version>`) rather than a folder."""
    return text.startswith(MODEL_URI_SCHEMES)


def download_model(uri: str, into: Path) -> Path:
    """The files of the MLflow model `uri` (a train run's artifacts, or a logged or registered model), downloaded
    from the tracking store (`tracking_uri()`) into the folder `into`; a URI that names nothing, or a store that does
    not answer, is one line."""
    import mlflow
    from mlflow.exceptions import MlflowException

    use_short_requests()
    mlflow.set_tracking_uri(tracking_uri())
    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(into)))
    except (MlflowException, OSError) as error:
        raise UserError(f"{uri}: cannot download it from {tracking_uri()}: {str(error).splitlines()[0]}") from None
    return folder
