"""A git + DVC repository of this pipeline on the tiny synthetic profile, and running commands in it.

Import `tiny_repo_fixture` into a test module to get the `tiny_repo` fixture (or call `make_tiny_repo` to build one
elsewhere, e.g. for a module-scoped fixture):

    from tests.tiny_repo import run, tiny_repo_fixture  # noqa: F401

    def test_repro(tiny_repo):
        run(["dvc", "repro"], tiny_repo)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_DETECTOR, TINY_SYNTHETIC


def environment() -> dict[str, str]:
    """The environment for commands in the tiny repository: this virtualenv's tools first, a git identity."""
    return os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "itm tests",
        "GIT_AUTHOR_EMAIL": "tests@itm.invalid",
        "GIT_COMMITTER_NAME": "itm tests",
        "GIT_COMMITTER_EMAIL": "tests@itm.invalid",
    }


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `args` in `cwd` and fail the test, with its output, unless it succeeds."""
    done = subprocess.run(args, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(name="tiny_repo")
def tiny_repo_fixture(tmp_path: Path) -> Path:
    """A git + DVC repository holding this pipeline with the tiny synthetic profile."""
    return make_tiny_repo(tmp_path / "repo")


def make_tiny_repo(repo: Path) -> Path:
    """Create the tiny repository at `repo` (a new folder) and commit it; returns `repo`."""
    repo.mkdir()
    for name in ("itm", "stages"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"]["synthetic"] = {"kind": "synthetic", **TINY_SYNTHETIC}
    params["tokenize"]["min_count"] = 1
    params["detector"]["architectures"]["small"] = {**TINY_DETECTOR, "blocks": [1, 1, 1, 1]}
    params["detector"]["train"] |= {"epochs": 1, "max_images": 16, "batch_size": 8}
    params["regions"] |= {"min_boxes": 3, "max_boxes": 10}
    for block in params["matchers"].values():
        block |= {"embed_dim": 16, "word_dim": 8}
    params["train"] |= {"epochs": 1, "batch_size": 32}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "tiny pipeline"], repo)
    return repo
