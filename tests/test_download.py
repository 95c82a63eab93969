"""`itm.data.download.fetch` against a local server that drops connections, ignores ranges and fails."""

from __future__ import annotations

import hashlib
import logging
import socket
from pathlib import Path

import pytest

from itm.data import download
from itm.data.download import cache_path, fetch
from itm.errors import UserError
from tests.http_server import (  # noqa: F401 - http_server_fixture provides the `http_server` fixture
    drop_after,
    http_server_fixture,
    ignore_range,
    stall,
    status,
    wrong_content,
)

DATA = bytes(range(256)) * 1000  # 256,000 bytes
MD5 = hashlib.md5(DATA).hexdigest()
SHA256 = hashlib.sha256(DATA).hexdigest()


@pytest.fixture(autouse=True)
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record back-off delays instead of waiting."""
    delays: list[float] = []
    monkeypatch.setattr(download, "_sleep", delays.append)
    return delays


def _fetch(url: str, cache: Path, **options) -> Path:
    defaults = {"size": len(DATA), "md5": MD5, "retries": 3, "backoff_seconds": 0.5, "progress": False}
    return fetch(url, cache, **{**defaults, **options})


def _leftovers(cache: Path) -> list[str]:
    """The names of the files in the cache, in any of its folders; an empty folder is named too."""
    found = cache.rglob("*") if cache.exists() else []
    return sorted(path.name for path in found if path.is_file() or not any(path.iterdir()))


def _in_cache(url: str, cache: Path, name: str) -> Path:
    """The file `name` in the cache folder of `url`, its folder created."""
    folder = cache_path(url, cache).parent
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def test_clean_download_is_verified_and_named_after_the_url(http_server, tmp_path):
    url = http_server.add("/files/data.bin", DATA)
    path = _fetch(url, tmp_path / "cache", sha256=SHA256)
    assert path == cache_path(url, tmp_path / "cache") and path.name == "data.bin"
    assert path.read_bytes() == DATA
    assert http_server.ranges("/files/data.bin") == [None]
    assert _leftovers(tmp_path / "cache") == ["data.bin"]


def test_resumes_after_a_dropped_connection(http_server, tmp_path, sleeps):
    url = http_server.add("/data.bin", DATA, faults=[drop_after(100_000)])
    path = _fetch(url, tmp_path)
    assert http_server.ranges("/data.bin") == [None, "bytes=100000-"]
    assert path.read_bytes() == DATA
    assert sleeps == [0.5]


def test_backoff_doubles_and_each_retry_resumes_from_disk(http_server, tmp_path, sleeps):
    url = http_server.add("/data.bin", DATA, faults=[drop_after(1000), status(503), drop_after(2000)])
    path = _fetch(url, tmp_path)
    assert http_server.ranges("/data.bin") == [None, "bytes=1000-", "bytes=1000-", "bytes=3000-"]
    assert path.read_bytes() == DATA
    assert sleeps == [0.5, 1.0, 2.0]


def test_server_ignoring_range_restarts_from_zero(http_server, tmp_path):
    url = http_server.add("/data.bin", DATA, faults=[drop_after(50_000), ignore_range()])
    path = _fetch(url, tmp_path)
    assert http_server.ranges("/data.bin") == [None, "bytes=50000-"]
    assert path.read_bytes() == DATA


def test_partial_file_already_complete_gets_416_and_is_accepted(http_server, tmp_path):
    url = http_server.add("/data.bin", DATA)
    _in_cache(url, tmp_path, "data.bin.part").write_bytes(DATA)
    path = _fetch(url, tmp_path)
    assert http_server.ranges("/data.bin") == [f"bytes={len(DATA)}-"]
    assert path.read_bytes() == DATA


def test_partial_file_longer_than_the_remote_restarts(http_server, tmp_path):
    url = http_server.add("/data.bin", DATA)
    _in_cache(url, tmp_path, "data.bin.part").write_bytes(DATA + b"junk")
    path = _fetch(url, tmp_path)
    assert http_server.ranges("/data.bin") == [f"bytes={len(DATA) + 4}-", None]
    assert path.read_bytes() == DATA


def test_two_503_then_success(http_server, tmp_path, sleeps, caplog):
    url = http_server.add("/data.bin", DATA, faults=[status(503), status(503)])
    with caplog.at_level(logging.WARNING, logger="itm.data.download"):
        path = _fetch(url, tmp_path)
    assert path.read_bytes() == DATA
    assert len(http_server.ranges("/data.bin")) == 3
    assert sleeps == [0.5, 1.0]
    assert sum("HTTP 503" in message for message in caplog.messages) == 2


def test_read_timeout_is_retried(http_server, tmp_path):
    url = http_server.add("/data.bin", DATA, faults=[stall(1.0)])
    path = _fetch(url, tmp_path, timeout_seconds=0.2)
    assert path.read_bytes() == DATA
    assert len(http_server.ranges("/data.bin")) == 2


def test_retries_exhausted_raises_and_leaves_nothing(http_server, tmp_path, sleeps):
    url = http_server.add("/data.bin", DATA, faults=[status(503)] * 10)
    with pytest.raises(UserError, match=r"after 4 attempt\(s\).*HTTP 503") as raised:
        _fetch(url, tmp_path / "cache")
    assert url in str(raised.value)
    assert "\n" not in str(raised.value)
    assert len(http_server.ranges("/data.bin")) == 4
    assert sleeps == [0.5, 1.0, 2.0]
    assert _leftovers(tmp_path / "cache") == []


def test_dropped_every_time_keeps_the_partial_for_the_next_run(http_server, tmp_path):
    url = http_server.add("/data.bin", DATA, faults=[drop_after(10_000)] * 2)
    with pytest.raises(UserError, match="connection dropped"):
        _fetch(url, tmp_path, retries=1)
    assert _leftovers(tmp_path) == ["data.bin.part"]
    path = _fetch(url, tmp_path)
    assert http_server.ranges("/data.bin")[-1] == "bytes=20000-"
    assert path.read_bytes() == DATA


def test_checksum_mismatch_every_time_raises_and_leaves_nothing(http_server, tmp_path):
    url = http_server.add("/data.bin", DATA, faults=[wrong_content()] * 10)
    with pytest.raises(
        UserError, match=rf"after 2 attempt\(s\).*checksum mismatch: expected md5 {MD5}, got [0-9a-f]{{32}}"
    ):
        _fetch(url, tmp_path, retries=1)
    assert _leftovers(tmp_path) == []


def test_checksum_mismatch_once_starts_over_from_zero(http_server, tmp_path):
    url = http_server.add("/data.bin", DATA, faults=[wrong_content()])
    path = _fetch(url, tmp_path)
    assert http_server.ranges("/data.bin") == [None, None]
    assert path.read_bytes() == DATA


def test_size_reported_by_server_differs_from_params(http_server, tmp_path):
    url = http_server.add("/data.bin", DATA)
    with pytest.raises(UserError, match=r"size mismatch: expected 999 bytes, server reports 256000"):
        _fetch(url, tmp_path, size=999, md5=None, retries=0)
    assert _leftovers(tmp_path) == []


def test_404_fails_without_retrying(http_server, tmp_path, sleeps):
    url = http_server.url("/missing.bin")
    with pytest.raises(UserError, match=r"missing\.bin: HTTP 404"):
        _fetch(url, tmp_path)
    assert len(http_server.ranges("/missing.bin")) == 1
    assert sleeps == []


def test_connection_refused_is_retried_then_reported(tmp_path, sleeps):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(UserError, match=r"after 3 attempt\(s\).*connection failed"):
        _fetch(f"http://127.0.0.1:{port}/data.bin", tmp_path, retries=2)
    assert sleeps == [0.5, 1.0]


def test_verified_cached_file_is_reused_without_a_request(http_server, tmp_path):
    url = http_server.add("/data.bin", DATA)
    _in_cache(url, tmp_path, "data.bin").write_bytes(DATA)
    assert _fetch(url, tmp_path).read_bytes() == DATA
    assert http_server.requests == []


def test_cached_file_that_no_longer_verifies_is_downloaded_again(http_server, tmp_path):
    url = http_server.add("/data.bin", DATA)
    _in_cache(url, tmp_path, "data.bin").write_bytes(b"x" * len(DATA))
    assert _fetch(url, tmp_path).read_bytes() == DATA
    assert http_server.ranges("/data.bin") == [None]


def test_url_filename_is_sanitised(http_server, tmp_path):
    url = http_server.add("/dir/we%20ird%3Bname.zip", DATA)
    assert _fetch(url, tmp_path).name == "we_ird_name.zip"


def test_missing_checksum_logs_a_warning(http_server, tmp_path, caplog):
    url = http_server.add("/data.bin", DATA)
    with caplog.at_level(logging.WARNING, logger="itm.data.download"):
        _fetch(url, tmp_path, md5=None)
    assert any("not verified by checksum" in message for message in caplog.messages)


def test_local_file_is_verified_and_returned_in_place(tmp_path):
    source = tmp_path / "local.bin"
    source.write_bytes(DATA)
    assert _fetch(str(source), tmp_path / "cache") == source
    assert _fetch(source.as_uri(), tmp_path / "cache", sha256=SHA256) == source
    assert not (tmp_path / "cache").exists()


def test_local_file_with_wrong_md5_is_refused(tmp_path):
    source = tmp_path / "local.bin"
    source.write_bytes(DATA)
    with pytest.raises(UserError, match=rf"local\.bin: checksum mismatch: expected md5 {'0' * 32}, got {MD5}"):
        _fetch(str(source), tmp_path / "cache", md5="0" * 32)


def test_missing_local_file_is_named(tmp_path):
    with pytest.raises(UserError, match=r"nowhere\.zip: file not found"):
        _fetch(str(tmp_path / "nowhere.zip"), tmp_path / "cache")
