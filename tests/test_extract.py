"""`itm.data.download.extract` and `read_member`: prefixes are stripped, unsafe archives are refused whole."""

from __future__ import annotations

import io
import random
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from itm.data.download import extract, read_member
from itm.errors import UserError

FILES = {
    "top/a.jpg": b"aaa",
    "top/sub/b.jpg": b"bbbb",
    "other/c.txt": b"ignored: outside the prefix",
}


def _zip(path: Path, files: dict[str, bytes], extra: list[zipfile.ZipInfo] = ()) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("top/", b"")  # a folder entry, as zip tools write them
        for name, data in files.items():
            zf.writestr(name, data)
        for info in extra:
            zf.writestr(info, b"payload")
    return path


def _tar(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        folder = tarfile.TarInfo("./top")
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
        for name, data in files.items():
            info = tarfile.TarInfo(f"./{name}")  # `tar czf x.tgz ./top` style names
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info, io.BytesIO(b"payload") if info.isfile() else None)
    return path


def _tar_info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(b"payload") if kind == tarfile.REGTYPE else 0
    return info


def _zip_info(name: str, mode: int = stat.S_IFREG | 0o644) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    return info


@pytest.mark.parametrize("make", [_zip, _tar], ids=["zip", "tar.gz"])
def test_extracts_files_under_the_prefix_without_it(make, tmp_path):
    archive = make(tmp_path / "archive", FILES)
    extracted = extract(archive, tmp_path / "out", strip_prefix="top/", progress=False)
    assert sorted(extracted) == ["a.jpg", "sub/b.jpg"]
    assert (tmp_path / "out" / "a.jpg").read_bytes() == b"aaa"
    assert (tmp_path / "out" / "sub" / "b.jpg").read_bytes() == b"bbbb"
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")) == [
        "a.jpg",
        "sub",
        "sub/b.jpg",
    ]


@pytest.mark.parametrize("make", [_zip, _tar], ids=["zip", "tar.gz"])
def test_empty_prefix_extracts_everything(make, tmp_path):
    archive = make(tmp_path / "archive", FILES)
    assert sorted(extract(archive, tmp_path / "out", progress=False)) == sorted(FILES)


@pytest.mark.parametrize(
    ("make", "bad", "name", "reason"),
    [
        (_zip, _zip_info("../evil"), "../evil", "'..' in path"),
        (_zip, _zip_info("/abs/path"), "/abs/path", "absolute path"),
        (_zip, _zip_info("top/../../evil"), "top/../../evil", "'..' in path"),
        (_zip, _zip_info("C:/windows/evil"), "C:/windows/evil", "drive letter"),
        (_zip, _zip_info("top/link", stat.S_IFLNK | 0o777), "top/link", "symlink"),
        (_tar, _tar_info("../evil"), "../evil", "'..' in path"),
        (_tar, _tar_info("/abs/path"), "/abs/path", "absolute path"),
        (_tar, _tar_info("top/link", tarfile.SYMTYPE, "/etc/passwd"), "top/link", "symlink"),
        (_tar, _tar_info("top/hard", tarfile.LNKTYPE, "top/a.jpg"), "top/hard", "hardlink"),
        (_tar, _tar_info("top/fifo", tarfile.FIFOTYPE), "top/fifo", "device or fifo"),
    ],
    ids=[
        "zip-dotdot",
        "zip-absolute",
        "zip-nested-dotdot",
        "zip-drive",
        "zip-symlink",
        "tar-dotdot",
        "tar-absolute",
        "tar-symlink",
        "tar-hardlink",
        "tar-fifo",
    ],
)
def test_unsafe_entry_refuses_the_whole_archive(make, bad, name, reason, tmp_path):
    archive = make(tmp_path / "archive", FILES, [bad])
    with pytest.raises(UserError) as raised:
        extract(archive, tmp_path / "out" / "images", progress=False)
    message = str(raised.value)
    assert str(archive) in message
    assert f"{name!r} ({reason})" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


def test_refusal_lists_the_first_ten_entries_and_counts_the_rest(tmp_path):
    bad = [_zip_info(f"../evil{i}") for i in range(13)]
    archive = _zip(tmp_path / "archive.zip", FILES, bad)
    with pytest.raises(UserError, match=r"13 unsafe entries: .*'\.\./evil9' .* and 3 more$") as raised:
        extract(archive, tmp_path / "out", progress=False)
    assert "evil10" not in str(raised.value)


def test_not_an_archive_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(UserError, match="not a zip or tar archive"):
        extract(path, tmp_path / "out", progress=False)


def test_truncated_tar_gz_is_reported_as_damaged(tmp_path):
    noise = random.Random(0).randbytes(50_000)  # incompressible, so the cut lands inside the members
    archive = _tar(tmp_path / "archive.tgz", {f"top/{i}.bin": noise for i in range(4)})
    archive.write_bytes(archive.read_bytes()[:120_000])
    with pytest.raises(UserError, match=r"archive\.tgz: damaged tar archive"):
        extract(archive, tmp_path / "out", progress=False)


def test_read_member_returns_the_bytes(tmp_path):
    archive = _zip(tmp_path / "caption_datasets.zip", FILES)
    assert read_member(archive, "top/sub/b.jpg") == b"bbbb"


def test_read_member_missing_names_what_is_there(tmp_path):
    archive = _zip(tmp_path / "caption_datasets.zip", FILES)
    with pytest.raises(UserError, match=r"no member 'dataset_coco\.json' \(it has: top/a\.jpg, top/sub/b\.jpg"):
        read_member(archive, "dataset_coco.json")
