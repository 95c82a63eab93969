"""Addresses of MLflow UI pages, relative to the UI's address, that open on the runs.

MLflow 3.17's UI opens every experiment on its GenAI view (traces, "no data") unless the browser has chosen "Model
training" in the switch at the top of its sidebar (it remembers the choice) or the address says
`workflowType=machine_learning`. The experiment's `mlflow.experimentKind` tag, which earlier MLflow 3 releases read
to choose the view, no longer decides it. So every address itm prints (`itm ui`, the compare report's run links)
carries the view.
"""

from __future__ import annotations

RUNS_VIEW = "workflowType=machine_learning"  # the UI's model-training view (runs), not GenAI's traces


def runs_page(experiment_id: str) -> str:
    """The UI's page of an experiment's runs, relative to the UI's address."""
    return f"#/experiments/{experiment_id}/runs?{RUNS_VIEW}"


def run_page(experiment_id: str, run_id: str) -> str:
    """The UI's page of one run, relative to the UI's address."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{RUNS_VIEW}"
