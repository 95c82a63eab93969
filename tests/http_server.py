"""A local HTTP file server for download tests: in-memory files, Range support and scripted faults.

Each path has a queue of faults; every request for the path consumes the next one (a request with an empty
queue is served normally). Every request is recorded with its Range header, so tests can check that a resume
asked for the right bytes. Import `http_server_fixture` into a test module to get the `http_server` fixture:

    from tests.http_server import drop_after, http_server_fixture  # noqa: F401

    def test_resume(http_server):
        url = http_server.add("/a.bin", data, faults=[drop_after(100)])
        ...
        assert http_server.ranges("/a.bin") == [None, "bytes=100-"]
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour for one request."""

    kind: str  # "drop_after", "status", "ignore_range", "wrong_content" or "stall"
    value: float = 0


def drop_after(n_bytes: int) -> Fault:
    """Send the headers with the full Content-Length, then close the connection after `n_bytes` of body."""
    return Fault("drop_after", n_bytes)


def status(code: int) -> Fault:
    """Answer with this HTTP status and an empty body."""
    return Fault("status", code)


def ignore_range() -> Fault:
    """Answer a Range request with 200 and the whole body."""
    return Fault("ignore_range")


def wrong_content() -> Fault:
    """Serve different bytes of the same length."""
    return Fault("wrong_content")


def stall(seconds: float) -> Fault:
    """Send the headers, then wait `seconds` before the body (to trigger a client read timeout)."""
    return Fault("stall", seconds)


@dataclass(frozen=True)
class Request:
    """A request as the server saw it."""

    path: str
    range: str | None


class FileServer:
    """The state behind the handler: files, fault queues and the request log, shared across threads."""

    def __init__(self) -> None:
        self._files: dict[str, bytes] = {}
        self._faults: dict[str, list[Fault]] = {}
        self._requests: list[Request] = []
        self._lock = threading.Lock()
        self.base_url = ""

    def add(self, path: str, data: bytes, faults: Iterable[Fault] = ()) -> str:
        """Serve `data` at `path` (faults first, in order); returns its URL."""
        with self._lock:
            self._files[path] = data
            self._faults[path] = list(faults)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    def ranges(self, path: str) -> list[str | None]:
        """The Range header of each request for `path`, in order (None for a request without one)."""
        return [request.range for request in self.requests if request.path == path]

    def _take(self, path: str, range_header: str | None) -> tuple[bytes | None, Fault | None]:
        with self._lock:
            self._requests.append(Request(path, range_header))
            queue = self._faults.get(path, [])
            return self._files.get(path), (queue.pop(0) if queue else None)


class _Handler(BaseHTTPRequestHandler):
    server_state: FileServer  # set on the per-server subclass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        requested_range = self.headers.get("Range")
        data, fault = self.server_state._take(path, requested_range)
        kind = fault.kind if fault else None
        if data is None:
            self._empty(404)
        elif kind == "status":
            self._empty(int(fault.value))
        else:
            if kind == "wrong_content":
                data = bytes(byte ^ 0xFF for byte in data)
            self._send(data, None if kind == "ignore_range" else requested_range, fault)

    def _send(self, data: bytes, requested_range: str | None, fault: Fault | None) -> None:
        start = _range_start(requested_range)
        if start is not None and start >= len(data):
            self._empty(416, {"Content-Range": f"bytes */{len(data)}"})
            return
        if start is None:
            self.send_response(200)
            body = data
        else:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault is not None and fault.kind == "stall":
            self.wfile.flush()
            time.sleep(fault.value)
        if fault is not None and fault.kind == "drop_after":
            self.wfile.write(body[: int(fault.value)])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)

    def _empty(self, code: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""


def _range_start(header: str | None) -> int | None:
    """N from `bytes=N-` (the only form the downloader sends); None without a Range header."""
    if header is None:
        return None
    match = re.fullmatch(r"bytes=(\d+)-", header.strip())
    return int(match.group(1)) if match else None


@pytest.fixture(name="http_server")
def http_server_fixture() -> Iterator[FileServer]:
    """A `FileServer` listening on 127.0.0.1 for the duration of one test."""
    state = FileServer()
    handler = type("Handler", (_Handler,), {"server_state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    state.base_url = f"http://{host}:{port}"
    # A short poll interval keeps shutdown (once per test) fast.
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), name="test-http-server", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
