"""CurveZMQ: keys, the key store, the ZAP handler, revocation, and the keyring pushed down a tree.

Real sockets and the real ZAP handler throughout; every context, socket and
ZAP thread is closed by the fixtures.
"""

from __future__ import annotations

import asyncio
import os
import random
import stat
import time

import pytest
import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from bus import protocol as p
from bus.link import NodeLink
from bus.planes import PlaneLoop, SocketFactory, SocketSetupError, endpoint_of
from bus.policy import TreeConfig
from bus.security import (CACHE_FILE, IDENTITY_FILE, MANAGER_PUB, KeyFormatError, KeyPair, KeyStoreError, Security,
                          SecurityError, decode_key, encode_key, fingerprint, load_public_key, op_keys_sync,
                          plain_endpoint, read_key_file, split_endpoint, tag_endpoint, write_key_file)
from bus.tree import ATTACHED, TreeNode
from manager.keys import ACCEPTED, PENDING, REVOKED, KeyService, KeyStore, apply_key_command
from manager.root import RootNode
from nodes.ops import HANDLERS

# -- keys, files, endpoints ----------------------------------------------------------


def test_key_text_round_trips():
    pair = KeyPair.generate()
    assert len(pair.public) == len(pair.secret) == 32
    z = encode_key(pair.public)
    assert len(z) == 40
    assert decode_key(z) == decode_key(pair.public.hex()) == decode_key(pair.public) == pair.public
    assert zmq.curve_public(z85_secret := encode_key(pair.secret).encode()) == z.encode(), z85_secret
    assert len(fingerprint(pair.public)) == 16 and fingerprint(pair.public, full=True).startswith(pair.fingerprint)
    for bad in ("", "short", "~" * 40, "g" * 64, b"\x00" * 31, "a" * 32):  # 32 raw bytes only as bytes
        with pytest.raises(KeyFormatError):
            decode_key(bad)


def test_endpoints_carry_their_server_key():
    for _ in range(50):  # z85 keys contain '#', ':' and '/' too: the tag is found by position
        key = KeyPair.generate().public
        ep = tag_endpoint("tcp://10.0.0.7:5555", key)
        assert split_endpoint(ep) == ("tcp://10.0.0.7:5555", key)
        assert plain_endpoint(ep) == "tcp://10.0.0.7:5555"
        assert tag_endpoint(ep, key) == ep
    assert split_endpoint("tcp://127.0.0.1:7070") == ("tcp://127.0.0.1:7070", None)


def test_key_files_are_private_atomic_and_zpl(tmp_path):
    pair = KeyPair.generate()
    path = tmp_path / "d" / "node.key"
    write_key_file(path, pair.public, pair.secret, name="node-1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [f.name for f in path.parent.iterdir()] == ["node.key"]  # no temporary file left behind
    assert read_key_file(path) == (pair.public, pair.secret, {"name": "node-1"})
    # czmq's format: pyzmq's own loader reads it
    assert zmq.auth.load_certificate(str(path)) == (encode_key(pair.public).encode(), encode_key(pair.secret).encode())
    assert load_public_key(str(path)) == load_public_key(encode_key(pair.public)) == pair.public
    os.chmod(path, 0o644)
    with pytest.raises(KeyStoreError, match="chmod 600"):
        read_key_file(path)
    (tmp_path / "junk.pub").write_text("nothing here\n")
    with pytest.raises(KeyStoreError, match="not a CURVE certificate"):
        read_key_file(tmp_path / "junk.pub")


# -- the key store -------------------------------------------------------------------


def test_store_accept_pending_revoke(tmp_path):
    store = KeyStore(tmp_path / "keys")
    assert not store.initialized()
    with pytest.raises(KeyStoreError, match="keys init"):
        store.manager_keypair()
    mk = store.init()
    assert store.initialized() and stat.S_IMODE(store.path.stat().st_mode) == 0o700
    with pytest.raises(KeyStoreError, match="--force"):
        store.init()
    v0 = store.version
    a, b, c = (KeyPair.generate().public for _ in range(3))
    assert store.add("web-1", a).state == ACCEPTED
    assert store.add("web-1", a).state == ACCEPTED  # idempotent
    assert store.version > v0
    with pytest.raises(KeyStoreError, match="taken"):
        store.add("web-1", b)
    with pytest.raises(KeyStoreError, match="manager's own"):
        store.add("me", mk.public)
    with pytest.raises(KeyStoreError, match="bad key name"):
        store.add("../etc/passwd", b)
    pend = store.note_pending(b, "10.0.0.9")
    assert pend.state == PENDING and pend.name == fingerprint(b) and pend.meta["address"] == "10.0.0.9"
    assert store.note_pending(b, "10.0.0.9") is None  # already pending
    assert store.authorized() == {mk.public, a}
    got = store.accept(fingerprint(b)[:8], name="web-2")
    assert (got.name, got.state) == ("web-2", ACCEPTED)
    assert store.authorized() == {mk.public, a, b}
    assert store.revoke("web-1").state == REVOKED
    assert store.authorized() == {mk.public, b} and store.revoked() == {a}
    with pytest.raises(KeyStoreError, match="revoked"):
        store.add("web-1", a)
    assert store.add("web-1", a, force=True).state == ACCEPTED
    with pytest.raises(KeyStoreError, match="no pending key"):
        store.accept("web-2")
    assert store.find(encode_key(b)).name == "web-2"
    with pytest.raises(KeyStoreError, match="no accepted"):
        store.find(encode_key(c), (ACCEPTED,))
    for path in store.path.rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_store_autoaccept_and_pending_bound(tmp_path, monkeypatch):
    monkeypatch.setattr("manager.keys.MAX_PENDING", 8)
    store = KeyStore(tmp_path)
    store.init()
    k1, k2 = KeyPair.generate().public, KeyPair.generate().public
    (tmp_path / "autoaccept").write_text(f"# name key\nrack-1 {encode_key(k1)}\nrack-2 {fingerprint(k2, True)}\n")
    assert store.note_pending(k1, "a").state == ACCEPTED
    assert store.note_pending(k2, "b").name == "rack-2"
    for i in range(8 + 5):
        store.note_pending(KeyPair.generate().public, "flood")
    assert len(store.entries(PENDING)) == 8


def test_apply_key_command(tmp_path):
    store = KeyStore(tmp_path)
    store.init()
    key = encode_key(KeyPair.generate().public)
    res, changed = apply_key_command(store, {"op": "add", "name": "n1", "key": key})
    assert changed and res["entry"]["name"] == "n1" and res["entry"]["key"] == key
    res, changed = apply_key_command(store, {"op": "list"})
    assert not changed and [e["name"] for e in res["keys"]] == ["n1"]
    assert res["manager"]["fingerprint"] == store.manager_keypair().fingerprint
    with pytest.raises(KeyStoreError, match="unknown keys operation"):
        apply_key_command(store, {"op": "nuke"})


# -- real sockets, real ZAP ---------------------------------------------------------------


@pytest.fixture
def server(zctx):
    """A secure data ROUTER admitting one client key; yields (router, security, client pair, manager key)."""
    pair, good, mk = KeyPair.generate(), KeyPair.generate(), KeyPair.generate().public
    sec = Security(pair, manager_key=mk, authorized=[good.public])
    fac = SocketFactory(zctx, linger=0, security=sec)
    try:
        router = fac.data_router("tcp://127.0.0.1:0")
        yield router, sec, good
    finally:
        fac.close(0)
        sec.close()


@pytest.fixture
def clients():
    """Make client DEALERs (with their own context and monitor); all closed afterwards."""
    made = []
    ctx = zmq.Context()

    def make(pair: KeyPair | None, endpoint: str, manager_key=None, name=b"\x01cl"):
        if pair is None:  # no key at all: a plain DEALER
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.immediate = 1
            sock.connect(plain_endpoint(endpoint))
            fac = None
        else:
            fac = SocketFactory(ctx, linger=0, security=Security(pair, manager_key=manager_key))
            sock = fac.data_dealer(endpoint, name)
        mon = sock.get_monitor_socket()
        made.append((fac, sock, mon))
        return sock, mon

    try:
        yield make
    finally:
        for fac, sock, mon in made:
            if not sock.closed:
                sock.disable_monitor()
            mon.close(0)
            sock.close(0)
            if fac is not None:
                fac.close(0)
        ctx.term()


def wait_event(mon, names: set, timeout: float = 5.0) -> str:
    """The first monitor event among ``names`` (a positive condition with a deadline)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if mon.poll(int(left * 1000) + 1):
            ev = recv_monitor_message(mon)["event"]
            if ev.name in names:
                return ev.name
    raise AssertionError(f"none of {names} within {timeout}s")


def test_authorized_client_talks_and_endpoint_is_tagged(server, clients):
    router, sec, good = server
    ep = sec.advertise(endpoint_of(router))
    assert split_endpoint(ep)[1] == sec.public_key
    dealer, mon = clients(good, ep)
    wait_event(mon, {"HANDSHAKE_SUCCEEDED"})
    dealer.send_multipart([b"ping"])
    assert router.poll(5000) and router.recv_multipart()[1:] == [b"ping"]
    assert router.getsockopt(zmq.CURVE_SERVER) == 1 and router.getsockopt(zmq.ZAP_DOMAIN).startswith(b"snsbus/")


def test_no_key_unknown_key_and_revoked_key_cannot_talk(server, clients):
    router, sec, good = server
    ep = sec.advertise(endpoint_of(router))
    plain, mon = clients(None, ep)
    assert wait_event(mon, {"HANDSHAKE_FAILED_PROTOCOL", "HANDSHAKE_FAILED_NO_DETAIL"})
    stranger, mon = clients(KeyPair.generate(), ep)
    assert wait_event(mon, {"HANDSHAKE_FAILED_AUTH"}) == "HANDSHAKE_FAILED_AUTH"
    assert sec.update(1, [good.public], revoked=[good.public])  # revoked wins over listed
    revoked, mon = clients(good, ep, name=b"\x01rv")
    assert wait_event(mon, {"HANDSHAKE_FAILED_AUTH"}) == "HANDSHAKE_FAILED_AUTH"
    for sock in (plain, stranger, revoked):
        with pytest.raises(zmq.Again):  # IMMEDIATE: no connection, nothing queued
            sock.send(b"hello", zmq.NOBLOCK)
    assert not router.poll(200)
    assert sec.statistics()["zap"]["refused"] >= 2 and sec.counters["unknown"] >= 1


def test_pinned_wrong_server_key_fails(server, clients):
    router, sec, good = server
    ep = tag_endpoint(endpoint_of(router), KeyPair.generate().public)  # right address, wrong key
    dealer, mon = clients(good, ep)
    assert wait_event(mon, {"HANDSHAKE_FAILED_NO_DETAIL", "HANDSHAKE_FAILED_PROTOCOL"})
    with pytest.raises(zmq.Again):
        dealer.send(b"x", zmq.NOBLOCK)
    # a plain endpoint means the pinned manager key, which this server does not hold either
    dealer2, mon2 = clients(good, endpoint_of(router), manager_key=KeyPair.generate().public, name=b"\x01m")
    assert wait_event(mon2, {"HANDSHAKE_FAILED_NO_DETAIL", "HANDSHAKE_FAILED_PROTOCOL"})


def test_client_without_any_server_key_is_refused_by_the_factory(zctx):
    fac = SocketFactory(zctx, linger=0, security=Security(KeyPair.generate()))
    try:
        with pytest.raises(SocketSetupError, match="pin the manager's key"):
            fac.control_dealer("tcp://127.0.0.1:1", b"\x01a")
    finally:
        fac.close(0)


def test_revocation_cuts_a_connected_peer_and_spares_others(server, clients):
    router, sec, good = server
    other = KeyPair.generate()
    assert sec.update(1, [good.public, other.public])
    ep = sec.advertise(endpoint_of(router))
    victim, vmon = clients(good, ep, name=b"\x01victim")
    bystander, bmon = clients(other, ep, name=b"\x01by")
    for sock, mon in ((victim, vmon), (bystander, bmon)):
        wait_event(mon, {"HANDSHAKE_SUCCEEDED"})
        sock.send(b"before")
    got = {router.recv_multipart()[0] for _ in range(2) if router.poll(5000)}
    assert got == {b"\x01victim", b"\x01by"}
    assert sec.update(2, [other.public], revoked=[good.public])  # no running loop: cut at once
    assert sec.counters["cut"] >= 1
    assert wait_event(vmon, {"DISCONNECTED"}) and wait_event(vmon, {"HANDSHAKE_FAILED_AUTH"})
    with pytest.raises(zmq.Again):
        victim.send(b"after", zmq.NOBLOCK)
    # A peer from the same address was cut too, reconnected and passed ZAP again.
    wait_event(bmon, {"HANDSHAKE_SUCCEEDED"})
    bystander.send(b"after")
    assert router.poll(5000) and router.recv_multipart() == [b"\x01by", b"after"]
    assert not router.poll(200)


def test_update_is_versioned_cached_and_fires_revocation_hooks(tmp_path, zctx):
    d = tmp_path / "node"
    mk = KeyPair.generate().public
    d.mkdir()
    write_key_file(d / MANAGER_PUB, mk)
    sec = Security.from_key_dir(d, name="n1")
    assert (d / IDENTITY_FILE).is_file() and sec.manager_key == mk and sec.version == 0
    assert sec.allowed() == {sec.public_key, mk}
    peer = KeyPair.generate().public
    assert sec.update(5, [peer]) and not sec.update(5, []) and not sec.update(4, [])
    again = Security.from_key_dir(d)  # the cache: a restarted node admits its peers at once
    assert again.public_key == sec.public_key and again.version == 5 and peer in again.allowed()
    assert (d / CACHE_FILE).stat().st_mode & 0o077 == 0
    fired = []
    sec.on_self_revoked = lambda: fired.append("self")
    sec.on_server_revoked = lambda sock, ep: fired.append(("server", ep))
    fac = SocketFactory(zctx, linger=0, security=sec)
    try:
        fac.control_dealer(tag_endpoint("tcp://127.0.0.1:1", peer), b"\x01p")
        fac.control_dealer("tcp://127.0.0.1:2", b"\x01m")  # the manager: not revoked
        assert sec.update(6, [], revoked=[peer, sec.public_key])
    finally:
        fac.close(0)
    assert fired == [("server", "tcp://127.0.0.1:1"), "self"]
    with pytest.raises(SecurityError, match="manager.pub"):
        Security.from_key_dir(tmp_path / "empty")


def test_op_keys_sync():
    class Node:
        security = Security(KeyPair.generate())

    keys = [KeyPair.generate().public for _ in range(3)]
    assert op_keys_sync(Node, {"v": 3}, 1.0) == {"v": 0}  # a version check only
    assert op_keys_sync(Node, {"v": 3, "k": b"".join(keys), "r": b""}, 1.0) == {"v": 3}
    assert set(keys) <= Node.security.allowed()
    assert op_keys_sync(object(), {"v": 3}, 1.0) == {"v": -1}


def test_zap_runs_before_any_bind_and_stops_with_the_factory(zctx):
    sec = Security(KeyPair.generate(), manager_key=KeyPair.generate().public)
    fac = SocketFactory(zctx, linger=0, security=sec)
    fac.control_router("tcp://127.0.0.1:0")
    (zap,) = [z for _, z, _ in sec._zap.values()]
    assert zap.running
    other = Security(KeyPair.generate())
    with pytest.raises(SocketSetupError, match="another ZAP handler"):
        SocketFactory(zctx, linger=0, security=other).control_router("tcp://127.0.0.1:0")
    fac.close(0)
    assert not zap.running


# -- the keyring travels down a real tree ------------------------------------------------------


class _KeyedLink(NodeLink):
    """NodeLink advertising keyed endpoints: the two-line wiring proposed for bus/link.py."""

    def open(self) -> None:
        super().open()
        self.control_endpoint = self.factory.security.advertise(self.control_endpoint)
        self.data_endpoint = self.factory.security.advertise(self.data_endpoint)


class _Host:
    """One 'process': its context, Security, factory, PlaneLoop and logical nodes (like NodeHost)."""

    def __init__(self, security: Security):
        self.security = security
        self.ctx = zmq.Context()
        self.factory = SocketFactory(self.ctx, linger=0, security=security)
        self.loop = PlaneLoop()
        self.links, self.nodes = [], []

    async def start(self, join: str, names, cfg: TreeConfig):
        await self.loop.start()
        for name in names:
            link = _KeyedLink(self.factory, self.loop, control_bind="tcp://127.0.0.1:0", data_bind="tcp://127.0.0.1:0")
            link.open()
            node = TreeNode(name, link, config=cfg, root_endpoint=join, rng=random.Random(len(self.nodes)),
                            handlers={**HANDLERS, "keys.sync": op_keys_sync})
            node.security = self.security
            for attr in ("on_child", "on_parent", "heard_child", "heard_parent", "parent_lost", "connect_refused"):
                setattr(link, attr, getattr(node, attr))
            self.links.append(link)
            self.nodes.append(node)
            node.start()

    def tick(self):
        for n in self.nodes:
            n.tick()

    async def stop(self):
        for n in self.nodes:
            await n.stop()
        await self.loop.stop()
        for link in self.links:
            link.close(0)
        self.factory.close(0)
        self.ctx.term()


def test_keyring_push_join_through_keyed_endpoints_and_revoke(tmp_path, arun, until):
    store = KeyStore(tmp_path / "keys")
    store.init()
    mk = store.manager_keypair().public
    pairs = [KeyPair.generate() for _ in range(3)]
    store.add("p0", pairs[0].public)  # p1 and p2 start pending: the manager does not know them yet
    cfg = TreeConfig(max_children=1, heartbeat=0.2, misses=3, join_timeout=0.5, backoff_base=0.05, backoff_cap=0.3)

    async def main():
        svc = KeyService(store, resync=3600)
        ctx = zmq.Context()
        fac = SocketFactory(ctx, linger=0, security=svc.load())
        loop = PlaneLoop()
        await loop.start()
        link = NodeLink(fac, loop, control_bind="tcp://127.0.0.1:0", data_bind="tcp://127.0.0.1:0")
        link.open()
        assert split_endpoint(link.control_endpoint)[1] is None  # the manager's endpoints stay plain
        root = RootNode(link, config=cfg)
        root.root_endpoint = link.control_endpoint
        link.on_child, link.heard_child = root.on_child, root.heard_child
        deliver = root.deliver

        def hooked(msg, from_link):  # the REGISTER hook proposed for manager/root.py
            deliver(msg, from_link)
            if msg.header.type == p.MsgType.REGISTER and isinstance(msg.body, dict):
                svc.on_register(msg.body)

        root.deliver = hooked
        svc.attach(root)
        hosts = [_Host(Security(pair, manager_key=mk)) for pair in pairs]
        try:
            for i, h in enumerate(hosts):
                await h.start(link.control_endpoint, [f"n{i}"], cfg)

            def tick():
                root.tick()
                for h in hosts:
                    h.tick()

            async def attached(names, timeout=10.0):
                def ok():
                    tick()
                    alive = {m.name for m in root.membership.alive()}
                    return set(names) <= alive
                await until(ok, timeout, f"{names} registered")

            await attached(["n0"])
            await until(lambda: hosts[0].security.version == store.version, 5, "keyring at n0")
            assert {e.state for e in store.entries() if e.key != pairs[0].public} == {PENDING}
            for pair, name in ((pairs[1], "n1"), (pairs[2], "n2")):  # bus-ctl keys accept
                res = await svc.command({"op": "accept", "ref": fingerprint(pair.public), "name": name})
                assert res["entry"]["state"] == ACCEPTED
            await attached(["n0", "n1", "n2"], 15.0)  # max_children 1: a chain, joined via keyed endpoints
            assert max(root.membership.depths().values()) >= 2
            await until(lambda: all(h.security.version == store.version for h in hosts), 5, "keyring everywhere")
            # Revoke n1 (in the middle of the chain): it is cut off, and the others heal without it.
            res = await svc.command({"op": "revoke", "ref": "n1"})
            assert res["push"]["version"] == store.version

            def healed():
                tick()
                alive = {m.name for m in root.membership.alive()}
                return "n1" not in alive and {"n0", "n2"} <= alive and hosts[2].nodes[0].state == ATTACHED
            await until(healed, 15.0, "tree healed without n1")
            assert hosts[1].nodes[0].state != ATTACHED
            assert svc.security.counters["refused"] + sum(h.security.counters["refused"] for h in hosts) > 0
        finally:
            for h in hosts:
                await h.stop()
            await svc.close()
            await root.stop()
            await loop.stop()
            link.close(0)
            fac.close(0)
            ctx.term()

    arun(main(), timeout=60)


class _FakeRoot:
    """What KeyService needs of a RootNode: broadcast/ask/outcome and the membership."""

    def __init__(self):
        self.sent = []
        self.membership = type("M", (), {"alive": lambda self: [], "names": lambda self: {}, "members": {}})()

    async def broadcast(self, op, args, *, timeout):
        from bus.convergecast import OpResult

        self.sent.append((op, args))
        return OpResult()

    def outcome(self, result, expected):
        return {"groups": [], "missing": []}


def test_open_mode_admits_new_keys_and_an_edited_store_is_pushed(tmp_path, arun, until, zctx):
    store = KeyStore(tmp_path / "keys")
    svc = KeyService(store, open=True, resync=0.05, debounce=0.01)
    sec = svc.load()
    assert store.initialized() and sec.public_key == store.manager_keypair().public
    newcomer = KeyPair.generate()

    async def main():
        root = _FakeRoot()
        svc.attach(root)
        fac = SocketFactory(zctx, linger=0, security=sec)
        ctx = zmq.Context()
        cfac = SocketFactory(ctx, linger=0, security=Security(newcomer, manager_key=sec.public_key))
        try:
            router = fac.control_router("tcp://127.0.0.1:0")
            dealer = cfac.control_dealer(endpoint_of(router), b"\x01new")
            await until(lambda: dealer.poll(0, zmq.POLLOUT), 5, "an open manager admits an unknown key")
            await until(lambda: any(e.key == newcomer.public and e.state == ACCEPTED for e in store.entries()),
                        5, "the key recorded as accepted")
            await until(lambda: any(newcomer.public in args.get("k", b"") for _, args in root.sent), 5, "a push")
            # An offline edit (`bus-ctl keys revoke --keys DIR`) is found by the resync and pushed.
            store.revoke(fingerprint(newcomer.public))
            await until(lambda: any(newcomer.public in args.get("r", b"") for _, args in root.sent), 5,
                        "the revocation pushed")
            assert newcomer.public not in sec.allowed()
        finally:
            await svc.close()
            cfac.close(0)
            ctx.term()
            fac.close(0)

    arun(main())
