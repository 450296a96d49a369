"""CurveZMQ on every socket of both planes: key pairs, key files, pinning, the ZAP handler.

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

The manager owns the key store and pushes the authorized set down the tree
(op ``keys.sync``, :mod:`manager.keys`); :class:`Security` is one process's
side of it, so every node's ROUTERs admit exactly the keys the manager
accepted.  Revoking removes the key from every set and cuts the revoked peer's
live connections.  See docs/security.md.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
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
    "SecurityError", "KeyFormatError", "KeyStoreError", "KeyPair", "ZapHandler", "Security", "KEY_HANDLERS",
    "op_keys_sync", "decode_key", "encode_key", "fingerprint", "load_public_key", "read_key_file",
    "write_key_file", "atomic_write", "ring_json", "tag_endpoint", "split_endpoint", "plain_endpoint",
    "cut_connections", "handshake_failure", "HANDSHAKE_EVENTS", "client_security", "IDENTITY_FILE", "MANAGER_PUB",
    "CLIENT_KEY", "CACHE_FILE",
]

log = logging.getLogger(__name__)

try:  # CPython's own sha256: hashlib would map OpenSSL's libcrypto, 3.5 MB of RSS in every bus-node
    from _sha256 import sha256 as _sha256
except ImportError:  # pragma: no cover - other Pythons, or 3.12+ (_sha2)
    try:
        from _sha2 import sha256 as _sha256
    except ImportError:
        from hashlib import sha256 as _sha256

IDENTITY_FILE = "identity.key"  # a key dir's own key pair (nodes, front ends)
MANAGER_PUB = "manager.pub"  # the pinned manager key, in a key dir and in the store
CLIENT_KEY = "client.key"  # bus-ctl's key pair, in the state directory
CACHE_FILE = "authorized.json"  # a node's last keyring from the manager
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
    h = _sha256(key).hexdigest()
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


def atomic_write(path: Path, text: str) -> None:
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
    atomic_write(Path(path), "\n".join(lines) + "\n")


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


def _create_exclusively(path: Path, name: str) -> bool:
    """Make a new key pair at ``path`` unless one appears there first; True if this call made it.

    Processes of one machine starting together (one key dir) must end up with the
    same key: the file is linked into place, which fails if another was first."""
    pair = KeyPair.generate()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.new")
    write_key_file(tmp, pair.public, pair.secret, name=name)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


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


# -- the ZAP handler ----------------------------------------------------------------


class ZapHandler:
    """Answers the ZAP requests of one context's CURVE servers.

    In a process with a running asyncio loop (the daemons) the handler is a
    ROUTER served from that loop: requests are answered in batches on the
    loop's own thread, with no GIL hand-off per handshake.  A thread waiting
    for the GIL waits up to the 5 ms switch interval while the loop is busy,
    which made a join storm of 1000 nodes twice as slow.  Without a running
    loop (scripts, some tests) a thread answers instead.
    ``decide(domain, address, key) -> (ok, reason)`` is called on whichever
    serves.  ZAP must be bound before the first CURVE server binds: libzmq
    admits every client of a CURVE server when no handler is bound.
    """

    def __init__(self, context: zmq.Context, decide: Callable[[str, str, bytes], tuple[bool, str]]):
        self._context = context
        self._decide = decide
        self._thread: threading.Thread | None = None
        self._zap = self._pipe = self._thread_pipe = None
        self._loop = None  # the asyncio loop serving the ROUTER, in loop mode
        self.counters = {"admitted": 0, "refused": 0, "malformed": 0}

    @property
    def running(self) -> bool:
        return self._thread is not None or self._loop is not None

    def _bind(self, kind: int) -> zmq.Socket:
        sock = self._context.socket(kind, socket_class=zmq.Socket)
        sock.linger = 0
        try:
            sock.bind("inproc://zeromq.zap.01")
        except zmq.ZMQError as e:
            sock.close(0)
            raise SecurityError(f"cannot serve ZAP on this context ({e}): another ZAP handler runs there") from e
        return sock

    def start(self) -> None:
        if self.running:
            return
        loop = _running_loop()
        if loop is not None:
            self._zap = self._bind(zmq.ROUTER)
            self._loop = loop
            loop.add_reader(self._zap.getsockopt(zmq.FD), self._serve)
            self._serve()  # the FD is edge-triggered: look once now
            return
        self._zap = self._bind(zmq.REP)
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
        if self._loop is not None:
            if not self._loop.is_closed():
                self._loop.remove_reader(self._zap.getsockopt(zmq.FD))
            self._zap.close(0)
            self._zap = self._loop = None
            return
        if self._thread is None:
            return
        self._pipe.send(b"STOP")
        self._thread.join()
        for s in (self._zap, self._pipe, self._thread_pipe):
            s.close(0)
        self._thread = self._zap = self._pipe = self._thread_pipe = None

    def _serve(self) -> None:
        """Loop mode: answer every queued request ([peer, b"", *request] on the ROUTER)."""
        zap = self._zap
        while zap is not None and not zap.closed and zap.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                msg = zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(msg) < 2 or msg[1] != b"":
                self.counters["malformed"] += 1
                continue  # not from libzmq's ZAP client: nobody waits for an answer
            try:
                zap.send_multipart([msg[0], b"", *self._answer(msg[2:])], zmq.NOBLOCK)
            except zmq.ZMQError:
                self.counters["malformed"] += 1  # the handshake is gone meanwhile

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
        d = Path(key_dir).expanduser().absolute()  # passed on to the processes a node runs, in other cwds
        ident = d / IDENTITY_FILE
        created = not ident.exists() and _create_exclusively(ident, name or _socket.gethostname())
        public, secret, _ = read_key_file(ident)
        if created:
            fp = fingerprint(public)
            log.warning("created key %s (sha256 %s) in %s; unless it is pre-authorized, the manager admits it "
                        "after `bus-ctl keys accept %s`", fp, fingerprint(public, True), d, fp)
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
                atomic_write(self.cache, ring_json(self._version, self._authorized, self._revoked))
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


def ring_json(version: int, keys, revoked) -> str:
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
