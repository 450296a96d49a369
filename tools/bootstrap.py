"""Start bus-node on ``ssh`` resources, installing it there first when it is missing.

Everything goes through the system ``ssh`` client (``BatchMode=yes``: keys
only, never a prompt), so the user's ssh configuration, agent and known_hosts
apply.  Per host, :func:`bootstrap` makes one connection when bus-node is
installed and current, two when it is not:

1. ``probe``: a small Python helper (``tools/bootstrap_remote.py``, run with
   the remote ``python3 -c``) compares the digest stored in
   ``REMOTE_DIR/venv`` with the wheelhouse's.  If they match it starts
   bus-node (unless one of that name is already running) and answers;
   otherwise it answers "need-install" with the remote Python's version and
   machine.
2. ``install``: the wheelhouse travels as a tar stream on the same ssh
   connection's stdin.  The helper creates a new ``REMOTE_DIR/venv-*`` with
   ``python3 -m venv``, installs ``snsbus`` with ``pip --no-index
   --find-links`` (no network needed on the remote side), points the
   ``REMOTE_DIR/venv`` symlink at it, and starts bus-node.

Remote layout::

    REMOTE_DIR/venv -> venv-DIGEST16-TIME-PID/   the current install (.snsbus-digest inside)
    REMOTE_DIR/logs/NAME.log                     bus-node's stdout + stderr (appended)
    REMOTE_DIR/run/NAME.pid                      the detached bus-node's pid

bus-node runs in its own session (it survives the ssh connection), with
stdin from /dev/null.  A live node of the same name, running from the current
install with the same arguments, is left alone; one that runs from an older
install or with other arguments (another manager, say) is stopped and started
again.  Older installs that no running bus-node uses are removed.

Every failure raises :class:`BootstrapError`, whose first line is one
sentence naming the host and what failed, followed by the tail of the
relevant stderr or log.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

from core.errors import BusError

__all__ = [
    "BootstrapError",
    "BootstrapResult",
    "StopResult",
    "DEFAULT_REMOTE_DIR",
    "DEFAULT_WHEELHOUSE_DIR",
    "build_wheelhouse",
    "wheelhouse_digest",
    "bootstrap",
    "bootstrap_all",
    "stop_remote",
    "stop_all",
]

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REMOTE_DIR = "~/.snsbus"
DEFAULT_WHEELHOUSE_DIR = PROJECT_ROOT / "build" / "wheelhouse"
PROJECT_NAME = "snsbus"
MANIFEST = "wheelhouse.json"

_PYTHON_MISSING = 97  # exit status of the remote prelude when there is no python3
_KEEP_OLD_WHEELHOUSES = 3600.0  # seconds: older unused wheelhouses are pruned
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@%+=:,-]*$")
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class BootstrapError(BusError, RuntimeError):
    """bus-node could not be installed, started or stopped on a host.

    ``host`` is ``user@address:port``, ``name`` the resource's name, ``reason``
    a short code (``unreachable``, ``auth``, ``hostkey``, ``ssh``, ``python``,
    ``incompatible``, ``unpack``, ``venv``, ``pip``, ``start``, ``stop``,
    ``timeout``, ``usage``, ``build``) and ``tail`` the stderr or log lines
    quoted under the first line of the message.
    """

    def __init__(self, message: str, *, host: str = "", name: str = "", reason: str = "", tail: str = ""):
        self.sentence = message
        self.host = host
        self.name = name
        self.reason = reason
        self.tail = tail
        text = message if not tail else message + "\n" + "\n".join("    " + line for line in tail.splitlines())
        super().__init__(text)


@dataclasses.dataclass(frozen=True)
class BootstrapResult:
    """What :func:`bootstrap` did on one host.

    ``state`` is ``started`` (a new bus-node), ``running`` (one of that name
    was already running from the current install with the same arguments:
    left alone) or ``restarted`` (one ran from an older install or with other
    arguments: stopped, started anew).  ``installed``: this call installed.
    ``key``: the z85 public key of the node (``REMOTE_DIR/keys/identity.key``,
    made by bus-node on its first start), for the caller to admit; None
    without CURVE.
    """

    name: str
    host: str
    pid: int
    state: str
    installed: bool
    log: str
    remote_dir: str
    elapsed: float
    key: str | None = None

    @property
    def started(self) -> bool:
        """Whether this call started a bus-node process."""
        return self.state != "running"


@dataclasses.dataclass(frozen=True)
class StopResult:
    """What :func:`stop_remote` did: ``how`` is ``terminated``, ``killed`` or ``not running``."""

    name: str
    host: str
    pid: int | None
    how: str


# --------------------------------------------------------------------------- wheelhouse


def _project_files(root: Path) -> list[Path]:
    """The files a wheel of the project is built from, relative to ``root``, sorted."""
    conf = tomllib.loads((root / "pyproject.toml").read_text())
    packages = conf.get("tool", {}).get("setuptools", {}).get("packages", [])
    files = [Path(p) for p in ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", "README.md", "LICENSE")
             if (root / p).is_file()]
    for pkg in packages:
        base = root / pkg.replace(".", "/")
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(root)
            if not path.is_file() or "__pycache__" in rel.parts:
                continue
            # Build products of an in-place build are not sources.
            if path.suffix in (".pyc", ".pyo", ".so", ".html", ".stamp"):
                continue
            if path.suffix == ".c" and path.with_suffix(".pyx").exists():
                continue
            files.append(rel)
    return sorted(set(files))


def _sources_key(root: Path, files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    h.update(f"{sys.implementation.name}-{sys.version_info[0]}.{sys.version_info[1]}-"
             f"{platform.machine()}\0".encode())
    for rel in files:
        h.update(str(rel).encode() + b"\0")
        h.update(hashlib.sha256((root / rel).read_bytes()).digest())
    return h.hexdigest()


def wheelhouse_digest(wheelhouse: Path) -> str:
    """sha256 over the names and contents of the wheels in ``wheelhouse``: its version."""
    h = hashlib.sha256()
    wheels = sorted(Path(wheelhouse).glob("*.whl"))
    for whl in wheels:
        h.update(whl.name.encode() + b"\0")
        with open(whl, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def _tail(text: str, lines: int = 6) -> str:
    kept = [line.rstrip() for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def _prune_wheelhouses(dest: Path, keep: Path) -> None:
    now = time.time()
    for old in dest.glob(f"{PROJECT_NAME}-*"):
        try:
            if old != keep and old.is_dir() and now - old.stat().st_mtime > _KEEP_OLD_WHEELHOUSES:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def build_wheelhouse(dest: Path | None = None, *, python: str | None = None, timeout: float = 900.0) -> Path:
    """Wheels of this project and its runtime dependencies, in ``dest/snsbus-KEY/``; returns that dir.

    ``KEY`` hashes the project's sources (the packages named in pyproject.toml,
    setup.py, pyproject.toml, README.md) and the interpreter, so a second call
    with unchanged sources returns at once.  The build runs ``pip wheel
    --no-build-isolation`` with ``python`` (default: this interpreter, which
    must have Cython, setuptools and wheel: ``make install`` puts them in
    .venv) on a copy of the sources, so the work tree is not touched.
    Dependencies come from the package index (or pip's cache).  A lock file
    keeps concurrent callers from building the same thing twice.
    """
    dest = Path(dest) if dest is not None else DEFAULT_WHEELHOUSE_DIR
    python = python or sys.executable
    files = _project_files(PROJECT_ROOT)
    key = _sources_key(PROJECT_ROOT, files)
    final = dest / f"{PROJECT_NAME}-{key[:16]}"
    if (final / MANIFEST).is_file():
        return final
    dest.mkdir(parents=True, exist_ok=True)
    if python == sys.executable and importlib.util.find_spec("Cython") is None:
        raise BootstrapError(
            f"cannot build the wheelhouse: Cython is not installed for {python}; run `make install`",
            reason="build")
    with open(dest / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / MANIFEST).is_file():  # built by another caller while we waited
            return final
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=".build-", dir=dest) as tmp:
            src, out = Path(tmp) / "src", Path(tmp) / "wheels"
            for rel in files:
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(PROJECT_ROOT / rel, src / rel)
            argv = [python, "-m", "pip", "wheel", "--no-build-isolation", "--disable-pip-version-check",
                    "-q", "-w", str(out), str(src)]
            log.info("building the wheelhouse: %s", " ".join(argv))
            try:
                proc = subprocess.run(argv, cwd=tmp, stdin=subprocess.DEVNULL, capture_output=True,
                                      timeout=timeout, env=dict(os.environ, PIP_NO_INPUT="1"))
            except subprocess.TimeoutExpired as e:
                raise BootstrapError(f"building the wheelhouse timed out after {timeout:g}s",
                                     reason="build") from e
            if proc.returncode != 0:
                raise BootstrapError(
                    f"building the wheelhouse failed: `pip wheel` exited with code {proc.returncode}",
                    reason="build", tail=_tail(proc.stderr.decode("utf-8", "replace"), 10))
            wheels = sorted(p.name for p in out.glob("*.whl"))
            if not any(w.startswith(f"{PROJECT_NAME}-") for w in wheels):
                raise BootstrapError(f"building the wheelhouse made no {PROJECT_NAME} wheel", reason="build")
            manifest = {"key": key, "digest": wheelhouse_digest(out), "wheels": wheels,
                        "python": sys.version.split()[0], "built": time.time(),
                        "seconds": round(time.monotonic() - t0, 1)}
            (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            out.rename(final)
        _prune_wheelhouses(dest, final)
    log.info("wheelhouse %s built in %.1fs", final, time.monotonic() - t0)
    return final


class _Payload:
    """One wheelhouse as shipped: its digest, its target, and (made on demand, once) its tar."""

    def __init__(self, wheelhouse: Path) -> None:
        self.dir = Path(wheelhouse)
        wheels = sorted(self.dir.glob("*.whl"))
        ours = [w for w in wheels if w.name.startswith(f"{PROJECT_NAME}-")]
        if not ours:
            raise BootstrapError(f"{self.dir} holds no {PROJECT_NAME} wheel; build one with build_wheelhouse()",
                                 reason="usage")
        self.wheels = wheels
        self.digest = wheelhouse_digest(self.dir)
        # snsbus-0.1.0-cp311-cp311-linux_x86_64.whl -> python tag, platform tag
        parts = ours[-1].name[:-4].split("-")
        self.python_tag, self.platform_tag = parts[-3], parts[-1]
        self._tar: Path | None = None
        self._lock = threading.Lock()

    def target(self) -> tuple[tuple[int, int] | None, str | None]:
        """(major, minor) of CPython and the machine the project wheel needs; None = any."""
        m = re.fullmatch(r"cp(\d)(\d+)", self.python_tag)
        version = (int(m.group(1)), int(m.group(2))) if m else None
        machine = None
        if self.platform_tag != "any":
            machine = re.sub(r"^(many|musl)?linux(_\d+_\d+|\d+)?_", "", self.platform_tag.split(".")[0])
        return version, machine

    def tar(self) -> Path:
        with self._lock:
            if self._tar is None:
                fd, name = tempfile.mkstemp(prefix="snsbus-wheelhouse-", suffix=".tar")
                with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w") as tf:
                    for whl in self.wheels:
                        tf.add(whl, arcname=whl.name, recursive=False)
                self._tar = Path(name)
            return self._tar

    def close(self) -> None:
        with self._lock:
            if self._tar is not None:
                self._tar.unlink(missing_ok=True)
                self._tar = None


# --------------------------------------------------------------------------- the remote helper

# tools/bootstrap_remote.py, sent as text and run on the remote host as
# `python3 -c _REMOTE ACTION DIR DIGEST NAME NUMBER -- BUS-NODE-ARGS...` (see its docstring).
_REMOTE = Path(__file__).with_name("bootstrap_remote.py").read_text(encoding="utf-8")

# Run by the remote login shell (POSIX sh syntax assumed), so "python3 is missing" has its own status.
_PRELUDE = ("command -v python3 >/dev/null 2>&1 || "
            "{ echo 'snsbus bootstrap: python3 was not found on PATH' >&2; exit %d; }; exec python3 -c " %
            _PYTHON_MISSING)


# --------------------------------------------------------------------------- ssh


_SSH_FAILURES = (
    # (substring of ssh's stderr, lower-cased), reason, what failed
    ("permission denied", "auth", "ssh authentication failed: the server refused the key "
                                  "(check the identity file and the user's authorized_keys)"),
    ("too many authentication failures", "auth", "ssh authentication failed: too many keys were offered "
                                                 "(pass the identity file)"),
    ("no more authentication methods", "auth", "ssh authentication failed: no usable authentication method"),
    ("host key verification failed", "hostkey", "the host key is unknown or has changed "
                                                "(add it to known_hosts, e.g. with ssh-keyscan)"),
    ("connection refused", "unreachable", "the host is unreachable: connection refused "
                                          "(no ssh server listens on that port)"),
    ("connection timed out", "unreachable", "the host is unreachable: the connection timed out"),
    ("operation timed out", "unreachable", "the host is unreachable: the connection timed out"),
    ("no route to host", "unreachable", "the host is unreachable: no route to host"),
    ("network is unreachable", "unreachable", "the host is unreachable: the network is unreachable"),
    ("could not resolve hostname", "unreachable", "the host is unreachable: its name does not resolve"),
    ("name or service not known", "unreachable", "the host is unreachable: its name does not resolve"),
    ("temporary failure in name resolution", "unreachable", "the host is unreachable: name resolution failed"),
    ("no such identity", "usage", "the identity file cannot be read"),
    ("bad permissions", "usage", "the identity file is readable by others, so ssh refuses it (chmod 600 it)"),
    ("connection closed", "ssh", "the ssh connection was closed by the server"),
    ("connection reset", "ssh", "the ssh connection was reset"),
)


def _classify_ssh_failure(stderr: str) -> tuple[str, str]:
    """(reason, what failed) for an ssh run that exited 255."""
    low = stderr.lower()
    for needle, reason, what in _SSH_FAILURES:
        if needle in low:
            return reason, what
    return "ssh", "ssh failed (exit status 255)"


class _Target:
    """How to reach one resource with the system ssh client."""

    def __init__(self, resource, *, identity_file=None, known_hosts=None, connect_timeout: float = 10.0,
                 ssh: str | None = None) -> None:
        if getattr(resource, "type", "ssh") != "ssh":
            raise BootstrapError(
                f"{resource.name}: resource type {resource.type!r} cannot be bootstrapped over ssh "
                f"(only type=\"ssh\" resources are)", name=resource.name, reason="usage")
        if not _NAME_RE.match(resource.name):
            raise BootstrapError(f"{resource.name!r}: a resource name used as a file name must be letters, "
                                 f"digits and ._-", name=resource.name, reason="usage")
        self.resource = resource
        self.address = resource.address
        self.port = int(resource.port or 22)
        self.user = resource.user
        self.host = f"{self.user + '@' if self.user else ''}{self.address}:{self.port}"
        self.label = f"{resource.name} ({self.host})"
        self.ssh = ssh or shutil.which("ssh")
        if not self.ssh:
            raise BootstrapError(f"{self.label}: the ssh client is not installed here (install openssh-client)",
                                 host=self.host, name=resource.name, reason="usage")
        argv = [self.ssh, "-T", "-p", str(self.port),
                "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(round(connect_timeout)))}",
                "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR"]
        if self.user:
            argv += ["-l", self.user]
        if identity_file:
            argv += ["-i", str(identity_file), "-o", "IdentitiesOnly=yes"]
        if known_hosts:
            argv += ["-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
                     "-o", "StrictHostKeyChecking=yes"]
        self.argv = argv

    def error(self, what: str, reason: str, tail: str = "") -> BootstrapError:
        return BootstrapError(f"{self.label}: {what}", host=self.host, name=self.resource.name,
                              reason=reason, tail=tail)

    def call(self, action: str, remote_dir: str, *, digest: str = "", number: float = 0.0, args=(),
             stdin=None, timeout: float, doing: str) -> dict:
        """Run the helper's ``action`` over ssh; its JSON answer, or raise :class:`BootstrapError`."""
        words = [action, remote_dir, digest or "-", self.resource.name, f"{number:g}", "--", *args]
        command = _PRELUDE + shlex.quote(_REMOTE) + " " + " ".join(shlex.quote(str(w)) for w in words)
        argv = [*self.argv, "--", self.address, command]
        try:
            proc = subprocess.run(argv, stdin=stdin if stdin is not None else subprocess.DEVNULL,
                                  capture_output=True, timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired as e:
            raise self.error(f"timed out after {timeout:.0f}s while {doing}", "timeout") from e
        except OSError as e:
            raise self.error(f"could not run {self.ssh}: {e}", "usage") from e
        err = proc.stderr.decode("utf-8", "replace")
        if proc.returncode == 255:
            reason, what = _classify_ssh_failure(err)
            raise self.error(what, reason, _tail(err))
        if proc.returncode == _PYTHON_MISSING and "python3" in err:
            raise self.error("python3 is missing on the host (install it there)", "python", _tail(err))
        lines = proc.stdout.decode("utf-8", "replace").strip().splitlines()
        try:
            reply = json.loads(lines[-1])
            if not isinstance(reply, dict):
                raise ValueError(reply)
        except (IndexError, ValueError):
            raise self.error(f"the remote helper failed with exit status {proc.returncode} while {doing}",
                             "ssh", _tail(err)) from None
        if not reply.get("ok"):
            stage = str(reply.get("stage") or "ssh")
            raise self.error(str(reply.get("error") or f"{stage} failed"), stage,
                             str(reply.get("tail") or _tail(err)))
        return reply


def _node_args(resource, join: str, extra_args: Sequence[str]) -> list[str]:
    args = ["--join", join, "--name", resource.name]
    if resource.group:
        args += ["--group", resource.group]
    for key, value in resource.attrs:
        args += ["--attr", f"{key}={value}"]
    join_host = join.removeprefix("tcp://").rsplit(":", 1)[0]
    advertised = any(a == "--advertise" or str(a).startswith("--advertise=") for a in extra_args)
    if join_host not in _LOOPBACK and not advertised:
        # Reached over ssh at this address, so the tree can reach it there too
        # (bus-node's own default, the host name, may not resolve elsewhere).
        args += ["--advertise", resource.address]
    return args + [str(a) for a in extra_args]


def _check_target(target: _Target, payload: _Payload, probe: dict) -> None:
    version, machine = payload.target()
    remote_version = tuple(probe.get("version") or ())
    impl, remote_machine = probe.get("impl"), probe.get("machine")
    if (version and (impl != "cpython" or remote_version != version)) or (machine and remote_machine != machine):
        have = f"{impl} {'.'.join(map(str, remote_version))} on {remote_machine}"
        need = f"CPython {'.'.join(map(str, version)) if version else 'any'} on {machine or 'any machine'}"
        raise target.error(
            f"python3 there ({probe.get('python')}) is {have}, but the wheelhouse is built for {need}; "
            f"install that Python there or build the wheelhouse on a matching machine", "incompatible")


def _key_args(manager_key: str | None) -> list[str]:
    """bus-node's CURVE flags: its key made in ``REMOTE_DIR/keys`` (its cwd), pinned to the manager's key."""
    return ["--insecure"] if manager_key is None else ["--key-dir", "keys", "--manager-key", manager_key]


def admit(call, name: str, key: str) -> bool:
    """Accept a bootstrapped node's ``key`` as ``name`` through the manager's control API
    (``call(cmd, **args)``, e.g. ``CtlClient.call``); False when it was accepted already."""
    known = call("keys", op="list").get("keys", [])
    if any(k["key"] == key and k["state"] == "accepted" for k in known):
        return False
    if any(k["name"] == name and k["state"] == "accepted" for k in known):
        raise BootstrapError(f"{name} is accepted with another key: the node made a new one (its key dir was "
                             f"removed?); run `bus-ctl keys revoke {name}` and bootstrap it again", reason="usage")
    call("keys", op="add", name=name, key=key)
    return True


def _bootstrap(resource, join: str, payload: _Payload, *, identity_file=None, known_hosts=None,
               remote_dir: str = DEFAULT_REMOTE_DIR, timeout: float = 120.0, connect_timeout: float = 10.0,
               extra_args: Sequence[str] = (), start_check: float = 1.0,
               manager_key: str | None = None) -> BootstrapResult:
    t0 = time.monotonic()
    deadline = t0 + timeout
    target = _Target(resource, identity_file=identity_file, known_hosts=known_hosts,
                     connect_timeout=min(connect_timeout, timeout))
    args = _node_args(resource, join, [*_key_args(manager_key), *extra_args])
    common = dict(digest=payload.digest, number=start_check, args=args)
    reply = target.call("probe", remote_dir, **common, timeout=deadline - time.monotonic(),
                        doing="checking the install")
    installed = False
    if reply.get("state") == "need-install":
        _check_target(target, payload, reply)
        log.info("%s: installing bus-node from %d wheels", target.label, len(payload.wheels))
        with open(payload.tar(), "rb") as tar:
            reply = target.call("install", remote_dir, **common, stdin=tar, timeout=deadline - time.monotonic(),
                                doing="installing bus-node")
        installed = bool(reply.get("installed", True))  # False: a concurrent call installed it first
    log.info("%s: bus-node %s, pid %s", target.label, reply["state"], reply["pid"])
    return BootstrapResult(name=resource.name, host=target.host, pid=int(reply["pid"]), state=reply["state"],
                           installed=installed, log=reply["log"], remote_dir=remote_dir,
                           elapsed=round(time.monotonic() - t0, 3), key=reply.get("key"))


def bootstrap(
    resource,
    join: str,
    *,
    wheelhouse: Path,
    identity_file: str | None = None,
    known_hosts: str | None = None,
    remote_dir: str = DEFAULT_REMOTE_DIR,
    timeout: float = 120.0,
    connect_timeout: float = 10.0,
    extra_args: Sequence[str] = (),
    start_check: float = 1.0,
    manager_key: str | None = None,
) -> BootstrapResult:
    """Make bus-node run on the ssh ``resource``, joined to ``join``; install it first if needed.

    ``resource`` is a :class:`manager.resources.Resource` of type ``ssh``
    (name, address, port, user, group, attrs).  bus-node is started as
    ``bus-node --join JOIN --name NAME [--group G] [--attr K=V ...]
    [--advertise ADDRESS] EXTRA_ARGS`` (``--advertise`` unless JOIN is a
    loopback address or EXTRA_ARGS set it).  ``known_hosts`` replaces the
    user's known_hosts files and makes host key checking strict; without it
    ssh's own configuration decides.  ``start_check`` is how long the remote
    side watches a new bus-node for an early exit.  ``timeout`` bounds the
    whole call.  Idempotent: a live bus-node of that name running from the
    current install with the same arguments is left alone (``state ==
    "running"``).  ``manager_key`` (z85): the node runs with CurveZMQ, its key
    in ``REMOTE_DIR/keys`` and pinned to that manager key; the result's
    ``key`` is the node's, to :func:`admit`.  None: ``--insecure``.  Raises
    :class:`BootstrapError`.
    """
    payload = _Payload(wheelhouse)
    try:
        return _bootstrap(resource, join, payload, identity_file=identity_file, known_hosts=known_hosts,
                          remote_dir=remote_dir, timeout=timeout, connect_timeout=connect_timeout,
                          extra_args=extra_args, start_check=start_check, manager_key=manager_key)
    finally:
        payload.close()


def _each(fn, resources: list, max_workers: int) -> dict:
    """``fn`` on every resource in a thread pool: ``{name: result or BootstrapError}``, in input order."""
    names = [r.name for r in resources]
    if len(set(names)) != len(names):
        raise BootstrapError(f"resource names must be unique: {', '.join(sorted(names))}", reason="usage")

    def one(resource):
        try:
            return fn(resource)
        except BootstrapError as e:
            return e

    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(resources) or 1)),
                            thread_name_prefix="bootstrap") as pool:
        return dict(zip(names, pool.map(one, resources)))


def bootstrap_all(resources: Iterable, join: str, *, wheelhouse: Path, max_workers: int = 16,
                  **kwargs) -> dict[str, BootstrapResult | BootstrapError]:
    """:func:`bootstrap` every resource in parallel; ``{name: result or error}`` in input order.

    Takes the keyword arguments of :func:`bootstrap`.  The wheelhouse is
    hashed and packed once for all hosts.  One host's failure does not
    raise: its entry is the :class:`BootstrapError`.
    """
    payload = _Payload(wheelhouse)
    try:
        return _each(lambda r: _bootstrap(r, join, payload, **kwargs), list(resources), max_workers)
    finally:
        payload.close()


def stop_remote(
    resource,
    name: str | None = None,
    *,
    identity_file: str | None = None,
    known_hosts: str | None = None,
    remote_dir: str = DEFAULT_REMOTE_DIR,
    grace: float = 5.0,
    timeout: float = 30.0,
    connect_timeout: float = 10.0,
) -> StopResult:
    """SIGTERM the bus-node ``name`` (default: the resource's name) started by :func:`bootstrap`.

    Waits ``grace`` seconds, then SIGKILLs its process group.  Stopping a node
    that is not running is not an error (``how == "not running"``).
    """
    if name is not None and name != resource.name:
        resource = dataclasses.replace(resource, name=name)
    target = _Target(resource, identity_file=identity_file, known_hosts=known_hosts,
                     connect_timeout=min(connect_timeout, timeout))
    reply = target.call("stop", remote_dir, number=grace, timeout=timeout, doing="stopping bus-node")
    pid = reply.get("pid")
    return StopResult(name=resource.name, host=target.host, pid=int(pid) if pid else None, how=reply["how"])


def stop_all(resources: Iterable, *, max_workers: int = 16, **kwargs) -> dict[str, StopResult | BootstrapError]:
    """:func:`stop_remote` every resource in parallel; ``{name: result or error}`` in input order."""
    return _each(lambda r: stop_remote(r, **kwargs), list(resources), max_workers)
