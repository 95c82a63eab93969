"""`itm ui`: MLflow's UI on the pipeline's tracking store, at the page of the `itm` experiment's runs.

It starts `mlflow ui` on the repository's store and prints the address of the runs page, which opens on the runs
whatever the browser chose before (pages.py).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

from itm.errors import UserError
from itm.tracking.pages import runs_page
from itm.tracking.runs import EXPERIMENT
from itm.tracking.store import check_store, sqlite_path, tracking_uri


def ui_command(uri: str, host: str, port: int) -> list[str]:
    """`mlflow ui` on the store `uri` (a database), from this environment."""
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]


def serve(host: str, port: int) -> None:
    """Print the address of the `itm` experiment's runs and serve the UI until interrupted; for a tracking server
    (`MLFLOW_TRACKING_URI` over HTTP), print its address only."""
    uri = tracking_uri()
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    path = sqlite_path(uri)
    if path is not None and not path.is_file():  # not created here: a store with nothing in it shows nothing
        raise UserError(f"tracking store {uri}: no such file yet: run the pipeline first (make quick)")
    experiment = check_store(uri).get_experiment_by_name(name)
    if experiment is None:
        raise UserError(f"tracking store {uri} has no experiment {name!r} yet: run the pipeline first (make quick)")
    if uri.startswith(("http://", "https://")):  # a server, already serving its UI
        print(f"the {name} experiment's runs: {uri.rstrip('/')}/{runs_page(experiment.experiment_id)}")
        return
    print(f"the {name} experiment's runs: http://{host}:{port}/{runs_page(experiment.experiment_id)}", flush=True)
    print("(Ctrl-C stops the UI)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # the way to stop it
        subprocess.run(ui_command(uri, host, port), check=False)
