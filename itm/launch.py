"""Re-launching a stage as several processes under `torchrun` (without importing torch: every stage entry point
reads this).

A stage asked for more than one process (`gpus` x `nodes` in its params section) runs its own command again under
`python -m torch.distributed.run`; each of those processes then joins the process group (`itm.distributed.start`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from itm.errors import UserError

# Set by torchrun in every process it starts; LOCAL_WORLD_SIZE is the processes on this node.
RANK, LOCAL_RANK, WORLD_SIZE = "RANK", "LOCAL_RANK", "WORLD_SIZE"
# Multi-node rendezvous, read by `relaunch_command` on every node: host:port of the c10d store and a job id.
RDZV_ENDPOINT, RDZV_ID = "ITM_RDZV_ENDPOINT", "ITM_RDZV_ID"


def launched_by_torchrun() -> bool:
    return WORLD_SIZE in os.environ and RANK in os.environ


def relaunch_command(module: str, argv: Sequence[str], gpus: int, nodes: int) -> list[str] | None:
    """The `torchrun` command that runs `python -m module argv` as gpus x nodes processes; None when one process
    is asked for, or when this process already is one of torchrun's.

    One node: `--standalone` (a local rendezvous on a free port). Several nodes: every node runs the same stage
    command, with ITM_RDZV_ENDPOINT=host:port (reachable from every node) and ITM_RDZV_ID (the same on every node)
    set; torchrun's c10d rendezvous assigns the node ranks.
    """
    if launched_by_torchrun() or gpus * nodes <= 1:
        return None
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}", f"--nnodes={nodes}"]
    if nodes == 1:
        launcher.append("--standalone")
    else:
        endpoint, job = os.environ.get(RDZV_ENDPOINT), os.environ.get(RDZV_ID)
        if not endpoint or not job:
            raise UserError(
                f"{nodes} nodes need {RDZV_ENDPOINT}=host:port (the rendezvous, reachable from every node) and "
                f"{RDZV_ID}=<job id> in the environment of every node's stage command"
            )
        launcher += ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={job}"]
    return [*launcher, "-m", module, *argv]
