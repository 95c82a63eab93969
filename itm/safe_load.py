"""Reading files from elsewhere (published checkpoints, vocabularies, concept files) without running their code.

A pickle names the globals it wants built; an ordinary unpickler imports and calls whatever it names, so loading an
untrusted pickle can run anything. Here:

- plain pickles go through `SafeUnpickler`, which builds numpy arrays, numpy scalars and plain containers, plus
  the stand-in classes a caller names for the classes a file is known to hold (e.g. SCAN's `Vocabulary`); it
  refuses every other global;
- torch files go through `torch.load(weights_only=True)` with the same stand-ins and numpy's scalars allow-listed.

A stand-in is a plain class whose instances only receive attributes (`Record`): unpickling creates it without
calling `__init__` and sets its `__dict__` from the pickled state, so nothing in the file chooses code to run.
"""

from __future__ import annotations

import importlib
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from itm.errors import UserError

StandIns = Mapping[str, type]  # "module.Name" as the file writes it -> the class to build instead


class Record:
    """A stand-in for an object that only carries attributes (`argparse.Namespace`, a vocabulary wrapper)."""

    def __repr__(self) -> str:
        return f"Record({', '.join(f'{key}={value!r}' for key, value in vars(self).items())})"


NAMESPACE_STAND_IN: StandIns = {"argparse.Namespace": Record}  # training options saved beside the weights


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle named a global outside the allow-list."""


def _numpy_core(submodule: str) -> ModuleType:
    # numpy 2 moved numpy.core to numpy._core; pickles name whichever numpy wrote them.
    try:
        return importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{submodule}")


_NUMPY_CORE_GLOBALS = {("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer")}
_PLAIN_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("_codecs", "encode")}
_PLAIN_GLOBALS |= {("builtins", name) for name in ("dict", "list", "tuple", "set", "frozenset", "slice")}
_PLAIN_GLOBALS |= {("builtins", name) for name in ("int", "float", "complex", "bool", "str", "bytes", "bytearray")}


class SafeUnpickler(pickle.Unpickler):
    """Builds numpy arrays, numpy scalars, plain containers and the given stand-ins; refuses every other global.

    `_codecs.encode` is how protocol-2 pickles written by Python 3 carry bytes (a numpy array's raw data).
    """

    def __init__(self, stream: Any, stand_ins: StandIns = NAMESPACE_STAND_IN, **kwargs: Any) -> None:
        super().__init__(stream, **kwargs)
        self.stand_ins = dict(stand_ins)

    def find_class(self, module: str, name: str) -> Any:
        for prefix in ("numpy.core.", "numpy._core."):
            submodule = module.removeprefix(prefix)
            if module.startswith(prefix) and (submodule, name) in _NUMPY_CORE_GLOBALS:
                return getattr(_numpy_core(submodule), name)
        module = "builtins" if module == "__builtin__" else module
        if (module, name) in _PLAIN_GLOBALS:
            return super().find_class(module, name)
        stand_in = self.stand_ins.get(f"{module}.{name}")
        if stand_in is not None:
            return stand_in
        raise RefusedGlobal(f"{module}.{name}")


def first_line(error: BaseException) -> str:
    """`Type: first line of the message`, for one-line errors about files that fail in many ways."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def load_pickle(path: Path, stand_ins: StandIns = NAMESPACE_STAND_IN, *, what: str = "pickle") -> Any:
    """The content of the pickle at `path`, built by `SafeUnpickler`; a `UserError` naming the file otherwise."""
    allowed = "numpy arrays, plain containers" + "".join(f", {name}" for name in stand_ins)
    try:
        with path.open("rb") as stream:
            return SafeUnpickler(stream, stand_ins, encoding="latin1").load()  # latin1: Python 2 pickles of numpy
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except RefusedGlobal as refused:
        raise UserError(f"{path}: refused to load `{refused}` from the pickle (only {allowed} are allowed)") from None
    except Exception as error:  # the pickle docs list AttributeError, EOFError, ImportError, IndexError and more
        raise UserError(f"{path}: not a readable {what} ({first_line(error)})") from None


def _torch_allow_list(stand_ins: StandIns) -> list[Any]:
    """torch's allow-list: the stand-ins under the names the file uses, and numpy scalars (a `best_rsum` saved as
    numpy.float64) under both of numpy's module names."""
    scalar = _numpy_core("multiarray").scalar
    dtypes = [type(np.dtype(kind)) for kind in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_)]
    numpy_names = [(scalar, f"{core}.multiarray.scalar") for core in ("numpy.core", "numpy._core")]
    return [*((cls, name) for name, cls in stand_ins.items()), *numpy_names, np.dtype, *dtypes]


def load_torch(path: Path, stand_ins: StandIns = NAMESPACE_STAND_IN, *, what: str = "torch checkpoint") -> Any:
    """The content of the torch file at `path` (zip or the pre-1.6 format), by `torch.load(weights_only=True)`
    with the stand-ins allow-listed; a `UserError` naming the file otherwise."""
    try:
        with torch.serialization.safe_globals(_torch_allow_list(stand_ins)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except Exception as error:  # an untrusted file can fail in many ways (zip, pickle, refused global)
        message = first_line(error)
        refused = _refused_global(str(error))
        unpickler = _UNPICKLER_ERROR.search(str(error))
        if refused is not None:
            message = f"refused to load `{refused}`"
        elif unpickler is not None:  # torch's first line would advise loading it unsafely
            message = f"refused by the weights-only unpickler: {unpickler.group(1).strip()}"
        raise UserError(f"{path}: not a loadable {what} ({message})") from None


_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error: *\n?([^\n]+)")
_REFUSED = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


def _refused_global(message: str) -> str | None:
    """The global torch's weights-only unpickler refused, from its (long) message."""
    found = _REFUSED.search(message)
    return None if found is None else found.group(1)
