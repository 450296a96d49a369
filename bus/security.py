"""CurveZMQ on every socket of both planes: keys, the key store, the ZAP handler.

Every process has one key pair (a machine's bus-node processes may share
one, like an ssh host key).  Every bound ROUTER is a CURVE server whose ZAP
handler (one thread per context, :class:`ZapHandler`) admits only authorized
client keys; every DEALER is a CURVE client pinned to its server's key:

* a plain endpoint (``tcp://host:port``, e.g. ``--join``) means the manager,
  whose key every process pins (a file or a flag);
* any other server advertises its endpoints *with* its key,
  ``tcp://host:port#<z85 key>`` (:func:`tag_endpoint`), and those endpoints
  only ever travel inside CURVE links from the manager or authorized nodes,
  so a joiner redirected to node X connects to X pinned to X's own key.

The manager owns the key store (:class:`KeyStore`, salt-key style: accepted,
pending, revoked, plus an ``autoaccept`` file) and pushes the authorized set
down the tree (op ``keys.sync``, :class:`KeyService`), so every node's ROUTERs
admit exactly the keys the manager accepted.  Revoking removes the key from
every set and cuts the revoked peer's live connections.  See docs/security.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import logging
import os
import re
import socket as _socket
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import zmq
from zmq.utils import z85

from bus.protocol import BusError

__all__ = [
    "SecurityError", "KeyFormatError", "KeyStoreError", "KeyPair", "KeyEntry", "KeyStore", "ZapHandler",
    "Security", "KeyService", "KEY_HANDLERS", "op_keys_sync", "apply_key_command", "decode_key", "encode_key",
    "fingerprint", "load_public_key", "read_key_file", "write_key_file", "tag_endpoint", "split_endpoint",
    "plain_endpoint", "cut_connections", "handshake_failure", "HANDSHAKE_EVENTS", "local_cluster_keys",
    "client_security", "IDENTITY_FILE", "MANAGER_PUB", "CLIENT_KEY", "CACHE_FILE", "ACCEPTED", "PENDING", "REVOKED",
]

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.key"  # a key dir's own key pair (nodes, front ends)
MANAGER_PUB = "manager.pub"  # the pinned manager key, in a key dir and in the store
CLIENT_KEY = "client.key"  # bus-ctl's key pair, in the state directory
CACHE_FILE = "authorized.json"  # a node's last keyring from the manager
ACCEPTED, PENDING, REVOKED = "accepted", "pending", "revoked"
STATES = (ACCEPTED, PENDING, REVOKED)
MAX_PENDING = 256  # an attacker with endless fresh keys must not fill the disk
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_TAG = "#"  # endpoint#key: z85 keys are exactly 40 characters


class SecurityError(BusError):
    """A key, key file or CURVE setting is missing or wrong; the message says what to do."""


class KeyFormatError(SecurityError, ValueError):
    """Text that is not a CURVE key (40 z85 characters, 64 hex digits or 32 bytes)."""


class KeyStoreError(SecurityError, OSError):
    """The key store refused a change or cannot be read."""


# -- keys ------------------------------------------------------------------------


def encode_key(key: bytes) -> str:
    """The 40-character z85 text of a raw 32-byte key."""
    return z85.encode(key).decode("ascii")


def decode_key(value) -> bytes:
    """A raw 32-byte key from z85 text (40 characters), hex (64) or raw bytes (32, bytes only)."""
    if isinstance(value, (bytes, bytearray)) and len(value) == 32:
        return bytes(value)
    text = (value.decode("ascii", "replace") if isinstance(value, (bytes, bytearray)) else str(value)).strip()
    try:
        if len(text) == 40:
            return z85.decode(text.encode("ascii"))
        if len(text) == 64:
            return bytes.fromhex(text)
    except (ValueError, KeyError, IndexError) as e:  # UnicodeEncodeError is a ValueError
        raise KeyFormatError(f"not a CURVE key: {value!r}") from e
    raise KeyFormatError(f"not a CURVE key (40 z85 characters or 64 hex digits): {value!r}")


def fingerprint(key: bytes, full: bool = False) -> str:
    """sha256 of the raw key in hex: 16 digits to show and type, 64 to pin in a file."""
    h = hashlib.sha256(key).hexdigest()
    return h if full else h[:16]


@dataclass(frozen=True)
class KeyPair:
    """Raw 32-byte CURVE keys; ``secret`` is None for a peer's public key."""

    public: bytes
    secret: bytes | None = field(default=None, repr=False)

    @classmethod
    def generate(cls) -> KeyPair:
        pub, sec = zmq.curve_keypair()
        return cls(z85.decode(pub), z85.decode(sec))

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600: temporary file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_key_file(path, public: bytes, secret: bytes | None = None, **meta) -> None:
    """A ZPL certificate (the format of czmq and ``zmq.auth.load_certificate``), mode 0600."""
    kind = "Secret" if secret else "Public"
    lines = [f"#   ****  Generated by snsbus on {time.strftime('%Y-%m-%d %H:%M:%S')}  ****",
             f"#   ZeroMQ CURVE **{kind}** Certificate",
             "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions." if secret else "#",
             "", "metadata"]
    for k, v in meta.items():
        if v is not None:
            lines.append(f'    {k} = "{str(v).replace(chr(34), "").replace(chr(10), " ")}"')
    lines += ["curve", f'    public-key = "{encode_key(public)}"']
    if secret:
        lines.append(f'    secret-key = "{encode_key(secret)}"')
    _atomic_write(Path(path), "\n".join(lines) + "\n")


def read_key_file(path) -> tuple[bytes, bytes | None, dict]:
    """``(public, secret or None, metadata)`` of a certificate; refuses a secret readable by others."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as e:
        raise KeyStoreError(f"cannot read the key file {path}: {e}") from e
    values = {}
    for line in text.splitlines():
        k, sep, v = line.strip().partition("=")
        if sep and not line.lstrip().startswith("#"):
            values[k.strip()] = v.strip().strip('"')
    try:
        public = decode_key(values["public-key"])
        secret = decode_key(values["secret-key"]) if "secret-key" in values else None
    except (KeyError, KeyFormatError) as e:
        raise KeyStoreError(f"{path} is not a CURVE certificate (no valid public-key line)") from e
    if secret is not None and mode & 0o077:
        raise KeyStoreError(f"the secret key {path} is readable by other users: run `chmod 600 {path}`")
    return public, secret, {k: v for k, v in values.items() if k not in ("public-key", "secret-key")}


def load_public_key(value) -> bytes:
    """A pinned key from a flag: key text (z85/hex), or the path of a .pub/.key file."""
    if isinstance(value, bytes) and len(value) == 32:
        return value
    if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
        return read_key_file(value)[0]
    return decode_key(value)


# -- endpoints that carry their server's key ------------------------------------------


def tag_endpoint(endpoint: str, key: bytes) -> str:
    """``tcp://host:port#<z85 key>``: an endpoint that names the key its server must prove."""
    return f"{plain_endpoint(endpoint)}{_TAG}{encode_key(key)}"


def split_endpoint(endpoint: str) -> tuple[str, bytes | None]:
    """``(endpoint for libzmq, server key or None)``."""
    if len(endpoint) > 41 and endpoint[-41] == _TAG:
        return endpoint[:-41], decode_key(endpoint[-40:])
    return endpoint, None


def plain_endpoint(endpoint: str) -> str:
    """The endpoint without its key (for display and for libzmq)."""
    return split_endpoint(endpoint)[0]


#: The monitor events of a failed handshake (watch them on a client to say why it cannot connect).
HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def handshake_failure(monitor: zmq.Socket, secure: bool) -> str | None:
    """Why a DEALER (monitored for :data:`HANDSHAKE_EVENTS`) never connected, as advice; None: no failure seen."""
    seen = set()
    while monitor.poll(0):
        seen.add(int.from_bytes(monitor.recv_multipart()[0][:2], "little"))
    if zmq.EVENT_HANDSHAKE_FAILED_AUTH in seen:
        return ("refused this client's key: have it accepted (`bus-ctl keys add NAME KEY` where the manager "
                "runs; `bus-ctl keys init --client-only` prints this client's key)")
    if seen:
        return ("failed the CURVE handshake: the pinned manager key is wrong (copy its manager.pub again)"
                if secure else "requires CURVE: run `bus-ctl keys init --client-only` and copy its manager.pub")
    return None


# -- the key store (manager side) ---------------------------------------------------


@dataclass(frozen=True)
class KeyEntry:
    name: str
    key: bytes
    state: str
    meta: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    def to_dict(self) -> dict:
        return {**self.meta, "name": self.name, "state": self.state, "fingerprint": self.fingerprint,
                "key": encode_key(self.key)}


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise KeyStoreError(f"bad key name {name!r}: use letters, digits and . _ @ + - (at most 64)")
    return name


class KeyStore:
    """The manager's keys on disk (every file 0600, every directory 0700)::

        DIR/manager.key  DIR/manager.pub      the manager's key pair / its public half
        DIR/accepted/NAME.pub                 admitted everywhere
        DIR/pending/FP.pub                    seen at the manager, waiting for `bus-ctl keys accept`
        DIR/revoked/NAME.pub                  refused everywhere, connections cut
        DIR/autoaccept                        "NAME KEY" lines (KEY: z85 or sha256 hex): accepted on sight
        DIR/keyring.json                      {"version"}: grows with every change

    Every method reads the disk, so an edit by ``bus-ctl keys --keys DIR`` is
    seen by a running manager (at its next sync).  Writes are atomic.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._full_warned = -1e9

    def initialized(self) -> bool:
        return (self.path / "manager.key").is_file()

    @contextlib.contextmanager
    def _locked(self):
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._lock:
            fd = os.open(self.path / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the lock

    def init(self, *, force: bool = False) -> KeyPair:
        """Create the manager's key pair (refused if one exists, unless ``force``)."""
        with self._locked():
            if self.initialized() and not force:
                raise KeyStoreError(f"{self.path} already holds a manager key; --force replaces it "
                                    f"(every node pinning the old one is then refused)")
            for d in STATES:
                (self.path / d).mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.path, 0o700)
            pair = KeyPair.generate()
            write_key_file(self.path / "manager.key", pair.public, pair.secret, name="manager")
            write_key_file(self.path / MANAGER_PUB, pair.public, name="manager")
            self._bump()
            return pair

    def manager_keypair(self) -> KeyPair:
        if not self.initialized():
            raise KeyStoreError(f"no manager key in {self.path}: run `bus-ctl keys init --keys {self.path}`")
        public, secret, _ = read_key_file(self.path / "manager.key")
        return KeyPair(public, secret)

    @property
    def version(self) -> int:
        try:
            return int(json.loads((self.path / "keyring.json").read_text())["version"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def _bump(self) -> int:
        # Wall-clock milliseconds, never less than before + 1: a store restored
        # from a backup still outranks what nodes have cached.
        v = max(self.version + 1, int(time.time() * 1000))
        _atomic_write(self.path / "keyring.json", json.dumps({"version": v}) + "\n")
        return v

    def entries(self, state: str | None = None) -> list[KeyEntry]:
        out = []
        for st in STATES if state is None else (state,):
            for f in sorted((self.path / st).glob("*.pub")):
                public, _, meta = read_key_file(f)
                out.append(KeyEntry(f.stem, public, st, meta))
        return out

    def authorized(self) -> set[bytes]:
        """Accepted keys plus the manager's own."""
        keys = {e.key for e in self.entries(ACCEPTED)}
        if self.initialized():
            keys.add(self.manager_keypair().public)
        return keys

    def revoked(self) -> set[bytes]:
        return {e.key for e in self.entries(REVOKED)}

    def find(self, ref: str, states=STATES) -> KeyEntry:
        """By name, fingerprint (or a prefix of 6+ digits) or key; one match or an error."""
        entries = [e for e in self.entries() if e.state in states]
        hits = [e for e in entries if e.name == ref]
        if not hits and re.fullmatch(r"[0-9a-f]{6,64}", ref or ""):
            hits = [e for e in entries if fingerprint(e.key, True).startswith(ref)]
        if not hits:
            with contextlib.suppress(KeyFormatError):
                key = decode_key(ref)
                hits = [e for e in entries if e.key == key]
        if len(hits) == 1:
            return hits[0]
        where = "/".join(states)
        if not hits:
            raise KeyStoreError(f"no {where} key named {ref!r} (see `bus-ctl keys list`)")
        raise KeyStoreError(f"{ref!r} matches {len(hits)} keys ({', '.join(e.name for e in hits)}): be more precise")

    def _move(self, entry: KeyEntry | None, state: str, name: str, key: bytes, **meta) -> KeyEntry:
        if entry is not None:
            (self.path / entry.state / f"{entry.name}.pub").unlink(missing_ok=True)
            meta = {**entry.meta, **meta}
        meta.pop("name", None)
        write_key_file(self.path / state / f"{name}.pub", key, name=name, **meta)
        if state != PENDING:  # the keyring is the accepted and revoked sets: a new pending key is not news
            self._bump()
        return KeyEntry(name, key, state, meta)

    def add(self, name: str, key: bytes, *, force: bool = False) -> KeyEntry:
        """Pre-authorize ``key`` as ``name`` (a pending one moves; a revoked one needs ``force``)."""
        _check_name(name)
        with self._locked():
            if self.initialized() and key == self.manager_keypair().public:
                raise KeyStoreError("that is the manager's own key; it is always admitted")
            same = [e for e in self.entries() if e.key == key]
            taken = [e for e in self.entries(ACCEPTED) if e.name == name and e.key != key]
            if taken:
                raise KeyStoreError(f"the name {name} is taken by key {taken[0].fingerprint}: revoke it first or "
                                    f"choose another name")
            old = same[0] if same else None
            if old is not None and old.state == ACCEPTED:
                if old.name == name:
                    return old
                raise KeyStoreError(f"that key is already accepted as {old.name}")
            if old is not None and old.state == REVOKED and not force:
                raise KeyStoreError(f"that key was revoked (as {old.name}); add --force to admit it again")
            return self._move(old, ACCEPTED, name, key, added=time.strftime("%Y-%m-%dT%H:%M:%S"))

    def accept(self, ref: str, name: str | None = None) -> KeyEntry:
        entry = self.find(ref, (PENDING,))
        return self.add(name or entry.name, entry.key)

    def revoke(self, ref: str) -> KeyEntry:
        with self._locked():
            entry = self.find(ref, (ACCEPTED, PENDING))
            return self._move(entry, REVOKED, entry.name, entry.key, revoked=time.strftime("%Y-%m-%dT%H:%M:%S"))

    def _autoaccept(self, key: bytes) -> str | None:
        try:
            lines = (self.path / "autoaccept").read_text(encoding="utf-8").splitlines()
        except OSError:
            return None
        fp = fingerprint(key, True)
        for line in lines:  # comments are whole lines: a z85 key may hold a '#'
            parts = [] if line.lstrip().startswith("#") else line.split()
            if len(parts) == 2 and (parts[1] == fp or parts[1] == encode_key(key)):
                return parts[0]
        return None

    def note_pending(self, key: bytes, address: str) -> KeyEntry | None:
        """An unknown key knocked: auto-accepted if listed in ``autoaccept``, else recorded as pending.

        None when nothing changed (already pending, or the pending list is full).
        """
        name = self._autoaccept(key)
        if name is not None:
            try:
                return self.add(name, key)
            except KeyStoreError as e:
                log.warning("autoaccept of %s as %s refused: %s", fingerprint(key), name, e)
                return None
        # Cheap checks only (a flood of fresh keys must not cost a scan each): the caller
        # asks only for keys its ZAP set neither admits nor refuses.
        with self._locked():
            if (self.path / PENDING / f"{fingerprint(key)}.pub").exists():
                return None
            if sum(1 for _ in (self.path / PENDING).glob("*.pub")) >= MAX_PENDING:
                if time.monotonic() - self._full_warned > 60.0:
                    self._full_warned = time.monotonic()
                    log.warning("%d keys are pending in %s: recording no more until some are accepted or revoked",
                                MAX_PENDING, self.path)
                return None
            now = time.strftime("%Y-%m-%dT%H:%M:%S")
            return self._move(None, PENDING, fingerprint(key), key, address=address, seen=now)


def apply_key_command(store: KeyStore, args: dict) -> tuple[dict, bool]:
    """One ``keys`` command on ``store``: ``(result, changed)``; used online (manager) and offline (bus-ctl)."""
    op = args.get("op", "list")
    if op == "list":
        mk = store.manager_keypair().public
        return {"manager": {"fingerprint": fingerprint(mk), "key": encode_key(mk)}, "version": store.version,
                "keys": [e.to_dict() for e in store.entries()]}, False
    if op == "add":
        key = decode_key(str(args.get("key", "")))
        entry = store.add(str(args.get("name", "")), key, force=bool(args.get("force")))
    elif op == "accept":
        entry = store.accept(str(args.get("ref", "")), args.get("name") or None)
    elif op == "revoke":
        entry = store.revoke(str(args.get("ref", "")))
    else:
        raise KeyStoreError(f"unknown keys operation {op!r}: use list, add, accept or revoke")
    return {"entry": entry.to_dict(), "version": store.version}, True


# -- the ZAP handler ----------------------------------------------------------------


class ZapHandler:
    """Answers the ZAP requests of one context's CURVE servers in a thread.

    ``decide(domain, address, key) -> (ok, reason)`` is called in that
    thread.  ZAP must be bound before the first CURVE server binds: libzmq
    admits every client of a CURVE server when no handler is bound.
    """

    def __init__(self, context: zmq.Context, decide: Callable[[str, str, bytes], tuple[bool, str]]):
        self._context = context
        self._decide = decide
        self._thread: threading.Thread | None = None
        self._zap = self._pipe = self._thread_pipe = None
        self.counters = {"admitted": 0, "refused": 0, "malformed": 0}

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._zap = self._context.socket(zmq.REP, socket_class=zmq.Socket)
        self._zap.linger = 0
        try:
            self._zap.bind("inproc://zeromq.zap.01")
        except zmq.ZMQError as e:
            self._zap.close(0)
            self._zap = None
            raise SecurityError(f"cannot serve ZAP on this context ({e}): another ZAP handler runs there") from e
        ep = f"inproc://snsbus-zap-stop-{id(self)}"
        self._pipe = self._context.socket(zmq.PAIR, socket_class=zmq.Socket)
        self._pipe.linger = 0
        self._pipe.bind(ep)
        self._thread_pipe = self._context.socket(zmq.PAIR, socket_class=zmq.Socket)
        self._thread_pipe.linger = 0
        self._thread_pipe.connect(ep)
        self._thread = threading.Thread(target=self._run, name="snsbus-zap", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._pipe.send(b"STOP")
        self._thread.join()
        for s in (self._zap, self._pipe, self._thread_pipe):
            s.close(0)
        self._thread = self._zap = self._pipe = self._thread_pipe = None

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        poller.register(self._thread_pipe, zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._thread_pipe in ready:
                return
            if self._zap in ready:
                self._zap.send_multipart(self._answer(self._zap.recv_multipart()))

    def _answer(self, msg: list) -> list:
        rid = msg[1] if len(msg) > 1 else b""
        if len(msg) != 7 or msg[0] != b"1.0" or msg[5] != b"CURVE" or len(msg[6]) != 32:
            self.counters["malformed"] += 1
            return [b"1.0", rid, b"400", b"CURVE only", b"", b""]
        key = msg[6]
        try:
            ok, reason = self._decide(msg[2].decode("utf-8", "replace"), msg[3].decode("utf-8", "replace"), key)
        except Exception:  # never leave a handshake hanging: refuse
            log.exception("ZAP decision failed; refusing")
            ok, reason = False, "internal error"
        self.counters["admitted" if ok else "refused"] += 1
        if ok:  # User-Id = the key: readable as message metadata by whoever receives frames
            return [b"1.0", rid, b"200", b"OK", z85.encode(key), b""]
        return [b"1.0", rid, b"400", reason.encode(), b"", b""]


def cut_connections(targets: set[tuple[int, str]]) -> int:
    """Shut down this process's accepted TCP connections to local port P from address A, (P, A) in ``targets``.

    libzmq cannot close one peer of a ROUTER, so the connection is shut down
    under it (``shutdown(2)``, not ``close``: libzmq sees EOF and closes its fd
    itself).  Linux only (``/proc/self/fd``); returns how many were cut.
    """
    if not targets or not os.path.isdir("/proc/self/fd"):
        return 0
    ports = {port for port, _ in targets}
    cut = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            dup = os.dup(int(name))
        except OSError:
            continue  # closed meanwhile
        try:
            s = _socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            continue
        with s:
            try:
                if s.family not in (_socket.AF_INET, _socket.AF_INET6) or (port := s.getsockname()[1]) not in ports:
                    continue
                peer = s.getpeername()[0].removeprefix("::ffff:")  # ENOTCONN: the listener itself
            except OSError:
                continue
            if (port, peer) in targets:
                with contextlib.suppress(OSError):
                    s.shutdown(_socket.SHUT_RDWR)
                    cut += 1
    return cut


# -- one process's CURVE settings -----------------------------------------------------


class Security:
    """CURVE for one process: its key pair, the pinned manager key, the keys its ROUTERs admit.

    :class:`bus.planes.SocketFactory` calls :meth:`secure_server` /
    :meth:`secure_client` for every socket, and :meth:`attach`/:meth:`detach`
    around its life; the ZAP thread starts with the first server socket of a
    context and stops when the last factory of that context closes.
    The manager's own key and this process's key are always admitted (logical
    nodes of one process connect to each other), unless revoked.
    """

    def __init__(self, keypair: KeyPair, *, manager_key: bytes | None = None, authorized: Iterable[bytes] = (),
                 revoked: Iterable[bytes] = (), version: int = 0, open: bool = False,
                 on_unknown: Callable[[bytes, str, bool], None] | None = None, cache=None, grace: float = 0.25):
        if keypair.secret is None:
            raise SecurityError("a process needs its secret key, not only the public one")
        self.keypair = keypair
        self.manager_key = manager_key
        self.open = open
        self.on_unknown = on_unknown
        self.on_self_revoked: Callable[[], None] | None = None
        self.on_server_revoked: Callable[[zmq.Socket, str], None] | None = None
        self.cache = Path(cache) if cache else None
        self.key_dir: Path | None = None  # set by from_key_dir; passed on to processes a node runs
        self.grace = grace
        self._version = int(version)
        self._authorized = frozenset(authorized)
        self._revoked = frozenset(revoked)
        self._allowed = self._compute_allowed()
        self._ids = itertools.count(1)
        self._servers = weakref.WeakValueDictionary()  # ZAP domain -> its ROUTER
        self._clients = weakref.WeakKeyDictionary()  # DEALER -> (server key, endpoint)
        self._seen: dict[bytes, set] = {}  # admitted key -> {(domain, address)}
        self._seen_lock = threading.Lock()
        self._zap: dict[int, tuple[zmq.Context, ZapHandler, int]] = {}  # id(ctx) -> (ctx, handler, factories)
        self.counters = {"admitted": 0, "refused": 0, "unknown": 0, "cut": 0, "updates": 0}

    @classmethod
    def from_key_dir(cls, key_dir, *, manager_key=None, name: str | None = None, **kw) -> Security:
        """``DIR/identity.key`` (made on first use), the manager key (``manager_key``: text or file, else
        ``DIR/manager.pub``) and the last keyring pushed (``DIR/authorized.json``)."""
        d = Path(key_dir).expanduser()
        ident = d / IDENTITY_FILE
        if not ident.exists():
            pair = KeyPair.generate()
            write_key_file(ident, pair.public, pair.secret, name=name or _socket.gethostname())
            log.warning("created key %s (sha256 %s) in %s; unless it is pre-authorized, the manager admits it "
                        "after `bus-ctl keys accept %s`", pair.fingerprint, fingerprint(pair.public, True), d,
                        pair.fingerprint)
        public, secret, _ = read_key_file(ident)
        if manager_key is None:
            if not (d / MANAGER_PUB).is_file():
                raise SecurityError(f"no manager key: copy the manager's manager.pub to {d / MANAGER_PUB} "
                                    f"or pass --manager-key")
            manager_key = d / MANAGER_PUB
        sec = cls(KeyPair(public, secret), manager_key=load_public_key(manager_key), cache=d / CACHE_FILE,
                  **{**_read_cache(d / CACHE_FILE), **kw})
        sec.key_dir = d
        return sec

    # -- properties ------------------------------------------------------------------
    @property
    def public_key(self) -> bytes:
        return self.keypair.public

    @property
    def version(self) -> int:
        return self._version

    def allowed(self) -> frozenset:
        """The client keys this process's ROUTERs admit now."""
        return self._allowed

    def _compute_allowed(self) -> frozenset:
        extra = {self.keypair.public} | ({self.manager_key} if self.manager_key else set())
        return frozenset((self._authorized | extra) - self._revoked)

    # -- SocketFactory hooks ---------------------------------------------------------
    def attach(self, context: zmq.Context) -> None:
        """A factory on ``context`` will build sockets (no I/O: the ZAP thread starts on first bind)."""
        ctx, zap, n = self._zap.get(id(context)) or (context, ZapHandler(context, self._decide), 0)
        self._zap[id(context)] = (ctx, zap, n + 1)

    def detach(self, context: zmq.Context) -> None:
        """That factory closed its sockets; the last one out stops the ZAP thread."""
        entry = self._zap.get(id(context))
        if entry is None:
            return
        ctx, zap, n = entry
        if n <= 1:
            zap.stop()
            del self._zap[id(context)]
        else:
            self._zap[id(context)] = (ctx, zap, n - 1)

    def close(self) -> None:
        """Stop every ZAP thread of this object (for users without a SocketFactory); idempotent."""
        for _, zap, _ in self._zap.values():
            zap.stop()
        self._zap.clear()

    def secure_server(self, sock: zmq.Socket) -> None:
        """CURVE server with its own ZAP domain (so a cut knows the socket); ZAP running first."""
        if id(sock.context) not in self._zap:
            self.attach(sock.context)
        self._zap[id(sock.context)][1].start()
        domain = f"snsbus/{next(self._ids)}"
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keypair.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keypair.secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
        self._servers[domain] = sock

    def secure_client(self, sock: zmq.Socket, endpoint: str) -> str:
        """CURVE client pinned to the endpoint's key (plain endpoint: the manager's); the endpoint for libzmq."""
        bare, key = split_endpoint(endpoint)
        key = key or self.manager_key
        if key is None:
            raise SecurityError(f"no server key for {endpoint}: pin the manager's key (--manager-key) or use an "
                                f"endpoint that carries its key")
        sock.setsockopt(zmq.CURVE_SERVERKEY, key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keypair.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keypair.secret)
        self._clients[sock] = (key, bare)
        return bare

    def advertise(self, endpoint: str) -> str:
        """The endpoint others should connect to: tagged with this process's key, except for the
        manager, whose key everyone pins (so its endpoints stay plain)."""
        if self.keypair.public == self.manager_key:
            return endpoint
        return tag_endpoint(endpoint, self.keypair.public)

    # -- ZAP (in the handler's thread) -------------------------------------------------
    def _decide(self, domain: str, address: str, key: bytes) -> tuple[bool, str]:
        if key in self._revoked:
            self.counters["refused"] += 1
            return False, "revoked key"
        known = key in self._allowed
        if not known:
            self.counters["unknown"] += 1
            if self.on_unknown is not None:
                self.on_unknown(key, address, self.open)
        if not (known or self.open):
            self.counters["refused"] += 1
            return False, "unknown key"
        self.counters["admitted"] += 1
        with self._seen_lock:
            seen = self._seen.setdefault(key, set())
            if len(seen) < 64:
                seen.add((domain, address))
        return True, "OK"

    # -- the keyring -------------------------------------------------------------------
    def update(self, version: int, keys: Iterable[bytes], revoked: Iterable[bytes] = ()) -> bool:
        """Adopt the manager's keyring if newer; keys that lose admission are cut off. True if applied."""
        if version <= self._version:
            return False
        before = self._allowed
        self._version = int(version)
        self._authorized, self._revoked = frozenset(keys), frozenset(revoked)
        self._allowed = self._compute_allowed()
        self.counters["updates"] += 1
        if self.cache is not None:
            try:
                _atomic_write(self.cache, _ring_json(self._version, self._authorized, self._revoked))
            except OSError as e:
                log.warning("cannot cache the keyring in %s: %s", self.cache, e)
        gone = before - self._allowed
        if gone:
            log.warning("keyring v%d: %d key(s) revoked: %s", version, len(gone),
                        ", ".join(fingerprint(k) for k in gone))
            loop = _running_loop()
            if loop is not None:  # let queued messages (this very keys.sync, forwarded) leave first
                loop.call_later(self.grace, self.revoked_now, gone)
            else:
                self.revoked_now(gone)
        return True

    def revoked_now(self, keys: set) -> int:
        """Cut ``keys`` off at once: their connections to our ROUTERs, our DEALERs to their servers,
        and this whole process when its own key is among them.  Returns connections cut."""
        keys = set(keys)
        with self._seen_lock:
            seen = set().union(*(self._seen.pop(k, set()) for k in keys))
        targets = set()  # (port of a ROUTER the key reached, address it came from)
        for domain, address in seen:
            sock = self._servers.get(domain)
            if sock is not None and not sock.closed:
                with contextlib.suppress(zmq.ZMQError, ValueError):
                    targets.add((int(sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1]), address))
        cut = cut_connections(targets)
        self.counters["cut"] += cut
        for sock, (key, endpoint) in list(self._clients.items()):
            if key in keys and not sock.closed:
                if self.on_server_revoked is not None:
                    self.on_server_revoked(sock, endpoint)
                else:
                    with contextlib.suppress(zmq.ZMQError):
                        sock.disconnect(endpoint)
        if self.keypair.public in keys and self.on_self_revoked is not None:
            log.error("this process's key %s was revoked by the manager", self.keypair.fingerprint)
            self.on_self_revoked()
        return cut

    def sync_body(self) -> dict:
        """The ``keys.sync`` arguments carrying this keyring (keys packed 32 bytes each)."""
        return {"v": self._version, "k": b"".join(sorted(self._authorized)), "r": b"".join(sorted(self._revoked))}

    def statistics(self) -> dict:
        zap = {}
        for _, handler, _ in self._zap.values():
            for k, v in handler.counters.items():
                zap[k] = zap.get(k, 0) + v
        return {**self.counters, "version": self._version, "allowed": len(self._allowed),
                "revoked": len(self._revoked), "zap": zap}


def _running_loop():
    """The running asyncio loop, or None; never imports asyncio (bus-ctl stays quick)."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is None:
        return None
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _ring_json(version: int, keys, revoked) -> str:
    """A keyring as the text of ``authorized.json`` (read back by :func:`_read_cache`)."""
    return json.dumps({"v": version, "keys": sorted(map(encode_key, keys)),
                       "revoked": sorted(map(encode_key, revoked))}) + "\n"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {"version": int(data["v"]), "authorized": [decode_key(k) for k in data["keys"]],
                "revoked": [decode_key(k) for k in data.get("revoked", [])]}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the unreadable keyring cache %s: %s", path, e)
        return {}


def _unpack(blob) -> list[bytes]:
    blob = bytes(blob or b"")
    return [blob[i:i + 32] for i in range(0, len(blob) - len(blob) % 32, 32)]


def op_keys_sync(node, args: dict, budget: float) -> dict:
    """``keys.sync`` {v, k?, r?} -> {v}: adopt the manager's keyring when ``k`` is given; answer the
    version held (``-1``: this node runs without CURVE).  Idempotent: the logical nodes of one
    process share one :class:`Security`, and the first copy to arrive applies it."""
    sec = getattr(node, "security", None)
    if sec is None:
        return {"v": -1}
    if "k" in args:
        sec.update(int(args.get("v", 0)), _unpack(args["k"]), _unpack(args.get("r")))
    return {"v": sec.version}


KEY_HANDLERS = {"keys.sync": op_keys_sync}


# -- the manager's side: the store, its ZAP decisions, pushing down the tree ------------------


class KeyService:
    """The manager's keys: its :class:`Security` from the store, pending/open admission, pushes.

    Lifecycle: :meth:`load` (reads the store, creating it on first use) and
    give ``.security`` to the SocketFactory; :meth:`attach` once the RootNode
    exists; ``await close()``.  Every change is broadcast (``keys.sync`` with
    the keyring); a node process that registers is asked its version and sent
    the keyring if behind; every ``resync`` seconds a version-only broadcast
    finds stragglers, and a store edited on disk is pushed.
    """

    def __init__(self, store: KeyStore, *, open: bool = False, resync: float = 30.0, timeout: float = 5.0,
                 debounce: float = 0.1):
        self.store = store
        self.open = open
        self.security: Security | None = None
        self._resync, self._timeout, self._debounce = resync, timeout, debounce
        self._root = None
        self._loop = None  # the manager's event loop, once attached
        self._synced: dict[tuple, int] = {}  # (process key, pid) -> keyring version it holds
        self._tasks: set = set()
        self._push_handle = None
        self._noted: dict[bytes, float] = {}

    def load(self) -> Security:
        """Read the store (made on first use) into the manager's :class:`Security`; returns it."""
        if not self.store.initialized():
            pair = self.store.init()
            log.warning("created the manager key %s in %s; copy %s to every node (or pass --manager-key)",
                        pair.fingerprint, self.store.path, self.store.path / MANAGER_PUB)
        pair = self.store.manager_keypair()
        self.security = Security(pair, manager_key=pair.public, authorized=self.store.authorized(),
                                 revoked=self.store.revoked(), version=self.store.version, open=self.open,
                                 on_unknown=self._unknown)
        return self.security

    def attach(self, root) -> None:
        """Start pushing through ``root`` (a RootNode), from its event loop."""
        import asyncio

        self._root = root
        self._loop = asyncio.get_running_loop()
        self._spawn(self._resync_forever())

    async def close(self) -> None:
        import asyncio

        if self._push_handle is not None:
            self._push_handle.cancel()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._root = None

    def _spawn(self, coro) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def refresh(self) -> bool:
        """Load the store into the manager's own ZAP set; True if it changed."""
        return self.security.update(self.store.version, self.store.authorized(), self.store.revoked())

    # -- unknown keys (called in the ZAP thread) --------------------------------------
    def _unknown(self, key: bytes, address: str, admitted: bool) -> None:
        now = time.monotonic()
        if now - self._noted.get(key, -1e9) < 60.0:
            return  # a pending node retries every few seconds: one disk write a minute
        if len(self._noted) > 4 * MAX_PENDING:
            self._noted.clear()
        self._noted[key] = now
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._note, key, address, admitted)
        else:
            self._note(key, address, admitted)

    def _note(self, key: bytes, address: str, admitted: bool) -> None:
        try:
            entry = self.store.add(fingerprint(key), key) if admitted else self.store.note_pending(key, address)
        except KeyStoreError as e:
            log.warning("could not record key %s from %s: %s", fingerprint(key), address, e)
            return
        if entry is None:
            return
        if entry.state == PENDING:
            log.warning("key %s from %s is pending: admit it with `bus-ctl keys accept %s --name NAME`",
                        entry.fingerprint, address, entry.fingerprint)
        else:
            log.warning("key %s from %s accepted as %s (%s)", entry.fingerprint, address, entry.name,
                        "open mode" if admitted else "autoaccept")
            self.changed()

    # -- pushing ----------------------------------------------------------------------
    def changed(self) -> None:
        """The store changed: refresh now, broadcast soon (changes within ``debounce`` share one push)."""
        self.refresh()
        if self._loop is not None and self._push_handle is None:
            self._push_handle = self._loop.call_later(self._debounce, lambda: self._spawn(self.push()))

    async def push(self) -> dict:
        """Broadcast the keyring to every node now; ``{version, current, behind, missing}``."""
        self._push_handle = None
        self.refresh()
        self._synced.clear()
        if self._root is None:
            return {"version": self.security.version, "current": 0, "behind": [], "missing": []}
        return await self._broadcast(self.security.sync_body())

    async def _broadcast(self, args: dict) -> dict:
        root, v = self._root, self.security.version
        expected = {m.id for m in root.membership.alive()}
        out = root.outcome(await root.broadcast("keys.sync", args, timeout=self._timeout), expected)
        behind = [n for g in out["groups"] if isinstance(g["value"], dict) and 0 <= g["value"].get("v", 0) < v
                  for n in g["nodes"]]
        current = sum(len(g["nodes"]) for g in out["groups"] if isinstance(g["value"], dict)
                      and g["value"].get("v") == v)
        return {"version": v, "current": current, "behind": behind, "missing": out["missing"]}

    def on_register(self, body: dict) -> None:
        """REGISTER hook: a node process not known to hold this keyring is asked (and sent it if behind)."""
        key = split_endpoint(str(body.get("ctl") or ""))[1]
        proc, v = (key, body.get("pid")), self.security.version  # processes of a machine may share a key
        if key is None or self._root is None or self._synced.get(proc) == v or not body.get("id"):
            return
        self._synced[proc] = v
        self._spawn(self._sync_one(body["id"], proc, v))

    async def _sync_one(self, node_id: int, proc: tuple, v: int) -> None:
        import asyncio

        try:
            held = await self._root.ask(node_id, "keys.sync", {"v": v}, timeout=self._timeout)
            if isinstance(held, dict) and 0 <= held.get("v", 0) < v:
                await self._root.ask(node_id, "keys.sync", self.security.sync_body(), timeout=self._timeout)
        except (LookupError, asyncio.TimeoutError) as e:
            log.debug("keyring sync with node #%d failed: %s", node_id, e)
            if self._synced.get(proc) == v:
                del self._synced[proc]

    async def _resync_forever(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(self._resync)
            try:
                if self.store.version != self.security.version:
                    await self.push()  # edited on disk by `bus-ctl keys --keys DIR`
                    continue
                res = await self._broadcast({"v": self.security.version})
                ids = {n: i for i, n in self._root.membership.names().items()}
                for name in res["behind"]:  # stragglers: a unicast of the whole keyring each
                    m = self._root.membership.members.get(ids.get(name, -1))
                    if m is not None:
                        self._synced.pop((split_endpoint(m.control)[1], m.pid), None)
                        self.on_register({"id": m.id, "ctl": m.control, "pid": m.pid})
            except (OSError, SecurityError) as e:  # the store is unreadable now: try again next period
                log.warning("keyring resync failed: %s", e)

    async def command(self, args: dict) -> dict:
        """The ``keys`` control command: ``list``, ``add``, ``accept``, ``revoke`` (+ push)."""
        result, changed = apply_key_command(self.store, args)
        result["open"] = self.open
        if changed:
            result["push"] = await self.push()
        return result


# -- ready-made key sets ------------------------------------------------------------------


def local_cluster_keys(state_dir) -> dict:
    """Every key a local cluster (``bus-ctl up``) needs, made once and pre-authorized:

    ``STATE/keys`` (the manager's store), ``STATE/nodes/keys`` (the local nodes' shared
    key pair, the manager key and the keyring), ``STATE/frontends/keys`` and
    ``STATE/client.key`` (bus-ctl).  Returns those paths.
    """
    sdir = Path(state_dir)
    store = KeyStore(sdir / "keys")
    if not store.initialized():
        store.init()
    mk = store.manager_keypair().public
    dirs = {"node_keys": sdir / "nodes" / "keys", "frontend_keys": sdir / "frontends" / "keys"}
    for (label, d), name in zip(dirs.items(), ("local-nodes", "local-frontends")):
        if not (d / IDENTITY_FILE).exists():
            pair = KeyPair.generate()
            write_key_file(d / IDENTITY_FILE, pair.public, pair.secret, name=name)
        write_key_file(d / MANAGER_PUB, mk, name="manager")
        with contextlib.suppress(KeyStoreError):
            store.add(name, read_key_file(d / IDENTITY_FILE)[0], force=True)
    if not (sdir / CLIENT_KEY).exists():
        pair = KeyPair.generate()
        write_key_file(sdir / CLIENT_KEY, pair.public, pair.secret, name="bus-ctl")
    with contextlib.suppress(KeyStoreError):
        store.add("bus-ctl", read_key_file(sdir / CLIENT_KEY)[0], force=True)
    ring = _ring_json(store.version, store.authorized(), store.revoked())
    for d in dirs.values():  # every process starts with the whole keyring: no refused joins at start
        _atomic_write(d / CACHE_FILE, ring)
    return {"keys": str(store.path), **{k: str(v) for k, v in dirs.items()}, "client_key": str(sdir / CLIENT_KEY),
            "manager_key": encode_key(mk)}


def client_security(state_dir, manager_key=None) -> Security | None:
    """bus-ctl's CURVE settings: ``STATE/client.key`` pinned to the manager key (``manager_key``, else
    ``$SNSBUS_MANAGER_KEY``, ``STATE/keys/manager.pub``, ``STATE/manager.pub``, the ``key`` of
    ``STATE/manager.json``).  None without a client key, or when that manager.json says ``key: null``
    (a manager started ``--insecure``)."""
    sdir = Path(state_dir)
    try:
        recorded = json.loads((sdir / "manager.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = {}
    if not (sdir / CLIENT_KEY).is_file() or (isinstance(recorded, dict) and "key" in recorded
                                               and recorded["key"] is None and manager_key is None):
        return None
    public, secret, _ = read_key_file(sdir / CLIENT_KEY)
    mk = manager_key or os.environ.get("SNSBUS_MANAGER_KEY")
    for path in (sdir / "keys" / MANAGER_PUB, sdir / MANAGER_PUB):
        mk = mk or (path if path.is_file() else None)
    mk = mk or (recorded.get("key") if isinstance(recorded, dict) else None)
    if not mk:
        raise SecurityError(f"{sdir / CLIENT_KEY} exists but the manager's key is unknown: copy its manager.pub "
                            f"to {sdir / MANAGER_PUB} or set SNSBUS_MANAGER_KEY")
    return Security(KeyPair(public, secret), manager_key=load_public_key(mk))
