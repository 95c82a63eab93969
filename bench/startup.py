"""Start-up of every entry point: how long `--help` takes, and how long before a stage can start its work.

    python -m bench.startup                              # this working tree
    python -m bench.startup --against a132de1            # and a revision's tree, side by side, with ratios
    python -m bench.startup --repeats 5 --only train itm

For each stage (`python -m stages.<name>`) and the `itm` command, each in a fresh interpreter from the tree's root:
- `help`: the wall time of `<entry point> --help`;
- `ready`: the wall time of importing the entry point and every project module its file imports (anywhere in the
  file, the imports a stage makes once its arguments parse included), and mlflow, which every stage's tracking run
  loads: what a stage has loaded when its work begins. Reading its data, its MLflow run and its work come after.
The reference rows, timed in the same run: a bare interpreter, `import torch`, `import torchvision`,
`import mlflow`. Each figure is the median of `--repeats` runs.

`--against REV` checks REV out into a temporary git worktree and times its entry points too (the same list: this
tree's stages), so the ratio column is REV's time over this tree's. The machine should be otherwise idle: the
figures are seconds of import work, which another process's load stretches.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import REPO, print_table
from tests.import_graph import ImportGraph

REFERENCES = {"python": "pass", "torch": "import torch", "torchvision": "import torchvision", "mlflow": "import mlflow"}
ITM_COMMAND = "itm.commands"  # the module of the `itm` console script


def entry_points(root: Path) -> dict[str, str]:
    """Label -> module of every stage of `root`'s stages/ and of the `itm` command."""
    stages = sorted(path.stem for path in (root / "stages").glob("*.py") if path.stem != "__init__")
    return {**{stage: f"stages.{stage}" for stage in stages}, "itm": ITM_COMMAND}


def work_modules(root: Path, module: str) -> list[str]:
    """The project modules (`itm.*`) that `module`'s file imports anywhere in it (the import graph of `root`)."""
    return sorted(name for name in ImportGraph(root).direct_imports(module) if name.split(".")[0] == "itm")


def seconds_of(root: Path, command: Sequence[str], repeats: int) -> float:
    """Median wall time of `command` run from `root` (its output discarded; a failure stops the benchmark)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run(command, cwd=root, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"{root}: {' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return statistics.median(times)


def help_command(module: str) -> list[str]:
    return [sys.executable, "-m", module, "--help"]


def ready_command(root: Path, module: str) -> list[str]:
    imports = [module, *work_modules(root, module), "mlflow"]
    return [sys.executable, "-c", "import stages\n" + "\n".join(f"import {name}" for name in imports)]


def measure(root: Path, labels: dict[str, str], repeats: int, tree: str) -> dict[tuple[str, str], float]:
    """(label, "help" | "ready") -> median seconds, for every entry point of `labels` in `root`."""
    figures = {}
    for label, module in labels.items():
        figures[label, "help"] = seconds_of(root, help_command(module), repeats)
        figures[label, "ready"] = seconds_of(root, ready_command(root, module), repeats)
        print(f"  {tree}: {label} help {figures[label, 'help']:.2f} s, "
              f"ready {figures[label, 'ready']:.2f} s", file=sys.stderr, flush=True)  # fmt: skip
    return figures


class Worktree:
    """A temporary `git worktree` of `revision`, removed on exit."""

    def __init__(self, revision: str) -> None:
        self.revision = revision
        self._folder = tempfile.TemporaryDirectory(prefix="itm-startup-")
        self.path = Path(self._folder.name) / "tree"

    def __enter__(self) -> Path:
        subprocess.run(["git", "worktree", "add", "--detach", str(self.path), self.revision], cwd=REPO,
                       check=True, capture_output=True)  # fmt: skip
        return self.path

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["git", "worktree", "remove", "--force", str(self.path)], cwd=REPO, capture_output=True)
        self._folder.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the median is shown)")
    parser.add_argument("--against", help="a git revision whose entry points are timed too, for the ratio")
    parser.add_argument("--only", nargs="+", help="entry points to time (stage names, or itm)")
    args = parser.parse_args(argv)

    labels = entry_points(REPO)
    if args.only:
        unknown = sorted(set(args.only) - set(labels))
        if unknown:
            parser.error(f"--only: not an entry point: {', '.join(unknown)} (choose from {', '.join(labels)})")
        labels = {label: labels[label] for label in args.only}
    print(f"python {sys.version.split()[0]}, median of {args.repeats} runs, fresh interpreter per run", flush=True)
    references = {
        name: seconds_of(REPO, [sys.executable, "-c", code], args.repeats) for name, code in REFERENCES.items()
    }
    print_table(["reference", "seconds"], [[name, f"{seconds:.2f}"] for name, seconds in references.items()])
    print()
    after = measure(REPO, labels, args.repeats, "now")
    if args.against is None:
        rows = [[label, f"{after[label, 'help']:.2f}", f"{after[label, 'ready']:.2f}"] for label in labels]
        print_table(["entry point", "help s", "ready s"], rows)
        return
    with Worktree(args.against) as tree:
        before = measure(tree, labels, args.repeats, args.against)
    rows = []
    for label in labels:
        row = [label]
        for kind in ("help", "ready"):
            old, new = before[label, kind], after[label, kind]
            row += [f"{old:.2f}", f"{new:.2f}", f"{old / new:.1f}x"]
        rows.append(row)
    header = ["entry point", f"help {args.against}", "help now", "ratio", f"ready {args.against}", "ready now", "ratio"]
    print_table(header, rows)


if __name__ == "__main__":
    main()
