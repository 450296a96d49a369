"""Package cache, safe extraction and install commands, with real files and processes."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import stat
import sys
import tarfile
import zipfile

import psutil
import pytest

from core.errors import BusError
from nodes.packages import (
    InstallTimeout,
    PackageCache,
    PackageError,
    UnsafeArchive,
    run_install,
    safe_extract,
)
from tests.helpers import wait_for

# ------------------------------------------------------------------ cache


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_put_bytes_and_path(tmp_path):
    cache = PackageCache(tmp_path / "cache")
    data = b"hello package" * 1000
    d = cache.put(data)
    assert d == sha(data)
    assert cache.has(d)
    assert cache.path(d) == tmp_path / "cache" / "objects" / d[:2] / d[2:]
    assert cache.path(d).read_bytes() == data
    src = tmp_path / "pkg.bin"
    src.write_bytes(b"other")
    d2 = cache.put(src)
    assert d2 == sha(b"other") and cache.has(d2)
    assert cache.put(data) == d  # idempotent
    assert not list((tmp_path / "cache" / "tmp").iterdir())


def test_bad_digest_refused(tmp_path):
    cache = PackageCache(tmp_path)
    with pytest.raises(PackageError):
        cache.path("../../etc/passwd")
    with pytest.raises(PackageError):
        cache.open_writer("ab" * 31, 10)


def test_chunked_write_commit(tmp_path):
    cache = PackageCache(tmp_path)
    data = os.urandom(10_000)
    d = sha(data)
    w = cache.open_writer(d, len(data))
    assert w.missing_ranges() == [(0, 10_000)]
    w.write(4000, data[4000:7000])
    w.write(0, data[:1000])
    assert w.missing_ranges() == [(1000, 4000), (7000, 10_000)]
    assert not cache.has(d)
    with pytest.raises(PackageError, match="incomplete"):
        w.commit()
    w.write(1000, data[1000:4000])
    w.write(7000, data[7000:])
    assert w.missing_ranges() == []
    assert not cache.has(d)  # nothing visible before commit
    path = w.commit()
    assert path.read_bytes() == data and cache.has(d)
    assert not list((tmp_path / "partial").iterdir())


def test_tampered_chunk_rejected_and_deleted(tmp_path):
    cache = PackageCache(tmp_path)
    data = os.urandom(4096)
    d = sha(data)
    w = cache.open_writer(d, len(data))
    w.write(0, data[:2048])
    w.write(2048, b"\x00" + data[2049:])  # one byte tampered
    with pytest.raises(PackageError, match="hash mismatch") as ei:
        w.commit()
    assert isinstance(ei.value, BusError)
    assert not cache.has(d)
    assert not list((tmp_path / "partial").iterdir())
    # A fresh writer starts from scratch.
    assert cache.open_writer(d, len(data)).missing_ranges() == [(0, 4096)]


def test_resume_after_restart(tmp_path):
    data = os.urandom(8192)
    d = sha(data)
    w = PackageCache(tmp_path).open_writer(d, len(data))
    w.write(0, data[:3000])
    del w  # "restart": a new cache object over the same directory
    w2 = PackageCache(tmp_path).open_writer(d, len(data))
    assert w2.missing_ranges() == [(3000, 8192)]
    w2.write(3000, data[3000:])
    w2.commit()
    assert PackageCache(tmp_path).path(d).read_bytes() == data


def test_chunk_outside_size_refused(tmp_path):
    w = PackageCache(tmp_path).open_writer(sha(b"abc"), 3)
    with pytest.raises(PackageError):
        w.write(2, b"xx")


# ------------------------------------------------------------------ archives


def add_file(tf: tarfile.TarFile, name: str, data: bytes = b"x", mode: int = 0o644):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mode = mode
    tf.addfile(ti, io.BytesIO(data))


def add_link(tf: tarfile.TarFile, name: str, target: str, kind=tarfile.SYMTYPE):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = target
    tf.addfile(ti)


def assert_empty(dest):
    assert not dest.exists() or list(dest.iterdir()) == []


def make_tar(path, build, mode="w"):
    with tarfile.open(path, mode) as tf:
        build(tf)
    return path


def good_tree(tf):
    ti = tarfile.TarInfo("app")
    ti.type = tarfile.DIRTYPE
    ti.mode = 0o755
    tf.addfile(ti)
    add_file(tf, "app/run.sh", b"#!/bin/sh\necho hi\n", 0o4755)
    add_file(tf, "app/data/cfg.txt", b"cfg")
    add_link(tf, "app/cfg", "data/cfg.txt")
    add_link(tf, "app/hard", "app/run.sh", tarfile.LNKTYPE)


@pytest.mark.parametrize("mode,suffix", [("w", ".tar"), ("w:gz", ".tar.gz")])
def test_good_tar(tmp_path, mode, suffix):
    arc = make_tar(tmp_path / f"p{suffix}", good_tree, mode)
    dest = tmp_path / "out"
    names = safe_extract(arc, dest)
    assert "app/run.sh" in names
    assert (dest / "app/run.sh").read_bytes() == b"#!/bin/sh\necho hi\n"
    mode_bits = stat.S_IMODE((dest / "app/run.sh").stat().st_mode)
    assert mode_bits == 0o755  # setuid stripped
    assert os.readlink(dest / "app/cfg") == "data/cfg.txt"
    assert (dest / "app/cfg").read_bytes() == b"cfg"
    assert (dest / "app/hard").stat().st_ino == (dest / "app/run.sh").stat().st_ino


def test_good_zip(tmp_path):
    arc = tmp_path / "p.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("app/", "")
        zf.writestr("app/a.txt", "A")
        zf.writestr("app/sub/b.txt", "B")
    dest = tmp_path / "out"
    safe_extract(arc, dest)
    assert (dest / "app/a.txt").read_text() == "A"
    assert (dest / "app/sub/b.txt").read_text() == "B"


UNSAFE_TAR = {
    "absolute": (lambda tf: (add_file(tf, "ok.txt"), add_file(tf, "/tmp/evil")), "/tmp/evil", "absolute"),
    "dotdot": (lambda tf: (add_file(tf, "ok.txt"), add_file(tf, "../x")), "../x", "'..'"),
    "dotdot-inner": (lambda tf: (add_file(tf, "ok.txt"), add_file(tf, "a/../../x")), "a/../../x", "'..'"),
    "symlink-etc": (lambda tf: (add_file(tf, "ok.txt"), add_link(tf, "etc", "/etc")), "etc", "absolute"),
    "symlink-up": (lambda tf: (add_file(tf, "ok.txt"), add_link(tf, "up", "../..")), "up", "outside"),
    "symlink-etc-then-file": (
        lambda tf: (add_link(tf, "evil", "/etc"), add_file(tf, "evil/passwd")),
        "evil",
        "absolute",
    ),
    "through-symlink": (
        lambda tf: (add_file(tf, "ok.txt"), add_link(tf, "d", "."), add_file(tf, "d/f")),
        "d/f",
        "through a symlink",
    ),
    "symlink-dir-then-file": (
        lambda tf: (add_link(tf, "sub", "sub2"), add_link(tf, "sub2", "../.."), add_file(tf, "sub/f")),
        "sub",
        "passes through another symlink",
    ),
    "overwrite-symlink": (
        lambda tf: (add_link(tf, "a", "b"), add_file(tf, "a")),
        "a",
        "overwrite a symlink",
    ),
    "hardlink-out": (
        lambda tf: (add_file(tf, "ok.txt"), add_link(tf, "h", "/etc/passwd", tarfile.LNKTYPE)),
        "h",
        "outside",
    ),
    "hardlink-dotdot": (
        lambda tf: (add_file(tf, "ok.txt"), add_link(tf, "h", "../secret", tarfile.LNKTYPE)),
        "h",
        "outside",
    ),
    "link-through-link": (
        lambda tf: (add_link(tf, "d/s", ".."), add_link(tf, "x", "d/s/..")),
        "x",
        "another symlink",
    ),
}


@pytest.mark.parametrize("case", sorted(UNSAFE_TAR))
def test_unsafe_tar_refused_nothing_extracted(tmp_path, case):
    build, member, why = UNSAFE_TAR[case]
    arc = make_tar(tmp_path / "bad.tar", build)
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchive) as ei:
        safe_extract(arc, dest)
    assert ei.value.member == member
    assert why in str(ei.value) and member in str(ei.value)
    assert isinstance(ei.value, PackageError)
    assert_empty(dest)
    assert not (tmp_path / "x").exists() and not (tmp_path / "evil").exists()


def test_device_file_refused(tmp_path):
    def build(tf):
        add_file(tf, "ok.txt")
        ti = tarfile.TarInfo("null")
        ti.type = tarfile.CHRTYPE
        ti.devmajor, ti.devminor = 1, 3
        tf.addfile(ti)

    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchive, match="device"):
        safe_extract(make_tar(tmp_path / "d.tar", build), dest)
    assert_empty(dest)


def test_existing_symlink_in_dest_not_followed(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, dest / "d")
    arc = make_tar(tmp_path / "a.tar", lambda tf: add_file(tf, "d/f"))
    with pytest.raises(UnsafeArchive, match="through a symlink"):
        safe_extract(arc, dest)
    assert list(outside.iterdir()) == []


def test_unsafe_zip_refused(tmp_path):
    for name in ("../evil.txt", "/abs.txt", "a/../../evil.txt"):
        arc = tmp_path / "bad.zip"
        with zipfile.ZipFile(arc, "w") as zf:
            zf.writestr("ok.txt", "ok")
            zf.writestr(name, "evil")
        dest = tmp_path / "out"
        with pytest.raises(UnsafeArchive):
            safe_extract(arc, dest)
        assert_empty(dest)
    # A zip symlink pointing outside.
    arc = tmp_path / "link.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("ok.txt", "ok")
        info = zipfile.ZipInfo("etc")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc")
    with pytest.raises(UnsafeArchive, match="absolute"):
        safe_extract(arc, tmp_path / "out")
    assert_empty(tmp_path / "out")


def test_not_an_archive(tmp_path):
    p = tmp_path / "junk"
    p.write_bytes(b"not an archive at all")
    with pytest.raises(PackageError):
        safe_extract(p, tmp_path / "out")


# ------------------------------------------------------------------ install


def test_install_ok(tmp_path):
    rc, out = asyncio.run(run_install("echo installed; echo err >&2; exit 3", tmp_path, 10))
    assert rc == 3
    assert "installed" in out and "err" in out


def test_install_env_and_cwd(tmp_path):
    env = {"PATH": os.environ["PATH"], "WHO": "node1"}
    rc, out = asyncio.run(run_install('echo "$WHO $(pwd)"', tmp_path, 10, env=env))
    assert rc == 0 and out.strip() == f"node1 {tmp_path}"


def test_install_timeout_kills_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    # The shell starts a background grandchild and records its pid, then hangs.
    cmd = f"{sys.executable} -c 'import time; time.sleep(60)' & echo $! > {pidfile}; echo started; wait"

    with pytest.raises(InstallTimeout) as ei:
        asyncio.run(run_install(cmd, tmp_path, 1.0))
    assert "timed out" in str(ei.value) and "killed" in str(ei.value)
    assert "started" in ei.value.output
    child = int(pidfile.read_text())
    wait_for(lambda: not _alive(child), timeout=5)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_tar_ending_in_a_zip_is_a_tar(tmp_path):
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("../evil", "e")
    arc = make_tar(tmp_path / "t.tar", lambda tf: add_file(tf, "inner.zip", zbuf.getvalue()))
    assert safe_extract(arc, tmp_path / "out") == ["inner.zip"]
    assert (tmp_path / "out/inner.zip").read_bytes() == zbuf.getvalue()


def test_extraction_error_is_a_package_error(tmp_path):
    def build(tf):
        ti = tarfile.TarInfo("a")
        ti.type = tarfile.DIRTYPE
        tf.addfile(ti)
        add_file(tf, "a/f")
        add_file(tf, "a")  # a file where a non-empty directory is

    with pytest.raises(PackageError, match="extraction"):
        safe_extract(make_tar(tmp_path / "c.tar", build), tmp_path / "out")


def test_corrupt_bookkeeping_starts_over(tmp_path):
    data = os.urandom(100)
    d = sha(data)
    PackageCache(tmp_path).open_writer(d, 100).write(0, data[:50])
    (tmp_path / "partial" / f"{d}.ranges").write_text("{not json")
    w = PackageCache(tmp_path).open_writer(d, 100)
    assert w.missing_ranges() == [(0, 100)]
    w.write(0, data)
    assert w.commit().read_bytes() == data


def test_cancelled_install_kills_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    cmd = f"sleep 60 & echo $! > {pidfile}; wait"

    async def main():
        task = asyncio.create_task(run_install(cmd, tmp_path, 60))
        while not (pidfile.exists() and pidfile.read_text().strip()):
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(main(), 10))
    wait_for(lambda: not _alive(int(pidfile.read_text())), timeout=5)
