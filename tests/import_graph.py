"""The project's import graph, read from the source with `ast` (no project module is imported).

Modules are the `.py` files under `itm/`, `stages/` and `bench/`, named by their path (`itm/models/base.py` is
`itm.models.base`, `itm/models/__init__.py` is `itm.models`). A module's direct imports are the project modules
named by its `import` and `from … import` statements anywhere in the file, lazy imports inside functions included,
except those under `if TYPE_CHECKING:`, which never run. `bench/` is a folder of scripts (no `__init__.py`): there
`import common` means the sibling `bench/common.py`, as it does when the script runs.

Importing a module runs its parent packages' `__init__.py` first, so the closure of a module follows both its
direct imports and its parent packages, transitively.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL = ("itm", "stages", "bench")


def _is_type_checking(test: ast.expr) -> bool:
    """`TYPE_CHECKING` or `typing.TYPE_CHECKING` (any module prefix)."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of `tree` at any depth, skipping the bodies of `if TYPE_CHECKING:` (not their `else`)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


class ImportGraph:
    """The modules of the project under `root` and who imports whom."""

    def __init__(self, root: Path = REPO, top_level: Iterable[str] = TOP_LEVEL) -> None:
        self.root = root
        self._paths: dict[str, Path] = {}  # module name -> file path relative to root
        for name in top_level:
            for path in sorted((root / name).rglob("*.py")):
                relative = path.relative_to(root)
                parts = relative.with_suffix("").parts
                self._paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = relative
        self._modules = {str(path): module for module, path in self._paths.items()}  # file path -> module name
        self._direct: dict[str, frozenset[str]] = {}

    @property
    def modules(self) -> list[str]:
        return sorted(self._paths)

    def path(self, module: str) -> Path:
        """The file of `module`, relative to the root (`itm.models` -> `itm/models/__init__.py`)."""
        return self._paths[module]

    def module(self, path: str | Path) -> str:
        """The module of a file given relative to the root (`itm/models/base.py` -> `itm.models.base`)."""
        return self._modules[str(Path(path))]

    def is_package(self, module: str) -> bool:
        return self._paths[module].name == "__init__.py"

    def parents(self, module: str) -> list[str]:
        """The packages whose `__init__.py` runs before `module` (`itm.models.base` -> `itm`, `itm.models`)."""
        parts = module.split(".")
        return [name for name in (".".join(parts[:n]) for n in range(1, len(parts))) if name in self._paths]

    def is_trivial_init(self, module: str) -> bool:
        """Whether `module` is a package whose `__init__.py` holds nothing but (at most) a docstring."""
        if not self.is_package(module):
            return False
        body = ast.parse((self.root / self._paths[module]).read_text()).body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            body = body[1:]
        return not body

    def direct_imports(self, module: str) -> frozenset[str]:
        """The project modules `module` imports itself, anywhere in its file except under `if TYPE_CHECKING:`."""
        if module not in self._direct:
            tree = ast.parse((self.root / self._paths[module]).read_text(), filename=str(self._paths[module]))
            found: set[str] = set()
            for node in _import_nodes(tree):
                if isinstance(node, ast.Import):
                    found.update(self._resolve(module, alias.name) for alias in node.names)
                else:
                    base = self._from_base(module, node)
                    found.update(self._resolve(module, base, alias.name) for alias in node.names)
            found.discard("")
            self._direct[module] = frozenset(found)
        return self._direct[module]

    def _from_base(self, module: str, node: ast.ImportFrom) -> str:
        """The absolute module named by `from <base> import …` in `module`, relative imports resolved."""
        if not node.level:
            return node.module or ""
        package = module.split(".") if self.is_package(module) else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        return ".".join([*package, *([node.module] if node.module else [])])

    def _resolve(self, importer: str, name: str, attribute: str = "") -> str:
        """The project module that importing `name` (and `attribute` from it) loads in `importer`; "" if none.

        `from a.b import c` loads the submodule `a.b.c` when there is one, else `c` is a name defined in `a.b`.
        A script folder without `__init__.py` (`bench/`) sees its siblings as top-level modules.
        """
        folder = self._paths[importer].parent
        if not (self.root / folder / "__init__.py").exists() and ".".join([*folder.parts, name]) in self._paths:
            name = ".".join([*folder.parts, name])
        if attribute and attribute != "*" and f"{name}.{attribute}" in self._paths:
            return f"{name}.{attribute}"
        parts = name.split(".")
        for n in range(len(parts), 0, -1):  # `import a.b.c` of a missing `c`: the deepest module that exists
            if ".".join(parts[:n]) in self._paths:
                return ".".join(parts[:n])
        return ""

    def requires(self, module: str) -> list[str]:
        """What running `module` runs first: its parent packages, then its direct imports."""
        return [*self.parents(module), *sorted(self.direct_imports(module))]

    def chains(self, module: str) -> dict[str, list[str]]:
        """Every module of the closure of `module`, each with one shortest chain of modules that loads it.

        The chain starts at `module` and ends with the module that imports (or is a subpackage of) the key.
        """
        chain: dict[str, list[str]] = {module: []}
        queue = deque([module])
        while queue:
            current = queue.popleft()
            for required in self.requires(current):
                if required not in chain:
                    chain[required] = [*chain[current], current]
                    queue.append(required)
        return chain

    def closure(self, module: str) -> set[str]:
        """`module`, its parent packages and everything they import, transitively."""
        return set(self.chains(module))
