"""A warm interpreter for the stages of one pipeline run: the libraries are imported once, each stage is a fork.

Every stage is a new Python process that imports torch (and torch._dynamo, which torch.optim imports on its first
step), pandas, pyarrow and matplotlib before its work: 4-8 s a stage on two cores, most of the quick profile's time.
`warm_stages()` starts one process that imports them once (`PRELOADED`, after pinning the numeric environment as
the stages do) and waits on a Unix socket in a private temporary folder, and puts a `python` launcher first on the
PATH it returns. `python -m stages.<name> <args>` (a dvc.yaml command) then hands its arguments, working folder,
environment and standard streams to that process, which forks; the fork runs the stage as `python -m` would: the
working folder first on sys.path, the project's own modules (`itm`, `stages`) imported afresh from it, only
third-party libraries already loaded, exit handlers run at the end. The launcher exits with the fork's status and
passes SIGTERM and SIGHUP (and SIGINT, when the terminal did not already send it) on to it. Any other `python`
command, or a stage whose warm process does not answer, runs the real interpreter.

A fork has only the thread that forked. The native pools the libraries start when imported (OpenBLAS's workers,
jemalloc's background thread) restart themselves in a fork, as in every DataLoader worker; a Python thread would
not, so the warm process checks that its imports started none before it serves, and ends otherwise (the stages then
run cold). A stage run warm writes the same bytes as one run cold (tests/test_prefork.py).

    with warm_stages() as environment:
        subprocess.run(["dvc", "exp", "run", ...], env=environment)
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import runpy
import select
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SOCKET_VARIABLE = "ITM_WARM_SOCKET"
PROJECT_PACKAGES = ("itm", "stages")  # imported afresh in each fork, from the stage's working folder
PRELOADED = (
    "numpy",
    "pandas",
    "pyarrow.dataset",
    "pyarrow.parquet",
    "pydantic",
    "yaml",
    "tqdm",
    "PIL.Image",
    "torch",
    "torch.optim",
    "torch._dynamo",
    "torchvision",
    "scipy.sparse",
    "sklearn.feature_extraction.text",
    "matplotlib",
    "mlflow",  # ~2 s, while DVC sets the experiment up; the stages use it unless ITM_TRACKING=off
)
STANDARD_STREAMS = (0, 1, 2)
_HEADER = struct.Struct("!I")  # the length of the JSON message that follows
_POLL_SECONDS = 0.2
START_SECONDS = 30


# The launcher: `python` on the warm run's PATH. Only `python -m stages.<name> ...` goes to the warm process.
LAUNCHER = """#!/bin/sh
# python for the stages of a warm run (itm/prefork.py): `python -m stages.<name>` is run by a fork of a process that
# has its libraries imported; anything else by the interpreter itself.
case "$1 $2" in
  "-m stages."*) exec {python} -m itm.prefork "$@" ;;
  *) exec {python} "$@" ;;
esac
"""


@contextlib.contextmanager
def warm_stages(
    environ: dict[str, str] | None = None, preloaded: Sequence[str] = PRELOADED
) -> Iterator[dict[str, str]]:
    """Start the warm process, importing `preloaded`, and yield the environment (`environ`, by default this
    process's) under which `python -m stages.<name>` runs as its fork; stop it on the way out."""
    folder = Path(tempfile.mkdtemp(prefix="itm-warm-"))  # mode 0700: the socket is this user's alone
    try:
        launcher = folder / "bin" / "python"
        launcher.parent.mkdir()
        launcher.write_text(LAUNCHER.format(python=shlex.quote(sys.executable)))
        launcher.chmod(stat.S_IRWXU)
        socket_path = folder / "socket"
        environment = dict(os.environ if environ is None else environ)
        server = subprocess.Popen(
            [sys.executable, "-m", "itm.prefork", "--serve", str(socket_path), *preloaded], env=environment
        )
        try:
            if _listening(socket_path, server):
                path = os.pathsep.join([str(launcher.parent), environment.get("PATH", "")])
                yield environment | {"PATH": path, SOCKET_VARIABLE: str(socket_path)}
            else:
                print("itm.prefork: the warm process did not start; stages run cold", file=sys.stderr)
                yield environment
        finally:
            server.terminate()
            server.wait()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _listening(socket_path: Path, server: subprocess.Popen[bytes]) -> bool:
    """Wait until the warm process listens (it binds its socket before importing anything, so stages that come
    while it imports wait in its queue); False if it ended or took over START_SECONDS."""
    deadline = time.monotonic() + START_SECONDS
    while not socket_path.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- the warm process ---------------------------------------------------------------------------------------------


def serve(socket_path: Path, preloaded: Sequence[str]) -> None:
    """Listen on `socket_path` at once (stages that come early wait in its queue), import `preloaded`, then run each
    request in a fork, one at a time (DVC runs one stage at a time)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the running stage; this process waits for it
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        binding = socket_path.with_name(f"{socket_path.name}.binding")
        listener.bind(str(binding))
        listener.listen(8)
        binding.rename(socket_path)  # the socket appears listening: a launcher never finds it refusing
        from itm import environment

        environment.pin()  # as `stages/__init__.py` does, before torch is imported
        for name in preloaded:
            importlib.import_module(name)
        if threading.active_count() != 1:
            print("itm.prefork: an import started a Python thread, which a fork would lack; stages run cold",
                  file=sys.stderr)  # fmt: skip
            return
        while True:
            connection, _ = listener.accept()
            with connection:
                _serve(connection, listener)


def _serve(connection: socket.socket, listener: socket.socket) -> None:
    try:
        request, streams = _Messages(connection).first_with_streams()
    except (OSError, ValueError):
        return  # a launcher that went away before it asked
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            listener.close()
            connection.close()
            code = _run_stage(request, streams)
        finally:
            os._exit(code)  # never back into this loop
    for descriptor in streams:
        os.close(descriptor)
    with contextlib.suppress(OSError):  # a launcher that went away before the status: it is not waiting for it
        _send(connection, {"pid": pid})
    status = _wait(pid, connection)
    with contextlib.suppress(OSError):
        _send(connection, {"status": status})


def _wait(pid: int, connection: socket.socket) -> int:
    """The fork's exit code (negative: the signal that ended it); a launcher that goes away takes its fork along."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        readable, _, _ = select.select([connection], [], [], _POLL_SECONDS)
        if readable and not _peek(connection):
            os.kill(pid, signal.SIGTERM)
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status)


def _peek(connection: socket.socket) -> bytes:
    """What waits to be read on `connection`, without reading it; nothing once the other side has closed it."""
    try:
        return connection.recv(1, socket.MSG_PEEK)
    except ConnectionError:
        return b""


def _run_stage(request: dict[str, Any], streams: Sequence[int]) -> int:
    """In the fork: become `python -m <module> <args>` started in `cwd` with `env` and the launcher's streams, run
    it, and return its exit code."""
    for target, descriptor in zip(STANDARD_STREAMS, streams, strict=True):
        os.dup2(descriptor, target)
        os.close(descriptor)
    for stream, descriptor in ((sys.stdout, 1), (sys.stderr, 2)):
        stream.reconfigure(line_buffering=os.isatty(descriptor))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    del os.environ[SOCKET_VARIABLE]  # a `python -m stages.*` the stage starts runs cold: this process waits for it
    for name in [name for name in sys.modules if name.split(".")[0] in PROJECT_PACKAGES]:
        del sys.modules[name]
    sys.path[0] = request["cwd"]
    importlib.invalidate_caches()  # the finders see the folder as it is now
    sys.argv = [request["module"], *request["args"]]
    code = 0
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except BaseException:  # what an uncaught exception does at the top of `python -m`
        traceback.print_exc()
        code = 1
    for thread in threading.enumerate():  # what interpreter shutdown does, before the exit handlers
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


# -- the launcher -------------------------------------------------------------------------------------------------


def launch(argv: Sequence[str]) -> int:
    """Run `python -m stages.<name> <args>` (argv: `-m`, module, args) in a fork of the warm process and return its
    exit code; the real interpreter runs it when the warm process does not answer."""
    module, args = argv[1], list(argv[2:])
    try:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(os.environ[SOCKET_VARIABLE])
    except (KeyError, OSError) as error:
        print(f"itm.prefork: no warm process ({error}); running {module} cold", file=sys.stderr)
        os.execv(sys.executable, [sys.executable, *argv])
    with connection:
        request = {"module": module, "args": args, "cwd": str(Path.cwd()), "env": dict(os.environ)}
        _send(connection, request, streams=STANDARD_STREAMS)
        replies = _Messages(connection)
        started = replies.next()
        if started is None:  # it stopped before forking (e.g. it found threads after its imports): nothing ran yet
            print(f"itm.prefork: the warm process did not take {module}; running it cold", file=sys.stderr)
            os.execv(sys.executable, [sys.executable, *argv])
        _forward_signals(started["pid"])
        finished = replies.next()
    if finished is None:
        print(f"itm.prefork: the warm process ended while running {module}", file=sys.stderr)
        return 1
    code = finished["status"]
    return 128 - code if code < 0 else code  # a signal's end, as the shell reports it


def _forward_signals(child: int) -> None:
    """SIGTERM and SIGHUP, which are sent to this process alone, go on to the fork; SIGINT too unless the fork is in
    this process group (a Ctrl-C on the terminal has then reached it already)."""
    forwarded = [signal.SIGTERM, signal.SIGHUP]
    try:
        own_group = os.getpgid(child) == os.getpgrp()
    except ProcessLookupError:  # it has ended already: there is nothing to pass on
        return
    if not own_group:
        forwarded.append(signal.SIGINT)
    else:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # wait for the fork's own end and status
    for number in forwarded:
        signal.signal(number, lambda received, frame: os.kill(child, received))


# -- messages: a length, then JSON; the launcher's standard streams ride on its request -----------------------------


def _send(connection: socket.socket, message: dict[str, Any], streams: Sequence[int] = ()) -> None:
    body = json.dumps(message).encode()
    data = _HEADER.pack(len(body)) + body
    if streams:
        sent = socket.send_fds(connection, [data], list(streams))  # the descriptors go with the first bytes
        data = data[sent:]
    if data:
        connection.sendall(data)


class _Messages:
    """The messages coming in on a connection, read through one buffer (two may arrive in one read)."""

    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection
        self.buffer = b""

    def first_with_streams(self) -> tuple[dict[str, Any], list[int]]:
        """The first message and the descriptors that came with it (the launcher's standard streams)."""
        data, streams, _, _ = socket.recv_fds(self.connection, 65536, len(STANDARD_STREAMS))
        if len(streams) != len(STANDARD_STREAMS):
            for descriptor in streams:
                os.close(descriptor)
            raise ValueError("a request without the launcher's standard streams")
        self.buffer += data
        message = self.next()
        if message is None:
            raise ValueError("a request cut short")
        return message, streams

    def next(self) -> dict[str, Any] | None:
        """The next message, or None when the other side closed the connection before sending it whole."""
        while True:
            if len(self.buffer) >= _HEADER.size:
                (length,) = _HEADER.unpack_from(self.buffer)
                end = _HEADER.size + length
                if len(self.buffer) >= end:
                    message, self.buffer = json.loads(self.buffer[_HEADER.size : end]), self.buffer[end:]
                    return message
            try:
                more = self.connection.recv(65536)  # retried by Python when a signal interrupts it (PEP 475)
            except ConnectionError:
                return None
            if not more:
                return None
            self.buffer += more


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--serve"]:
        serve(Path(args[1]), args[2:])
    else:
        raise SystemExit(launch(args))


if __name__ == "__main__":
    main()
