"""Experiment tracking behind a small interface: MLflow for real runs, a null tracker for tests.

Library code receives a `Tracker` and never imports mlflow. Stages open one run each with `start_run`, tagged with
the stage name, the git revision and, inside `dvc exp run`, the experiment name (tags.py).

The default store is `sqlite:///<repository>/mlflow.db` with an absolute path, so runs from `dvc exp run --temp`
or `--queue` (which execute in copies under `<repository>/.dvc/tmp/exps/`) land in the same database as the
workspace's. `MLFLOW_TRACKING_URI` overrides it, e.g. with a team's `mlflow server`. `ITM_TRACKING=off` turns
tracking off (the null tracker), which the test suite uses.

Tracking never costs a stage its work: the store is checked before the stage starts, with a short timeout
(store.py); a store that stops answering later gets a few short tries, then the run keeps what it logs in its local
folder (local.py, records.py) and goes on; what was kept is sent by the next stage to start or by
`itm tracking sync`, and a run whose process was killed is ended KILLED, unless a resumed stage continues it
(runs.py).
"""

from itm.tracking.models import MODEL_TYPE, MODEL_URI_SCHEMES, RUN_MODEL_DIR, download_model, is_model_uri
from itm.tracking.runs import EXPERIMENT, EXPERIMENT_KIND, MlflowTracker, send_kept, start_run, start_run_on_main
from itm.tracking.store import repository_root, tracking_uri
from itm.tracking.tags import RUN_INPUTS, git_revision, run_tags
from itm.tracking.trackers import NullTracker, RunOpener, Tracker, flatten

__all__ = [
    "EXPERIMENT",
    "EXPERIMENT_KIND",
    "MODEL_TYPE",
    "MODEL_URI_SCHEMES",
    "RUN_INPUTS",
    "RUN_MODEL_DIR",
    "MlflowTracker",
    "NullTracker",
    "RunOpener",
    "Tracker",
    "download_model",
    "flatten",
    "git_revision",
    "is_model_uri",
    "repository_root",
    "run_tags",
    "send_kept",
    "start_run",
    "start_run_on_main",
    "tracking_uri",
]
