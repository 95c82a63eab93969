"""A page template that lets `dvc plots show` and `dvc plots diff` draw without the network.

DVC's plots page loads Vega, Vega-Lite and Vega-Embed from a CDN (cdn.jsdelivr.net, dvc_render/vega.py), so a
machine without the internet shows an empty page. `itm offline-plots` fetches the same releases once from the npm
registry, checks each archive against its sha256, and writes `.dvc/plots/offline.html`: DVC's own page
(`dvc_render.html.PAGE_HTML`) with the three libraries inlined where DVC's page puts its CDN tags (`{scripts}`),
so DVC has nowhere to put them. It then sets
`plots.html_template` in `.dvc/config.local` (this clone only, not committed), so every later page draws offline.
The archives stay in the download cache (data/downloads), so the command runs again without the network.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dvc_render.html import PAGE_HTML

from itm.atomic import write_text
from itm.config import DownloadParams
from itm.data.download import fetch
from itm.errors import UserError

NPM_REGISTRY = "https://registry.npmjs.org"
TEMPLATE_PATH = Path("plots") / "offline.html"  # relative to .dvc/, where DVC resolves plots.html_template


@dataclass(frozen=True)
class Library:
    """One JavaScript library of DVC's page, as its npm archive holds it."""

    name: str
    version: str  # the release dvc-render's page loads from the CDN
    sha256: str  # of the npm archive
    member: str  # its browser build inside the archive

    def url(self, registry: str) -> str:
        return f"{registry.rstrip('/')}/{self.name}/-/{self.name}-{self.version}.tgz"


LIBRARIES = (
    Library("vega", "5.20.2", "d77deab01d6104b1239228720721f93003e60797d2faced7ffdd759fa70f989d",
            "package/build/vega.min.js"),
    Library("vega-lite", "5.2.0", "f64ca4745f043447ac86b67dc9e9592ec2b85ac8b8dafc35faf970f142463e4b",
            "package/build/vega-lite.min.js"),
    Library("vega-embed", "6.18.2", "93aeee312e92077b0252ef026c0fe0ec8fa430c19825aeada6cd3a6804e68e1b",
            "package/build/vega-embed.min.js"),
)  # fmt: skip


def browser_build(archive: Path, member: str) -> str:
    """The JavaScript file `member` of the npm archive `archive` (a gzipped tar), read without extracting."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            try:
                info = tar.getmember(member)
            except KeyError:
                raise UserError(f"{archive}: no member {member!r}; not the npm archive expected") from None
            stream = tar.extractfile(info) if info.isfile() else None
            if stream is None:
                raise UserError(f"{archive}: {member} is not a regular file")
            data = stream.read()
    except (tarfile.TarError, EOFError, OSError) as error:
        raise UserError(f"{archive}: damaged archive ({error})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{archive}: {member} is not UTF-8 text") from None


def page_template(scripts: Mapping[str, str]) -> str:
    """DVC's page template with each script (name -> JavaScript) inlined in order. A `</script` inside a script
    would end its tag early; it is written `<\\/script`, which JavaScript reads as the same string."""
    escaped = {name: code.replace("</script", "<\\/script") for name, code in scripts.items()}
    blocks = [f'    <script type="text/javascript">/* {name} */\n{code}\n    </script>'
              for name, code in escaped.items()]  # fmt: skip
    return PAGE_HTML.replace("{scripts}", "\n".join(blocks).lstrip())


def write_offline_template(
    dvc_dir: Path,
    cache_dir: Path,
    *,
    registry: str = NPM_REGISTRY,
    libraries: tuple[Library, ...] = LIBRARIES,
    download: DownloadParams | None = None,
) -> Path:
    """Fetch the libraries (sha256-checked), write the template under `dvc_dir` and point DVC's local config at it;
    returns the template's path. Nothing is written unless every library arrived whole."""
    settings = download or DownloadParams()
    scripts = {}
    for library in libraries:
        archive = fetch(library.url(registry), cache_dir, sha256=library.sha256, retries=settings.retries,
                        backoff_seconds=settings.backoff_seconds, timeout_seconds=settings.timeout_seconds)  # fmt: skip
        scripts[f"{library.name}@{library.version}"] = browser_build(archive, library.member)
    path = dvc_dir / TEMPLATE_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, page_template(scripts))
    _set_local_config(dvc_dir, "plots.html_template", TEMPLATE_PATH.as_posix())
    return path


def _set_local_config(dvc_dir: Path, key: str, value: str) -> None:
    command = [sys.executable, "-m", "dvc", "config", "--local", key, value]
    done = subprocess.run(command, cwd=dvc_dir.parent, capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"dvc config --local {key} {value}: {done.stderr.strip() or 'failed'}")
