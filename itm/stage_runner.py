"""What every stage entry point shares: one-line errors for user mistakes, and logging set-up."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence

from itm.atomic import disk_fault_message, is_disk_fault
from itm.config import Processes
from itm.errors import UserError
from itm.launch import relaunch_command

EXIT_USER_ERROR = 2


def run_stage(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> None:
    """Run a stage's `main`; a `UserError` prints `error: ...` lines on stderr and exits with status 2, and so does
    a full disk (or quota, or read-only file system) wherever the stage was writing."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # A terminated stage unwinds like an interrupted one, so temporary outputs are removed on the way out.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        main(argv)
    except UserError as error:
        _report(str(error))
    except OSError as error:
        if not is_disk_fault(error):
            raise
        _report(disk_fault_message(error.filename or "a file", error))
    except KeyboardInterrupt:
        print("error: interrupted; earlier outputs are kept, partial ones were removed", file=sys.stderr)
        raise SystemExit(130) from None


def _report(message: str) -> None:
    for line in message.splitlines():
        print(f"error: {line}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR) from None


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def default_workers() -> int:
    """Image-decoding worker processes: one core is left to the model, at most four workers."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def relaunch_under_torchrun(module: str, argv: Sequence[str] | None, processes: Processes) -> None:
    """When `processes` asks for more than one process and this is not yet one of torchrun's, run the stage
    `python -m module argv` under torchrun and exit with its status; else return and run here."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = relaunch_command(module, args, processes.gpus, processes.nodes)
    if command is None:
        return
    logging.getLogger(module).info("launching %d processes: %s", processes.gpus * processes.nodes, " ".join(command))
    raise SystemExit(subprocess.run(command, check=False).returncode)
