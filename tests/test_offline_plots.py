"""`itm offline-plots`: DVC's plots page with Vega, Vega-Lite and Vega-Embed inlined, fetched from an npm registry
(here a loopback server holding archives shaped like npm's) and checked by sha256."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dvc_render.html import HTML
from dvc_render.vega import VegaRenderer

from itm import commands
from itm.config import DownloadParams
from itm.errors import UserError
from itm.offline_plots import LIBRARIES, TEMPLATE_PATH, Library, browser_build, write_offline_template
from tests.http_server import http_server_fixture  # noqa: F401 - provides the `http_server` fixture
from tests.test_karpathy import tar_gz_bytes  # a gzipped tar, as npm serves a package (files under package/)


def _registry(http_server, scripts: dict[str, bytes] | None = None) -> tuple[str, tuple[Library, ...]]:
    """A registry serving an archive for each library (with `scripts[name]` as its browser build), and the
    libraries with those archives' checksums."""
    libraries = []
    for library in LIBRARIES:
        code = (scripts or {}).get(library.name, f"window.{library.name.replace('-', '_')} = 1;".encode())
        archive = tar_gz_bytes({library.member: code, "package/package.json": b"{}"})
        http_server.add(f"/{library.name}/-/{library.name}-{library.version}.tgz", archive)
        libraries.append(Library(library.name, library.version, hashlib.sha256(archive).hexdigest(), library.member))
    return http_server.url(""), tuple(libraries)


def test_the_libraries_are_the_releases_dvcs_page_loads() -> None:
    """A new dvc-render that loads other releases fails here, so the pinned archives follow it."""
    loaded = dict(re.findall(r"npm/([a-z-]+)@([\d.]+)", VegaRenderer.SCRIPTS))
    assert loaded == {library.name: library.version for library in LIBRARIES}


def test_the_template_inlines_every_library_and_dvc_adds_no_cdn(http_server, tmp_path: Path) -> None:
    (tmp_path / ".dvc").mkdir()
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "-f"], cwd=tmp_path, check=True)
    registry, libraries = _registry(http_server, {"vega": b"var tag = '</script>'; window.vega = 1;"})
    path = write_offline_template(tmp_path / ".dvc", tmp_path / "cache", registry=registry, libraries=libraries)
    assert path == tmp_path / ".dvc" / TEMPLATE_PATH
    template = path.read_text()
    assert "var tag = '<\\/script>'" in template  # would otherwise end the script element early
    assert template.count("<script") == template.count("</script>") == 3
    page = HTML(template).with_scripts(VegaRenderer.SCRIPTS).with_element('<div id="plot0"></div>').embed()
    assert "cdn.jsdelivr.net" not in page and "https://" not in page and '<div id="plot0"></div>' in page
    configured = subprocess.run([sys.executable, "-m", "dvc", "config", "plots.html_template"], cwd=tmp_path,
                                capture_output=True, text=True, check=True)  # fmt: skip
    assert configured.stdout.strip() == TEMPLATE_PATH.as_posix()


def test_an_archive_that_fails_its_checksum_writes_nothing(http_server, tmp_path: Path) -> None:
    registry, libraries = _registry(http_server)
    tampered = (*libraries[:2], Library(libraries[2].name, libraries[2].version, "0" * 64, libraries[2].member))
    dvc_dir = tmp_path / ".dvc"
    dvc_dir.mkdir()
    with pytest.raises(UserError, match="sha256"):
        write_offline_template(dvc_dir, tmp_path / "cache", registry=registry, libraries=tampered,
                               download=DownloadParams(retries=0))  # fmt: skip
    assert not (dvc_dir / TEMPLATE_PATH).exists()


def test_an_archive_without_the_build_is_named(tmp_path: Path) -> None:
    archive = tmp_path / "vega-5.20.2.tgz"
    archive.write_bytes(tar_gz_bytes({"package/package.json": b"{}"}))
    with pytest.raises(UserError, match=r"vega-5.20.2.tgz: no member 'package/build/vega.min.js'"):
        browser_build(archive, "package/build/vega.min.js")
    archive.write_bytes(b"not a tar")
    with pytest.raises(UserError, match="damaged archive"):
        browser_build(archive, "package/build/vega.min.js")


def test_the_command_outside_a_dvc_repository_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        commands.main(["offline-plots"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().endswith("not inside a DVC repository (no .dvc folder above it)")
