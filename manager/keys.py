"""The manager's CurveZMQ keys: the key store on disk and the service that pushes the keyring.

:class:`KeyStore` is salt-key style (accepted, pending, revoked, plus an
``autoaccept`` file); :class:`KeyService` builds the manager's
:class:`bus.security.Security` from it, records unknown keys as pending (or
admits them in ``--open`` mode) and broadcasts every change down the tree as
``keys.sync``, so every node's ROUTERs admit exactly the keys the manager
accepted.  :func:`local_cluster_keys` makes every key a ``bus-ctl up`` cluster
needs.  The per-process side (key pairs, ZAP, pinning) is :mod:`bus.security`;
see docs/security.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bus.security import (CACHE_FILE, CLIENT_KEY, IDENTITY_FILE, MANAGER_PUB, KeyFormatError, KeyPair,
                          KeyStoreError, Security, SecurityError, atomic_write, decode_key, encode_key,
                          fingerprint, read_key_file, ring_json, split_endpoint, write_key_file)

__all__ = ["KeyEntry", "KeyStore", "KeyService", "apply_key_command", "local_cluster_keys", "ACCEPTED", "PENDING",
           "REVOKED", "STATES", "MAX_PENDING"]

log = logging.getLogger(__name__)

ACCEPTED, PENDING, REVOKED = "accepted", "pending", "revoked"
STATES = (ACCEPTED, PENDING, REVOKED)
MAX_PENDING = 256  # an attacker with endless fresh keys must not fill the disk
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


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
        atomic_write(self.path / "keyring.json", json.dumps({"version": v}) + "\n")
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
    ``STATE/client.key`` (bus-ctl).  Returns those paths, the manager key (z85) and its fingerprint.
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
    ring = ring_json(store.version, store.authorized(), store.revoked())
    for d in dirs.values():  # every process starts with the whole keyring: no refused joins at start
        atomic_write(d / CACHE_FILE, ring)
    return {"keys": str(store.path), **{k: str(v) for k, v in dirs.items()}, "client_key": str(sdir / CLIENT_KEY),
            "manager_key": encode_key(mk), "fingerprint": fingerprint(mk)}
