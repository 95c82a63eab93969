"""Fetch dataset files over HTTP (or take them from a local path) and unpack archives safely.

Datasets are large (COCO's train2014.zip is 13.5 GB) and their hosts are unreliable, so a fetch resumes a
partial download, retries transient failures with back-off, and verifies size and checksums before a file
takes its final name in the cache. The cache is keyed by the source (`<cache>/<digest of the URL>/<file name>`),
so a file at its final name is the complete download of that very URL and a later run reuses it without a request;
it is called verified only when a checksum was given and matched. A full disk is not retried: it is one
`UserError`, and the partial download is kept to resume from. Archives come from third parties, so `extract`
refuses any archive with an entry that could write outside the target folder (absolute paths, `..`, links,
devices) before writing anything.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import logging
import lzma
import os
import re
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from itm.atomic import is_disk_fault
from itm.errors import UserError

log = logging.getLogger(__name__)

# Replaced by tests to make back-off instant.
_sleep: Callable[[float], None] = time.sleep

_CHUNK = 1 << 20  # bytes per read and per hashing step
_RETRY_STATUS = frozenset({408, 429})  # plus every 5xx
_USER_AGENT = "itm-download/1.0 (+urllib)"
_SHOWN_ENTRIES = 10  # offending archive entries named in a refusal


@dataclass(frozen=True)
class _Expected:
    """What a fetched file must match; None means unknown."""

    size: int | None = None
    md5: str | None = None
    sha256: str | None = None

    @property
    def has_checksum(self) -> bool:
        return self.md5 is not None or self.sha256 is not None


class _AttemptError(Exception):
    """A transient failure: the attempt may be repeated. `reason` is a short human-readable cause."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- fetch ----------------------------------------------------------------------------------------------------------


def fetch(
    source: str,
    cache_dir: Path,
    *,
    size: int | None = None,
    md5: str | None = None,
    sha256: str | None = None,
    retries: int = 5,
    backoff_seconds: float = 2.0,
    timeout_seconds: float = 60.0,
    progress: bool = True,
) -> Path:
    """Return a local copy of `source` (an http(s) URL, a `file://` URL or a local path), verified by the size and
    checksums given (without a checksum, it is not verified by content).

    A URL is downloaded to `cache_path(source, cache_dir)`, resuming an earlier partial download and retrying
    transient failures `retries` times; a complete download of the same URL already in the cache is reused without
    a request (after checking the size and checksums given now). A local file is verified and returned as is. Any
    failure the user must fix (missing file, HTTP 4xx, checksum mismatch after all retries, a full disk) raises
    `UserError`.
    """
    expected = _Expected(size=size, md5=md5.lower() if md5 else None, sha256=sha256.lower() if sha256 else None)
    if not expected.has_checksum:
        log.warning("%s: no md5 or sha256 given, so the file is not verified by checksum", source)
    if not _is_http(source):
        return _fetch_local(_local_path(source), expected)
    final = cache_path(source, cache_dir)
    if _reusable(final, expected) or _adopt_unkeyed(Path(cache_dir), final, expected):
        if expected.has_checksum:
            log.info("%s: using the verified copy at %s", source, final)
        else:
            log.info("%s: using the copy downloaded earlier from this URL at %s (not verified: no checksum)", source,
                     final)  # fmt: skip
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        _download(source, final, expected, retries, backoff_seconds, timeout_seconds, progress)
    except BaseException:
        with contextlib.suppress(OSError):  # this URL's folder, unless it keeps a partial download to resume
            final.parent.rmdir()
        raise
    return final


def cache_path(source: str, cache_dir: Path) -> Path:
    """Where the download of the URL `source` is kept: `cache_dir/<16 hex digits of its sha256>/<file name>`. The
    folder keys the cache by the whole URL, so two URLs ending in the same file name never share a copy."""
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    return Path(cache_dir) / key / _cache_name(source)


def _is_http(source: str) -> bool:
    return urllib.parse.urlsplit(source).scheme.lower() in ("http", "https")


def _local_path(source: str) -> Path:
    parts = urllib.parse.urlsplit(source)
    if parts.scheme.lower() == "file":
        return Path(urllib.request.url2pathname(parts.path))
    return Path(source).expanduser()


def _fetch_local(path: Path, expected: _Expected) -> Path:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    problem = _verify(path, expected)
    if problem is not None:
        raise UserError(f"{path}: {problem}")
    return path


def _cache_name(url: str) -> str:
    """A safe file name for `url` in the cache: the last path segment with unusual characters replaced."""
    segment = urllib.parse.unquote(urllib.parse.urlsplit(url).path).rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", segment).lstrip(".")
    return name or "download"


def _adopt_unkeyed(cache_dir: Path, final: Path, expected: _Expected) -> bool:
    """Move a download the cache kept by file name alone (`cache_dir/<file name>`, its layout before it was keyed
    by URL) to `final`, when a checksum given now proves that it is the wanted file: a large download survives the
    change of layout. Without a checksum it could be any URL's file of that name, so it is left alone."""
    unkeyed = cache_dir / final.name
    if not expected.has_checksum or not unkeyed.is_file() or _verify(unkeyed, expected) is not None:
        return False
    final.parent.mkdir(parents=True, exist_ok=True)
    unkeyed.replace(final)
    log.info("%s: verified, moved to %s", unkeyed, final)
    return True


def _reusable(final: Path, expected: _Expected) -> bool:
    """Whether the cached `final` still matches `expected` (which may have changed since it was stored)."""
    if not final.is_file():
        return False
    problem = _verify(final, expected)
    if problem is None:
        return True
    log.warning("%s: cached file no longer verifies (%s); downloading it again", final, problem)
    final.unlink()
    return False


def _download(
    url: str,
    final: Path,
    expected: _Expected,
    retries: int,
    backoff_seconds: float,
    timeout_seconds: float,
    progress: bool,
) -> None:
    """Download `url` into `final`, retrying transient failures; `final` appears only once verified."""
    part = final.with_name(final.name + ".part")
    attempts = retries + 1
    for attempt in range(1, attempts + 1):
        try:
            total = _attempt(url, part, expected, timeout_seconds, progress)
            problem = _verify(part, expected, server_size=total)
            if problem is not None:
                part.unlink(missing_ok=True)  # bad bytes cannot be resumed from: the next attempt starts over
                raise _AttemptError(problem)
        except _AttemptError as failure:
            if attempt == attempts:
                _discard_if_empty(part)
                raise UserError(
                    f"{url}: download failed after {attempts} attempt(s); last reason: {failure.reason}"
                ) from None
            delay = backoff_seconds * 2 ** (attempt - 1)
            log.warning(
                "%s: attempt %d of %d failed (%s); retrying in %.1f s", url, attempt, attempts, failure.reason, delay
            )
            _sleep(delay)
            continue
        part.replace(final)
        return


def _discard_if_empty(part: Path) -> None:
    """Keep a partial download with data for the next run to resume; an empty one is just clutter."""
    if part.is_file() and part.stat().st_size == 0:
        part.unlink()


def _attempt(url: str, part: Path, expected: _Expected, timeout: float, progress: bool) -> int | None:
    """One request that appends to `part` until the server's body ends; returns the file's total size if known.

    Transient problems raise `_AttemptError`; client errors (4xx other than 408/429) and a full disk raise
    `UserError`.
    """
    offset = part.stat().st_size if part.is_file() else 0
    try:
        try:
            response = _open(url, offset, timeout)
        except _RangeNotSatisfiableError as refusal:
            if refusal.total == offset or (refusal.total is None and expected.size == offset):
                return offset  # `part` already holds the whole file
            log.warning("%s: server cannot resume at byte %d; downloading from the start", url, offset)
            part.unlink()
            offset = 0
            response = _open(url, offset, timeout)
        with response:
            return _receive(url, response, part, offset, expected, progress)
    except urllib.error.HTTPError as error:
        raise _AttemptError(f"HTTP {error.code} {error.reason}") from None
    except OSError as error:
        if is_disk_fault(error):  # writing `part`: waiting cannot make room
            reason = error.strerror or os.strerror(error.errno or 0)
            raise UserError(
                f"{part}: {reason} while downloading {url}; make room on its disk and run again: the partial "
                "download is kept and resumes"
            ) from None
        raise _AttemptError(_describe_network_error(error)) from None
    except http.client.HTTPException as error:
        raise _AttemptError(_describe_network_error(error)) from None


class _RangeNotSatisfiableError(Exception):
    """HTTP 416 to a resume request: the partial file is at least as long as the server's; `total` if known."""

    def __init__(self, total: int | None) -> None:
        super().__init__(total)
        self.total = total


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    """Send the request, with a Range header when resuming from `offset`."""
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and offset:
            raise _RangeNotSatisfiableError(_unsatisfied_total(error.headers.get("Content-Range"))) from None
        if error.code >= 500 or error.code in _RETRY_STATUS:
            raise
        raise UserError(f"{url}: HTTP {error.code} {error.reason}") from None


def _receive(
    url: str, response: http.client.HTTPResponse, part: Path, offset: int, expected: _Expected, progress: bool
) -> int | None:
    """Stream the body into `part` (appending when the server honoured the Range); returns the total size."""
    if response.status == 206:
        start, total = _content_range(response.headers.get("Content-Range"))
        if start is None:
            part.unlink(missing_ok=True)
            raise _AttemptError("partial response without a valid Content-Range")
        if start != offset:
            part.unlink(missing_ok=True)
            raise _AttemptError(f"server resumed at byte {start} instead of {offset}")
    else:
        if offset:
            log.warning("%s: server ignored the Range request; downloading from the start", url)
        offset = 0
        total = _int_or_none(response.headers.get("Content-Length"))
    if expected.size is not None and total is not None and total != expected.size:
        part.unlink(missing_ok=True)
        raise _AttemptError(f"size mismatch: expected {expected.size} bytes, server reports {total}")
    written = _stream(response, part, offset, total, progress)
    if total is not None and written < total:
        raise _AttemptError(f"connection dropped after {written} of {total} bytes")
    return total


def _stream(response: http.client.HTTPResponse, part: Path, offset: int, total: int | None, progress: bool) -> int:
    """Append the body to `part` (truncating it first when `offset` is 0); returns the bytes now in `part`."""
    written = offset
    with (
        part.open("ab" if offset else "wb") as out,
        tqdm(
            total=total,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name.removesuffix(".part"),
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        while chunk := response.read(_CHUNK):
            out.write(chunk)
            written += len(chunk)
            bar.update(len(chunk))
    return written


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from `Content-Range: bytes first-last/total`; None where absent or `*`."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", header or "")
    if match is None:
        return None, None
    return int(match.group(1)), _int_or_none(match.group(2))


def _unsatisfied_total(header: str | None) -> int | None:
    """The total size from a 416's `Content-Range: bytes */total`, if present."""
    match = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", header or "")
    return int(match.group(1)) if match else None


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text is not None and text.strip().isdigit() else None


def _describe_network_error(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, urllib.error.URLError):
        reason = error.reason
        return "timed out" if isinstance(reason, TimeoutError) else f"connection failed: {reason}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


# --- verification ---------------------------------------------------------------------------------------------------


def _verify(path: Path, expected: _Expected, *, server_size: int | None = None) -> str | None:
    """None if `path` matches what is expected of it, else a one-line description of the first mismatch."""
    actual = path.stat().st_size
    for label, wanted in (("expected", expected.size), ("server reported", server_size)):
        if wanted is not None and actual != wanted:
            return f"size mismatch: {label} {wanted} bytes, got {actual}"
    if not expected.has_checksum:
        return None
    digests = _digests(path, md5=expected.md5 is not None, sha256=expected.sha256 is not None)
    for algorithm, wanted in (("md5", expected.md5), ("sha256", expected.sha256)):
        if wanted is not None and digests[algorithm] != wanted:
            return f"checksum mismatch: expected {algorithm} {wanted}, got {digests[algorithm]}"
    return None


def _digests(path: Path, *, md5: bool, sha256: bool) -> dict[str, str]:
    """The requested hex digests of `path`, computed in one pass."""
    hashers = {}
    if md5:
        hashers["md5"] = hashlib.md5(usedforsecurity=False)
    if sha256:
        hashers["sha256"] = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            for hasher in hashers.values():
                hasher.update(chunk)
    return {name: hasher.hexdigest() for name, hasher in hashers.items()}


# --- archives -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """One archive member, reduced to what the safety check and the extraction need."""

    name: str
    kind: str  # "file", "dir", "symlink", "hardlink" or "special" (device, fifo, ...)
    handle: zipfile.ZipInfo | tarfile.TarInfo


def extract(archive: Path, target: Path, *, strip_prefix: str = "", progress: bool = True) -> list[str]:
    """Unpack the regular files of a zip or tar `archive` under `strip_prefix` into `target`, prefix removed.

    The whole archive is refused with a `UserError` listing the offending entries, before anything is written,
    if any entry could escape `target` or is not a plain file or folder. Returns the extracted relative paths.
    """
    if zipfile.is_zipfile(archive):
        return _extract_zip(archive, target, strip_prefix, progress)
    if tarfile.is_tarfile(archive):
        return _extract_tar(archive, target, strip_prefix, progress)
    raise UserError(f"{archive}: not a zip or tar archive (or it is damaged)")


def _extract_zip(archive: Path, target: Path, strip_prefix: str, progress: bool) -> list[str]:
    try:
        with zipfile.ZipFile(archive) as zf:
            selected = _select(archive, [_zip_entry(info) for info in zf.infolist()], strip_prefix)
            for relative, entry in tqdm(selected, desc=f"extract {archive.name}", unit="file", disable=not progress):
                destination = _prepare_destination(target, relative)
                with zf.open(entry.handle) as source, destination.open("wb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
    except (zipfile.BadZipFile, EOFError) as error:
        raise UserError(f"{archive}: damaged zip archive ({error})") from None
    return [relative for relative, _ in selected]


def _extract_tar(archive: Path, target: Path, strip_prefix: str, progress: bool) -> list[str]:
    try:
        with tarfile.open(archive) as tf:
            selected = _select(archive, [_tar_entry(info) for info in tf.getmembers()], strip_prefix)
            for relative, entry in tqdm(selected, desc=f"extract {archive.name}", unit="file", disable=not progress):
                _prepare_destination(target, relative)
                # The "data" filter re-checks paths and links: a second line of defence behind `_select`.
                tf.extract(entry.handle.replace(name=relative, deep=False), target, filter="data")
    except tarfile.FilterError as error:
        raise UserError(f"{archive}: refusing to extract: {error}") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as error:
        raise UserError(f"{archive}: damaged tar archive ({error})") from None
    return [relative for relative, _ in selected]


def _zip_entry(info: zipfile.ZipInfo) -> _Entry:
    mode = info.external_attr >> 16  # unix mode bits, when the archive was made on unix
    if stat.S_ISLNK(mode):
        kind = "symlink"
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        kind = "special"
    else:
        kind = "dir" if info.is_dir() else "file"
    return _Entry(info.filename, kind, info)


def _tar_entry(info: tarfile.TarInfo) -> _Entry:
    if info.issym():
        kind = "symlink"
    elif info.islnk():
        kind = "hardlink"
    elif info.isdir():
        kind = "dir"
    elif info.isfile():
        kind = "file"
    else:
        kind = "special"
    return _Entry(info.name, kind, info)


def _select(archive: Path, entries: list[_Entry], strip_prefix: str) -> list[tuple[str, _Entry]]:
    """(relative path, entry) of the files to extract, after refusing the archive if any entry is unsafe."""
    problems = [f"{entry.name!r} ({problem})" for entry in entries if (problem := _unsafe(entry)) is not None]
    if problems:
        shown = ", ".join(problems[:_SHOWN_ENTRIES])
        more = f" and {len(problems) - _SHOWN_ENTRIES} more" if len(problems) > _SHOWN_ENTRIES else ""
        raise UserError(f"{archive}: refusing to extract: {len(problems)} unsafe entries: {shown}{more}")
    selected = []
    for entry in entries:
        name = _normalise(entry.name)
        if entry.kind == "file" and name.startswith(strip_prefix):
            relative = name[len(strip_prefix) :].lstrip("/")
            if relative:
                selected.append((relative, entry))
    return selected


def _unsafe(entry: _Entry) -> str | None:
    """Why extracting `entry` could be harmful, or None if it is safe."""
    name = entry.name.replace("\\", "/")
    if name.startswith("/"):
        return "absolute path"
    if re.match(r"^[A-Za-z]:", name):
        return "drive letter"
    if ".." in name.split("/"):
        return "'..' in path"
    if entry.kind in ("symlink", "hardlink"):
        return entry.kind
    if entry.kind == "special":
        return "device or fifo"
    return None


def _normalise(name: str) -> str:
    """The member name without empty and `.` components (`./a//b` -> `a/b`)."""
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def _prepare_destination(target: Path, relative: str) -> Path:
    destination = target / relative
    destination.parent.mkdir(parents=True, exist_ok=True)
    return destination


def read_member(archive: Path, member: str) -> bytes:
    """The bytes of one file inside a zip archive, e.g. `dataset_flickr30k.json` in `caption_datasets.zip`."""
    if not zipfile.is_zipfile(archive):
        raise UserError(f"{archive}: not a zip archive, so member {member!r} cannot be read from it")
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            if member not in names:
                files = [name for name in names if not name.endswith("/")]
                shown = ", ".join(files[:_SHOWN_ENTRIES]) + (" ..." if len(files) > _SHOWN_ENTRIES else "")
                raise UserError(f"{archive}: no member {member!r} (it has: {shown or 'no files'})")
            return zf.read(member)
    except (zipfile.BadZipFile, EOFError) as error:
        raise UserError(f"{archive}: damaged zip archive ({error})") from None
