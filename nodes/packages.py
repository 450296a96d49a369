"""Node-side package handling: content-addressed cache, safe extraction, install command.

* :class:`PackageCache` stores packages by sha256 under ``root/objects/ab/cdef...``.
  Objects appear there only by an atomic rename after their hash was verified, so a
  path under ``objects/`` is always complete. Chunked transfers go through
  :meth:`PackageCache.open_writer`; the partial data and the list of written ranges
  live under ``root/partial/`` and survive a restart, so a transfer resumes.
* :func:`safe_extract` validates *every* member of a tar / tar.gz / zip archive first
  and extracts nothing when one is unsafe. The checks are our own (we run 3.11, whose
  tarfile filters we do not rely on) and the extraction is done member by member.
* :func:`run_install` runs an install command in its own process group and kills the
  whole group on timeout.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import os
import re
import signal
import stat
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, IO

from core.errors import BusError

__all__ = [
    "PackageError",
    "UnsafeArchive",
    "InstallTimeout",
    "PackageCache",
    "ChunkWriter",
    "safe_extract",
    "run_install",
]

_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_COPY_CHUNK = 1 << 20


class PackageError(BusError):
    """A package that cannot be stored, verified, extracted or installed."""


class UnsafeArchive(PackageError, ValueError):
    """An archive member that would escape the destination; names the member and why."""

    def __init__(self, member: str, why: str):
        super().__init__(f"unsafe archive member {member!r}: {why}; nothing was extracted")
        self.member = member
        self.why = why


class InstallTimeout(PackageError, TimeoutError):
    """The install command ran past its timeout; its process group was killed."""

    def __init__(self, command: str, timeout: float, output: str):
        super().__init__(
            f"install command {command!r} timed out after {timeout:g}s; "
            f"its process group was killed"
        )
        self.command = command
        self.timeout = timeout
        self.output = output


def _check_digest(digest: str) -> str:
    # The digest becomes a path: only 64 lowercase hex characters may get there.
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise PackageError(f"not a sha256 hex digest: {digest!r}")
    return digest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PackageCache:
    """A content-addressed store of package files keyed by their sha256 hex digest."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._objects = self.root / "objects"
        self._partial = self.root / "partial"
        self._tmp = self.root / "tmp"

    def path(self, digest: str) -> Path:
        """Where the object ``digest`` lives (whether or not it is there yet)."""
        _check_digest(digest)
        return self._objects / digest[:2] / digest[2:]

    def has(self, digest: str) -> bool:
        """True when the complete, verified object is in the cache."""
        return self.path(digest).is_file()

    def put(self, data_or_path: bytes | str | os.PathLike) -> str:
        """Store bytes or a file's content; returns its digest (idempotent)."""
        self._tmp.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix="put-")
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(data_or_path, (bytes, bytearray, memoryview)):
                    h.update(data_or_path)
                    out.write(data_or_path)
                else:
                    with open(data_or_path, "rb") as src:
                        while chunk := src.read(_COPY_CHUNK):
                            h.update(chunk)
                            out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = h.hexdigest()
            self._install(Path(tmp), digest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return digest

    def open_writer(self, digest: str, size: int) -> "ChunkWriter":
        """A resumable writer for ``digest`` of ``size`` bytes (resumes earlier partial data)."""
        _check_digest(digest)
        if size < 0:
            raise PackageError(f"negative package size {size}")
        self._partial.mkdir(parents=True, exist_ok=True)
        return ChunkWriter(self, digest, size)

    def _install(self, src: Path, digest: str) -> Path:
        dst = self.path(digest)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(src, 0o444)
        os.replace(src, dst)  # atomic: readers see nothing or the whole object
        _fsync_dir(dst.parent)
        return dst


class ChunkWriter:
    """Writes one object at arbitrary offsets; state on disk survives restarts.

    Data goes to ``partial/DIGEST.data`` through one file descriptor kept open
    for the writer's life; written ranges are recorded in ``partial/DIGEST.ranges``
    (replaced atomically) every ``SAVE_BYTES`` bytes or ``SAVE_SECONDS`` seconds,
    and at :meth:`close`, so a transfer interrupted by a crash or restart resumes
    from the last save (what was written after it is fetched again). Chunks are
    not fsynced one by one: after a power loss the ranges may claim data the disk
    lost, which :meth:`commit`'s hash check catches (the object is then fetched again).

    Chunks written in order from offset 0 are hashed as they arrive, so
    :meth:`commit` reads back only what came out of order (after a resume, all of it).
    """

    #: Persist the written ranges after this many new bytes...
    SAVE_BYTES = 8 << 20
    #: ...or after this many seconds since the last save, whichever comes first.
    SAVE_SECONDS = 1.0

    def __init__(self, cache: PackageCache, digest: str, size: int):
        self.cache = cache
        self.digest = digest
        self.size = size
        self._data = cache._partial / f"{digest}.data"
        self._meta = cache._partial / f"{digest}.ranges"
        self._ranges: list[tuple[int, int]] = []
        self._fd = -1
        if self._meta.exists() and self._data.exists():
            try:
                meta = json.loads(self._meta.read_text())
                if meta.get("size") == size:
                    self._ranges = _merge([(int(a), int(b)) for a, b in meta["ranges"]])
            except (ValueError, KeyError, TypeError):
                self._ranges = []  # unreadable bookkeeping: start over
        if self._ranges:
            try:
                self._fd = os.open(self._data, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                self._ranges = []
        if not self._ranges:
            # Fresh start (or a stale partial of another size): begin empty.
            self._meta.unlink(missing_ok=True)
            self._fd = os.open(self._data, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            os.ftruncate(self._fd, size)
        # Running hash of the prefix [0, _hashed) as written; None once a write
        # touched that prefix again (commit then hashes the whole file).
        self._hash = hashlib.sha256()
        self._hashed = 0
        self._unsaved = 0
        self._saved_at = time.monotonic()

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset``; it must fit inside the declared size."""
        n = len(data)
        if offset < 0 or offset + n > self.size:
            raise PackageError(f"chunk [{offset}, {offset + n}) outside package of {self.size} bytes")
        if not n:
            return
        fd = self._fileno()
        done = os.pwrite(fd, data, offset)
        if done < n:  # rare on a regular file (disk full, signal): finish or raise
            view = memoryview(data)
            while done < n:
                done += os.pwrite(fd, view[done:], offset + done)
        if self._hash is not None:
            if offset == self._hashed:
                self._hash.update(data)
                self._hashed += n
            elif offset < self._hashed:
                # Bytes already hashed were written again (maybe differently):
                # the running hash no longer describes the file.
                self._hash = None
        self._add_range(offset, offset + n)
        self._unsaved += n
        if self._unsaved >= self.SAVE_BYTES or time.monotonic() - self._saved_at >= self.SAVE_SECONDS:
            self._save()

    def covers(self, start: int, end: int) -> bool:
        """True when every byte of ``[start, end)`` has been written (it may be served on)."""
        i = bisect.bisect_right(self._ranges, (start, float("inf"))) - 1
        return i >= 0 and self._ranges[i][0] <= start and self._ranges[i][1] >= end

    def fileno(self) -> int:
        """The descriptor of the partial data (valid until commit, abort or close)."""
        return self._fileno()

    def missing_ranges(self) -> list[tuple[int, int]]:
        """Half-open ``(start, end)`` byte ranges not yet written."""
        missing, pos = [], 0
        for start, end in self._ranges:
            if start > pos:
                missing.append((pos, start))
            pos = max(pos, end)
        if pos < self.size:
            missing.append((pos, self.size))
        return missing

    def commit(self) -> Path:
        """Verify the sha256 and publish the object; a mismatch deletes the data and raises."""
        if self.missing_ranges():
            raise PackageError(
                f"package {self.digest[:12]} incomplete, missing {self.missing_ranges()}"
            )
        fd = self._fileno()
        os.fdatasync(fd)  # durable before it is published
        h, pos = (self._hash.copy(), self._hashed) if self._hash is not None else (hashlib.sha256(), 0)
        while pos < self.size:
            chunk = os.pread(fd, min(_COPY_CHUNK, self.size - pos), pos)
            if not chunk:
                break  # the file shrank under us: the hash below fails
            h.update(chunk)
            pos += len(chunk)
        got = h.hexdigest()
        if got != self.digest:
            self.abort()
            raise PackageError(
                f"package hash mismatch: expected sha256 {self.digest}, got {got}; "
                f"the data was deleted, fetch it again"
            )
        self._close_fd()
        dst = self.cache._install(self._data, self.digest)
        self._meta.unlink(missing_ok=True)
        self._ranges = [(0, self.size)] if self.size else []
        self._unsaved = 0
        return dst

    def abort(self) -> None:
        """Forget the partial data."""
        self._close_fd()
        self._data.unlink(missing_ok=True)
        self._meta.unlink(missing_ok=True)
        self._ranges = []
        self._unsaved = 0
        self._hash, self._hashed = hashlib.sha256(), 0

    def close(self) -> None:
        """Persist the written ranges and release the file (a later write reopens it)."""
        if self._unsaved:
            self._save()
        self._close_fd()

    def __del__(self):
        # A writer dropped without close() still leaves resumable bookkeeping.
        try:
            self.close()
        except (OSError, AttributeError, TypeError):
            pass  # interpreter shutdown or a half-built writer: nothing to save

    def _fileno(self) -> int:
        if self._fd < 0:
            self._fd = os.open(self._data, os.O_RDWR | os.O_CLOEXEC)
        return self._fd

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def _add_range(self, start: int, end: int) -> None:
        r = self._ranges
        # Chunks almost always extend the last range or follow it: no re-sort then.
        if r and r[-1][0] <= start <= r[-1][1]:
            if end > r[-1][1]:
                r[-1] = (r[-1][0], end)
        elif not r or start > r[-1][1]:
            r.append((start, end))
        else:
            r.append((start, end))
            self._ranges = _merge(r)

    def _save(self) -> None:
        if not self._data.exists():
            return  # committed or aborted meanwhile: nothing to resume
        tmp = self._meta.with_suffix(".ranges.tmp")
        tmp.write_text(json.dumps({"size": self.size, "ranges": self._ranges}))
        os.replace(tmp, self._meta)
        self._unsaved = 0
        self._saved_at = time.monotonic()


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


# ---------------------------------------------------------------- safe extraction

@dataclass
class _Entry:
    name: str  # normalized relative posix path
    kind: str  # "file" | "dir" | "symlink" | "hardlink"
    mode: int
    link: str = ""
    opener: Callable[[], IO[bytes]] | None = None


def _norm_member(raw: str) -> str:
    """Normalize a member name, refusing absolute paths and ``..`` components."""
    if raw.startswith("/") or raw.startswith("\\") or re.match(r"^[A-Za-z]:", raw):
        raise UnsafeArchive(raw, "absolute path")
    parts = [p for p in re.split(r"[/\\]", raw) if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(raw, "'..' component")
    return "/".join(parts)


def _tar_entries(tf: tarfile.TarFile) -> list[_Entry]:
    entries = []
    for m in tf.getmembers():
        name = _norm_member(m.name)
        if m.isdev():  # character, block devices and fifos
            raise UnsafeArchive(m.name, "device or fifo file")
        if m.isdir():
            entries.append(_Entry(name, "dir", m.mode))
        elif m.issym():
            entries.append(_Entry(name, "symlink", m.mode, m.linkname))
        elif m.islnk():
            entries.append(_Entry(name, "hardlink", m.mode, m.linkname))
        elif m.isreg():
            entries.append(_Entry(name, "file", m.mode, opener=lambda m=m: tf.extractfile(m)))
        else:
            raise UnsafeArchive(m.name, f"unsupported member type {m.type!r}")
    return entries


def _zip_entries(zf: zipfile.ZipFile) -> list[_Entry]:
    entries = []
    for info in zf.infolist():
        name = _norm_member(info.filename)
        mode = info.external_attr >> 16
        fmt = stat.S_IFMT(mode)
        if fmt in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            raise UnsafeArchive(info.filename, "device or fifo file")
        perm = stat.S_IMODE(mode) or (0o755 if info.is_dir() else 0o644)
        if info.is_dir():
            entries.append(_Entry(name, "dir", perm))
        elif fmt == stat.S_IFLNK:
            target = zf.read(info).decode("utf-8", "surrogateescape")
            entries.append(_Entry(name, "symlink", perm, target))
        else:
            entries.append(_Entry(name, "file", perm, opener=lambda i=info: zf.open(i)))
    return entries


def _validate(entries: list[_Entry], dest: Path) -> None:
    links: set[str] = set()  # symlink members seen so far
    files: set[str] = set()  # regular-file members seen so far
    # Every symlink of the archive, whatever its position: a link target that climbs
    # through a directory the archive later turns into a symlink must be refused too.
    all_links = {e.name for e in entries if e.kind == "symlink"}

    def is_link(rel: str) -> bool:
        return rel in all_links or os.path.islink(dest / rel)

    for e in entries:
        if not e.name:
            if e.kind == "dir":
                continue  # the archive's "./" entry
            raise UnsafeArchive(e.name, "empty member name")
        parts = e.name.split("/")
        for i in range(1, len(parts)):
            if is_link("/".join(parts[:i])):
                raise UnsafeArchive(e.name, "would be written through a symlink")
        if e.name in links:
            raise UnsafeArchive(e.name, "would overwrite a symlink from the same archive")
        if e.kind == "dir" and os.path.islink(dest / e.name):
            # Creating it would chmod whatever that symlink (left by an earlier package) points at.
            raise UnsafeArchive(e.name, "directory member is a symlink already in the destination")
        if e.kind == "symlink":
            _check_link_target(e, dest, is_link)
            links.add(e.name)
        elif e.kind == "hardlink":
            # tar hard-link names are archive-relative; allow only earlier regular files.
            try:
                target = _norm_member(e.link)
            except UnsafeArchive:
                raise UnsafeArchive(e.name, f"hard link to {e.link!r} points outside") from None
            if target not in files:
                raise UnsafeArchive(
                    e.name, f"hard link to {e.link!r}, which is not a regular file of this archive"
                )
        elif e.kind == "file":
            files.add(e.name)


def _check_link_target(e: _Entry, dest: Path, is_link: Callable[[str], bool]) -> None:
    if not e.link:
        raise UnsafeArchive(e.name, "empty symlink target")
    if e.link.startswith("/"):
        raise UnsafeArchive(e.name, f"symlink to absolute path {e.link!r}")
    # Walk the target from the link's directory. A '..' after another link could
    # climb out of dest in ways a lexical normpath cannot see, so refuse targets
    # that pass through another link.
    stack = e.name.split("/")[:-1]
    for comp in e.link.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not stack:
                raise UnsafeArchive(e.name, f"symlink to {e.link!r} points outside the destination")
            stack.pop()
            continue
        stack.append(comp)
        if is_link("/".join(stack)) and "/".join(stack) != e.name:
            raise UnsafeArchive(e.name, f"symlink to {e.link!r} passes through another symlink")


def _extract(entries: list[_Entry], dest: Path) -> None:
    for e in entries:
        if not e.name:
            continue
        target = dest / e.name
        if e.kind == "dir":
            target.mkdir(parents=True, exist_ok=True)
            os.chmod(target, (e.mode & 0o777) | 0o700)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(target) and not target.is_dir():
            target.unlink()  # never write through whatever was there
        if e.kind == "symlink":
            os.symlink(e.link, target)
        elif e.kind == "hardlink":
            os.link(dest / _norm_member(e.link), target, follow_symlinks=False)
        else:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out, e.opener() as src:
                while chunk := src.read(_COPY_CHUNK):
                    out.write(chunk)
            os.chmod(target, e.mode & 0o777)  # no setuid/setgid/sticky bits


def safe_extract(archive_path: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Extract a tar, tar.gz or zip archive into ``dest``; returns the member names.

    Every member is validated before anything is written; an unsafe one raises
    :class:`UnsafeArchive` (naming it and why) and nothing is extracted.
    """
    archive_path = Path(archive_path)
    dest = Path(dest)
    with open(archive_path, "rb") as f:
        magic = f.read(4)
    # Decide by the leading magic, not zipfile.is_zipfile(): that one searches the
    # end of the file and also says yes to a tar whose last member is a zip.
    try:
        if magic in (b"PK\x03\x04", b"PK\x05\x06"):
            arc = zipfile.ZipFile(archive_path)
            read_entries = _zip_entries
        else:
            arc = tarfile.open(archive_path, "r:*")
            read_entries = _tar_entries
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
        raise PackageError(f"{archive_path}: not a tar, tar.gz or zip archive ({e})") from e
    with arc:
        try:
            entries = read_entries(arc)
        except (tarfile.TarError, zipfile.BadZipFile) as e:
            raise PackageError(f"{archive_path}: corrupt archive ({e})") from e
        dest.mkdir(parents=True, exist_ok=True)
        dest = Path(os.path.realpath(dest))
        _validate(entries, dest)
        try:
            _extract(entries, dest)
        except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
            raise PackageError(f"{archive_path}: extraction into {dest} failed: {e}") from e
    return [e.name for e in entries if e.name]


# ---------------------------------------------------------------- install command

_OUTPUT_LIMIT = 256 * 1024


async def run_install(
    command: str, cwd: str | os.PathLike, timeout: float, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run a shell command in its own process group; returns ``(returncode, output)``.

    stdout and stderr are merged (the last 256 KiB are kept). On timeout the whole
    process group is killed and :class:`InstallTimeout` is raised carrying the output.
    """
    proc = await asyncio.create_subprocess_shell(
        command,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    buf = bytearray()

    async def pump() -> None:
        while chunk := await proc.stdout.read(65536):
            buf.extend(chunk)
            if len(buf) > _OUTPUT_LIMIT:
                del buf[: len(buf) - _OUTPUT_LIMIT]

    reader = asyncio.create_task(pump())
    try:
        # Wait for the shell *and* its output: a grandchild holding the pipe open
        # also counts as still installing.
        await asyncio.wait_for(asyncio.gather(proc.wait(), asyncio.shield(reader)), timeout)
    except asyncio.TimeoutError:
        _killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        try:
            await asyncio.wait_for(reader, 2.0)
        except asyncio.TimeoutError:
            reader.cancel()
        raise InstallTimeout(command, timeout, buf.decode("utf-8", "replace")) from None
    except asyncio.CancelledError:
        _killpg(proc.pid, signal.SIGKILL)  # never leave an install running behind us
        await proc.wait()  # reap it; SIGKILL makes this prompt
        raise
    finally:
        if not reader.done():
            reader.cancel()
    return proc.returncode, buf.decode("utf-8", "replace")


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone
