"""Every stage of dvc.yaml depends on exactly the code it runs, so DVC re-runs it when that code changes.

The code a stage runs is the import closure of its script `stages/<name>.py` (read with `ast`, see
`tests/import_graph.py`): every project module it imports, at any depth, lazily or not, with the `__init__.py` of
every package on the way. Each of those files must be covered by a dep (a folder dep covers every file under it),
and each `.py` file listed as a dep must be in the closure. Exempt: package `__init__.py` files that hold only a
docstring, and the modules of `NOT_RESULTS`, which cannot change what a stage produces.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from itm.config import Params, TrainParams
from tests.import_graph import REPO, ImportGraph

CODE = ("itm/", "stages/", "bench/")  # deps that are code; the others are data, outputs of other stages

NOT_RESULTS = {
    "itm/errors.py": "error types and their messages",
    **{
        f"itm/tracking/{name}.py": "logging to MLflow, which records results but never changes them"
        for name in ("__init__", "local", "models", "pages", "records", "runs", "store", "tags", "trackers")
    },
}


def stages(root: Path = REPO) -> dict[str, dict[str, Any]]:
    """Each stage of `root`/dvc.yaml by its name, `<name>@` for a `foreach` stage (whose template is its `do:`) or a
    `matrix` one."""
    found = {}
    for name, definition in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].items():
        generated = "foreach" in definition or "matrix" in definition
        found[f"{name}@" if generated else name] = definition.get("do", definition)
    return found


def dependency_problems(
    graph: ImportGraph, name: str, stage: Mapping[str, Any], not_results: Mapping[str, str] = NOT_RESULTS
) -> list[str]:
    """What is wrong with the code deps of the stage `name`: files it runs but lacks, stale or missing deps."""
    script = stage["cmd"].split()[2]  # python -m stages.<name> ...
    deps = [dep.rstrip("/") for dep in stage.get("deps", [])]
    problems = [
        f"{name}: {dep} is a dep but does not exist"
        for dep in deps
        if dep.startswith(CODE) and not (graph.root / dep).exists()
    ]
    chains = graph.chains(script)
    for module, chain in sorted(chains.items(), key=lambda item: str(graph.path(item[0]))):
        path = graph.path(module).as_posix()
        if path in not_results or graph.is_trivial_init(module):
            continue
        if not any(path == dep or path.startswith(f"{dep}/") for dep in deps):
            via = " -> ".join(graph.path(link).as_posix() for link in chain)
            if chain and module in graph.parents(chain[-1]):
                via += ", as its package"
            problems.append(f"{name}: {path} is imported (via {via}) but not in deps")
    closure = {graph.path(module).as_posix() for module in chains}
    problems += [
        f"{name}: {dep} is a dep but the stage never imports it"
        for dep in deps
        if dep.startswith(CODE) and dep.endswith(".py") and (graph.root / dep).is_file() and dep not in closure
    ]
    return problems


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return ImportGraph()


@pytest.mark.parametrize("name", list(stages()))
def test_stage_deps_are_the_code_it_imports(graph: ImportGraph, name: str) -> None:
    problems = dependency_problems(graph, name, stages()[name])
    assert not problems, "\n".join(problems)


def test_the_lock_holds_only_stages_of_the_pipeline() -> None:
    """DVC never removes the entry of a stage that dvc.yaml no longer defines (a renamed or removed stage): such
    entries mislead a reader of dvc.lock and cost every `dvc` command time parsing them."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        defined = {stage.addressing for stage in repo.index.stages}
    locked = set(yaml.safe_load((REPO / "dvc.lock").read_text())["stages"])
    assert sorted(locked - defined) == []


def test_every_tracked_param_is_in_the_schema() -> None:
    unknown = [
        f"{name}: {key}"
        for name, stage in stages().items()
        for key in stage.get("params", [])
        if key.split(".")[0] not in Params.model_fields
    ]
    assert not unknown, f"params not in itm.config.Params: {unknown}"


def test_training_tracks_every_train_setting_but_the_seeds() -> None:
    """A new seed adds stages; it must not change the params of the other seeds' stages (which would run them
    again), and every other training setting must re-run training when it changes."""
    tracked = {key for key in stages()["train@"]["params"] if key.startswith("train.") or key == "train"}
    assert tracked == {f"train.{name}" for name in TrainParams.model_fields if name != "seeds"}


# The checks above, on tiny projects written into tmp_path: they can fail, and they read imports as Python runs them.


def write(root: Path, files: Mapping[str, str]) -> Path:
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return root


TINY = {
    "itm/__init__.py": '"""The package."""\n',
    "itm/config.py": "from itm.errors import UserError\n",
    "itm/errors.py": "class UserError(Exception): ...\n",
    "itm/models/__init__.py": "from itm.models import cvse\n",  # runs before any itm.models.* module
    "itm/models/base.py": "import torch\n",
    "itm/models/cvse.py": "from itm.data import glove\n",
    "itm/data/__init__.py": '"""Data."""\n',
    "itm/data/glove.py": "",
    "itm/device.py": "",
    "itm/train/__init__.py": '"""Training."""\n',
    "itm/train/loop.py": "from itm.models.base import Matcher\n\n\ndef run():\n    from itm import device\n",
    "itm/train/typed.py": (
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from itm.device import Device\n"
        "else:\n    from itm.config import Params\n"
    ),
    "stages/__init__.py": '"""Stages."""\n',
    "stages/train.py": "from itm.config import Params\nfrom itm.train import loop\n",
    "stages/typed.py": "from itm.train import typed\n",
}
COMPLETE = ["stages/train.py", "itm/config.py", "itm/models", "itm/data/glove.py", "itm/device.py", "itm/train"]


def stage(deps: list[str], script: str = "train") -> dict[str, Any]:
    return {"cmd": f"python -m stages.{script} --out models", "deps": [*deps, "data/regions"]}


def test_a_complete_stage_passes_and_exempts_trivial_inits_and_the_allow_list(tmp_path: Path) -> None:
    graph = ImportGraph(write(tmp_path, TINY))
    assert dependency_problems(graph, "train", stage(COMPLETE)) == []
    assert "itm.errors" in graph.closure("stages.train") and graph.is_trivial_init("itm")
    assert not graph.is_trivial_init("itm.models")


def test_a_missing_dep_fails_with_the_chain_that_imports_it(tmp_path: Path) -> None:
    graph = ImportGraph(write(tmp_path, TINY))
    deps = [dep for dep in COMPLETE if dep != "itm/data/glove.py"]
    assert dependency_problems(graph, "train@", stage(deps)) == [
        "train@: itm/data/glove.py is imported (via stages/train.py -> itm/train/loop.py -> itm/models/base.py"
        " -> itm/models/__init__.py -> itm/models/cvse.py) but not in deps"
    ]


def test_a_parent_package_init_and_what_it_imports_enter_the_closure(tmp_path: Path) -> None:
    graph = ImportGraph(write(tmp_path, TINY))
    # loop imports only itm.models.base; the package itm.models runs first and imports cvse, which imports glove
    assert graph.direct_imports("itm.train.loop") == {"itm.models.base", "itm.device"}
    assert {"itm.models", "itm.models.cvse", "itm.data.glove", "itm.data", "itm"} <= graph.closure("itm.train.loop")
    deps = [dep for dep in COMPLETE if dep != "itm/models"] + ["itm/models/base.py"]
    assert dependency_problems(graph, "train", stage(deps)) == [
        "train: itm/models/__init__.py is imported (via stages/train.py -> itm/train/loop.py -> itm/models/base.py, "
        "as its package) but not in deps",
        "train: itm/models/cvse.py is imported "
        "(via stages/train.py -> itm/train/loop.py -> itm/models/base.py -> itm/models/__init__.py) but not in deps",
    ]


def test_a_lazy_import_counts_and_a_type_checking_import_does_not(tmp_path: Path) -> None:
    graph = ImportGraph(write(tmp_path, TINY))
    assert "itm.device" in graph.direct_imports("itm.train.loop")  # imported inside run()
    assert graph.direct_imports("itm.train.typed") == {"itm.config"}  # the `else:` branch runs, the `if` does not
    deps = ["stages/typed.py", "itm/train", "itm/config.py"]
    assert dependency_problems(graph, "typed", stage(deps, "typed")) == []
    stale = dependency_problems(graph, "typed", stage([*deps, "itm/device.py"], "typed"))
    assert stale == ["typed: itm/device.py is a dep but the stage never imports it"]


def test_a_code_dep_that_does_not_exist_fails(tmp_path: Path) -> None:
    graph = ImportGraph(write(tmp_path, TINY))
    assert dependency_problems(graph, "train", stage([*COMPLETE, "itm/gone.py", "itm/gone"])) == [
        "train: itm/gone.py is a dep but does not exist",
        "train: itm/gone is a dep but does not exist",
    ]


def test_imports_resolve_submodules_relative_imports_and_script_siblings(tmp_path: Path) -> None:
    graph = ImportGraph(
        write(
            tmp_path,
            {
                **TINY,
                "itm/data/loaders.py": "from . import glove\nfrom .. import config\nfrom ..models.base import M\n",
                "itm/data/text.py": "import itm.data.glove\nimport itm.models.base.sub\nfrom itm.config import x\n",
                "bench/common.py": "",
                "bench/run.py": "from common import REPO\nimport itm.device\n",
            },
        )
    )
    assert graph.direct_imports("itm.data.loaders") == {"itm.data.glove", "itm.config", "itm.models.base"}
    assert graph.direct_imports("itm.data.text") == {"itm.data.glove", "itm.models.base", "itm.config"}
    assert graph.direct_imports("bench.run") == {"bench.common", "itm.device"}
    assert graph.module("itm/models/__init__.py") == "itm.models" and graph.path("bench.run") == Path("bench/run.py")
