"""The code is layered: a module imports from its own unit and from strictly lower layers, never upwards.

The layers, top to bottom:

    1. entry points: stages, bench, itm.commands
    2. itm.compare
    3. itm.report, itm.figures, itm.search, itm.experiments, itm.offline_plots
    4. itm.train, itm.detect
    5. itm.evaluate, itm.pair_attention, itm.published
    6. itm.models
    7. itm.data
    8. itm.stage_runner, itm.measurements, itm.checkpoints
    9. itm.config, itm.distributed, itm.tracking, itm.atomic, itm.device, itm.safe_load
    10. itm.launch
    11. itm.errors

A module's unit is its package folder or, for a single-file module, the module itself: the first two dotted
components for `itm.*` (`itm.models.cvse` -> `itm.models`, `itm.config` -> `itm.config`), the first one for
`stages.*` and `bench.*`. Units of one layer may not import each other. The package `itm` itself is exempt, and
every other unit must be placed in `LAYERS`, so a new folder or module gets its layer deliberately.

Imports are each file's own (not their closure), anywhere in the file, lazy ones included, except under
`if TYPE_CHECKING:`; they are read with `ast` (see `tests/import_graph.py`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.import_graph import ImportGraph

LAYERS: tuple[tuple[str, ...], ...] = (
    ("stages", "bench", "itm.commands", "itm.profiles"),
    ("itm.compare",),
    ("itm.report", "itm.figures", "itm.search", "itm.experiments", "itm.offline_plots"),
    ("itm.train", "itm.detect"),
    ("itm.evaluate", "itm.pair_attention", "itm.published"),
    ("itm.models",),
    ("itm.data",),
    ("itm.stage_runner", "itm.measurements", "itm.checkpoints"),
    (
        "itm.config",
        "itm.distributed",
        "itm.tracking",
        "itm.atomic",
        "itm.device",
        "itm.safe_load",
        "itm.seeds",
        "itm.prefork",
    ),
    ("itm.environment",),
    ("itm.launch",),
    ("itm.errors", "itm.formatting"),
)
LAYER = {unit: number for number, units in enumerate(LAYERS, start=1) for unit in units}


def unit(module: str) -> str | None:
    """The unit of `module`, or None for the exempt package `itm` itself."""
    parts = module.split(".")
    if parts[0] != "itm":
        return parts[0]
    return ".".join(parts[:2]) if len(parts) > 1 else None


def unplaced_units(graph: ImportGraph) -> list[str]:
    """One line for each module whose unit has no layer."""
    return [
        f"{graph.path(module).as_posix()}: unit {unit(module)} has no layer; place it in LAYERS in tests/test_layers.py"
        for module in graph.modules
        if unit(module) is not None and unit(module) not in LAYER
    ]


def layer_violations(graph: ImportGraph) -> list[str]:
    """One line for each import of a unit of the same or a higher layer (modules without a layer are skipped)."""
    problems = []
    for module in graph.modules:
        importer = unit(module)
        if importer not in LAYER:
            continue
        for imported in sorted(graph.direct_imports(module)):
            target = unit(imported)
            if target in LAYER and target != importer and LAYER[target] <= LAYER[importer]:
                problems.append(
                    f"{graph.path(module).as_posix()} imports {imported}: "
                    f"{importer} (layer {LAYER[importer]}) may not import {target} (layer {LAYER[target]})"
                )
    return problems


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return ImportGraph()


def test_every_unit_has_a_layer(graph: ImportGraph) -> None:
    problems = unplaced_units(graph)
    assert not problems, "\n".join(problems)


def test_no_module_imports_its_own_or_a_higher_layer(graph: ImportGraph) -> None:
    problems = layer_violations(graph)
    assert not problems, "\n".join(problems)


# The checks above, on tiny projects written into tmp_path: they can fail, and they read imports as Python runs them.


def project(root: Path, files: dict[str, str]) -> ImportGraph:
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return ImportGraph(root)


LAYERED = {
    "itm/__init__.py": "from itm.errors import UserError\n",
    "itm/errors.py": "",
    "itm/config.py": "import itm\nfrom itm import errors\n",
    "itm/models/__init__.py": "from itm.models.base import Matcher\n",
    "itm/models/base.py": "from . import losses\nfrom ..config import Params\n",
    "itm/models/losses.py": "",
    "itm/data/__init__.py": "",
    "itm/data/loaders.py": "from itm.config import Params\n",
    "stages/__init__.py": "",
    "stages/train.py": "from itm.models import Matcher\nfrom itm.data.loaders import load\n",
    "bench/common.py": "",
    "bench/training.py": "from common import REPO\nfrom itm.config import load_params\n",
}


def test_a_layered_project_passes(tmp_path: Path) -> None:
    graph = project(tmp_path, LAYERED)
    assert unplaced_units(graph) == [] and layer_violations(graph) == []
    assert unit("itm") is None and unit("itm.models.base") == "itm.models" and unit("bench.common") == "bench"


def test_an_upward_import_fails(tmp_path: Path) -> None:
    graph = project(tmp_path, {**LAYERED, "itm/data/loaders.py": "from itm.models.base import Regions\n"})
    assert layer_violations(graph) == [
        "itm/data/loaders.py imports itm.models.base: itm.data (layer 7) may not import itm.models (layer 6)"
    ]


def test_an_import_within_a_layer_fails(tmp_path: Path) -> None:
    graph = project(tmp_path, {**LAYERED, "itm/device.py": "", "itm/config.py": "from itm import device\n"})
    assert layer_violations(graph) == [
        "itm/config.py imports itm.device: itm.config (layer 9) may not import itm.device (layer 9)"
    ]


def test_a_lazy_import_counts_and_a_type_checking_import_does_not(tmp_path: Path) -> None:
    loaders = (
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from itm.models.base import Regions\n\n\n"
        "def load():\n    from itm.models import losses\n"
    )
    graph = project(tmp_path, {**LAYERED, "itm/data/loaders.py": loaders})
    assert layer_violations(graph) == [
        "itm/data/loaders.py imports itm.models.losses: itm.data (layer 7) may not import itm.models (layer 6)"
    ]


def test_a_unit_without_a_layer_fails(tmp_path: Path) -> None:
    graph = project(tmp_path, {**LAYERED, "itm/views.py": "from itm.models.base import Matcher\n"})
    placed = "itm/views.py: unit itm.views has no layer; place it in LAYERS in tests/test_layers.py"
    assert unplaced_units(graph) == [placed]
    assert layer_violations(graph) == []
