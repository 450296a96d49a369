"""A real OpenSSH server on 127.0.0.1 for tests: key-only, non-default port, its own files.

:class:`TestSshd` runs ``/usr/sbin/sshd -D -e -f CONFIG`` with a host key, a
config and a log in a temporary directory, on a free port below the
ephemeral range, and accepts exactly one generated ed25519 client key for one
user: a dedicated unprivileged account (``snsbus-ssh``, created with
``useradd -m`` when missing).  It needs root (to create that user and to run
an sshd that logs in as another user).
The server tags every session it starts with ``SNSBUS_TEST_SSHD=TOKEN``
(``SetEnv``), so :meth:`TestSshd.stop` finds and ends everything started
through it, including processes that detached from their session (a
bootstrapped bus-node), and nothing else::

    with TestSshd() as sshd:
        res = bootstrap(sshd.resource("n1"), join, wheelhouse=wh,
                        identity_file=sshd.identity_file, known_hosts=sshd.known_hosts)

The system packages come from ``scripts/test-deps.sh`` (openssh-server,
openssh-client).
"""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from core.errors import BusError

__all__ = ["SshdError", "TestSshd", "TEST_USER", "SSHD"]

log = logging.getLogger(__name__)

SSHD = "/usr/sbin/sshd"
TEST_USER = "snsbus-ssh"
MARKER = "SNSBUS_TEST_SSHD"


class SshdError(BusError, RuntimeError):
    """The test sshd could not be set up or started; the message says what to do."""


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SshdError(f"`{' '.join(argv)}` failed with code {proc.returncode}: {proc.stderr.strip()}")


def _keygen(path: Path, comment: str) -> Path:
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return path


def _proc_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _proc_ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _kill_all(pids: list[int], grace: float) -> None:
    """SIGTERM, up to ``grace`` seconds, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        live = [p for p in pids if not _gone(p)]
        for pid in live:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while live and time.monotonic() < deadline:
            live = [p for p in live if not _gone(p)]
            time.sleep(0.02)


class TestSshd:
    """A real sshd on ``host`` at a free port, key-only, for one user; stopped with everything it started.

    No I/O before :meth:`start` (or ``with``).  After it: ``address``,
    ``port``, ``user``, ``home``, ``identity_file`` (the accepted private key),
    ``known_hosts`` (holding this server's host key) and ``log_path``.
    """

    __test__ = False  # a helper, not a pytest test class

    def __init__(self, user: str | None = None, *, host: str = "127.0.0.1", port: int | None = None,
                 sshd: str = SSHD, start_timeout: float = 10.0) -> None:
        self.user = user or TEST_USER
        self.address = host
        self.port = port
        self.sshd = sshd
        self.start_timeout = start_timeout
        self.token = secrets.token_hex(8)
        self.dir: Path | None = None
        self.home: Path | None = None
        self.identity_file = ""
        self.known_hosts = ""
        self.log_path: Path | None = None
        self._authorized: Path | None = None
        self._proc: subprocess.Popen | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "TestSshd":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "TestSshd":
        """Set up the user, keys and config, start sshd and wait until it listens."""
        for tool in (self.sshd, shutil.which("ssh-keygen"), shutil.which("ssh")):
            if not tool or not os.access(tool, os.X_OK):
                raise SshdError(f"OpenSSH is not installed ({tool or 'ssh-keygen/ssh'} missing); "
                                f"run scripts/test-deps.sh")
        if os.geteuid() != 0:
            raise SshdError("a test sshd needs root (it creates a test user and logs in as it)")
        try:
            self.dir = Path(tempfile.mkdtemp(prefix="snsbus-sshd-"))
            self._ensure_user()
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation chroot
            self.home = Path(pwd.getpwnam(self.user).pw_dir)
            host_key = _keygen(self.dir / "ssh_host_ed25519_key", "snsbus-test-sshd")
            self.identity_file = str(_keygen(self.dir / "client_ed25519_key", f"snsbus-test-{self.token}"))
            self._authorize(Path(self.identity_file + ".pub").read_text())
            self.log_path = self.dir / "sshd.log"
            self._listen(host_key)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop sshd, every process its sessions left behind, and remove its files.  Idempotent."""
        pids: list[int] = []
        if self._proc is not None:
            pids = self._descendants(self._proc.pid)
            self._proc.terminate()
            try:
                self._proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        _kill_all(sorted(set(pids) | set(self.processes())), grace)
        if self._authorized is not None:
            self._authorized.unlink(missing_ok=True)
            self._authorized = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    # ------------------------------------------------------------------ for tests

    def resource(self, name: str = "ssh-node", *, group: str | None = None, attrs=()):
        """A ``type="ssh"`` :class:`manager.resources.Resource` pointing at this server."""
        from manager.resources import Resource

        return Resource(name, self.address, "ssh", self.port, self.user, group, tuple(attrs))

    def new_key(self, name: str) -> str:
        """A fresh ed25519 private key that this server does NOT accept (for negative tests)."""
        assert self.dir is not None, "start() first"
        return str(_keygen(self.dir / f"{name}_ed25519_key", f"snsbus-test-unauthorized-{name}"))

    def processes(self) -> list[int]:
        """Pids of the live processes started through this server's sessions (they carry its token)."""
        tag = f"{MARKER}={self.token}".encode()
        found = []
        for pid in _proc_pids():
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if tag in f.read().split(b"\0") and not _gone(pid):
                        found.append(pid)
            except OSError:
                pass
        return found

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ internals

    def _ensure_user(self) -> None:
        try:
            pwd.getpwnam(self.user)
        except KeyError:
            proc = subprocess.run(["useradd", "-m", "-s", "/bin/sh", "-c", "snsbus ssh tests", self.user],
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True)
            try:
                pwd.getpwnam(self.user)  # a concurrent run may have created it
            except KeyError:
                raise SshdError(f"could not create the test user {self.user!r}: {proc.stderr.strip()}") from None
        # Without PAM, sshd refuses accounts whose password is locked ("!"), even for
        # key auth; "*" means "no password can match" and is not locked.
        with open("/etc/shadow") as f:
            entry = next((line.split(":") for line in f if line.startswith(self.user + ":")), None)
        if entry is not None and entry[1].startswith("!"):
            _run(["usermod", "-p", "*", self.user])

    def _authorize(self, public_key: str) -> None:
        pw = pwd.getpwnam(self.user)
        # StrictModes: home and ~/.ssh owned by the user and not writable by others.
        home = Path(pw.pw_dir)
        home.mkdir(mode=0o755, exist_ok=True)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        os.chmod(home, os.stat(home).st_mode & ~0o022)
        ssh_dir = home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(ssh_dir, pw.pw_uid, pw.pw_gid)
        os.chmod(ssh_dir, 0o700)
        # One file per server, so concurrent test runs do not overwrite each other's keys.
        path = ssh_dir / f"authorized_keys.{self.token}"
        path.write_text(public_key)
        os.chown(path, pw.pw_uid, pw.pw_gid)
        os.chmod(path, 0o600)
        self._authorized = path

    def _config(self, host_key: Path) -> Path:
        lines = [
            f"Port {self.port}",
            f"ListenAddress {self.address}",
            f"HostKey {host_key}",
            f"PidFile {self.dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self._authorized}",
            f"AllowUsers {self.user}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin no",
            "UsePAM no",
            "StrictModes yes",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "AllowAgentForwarding no",
            "PrintMotd no",
            "PrintLastLog no",
            "UseDNS no",
            "MaxStartups 100:30:200",
            "LoginGraceTime 30",
            "LogLevel VERBOSE",
            f"SetEnv {MARKER}={self.token}",
        ]
        path = self.dir / "sshd_config"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _listen(self, host_key: Path) -> None:
        from tools.cluster import free_port

        fixed = self.port is not None
        for _attempt in range(1 if fixed else 5):
            if not fixed:
                self.port = free_port(self.address)
            config = self._config(host_key)
            with open(self.log_path, "wb") as out:
                self._proc = subprocess.Popen([self.sshd, "-D", "-e", "-f", str(config)],
                                              stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True)
            deadline = time.monotonic() + self.start_timeout
            while True:
                text = self.log_path.read_text(errors="replace")
                if "Server listening on" in text:
                    self._write_known_hosts(host_key)
                    log.info("test sshd pid %d on %s:%d for %s", self._proc.pid, self.address, self.port, self.user)
                    return
                if self._proc.poll() is not None:
                    self._proc = None
                    if "Address already in use" in text and not fixed:
                        break  # lost a race for the port: try another
                    raise SshdError(f"sshd exited at start:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise SshdError(f"sshd did not listen within {self.start_timeout:g}s:\n{self.log_tail()}")
                time.sleep(0.02)
        raise SshdError(f"sshd could not bind a port on {self.address}:\n{self.log_tail()}")

    def _write_known_hosts(self, host_key: Path) -> None:
        kind, blob = Path(str(host_key) + ".pub").read_text().split()[:2]
        where = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        path = self.dir / "known_hosts"
        path.write_text(f"{where} {kind} {blob}\n")
        self.known_hosts = str(path)

    @staticmethod
    def _descendants(root: int) -> list[int]:
        children: dict[int, list[int]] = {}
        for pid in _proc_pids():
            ppid = _proc_ppid(pid)
            if ppid is not None:
                children.setdefault(ppid, []).append(pid)
        out, todo = [], [root]
        while todo:
            for child in children.get(todo.pop(), []):
                out.append(child)
                todo.append(child)
        return out
