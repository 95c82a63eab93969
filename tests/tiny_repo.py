"""A git + DVC repository of this pipeline on the tiny synthetic profile, and running commands in it.

Import `tiny_repo_fixture` into a test module to get the `tiny_repo` fixture (or call `make_tiny_repo` to build one
elsewhere, e.g. for a module-scoped fixture):

    from tests.tiny_repo import run, tiny_repo_fixture  # noqa: F401

    def test_repro(tiny_repo):
        run(["dvc", "repro"], tiny_repo)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
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
    local = shutil.ignore_patterns("cache", "tmp", "config.local", "offline.html")  # this clone's own
    shutil.copytree(REPO / ".dvc", repo / ".dvc", ignore=local)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"]["synthetic"] = {"kind": "synthetic", **TINY_SYNTHETIC}
    params["tokenize"]["min_count"] = 1
    params["detector"]["architectures"]["small"] = {**TINY_DETECTOR, "blocks": [1, 1, 1, 1]}
    params["detector"]["train"] |= {"epochs": 1, "max_images": 16, "batch_size": 8}
    params["regions"] |= {"min_boxes": 3, "max_boxes": 10}
    for block in params["matchers"].values():
        block |= {"embed_dim": 16, "word_dim": 8}
    params["matchers"]["mvam"]["views"] = 4  # views of 4 dimensions
    params["train"] |= {"max_epochs": 1, "batch_size": 32}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "tiny pipeline"], repo)
    return repo


def tracked_files(repo: Path) -> dict[str, bytes]:
    """Every file of every output `dvc.lock` records (models, metrics, plots, reports, data), by its path relative to
    `repo`."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    files = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):  # the lock lists metrics and plots among the outs
            path = repo / out["path"]
            for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
                files[file.relative_to(repo).as_posix()] = file.read_bytes()
    return files


def file_differences(first: dict[str, bytes], second: dict[str, bytes]) -> list[str]:
    """One line per file that differs between two `tracked_files`: which keys of a JSON file, which members of a zip
    archive (.pt, .npz), else the sizes and the first differing byte."""
    lines = []
    for name in sorted(first.keys() | second.keys()):
        a, b = first.get(name), second.get(name)
        if a == b:
            continue
        if a is None or b is None:
            lines.append(f"{name}: only in the {'second' if a is None else 'first'} run")
        else:
            lines.append(f"{name}: {_bytes_difference(name, a, b)}")
    return lines


def _bytes_difference(name: str, a: bytes, b: bytes) -> str:
    if name.endswith(".json"):
        keys = _json_differences(json.loads(a), json.loads(b), "")
        return f"JSON differs at {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}"
    if a[:2] == b[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(a)) as one, zipfile.ZipFile(io.BytesIO(b)) as two:
            members = sorted(
                m for m in set(one.namelist()) | set(two.namelist())
                if m not in one.namelist() or m not in two.namelist() or one.read(m) != two.read(m)
            )  # fmt: skip
            dates = one.infolist()[0].date_time, two.infolist()[0].date_time
        return f"zip members differ: {members or 'none (only the archive metadata)'}; first entry dated {dates}"
    offset = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return f"{len(a)} vs {len(b)} bytes, first difference at byte {offset}"


def _json_differences(a: object, b: object, where: str) -> list[str]:
    """The paths (`history[0].train/loss`) at which two JSON documents differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(a.keys() | b.keys(), key=str):
            found += _json_differences(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        found = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found += _json_differences(x, y, f"{where}[{i}]")
        return found
    return [] if a == b else [f"{where or '(root)'}: {a!r} vs {b!r}"[:200]]
