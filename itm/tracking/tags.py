"""The tags of a stage's run: the stage, the git revision, the `dvc exp` experiment and the numeric environment."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from typing import Any

from itm import environment

# What a run's figures follow from, in the repository: a change here marks the run's revision `-dirty`.
RUN_INPUTS = ("itm", "stages", "params.yaml", "dvc.yaml", "pyproject.toml", "uv.lock")


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
