"""Package transfer over the data plane: real sockets on 127.0.0.1, a real PlaneLoop, tmp caches.

Throughput figures are printed (run with ``-s``), never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time

import pytest

from bus import protocol as p
from bus.link import NodeLink
from bus.planes import PlaneLoop, endpoint_of
from bus.transfer import ERR_BAD_REQUEST, ChunkService
from core.fastpath import IMPLEMENTATION
from nodes.packages import PackageCache, PackageError

MB = 1 << 20
LOOPBACK = "tcp://127.0.0.1:0"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Node:
    """One logical node: a NodeLink (its data ROUTER serves children), a cache and a ChunkService."""

    def __init__(self, factory, pl: PlaneLoop, base, name: str, cache_dir: str | None = None, **kw):
        self.name = name
        self.cache = PackageCache(base / (cache_dir or name))
        self.link = NodeLink(factory, pl, control_bind=LOOPBACK, data_bind=LOOPBACK)
        self.link.open()
        self.svc = ChunkService(factory, pl, self.cache, **kw)
        self.svc.serve(self.link)

    @property
    def endpoint(self) -> str:
        return self.link.data_endpoint

    def stats(self) -> dict:
        return self.svc.statistics()

    def close(self) -> None:
        self.svc.close()
        self.link.close()


class FakeUpstream:
    """A bare data ROUTER the test drives by hand: records requests, answers when told."""

    def __init__(self, factory, pl: PlaneLoop):
        self.pl = pl
        self.sock = factory.data_router(LOOPBACK)
        self.endpoint = endpoint_of(self.sock)
        self.requests: list[tuple[bytes, p.Message]] = []
        pl.add(self.sock, p.Plane.DATA, self._on_batch)

    def _on_batch(self, batch):
        for frames in batch:
            self.requests.append((frames[0], p.decode(frames[1:])))

    def answer(self, identity: bytes, msg: p.Message, data: bytes) -> None:
        o, n = msg.body["o"], msg.body["n"]
        frames = p.encode(p.MsgType.CHUNK, {"d": msg.body["d"], "o": o}, ref=msg.header.msg_id,
                          extra=[data[o:o + n]])  # fmt: skip
        assert self.pl.send(self.sock, [identity, *frames])

    def close(self) -> None:
        if not self.sock.closed:
            self.pl.remove(self.sock)
            self.sock.close(0)


@contextlib.asynccontextmanager
async def network(factory, tmp_path):
    """``make(name, upstream=None, **kw)`` builds Nodes on one running PlaneLoop; all closed at the end."""
    pl = PlaneLoop()
    made: list = []

    def make(name: str, upstream: Node | None = None, **kw) -> Node:  # kw: cache_dir, ChunkService options
        node = Node(factory, pl, tmp_path, name, **kw)
        made.append(node)
        if upstream is not None:
            node.svc.set_upstream(upstream.endpoint)
        return node

    def fake() -> FakeUpstream:
        f = FakeUpstream(factory, pl)
        made.append(f)
        return f

    make.fake = fake
    make.pl = pl
    async with pl:
        try:
            yield make
        finally:
            for thing in reversed(made):
                thing.close()


async def wait_until(pred, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.005)


def test_compiled_twin_in_use_unless_disabled():
    expected = "python" if os.environ.get("BUS_NO_EXTENSIONS") == "1" else "cython"
    assert IMPLEMENTATION == expected


def _rate(size: int, wall: float, cpu: float) -> str:
    return f"{size / MB / wall:.0f} MB/s wall, {cpu * 1e3:.1f} ms CPU (all ends in this process)"


# -- the happy paths ---------------------------------------------------------------


def test_single_hop_fetch(factory, tmp_path, arun):
    data = os.urandom(10 * MB)
    digest = sha(data)

    async def main():
        async with network(factory, tmp_path) as make:
            root = make("root")
            root.cache.put(data)
            child = make("child", upstream=root)
            t0, c0 = time.perf_counter(), time.process_time()
            path = await child.svc.fetch(digest, len(data), timeout=20)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            print(f"\n[{IMPLEMENTATION}] single hop 10 MiB: {_rate(len(data), wall, cpu)}")
            assert path == child.cache.path(digest) and path.read_bytes() == data
            s, r = child.stats(), root.stats()
            assert s["bytes_fetched"] == len(data) and s["chunks_fetched"] == 40
            assert s["fetches"] == 1 and s["resumed"] == 0 and s["hash_failures"] == 0
            assert r["bytes_served"] == len(data) and r["chunks_served"] == 40
            assert s["transfers"] == 0 and s["outstanding"] == 0
            assert not list((tmp_path / "child" / "partial").iterdir())
            # Already cached: no transfer at all.
            assert await child.svc.fetch(digest, len(data), timeout=5) == path
            assert child.stats()["cache_hits"] == 1 and child.stats()["fetches"] == 1

    arun(main(), timeout=60)


def test_chain_root_a_b_caches_at_every_hop(factory, tmp_path, arun):
    data = os.urandom(3 * MB + 12345)
    digest = sha(data)

    async def main():
        async with network(factory, tmp_path) as make:
            root = make("root")
            root.cache.put(data)
            a = make("a", upstream=root)
            b = make("b", upstream=a)
            path = await b.svc.fetch(digest, len(data), timeout=20)
            assert path.read_bytes() == data
            assert a.cache.has(digest)  # stored and forwarded
            assert root.stats()["bytes_served"] == len(data)
            assert a.stats()["fetches"] == 1 and a.stats()["bytes_served"] == len(data)
            # A second child of a is served from a's cache: the root sends nothing more.
            b2 = make("b2", upstream=a)
            await b2.svc.fetch(digest, len(data), timeout=20)
            assert root.stats()["bytes_served"] == len(data)
            assert a.stats()["fetches"] == 1 and a.stats()["bytes_served"] == 2 * len(data)

    arun(main(), timeout=60)


def test_three_hop_chain_throughput(factory, tmp_path, arun):
    data = os.urandom(10 * MB)
    digest = sha(data)

    async def main():
        async with network(factory, tmp_path) as make:
            root = make("root")
            root.cache.put(data)
            a = make("a", upstream=root)
            b = make("b", upstream=a)
            c = make("c", upstream=b)
            t0, c0 = time.perf_counter(), time.process_time()
            path = await c.svc.fetch(digest, len(data), timeout=30)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            print(f"\n[{IMPLEMENTATION}] 3-hop chain 10 MiB (store and forward): {_rate(len(data), wall, cpu)}")
            assert path.read_bytes() == data
            for n in (a, b):
                assert n.cache.has(digest) and n.stats()["fetches"] == 1
            assert root.stats()["bytes_served"] == len(data)

    arun(main(), timeout=60)


def test_many_children_share_the_parents_one_fetch(factory, tmp_path, arun):
    data = os.urandom(2 * MB + 7)
    digest = sha(data)

    async def main():
        async with network(factory, tmp_path) as make:
            root = make("root")
            root.cache.put(data)
            parent = make("parent", upstream=root)
            kids = [make(f"kid{i}", upstream=parent) for i in range(8)]
            paths = await asyncio.gather(*(k.svc.fetch(digest, len(data), timeout=20) for k in kids))
            assert all(pth.read_bytes() == data for pth in paths)
            assert root.stats()["bytes_served"] == len(data)
            ps = parent.stats()
            assert ps["fetches"] == 1 and ps["bytes_fetched"] == len(data)
            assert ps["bytes_served"] == 8 * len(data)
            assert ps["parked"] == 0 and ps["transfers"] == 0

    arun(main(), timeout=60)


def test_concurrent_fetches_of_one_digest_share_one_transfer(factory, tmp_path, arun):
    data = os.urandom(MB)
    digest = sha(data)

    async def main():
        async with network(factory, tmp_path) as make:
            root = make("root")
            root.cache.put(data)
            child = make("child", upstream=root)
            p1, p2 = await asyncio.gather(child.svc.fetch(digest, len(data), timeout=20),
                                          child.svc.fetch(digest, len(data), timeout=20))  # fmt: skip
            assert p1 == p2 and p1.read_bytes() == data
            s = child.stats()
            assert s["fetches"] == 1 and s["fetches_joined"] == 1 and s["bytes_fetched"] == len(data)
            assert root.stats()["bytes_served"] == len(data)

    arun(main(), timeout=60)


def test_empty_package(factory, tmp_path, arun):
    digest = sha(b"")

    async def main():
        async with network(factory, tmp_path) as make:
            root = make("root")
            child = make("child", upstream=root)
            path = await child.svc.fetch(digest, 0, timeout=5)
            assert path.read_bytes() == b"" and child.stats()["chunks_fetched"] == 0

    arun(main())


# -- failures ----------------------------------------------------------------------


def _tamper(cache: PackageCache, digest: str) -> None:
    path = cache.path(digest)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.chmod(path, 0o444)


def test_tampered_object_upstream_is_refused(factory, tmp_path, arun):
    data = os.urandom(MB + 5)
    digest = sha(data)

    async def main():
        async with network(factory, tmp_path) as make:
            root = make("root")
            root.cache.put(data)
            _tamper(root.cache, digest)
            child = make("child", upstream=root)
            with pytest.raises(PackageError, match="hash mismatch") as ei:
                await child.svc.fetch(digest, len(data), timeout=20)
            assert digest in str(ei.value)
            assert not child.cache.has(digest)
            assert not list((tmp_path / "child" / "partial").iterdir())
            assert child.stats()["hash_failures"] == 1 and child.stats()["transfers"] == 0
            # Two hops: the middle node refuses it too. With cut-through the leaf may
            # have every byte before the middle's verdict, and then finds the mismatch itself.
            mid = make("mid", upstream=root)
            leaf = make("leaf", upstream=mid)
            with pytest.raises(PackageError, match="hash mismatch"):
                await leaf.svc.fetch(digest, len(data), timeout=20)
            assert not mid.cache.has(digest) and not leaf.cache.has(digest)
            assert mid.stats()["hash_failures"] == 1

    arun(main(), timeout=60)


def test_unknown_package_at_the_root(factory, tmp_path, arun):
    digest = sha(b"nobody has this")

    async def main():
        async with network(factory, tmp_path) as make:
            root = make("root")
            a = make("a", upstream=root)
            b = make("b", upstream=a)
            with pytest.raises(PackageError, match=f"upstream has no package {digest[:12]}"):
                await a.svc.fetch(digest, 100, timeout=10)
            with pytest.raises(PackageError, match="upstream could not get package .*has no package"):
                await b.svc.fetch(digest, 100, timeout=10)
            assert root.stats()["requests_missing"] >= 1
            assert not a.cache.has(digest) and not b.cache.has(digest)

    arun(main(), timeout=30)


def test_timeout_names_the_package_and_progress(factory, tmp_path, arun):
    digest = sha(b"x" * 1000)

    async def main():
        async with network(factory, tmp_path) as make:
            lonely = make("lonely")  # no upstream at all
            with pytest.raises(TimeoutError, match=rf"package {digest[:12]}: got 0 of 1000 bytes with no upstream"):
                await lonely.svc.fetch(digest, 1000, timeout=0.2)
            assert lonely.stats()["transfers"] == 0 and lonely.stats()["fetch_timeouts"] == 1

    arun(main())


def test_bad_arguments_to_fetch(factory, tmp_path, arun):
    async def main():
        async with network(factory, tmp_path) as make:
            n = make("n")
            with pytest.raises(PackageError, match="not a sha256"):
                await n.svc.fetch("../../etc/passwd", 10, timeout=1)
            with pytest.raises(PackageError, match="size"):
                await n.svc.fetch(sha(b""), -1, timeout=1)
    arun(main())
    with pytest.raises(ValueError):
        ChunkService(factory, PlaneLoop(), PackageCache(tmp_path), window=0)
    with pytest.raises(ValueError):
        ChunkService(factory, PlaneLoop(), PackageCache(tmp_path), chunk_size=p.MAX_FRAME + 1)


# -- resume, retransmit, re-parent ------------------------------------------------


def test_resume_after_interrupted_fetch(factory, tmp_path, arun, until):
    data = os.urandom(40_000)
    digest = sha(data)
    chunk = 4000

    async def main():
        async with network(factory, tmp_path) as make:
            fake = make.fake()
            child = make("child", chunk_size=chunk, window=2, request_timeout=30)
            child.svc.set_upstream(fake.endpoint)
            fetch = asyncio.ensure_future(child.svc.fetch(digest, len(data), timeout=1.0))
            answered = 0
            while answered < 3:  # three chunks, then the upstream dies
                await until(lambda: len(fake.requests) > answered, what="a request")
                fake.answer(*fake.requests[answered], data)
                answered += 1
            await until(lambda: child.stats()["chunks_fetched"] == 3, what="three chunks stored")
            fake.close()
            with pytest.raises(TimeoutError, match=rf"package {digest[:12]}: got {3 * chunk} of {len(data)} bytes"):
                await fetch
            child.close()  # a restart: a new service over the same cache directory
            root = make("root")
            root.cache.put(data)
            again = make("child-again", cache_dir="child", chunk_size=chunk)
            again.svc.set_upstream(root.endpoint)
            path = await again.svc.fetch(digest, len(data), timeout=10)
            assert path.read_bytes() == data
            s = again.stats()
            assert s["resumed"] == 1
            assert s["bytes_fetched"] == len(data) - 3 * chunk < len(data)
            assert root.stats()["bytes_served"] == len(data) - 3 * chunk

    arun(main(), timeout=60)


def test_upstream_switched_mid_transfer(factory, tmp_path, arun, until):
    data = os.urandom(64_000)
    digest = sha(data)
    chunk = 4000

    async def main():
        async with network(factory, tmp_path) as make:
            root = make("root")
            root.cache.put(data)
            fake = make.fake()
            child = make("child", chunk_size=chunk, window=4, request_timeout=30)
            child.svc.set_upstream(fake.endpoint)
            fetch = asyncio.ensure_future(child.svc.fetch(digest, len(data), timeout=20))
            for i in range(5):
                await until(lambda: len(fake.requests) > i, what="a request")
                fake.answer(*fake.requests[i], data)
            await until(lambda: child.stats()["chunks_fetched"] == 5, what="five chunks")
            # The parent goes silent (it hangs); the tree re-parents the node.
            child.svc.set_upstream(root.endpoint)
            path = await fetch
            assert path.read_bytes() == data
            assert child.stats()["bytes_fetched"] == len(data)  # nothing fetched twice
            assert root.stats()["bytes_served"] == len(data) - 5 * chunk
            assert child.stats()["upstream"] == root.endpoint

    arun(main(), timeout=60)


def test_unanswered_requests_are_sent_again(factory, tmp_path, arun, until):
    data = os.urandom(20_000)
    digest = sha(data)

    async def main():
        async with network(factory, tmp_path) as make:
            fake = make.fake()
            child = make("child", chunk_size=5000, window=4, request_timeout=0.3)
            child.svc.set_upstream(fake.endpoint)
            fetch = asyncio.ensure_future(child.svc.fetch(digest, len(data), timeout=20))
            # Lose the first copy of every request; answer the second.
            seen: dict[int, int] = {}
            served = 0
            while not fetch.done():
                await until(lambda: len(fake.requests) > served or fetch.done(), what="a request")
                for ident, msg in fake.requests[served:]:
                    seen[msg.header.msg_id] = seen.get(msg.header.msg_id, 0) + 1
                    if seen[msg.header.msg_id] == 2:
                        fake.answer(ident, msg, data)
                    served += 1
            assert (await fetch).read_bytes() == data
            assert sorted(seen.values()) == [2, 2, 2, 2]  # the same msg_id, re-sent once each
            assert child.stats()["retransmits"] == 4

    arun(main(), timeout=60)


# -- flow control and bad input ------------------------------------------------------


def test_window_bounds_the_outstanding_requests(factory, tmp_path, arun, until):
    data = os.urandom(30_000)
    digest = sha(data)

    async def main():
        async with network(factory, tmp_path) as make:
            fake = make.fake()
            child = make("child", chunk_size=1000, window=3, request_timeout=30)
            child.svc.set_upstream(fake.endpoint)
            fetch = asyncio.ensure_future(child.svc.fetch(digest, len(data), timeout=20))
            await until(lambda: len(fake.requests) == 3, what="the first window")
            # The window is filled in one go: nothing more was even sent.
            assert child.stats()["requests_sent"] == 3 and child.stats()["outstanding"] == 3
            answered = 0
            while answered < 30:
                fake.answer(*fake.requests[answered], data)
                answered += 1
                # Each chunk grants exactly one more request.
                await until(lambda: child.stats()["chunks_fetched"] == answered, what="the chunk stored")
                want = min(30, answered + 3)
                assert child.stats()["requests_sent"] == want
                assert child.stats()["outstanding"] == want - answered
                await until(lambda: len(fake.requests) == want, what="the next request")
            assert (await fetch).read_bytes() == data
            assert child.stats()["max_outstanding"] == 3

    arun(main(), timeout=60)


def test_malformed_requests_are_counted_and_service_keeps_serving(factory, tmp_path, arun, until):
    data = os.urandom(100_000)
    digest = sha(data)
    bad_bodies = [
        ["not", "a", "map"],
        {"o": 0, "n": 10},  # no digest
        {"d": "zz", "o": 0, "n": 10},
        {"d": "../" * 30, "o": 0, "n": 10},
        {"d": digest, "o": -1, "n": 10},
        {"d": digest, "o": "0", "n": 10},
        {"d": digest, "o": True, "n": 10},
        {"d": digest, "o": 0, "n": 0},
        {"d": digest, "o": 0, "n": p.MAX_FRAME + 1},
        {"d": digest, "o": 0, "n": 10, "s": -5},
        {"d": digest, "o": 0, "n": 10, "s": 5},  # range outside the declared size
        {"d": digest, "o": 0, "n": 10, "t": "soon"},
        {"d": digest, "o": 99_995, "n": 10},  # past the end of the object
    ]

    async def main():
        async with network(factory, tmp_path) as make:
            server = make("server")
            server.cache.put(data)
            raw = factory.data_dealer(server.endpoint, b"\x05raw")
            replies = []
            make.pl.add(raw, p.Plane.DATA, lambda batch: replies.extend(p.decode(f) for f in batch))
            try:
                await until(lambda: make.pl.send(raw, p.encode(p.MsgType.DATA, {})), what="connected")
                for body in bad_bodies:
                    assert make.pl.send(raw, p.encode(p.MsgType.CHUNK_REQUEST, body))
                # Not msgpack at all: the link drops it before us; a wrong type is not ours.
                hdr = p.codec.pack(int(p.MsgType.CHUNK_REQUEST), 0, 1, 0, 0, 0, 64, 0, 0, 1)
                assert make.pl.send(raw, [hdr, b"\xc1"])
                await until(lambda: len(replies) == len(bad_bodies), what="an error per bad request")
                s = server.stats()
                assert s["requests_bad"] == len(bad_bodies)
                assert s["requests_ignored"] == 1  # the DATA message
                assert all(m.header.flags & p.Flag.ERROR and m.body["code"] == ERR_BAD_REQUEST for m in replies)
                assert all(isinstance(m.body["error"], str) and m.body["error"] for m in replies)
                assert s["bytes_served"] == 0
                # A good request from the same peer is served as usual.
                assert make.pl.send(raw, p.encode(p.MsgType.CHUNK_REQUEST, {"d": digest, "o": 10, "n": 5}))
                await until(lambda: len(replies) == len(bad_bodies) + 1, what="a chunk")
                assert replies[-1].extra == [data[10:15]] and not replies[-1].header.flags & p.Flag.ERROR
                child = make("child", upstream=server)
                assert (await child.svc.fetch(digest, len(data), timeout=10)).read_bytes() == data
            finally:
                make.pl.remove(raw)
                raw.close(0)

    arun(main(), timeout=60)


def test_unexpected_replies_are_ignored(factory, tmp_path, arun, until):
    data = os.urandom(8000)
    digest = sha(data)

    async def main():
        async with network(factory, tmp_path) as make:
            fake = make.fake()
            child = make("child", chunk_size=4000, window=2, request_timeout=30)
            child.svc.set_upstream(fake.endpoint)
            fetch = asyncio.ensure_future(child.svc.fetch(digest, len(data), timeout=20))
            await until(lambda: len(fake.requests) == 2, what="two requests")
            ident, first = fake.requests[0]
            # A reply to nothing, a short chunk and a wrong offset: counted, not stored.
            stale = p.encode(p.MsgType.CHUNK, {"d": digest, "o": 0}, ref=12345, extra=[data[:4000]])
            short = p.encode(p.MsgType.CHUNK, {"d": digest, "o": 0}, ref=first.header.msg_id, extra=[b"x"])
            wrong = p.encode(p.MsgType.CHUNK, {"d": digest, "o": 4000}, ref=first.header.msg_id,
                             extra=[data[4000:8000]])  # fmt: skip
            for frames in (stale, short, wrong):
                assert make.pl.send(fake.sock, [ident, *frames])
            await until(lambda: child.stats()["replies_stale"] + child.stats()["replies_bad"] == 3, what="counted")
            assert child.stats()["bytes_fetched"] == 0
            for ident, msg in fake.requests:
                fake.answer(ident, msg, data)
            assert (await fetch).read_bytes() == data

    arun(main(), timeout=30)


# -- the writer's running hash ---------------------------------------------------------


def test_writer_rewriting_hashed_bytes_is_still_verified(tmp_path):
    data = os.urandom(10_000)
    w = PackageCache(tmp_path).open_writer(sha(data), len(data))
    w.write(0, data[:5000])  # hashed as it arrives
    w.write(0, b"\x00" * 100)  # the same bytes again, but different: the running hash is void
    w.write(5000, data[5000:])
    with pytest.raises(PackageError, match="hash mismatch"):
        w.commit()


def test_writer_out_of_order_and_reopened(tmp_path):
    data = os.urandom(10_000)
    d = sha(data)
    w = PackageCache(tmp_path).open_writer(d, len(data))
    w.write(6000, data[6000:])
    w.write(0, data[:3000])
    w.close()
    w2 = PackageCache(tmp_path).open_writer(d, len(data))
    assert w2.missing_ranges() == [(3000, 6000)]
    w2.write(3000, data[3000:6000])
    assert w2.commit().read_bytes() == data


def test_node_between_parents_parks_requests_until_its_next_parent(factory, tmp_path, arun):
    """A non-root node with no upstream (orphaned, rejoining) holds its children's requests."""
    data = os.urandom(MB + 7)
    digest = sha(data)

    async def main():
        async with network(factory, tmp_path) as make:
            root = make("root")
            root.cache.put(data)
            orphan = make("orphan", root=False)  # no upstream yet: between parents
            child = make("child", upstream=orphan)
            fetch = asyncio.ensure_future(child.svc.fetch(digest, len(data), timeout=20))
            await asyncio.sleep(0.3)
            assert not fetch.done() and orphan.stats()["requests_parked"] >= 1
            assert orphan.stats()["requests_missing"] == 0
            orphan.svc.set_upstream(root.endpoint)  # rejoined
            assert (await fetch).read_bytes() == data
            assert root.stats()["bytes_served"] == len(data)

    arun(main(), timeout=60)


def test_cut_through_serves_chunks_before_the_whole_package_is_in(factory, tmp_path, arun):
    """A middle node passes chunks on as they arrive (the leaf still checks the whole hash)."""
    data = os.urandom(4 * MB)
    digest = sha(data)

    async def main():
        async with network(factory, tmp_path) as make:
            up = make.fake()  # answers only when told: the middle node holds a part of the package
            mid = make("mid", root=False)
            mid.svc.set_upstream(up.endpoint)
            leaf = make("leaf", upstream=mid)
            fetch = asyncio.ensure_future(leaf.svc.fetch(digest, len(data), timeout=20))
            await wait_until(lambda: len(up.requests) >= 8)
            first = up.requests[:4]
            for ident, msg in first:
                up.answer(ident, msg, data)
            await wait_until(lambda: leaf.stats()["chunks_fetched"] >= 1)
            assert not fetch.done() and not mid.cache.has(digest)
            assert mid.stats()["served_partial"] >= 1  # passed on before the middle had it all
            answered = {id(m) for _, m in first}
            while not fetch.done():
                pending = [(i, m) for i, m in up.requests if id(m) not in answered]
                for ident, msg in pending:
                    answered.add(id(msg))
                    up.answer(ident, msg, data)
                await asyncio.sleep(0.01)
            assert (await fetch).read_bytes() == data and mid.cache.has(digest)

    arun(main(), timeout=60)
