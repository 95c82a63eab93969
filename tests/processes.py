"""Run a function in several CPU processes joined over gloo, as torchrun would start them (tests only)."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from itm import distributed


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, out: str, function: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "ITM_TRACKING": "off",
        }
    )
    torch.set_num_threads(1)
    with distributed.processes(torch.device("cpu")) as context:
        result = function(context, *args)
    Path(out, f"{rank}.pkl").write_bytes(pickle.dumps(result))


def run_processes(function: Callable[..., Any], *args: Any, world_size: int = 2) -> list[Any]:
    """`function(context, *args)` in `world_size` processes (a picklable, module-level function); each rank's
    return value, in rank order."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world_size, free_port(), out, function, args), nprocs=world_size, join=True)
        return [pickle.loads(Path(out, f"{rank}.pkl").read_bytes()) for rank in range(world_size)]
