"""Archives that try to write outside their directory (issue 7, item 3).

tests/nodes/test_packages.py covers the classic cases (``..``, absolute
paths, symlinks to ``/etc`` or ``../..``, writing through a symlink, hard
links out, devices, zip ``..``/absolute names and an absolute zip symlink).
Here is what it does not: Windows separators and drive letters, a relative
zip symlink out, hard links to symlinks and directories, a member replacing an
earlier regular file by a symlink, and two holes found for issue 7 and fixed
in ``nodes/packages.py``: a symlink whose target climbs
through a symlink that comes *later* in the archive, and a directory member
whose chmod follows a symlink left in the destination by an earlier package
(every package of an application is unpacked into the same directory).
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile

import pytest

from nodes.packages import UnsafeArchive, safe_extract


def add_file(tf, name: str, data: bytes = b"x", mode: int = 0o644) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode = len(data), mode
    tf.addfile(ti, io.BytesIO(data))


def add_link(tf, name: str, target: str, kind=tarfile.SYMTYPE) -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, target
    tf.addfile(ti)


def add_dir(tf, name: str, mode: int = 0o755) -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode = tarfile.DIRTYPE, mode
    tf.addfile(ti)


def make_tar(path, *members):
    with tarfile.open(path, "w") as tf:
        for add, *args in members:
            add(tf, *args)
    return path


def escapes(dest, rel: str) -> bool:
    real, root = os.path.realpath(dest / rel), os.path.realpath(dest)
    return os.path.commonpath([real, root]) != root


@pytest.mark.parametrize("name", ["a\\..\\..\\x", "..\\x", "C:x", "c:\\evil", "\\abs", "a/./../../x"])
def test_windows_separators_and_drives_refused(tmp_path, name):
    arc = make_tar(tmp_path / "a.tar", (add_file, "ok"), (add_file, name))
    with pytest.raises(UnsafeArchive):
        safe_extract(arc, tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_zip_relative_symlink_out_refused(tmp_path):
    arc = tmp_path / "z.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("ok.txt", "ok")
        info = zipfile.ZipInfo("up")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "../..")
    with pytest.raises(UnsafeArchive, match="outside"):
        safe_extract(arc, tmp_path / "out")


@pytest.mark.parametrize("members,why", [
    ([(add_file, "f"), (add_link, "s", "f"), (add_link, "h", "s", tarfile.LNKTYPE)], "not a regular file"),
    ([(add_dir, "d"), (add_link, "h", "d", tarfile.LNKTYPE)], "not a regular file"),
    ([(add_link, "ln", "sub"), (add_dir, "sub"), (add_file, "sub/f"), (add_link, "h", "ln/f", tarfile.LNKTYPE)],
     "not a regular file"),
    ([(add_file, "f"), (add_link, "h", "f", tarfile.LNKTYPE), (add_link, "f", "/etc/passwd")], "absolute"),
    ([(add_link, "h", "missing", tarfile.LNKTYPE)], "not a regular file"),
])  # fmt: skip
def test_hard_links_only_to_earlier_regular_files(tmp_path, members, why):
    arc = make_tar(tmp_path / "h.tar", *members)
    with pytest.raises(UnsafeArchive, match=why):
        safe_extract(arc, tmp_path / "out")


def test_symlink_through_a_later_symlink_refused(tmp_path):
    # a -> x/b/.. looks inside when checked; x/b -> .. comes later and makes a resolve to dest/..
    arc = make_tar(tmp_path / "late.tar", (add_link, "a", "x/b/.."), (add_dir, "x"), (add_link, "x/b", ".."))
    dest = tmp_path / "base" / "dest"
    dest.mkdir(parents=True)
    try:
        safe_extract(arc, dest)
    except UnsafeArchive:
        return
    assert not escapes(dest, "a"), "a symlink of the archive resolves outside the destination"


def test_directory_member_never_changes_a_directory_outside(tmp_path):
    base = tmp_path / "base"
    dest = base / "app"
    dest.mkdir(parents=True)
    os.chmod(base, 0o700)
    first = make_tar(tmp_path / "1.tar", (add_link, "a", "x/b/.."), (add_dir, "x"), (add_link, "x/b", ".."))
    second = make_tar(tmp_path / "2.tar", (add_dir, "a", 0o777))  # the next package of the same application
    try:
        safe_extract(first, dest)
        safe_extract(second, dest)
    except UnsafeArchive:
        pass
    assert stat.S_IMODE(base.stat().st_mode) == 0o700, "a directory outside the destination was chmod-ed"
