"""The front end's fast path toward a node hosting both the workers and the result's cache instance.

The real worker stub (nodes/stub.py, docs/services.md) honours a TASK's
``put`` (store the result in a cache instance of its node, answer
``stored: true``), ``probe`` (answer ``hit: true`` from that cache instance
without running anything) and ``in`` (take the inputs from the node's cache,
``no_input`` when one is not there).  These tests drive a real
:class:`~frontends.server.FrontEnd` over HTTP against the test peer in its
``stub_cache`` mode, which answers those fields as the stub does, and check
both what the front end answers and what went over the wire.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from examples.transend.distill import distill_worker
from frontends.server import X_APPROXIMATE, X_CACHE, X_WORKER, _alias_key, _original_key, result_key
from tests.frontends.taskpeer import TaskPeer, transend_stack
from tests.frontends.test_dispatch import frontend
from tools.imagegen import write_set


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(cond, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    manifest = write_set(d, 4, seed=3)
    return d, [m["name"] for m in manifest]


def ids(peer: TaskPeer) -> tuple[str, str]:
    """The one distill worker and the one cache instance of the stack."""
    (wid,) = [w for w in peer.workers if "/distill@" in w]
    (cid,) = peer.caches
    return wid, cid


async def first_miss(client, peer: TaskPeer, origin: str, name: str) -> tuple:
    """The first request for image ``name`` (a miss), once its original and alias are in the node's cache:
    (worker id, cache id, that cache's store, the worker, url, the original's key, response, body)."""
    wid, cid = ids(peer)
    store = peer.cache_store(cid)
    url = f"{origin}/{name}"
    okey = _original_key(url)
    r = await client.get("/distill", params={"url": url, "w": "120"})
    assert r.status == 200 and r.headers[X_CACHE] == "miss"
    body = await r.read()
    await until(lambda: okey in store and (cid, "put", _alias_key("distill", [url])) in peer.cache_ops,
                what="the original and the alias in the cache")  # fmt: skip
    return wid, cid, store, peer.workers[wid], url, okey, r, body


def expected(original: bytes, params: dict) -> bytes:
    """What the distiller makes of ``original`` with ``params`` (deterministic)."""
    return distill_worker({"data": original, "params": params})["data"]


def test_miss_is_stored_by_the_workers_node_and_the_next_request_hits(images):
    """A miss whose result's cache instance is on the worker's node: the node stores it (``stored``),
    the front end does not put the result again, and the identical request is then a cache hit."""
    d, names = images

    async def main():
        # local_originals=0: no probe shortcut, so the second request goes through the front end's own get.
        async with transend_stack(d, workers=1, stub_cache=True, local_originals=0) as (client, fe, peer, origin):
            wid, cid = ids(peer)
            store = peer.cache_store(cid)
            url = f"{origin}/{names[1]}"
            r = await client.get("/distill", params={"url": url, "w": "120"})
            assert r.status == 200, await r.text()
            body, ctype = await r.read(), r.headers["Content-Type"]
            assert r.headers[X_CACHE] == "miss" and X_APPROXIMATE not in r.headers and r.headers[X_WORKER] == wid

            # The TASK named the result's cache instance; nothing by reference before a `stored: true`.
            ((task, frames),) = peer.workers[wid].tasks
            key = result_key("distill", [url], task["p"])
            assert task["put"]["w"] == cid and task["put"]["k"] == key
            assert "probe" not in task and "in" not in task and frames == 1

            # The worker's node stored it, with its content type, before answering.
            assert peer.stub_writes == [(cid, key, True)]
            entry = store.peek(key)
            assert entry is not None and entry.data == body and entry.meta["content_type"] == ctype

            # The front end wrote the alias (after where it would have put the result) but not the result.
            alias = _alias_key("distill", [url])
            await until(lambda: (cid, "put", alias) in peer.cache_ops, what="the alias put")
            assert (cid, "put", key) not in peer.cache_ops
            c = fe.cache.statistics()
            assert c["stored_by_workers"] == 1 and c["probes"] == 0

            # The identical request: a hit from what the node stored, the worker not asked again.
            r = await client.get("/distill", params={"url": url, "w": "120"})
            assert r.status == 200 and r.headers[X_CACHE] == "hit"
            assert await r.read() == body and r.headers["Content-Type"] == ctype
            assert peer.workers[wid].ran == 1 and len(peer.workers[wid].tasks) == 1
            assert fe.statistics()["frontend"]["hits"] == 1 and fe.statistics()["frontend"]["misses"] == 1

    run(main())


def test_probe_hit_is_answered_from_the_cache_without_running_the_worker(images):
    """Once the node said ``stored``, a request whose original the front end holds is one TASK with
    ``probe`` and the input by reference: a cached result comes back ``hit`` and nothing runs; an
    uncached one runs on the input read from the node's cache."""
    d, names = images
    original = (d / names[1]).read_bytes()

    async def main():
        async with transend_stack(d, workers=1, stub_cache=True) as (client, fe, peer, origin):
            wid, cid, store, worker, url, okey, r, first = await first_miss(client, peer, origin, names[1])
            ctype = r.headers["Content-Type"]
            key = worker.tasks[0][0]["put"]["k"]
            gets_before = sum(1 for op in peer.cache_ops if op[1] == "get")

            # The identical request: answered by the node from its cache, the worker never runs.
            r = await client.get("/distill", params={"url": url, "w": "120"})
            assert r.status == 200, await r.text()
            assert r.headers[X_CACHE] == "hit" and X_APPROXIMATE not in r.headers
            assert await r.read() == first and r.headers["Content-Type"] == ctype
            assert worker.ran == 1 and len(worker.tasks) == 2
            task, frames = worker.tasks[1]
            assert task["probe"] is True and task["put"]["w"] == cid and task["put"]["k"] == key
            assert task["in"] == [{"w": cid, "k": okey}] and frames == 0
            # The front end asked the cache nothing itself: the probe was its lookup.
            assert sum(1 for op in peer.cache_ops if op[1] == "get") == gets_before
            c = fe.cache.statistics()
            assert c["probes"] == 1 and c["stored_by_workers"] == 1
            assert fe.statistics()["frontend"]["hits"] == 1

            # Other parameters: the probe misses, the worker runs on the original read from the node's cache.
            r = await client.get("/distill", params={"url": url, "w": "64"})
            assert r.status == 200, await r.text()
            assert r.headers[X_CACHE] == "miss" and r.headers[X_WORKER] == wid and X_APPROXIMATE not in r.headers
            third = await r.read()
            assert worker.ran == 2 and len(worker.tasks) == 3
            task, frames = worker.tasks[2]
            assert task["probe"] is True and task["in"] == [{"w": cid, "k": okey}] and frames == 0
            assert third == await asyncio.to_thread(expected, original, task["p"]) and third != first
            assert store.peek(task["put"]["k"]).data == third and (cid, task["put"]["k"], True) in peer.stub_writes
            t, c = fe.tasks.statistics(), fe.cache.statistics()
            assert t["by_ref"] == 2 and t["no_input"] == 0
            assert c["probes"] == 2 and c["stored_by_workers"] == 2
            # Once the front end's background writes are done: it never put either result itself (not
            # after the probe hit, not after the node said `stored`).
            await until(lambda: not fe._background, what="the front end's background writes")
            assert (cid, "put", key) not in peer.cache_ops and (cid, "put", task["put"]["k"]) not in peer.cache_ops

    run(main())


def test_input_by_reference_missing_on_the_node_is_resent_with_its_bytes(images):
    """The original was evicted from the node's cache: the node answers ``no_input``, the front end
    sends the same TASK again with the bytes, the request succeeds with the right result, and the
    original is put back for the next requests."""
    d, names = images
    original = (d / names[1]).read_bytes()

    async def main():
        async with transend_stack(d, workers=1, stub_cache=True) as (client, fe, peer, origin):
            wid, cid, store, worker, url, okey, _, _ = await first_miss(client, peer, origin, names[1])
            puts_of_original = peer.cache_ops.count((cid, "put", okey))
            assert store.delete(okey)  # evicted

            r = await client.get("/distill", params={"url": url, "w": "64"})
            assert r.status == 200, await r.text()
            assert r.headers[X_CACHE] == "miss" and X_APPROXIMATE not in r.headers and r.headers[X_WORKER] == wid
            body = await r.read()
            # First by reference (no frame): no_input, nothing ran; then the same worker, with the bytes.
            assert len(worker.tasks) == 3 and worker.ran == 2
            (by_ref, n_ref), (resent, n_resent) = worker.tasks[1:]
            assert by_ref["in"] == [{"w": cid, "k": okey}] and n_ref == 0
            assert "in" not in resent and n_resent == 1 and resent["put"] == by_ref["put"]
            assert body == await asyncio.to_thread(expected, original, resent["p"])
            assert store.peek(resent["put"]["k"]).data == body  # stored by the node, as usual
            assert fe.tasks.statistics()["no_input"] == 1
            # The front end puts the original back where the ring says it belongs.
            await until(lambda: okey in store, what="the original put back")
            assert store.peek(okey).data == original
            assert peer.cache_ops.count((cid, "put", okey)) == puts_of_original + 1

    run(main())


def test_result_cache_on_another_node_is_put_by_the_front_end(images):
    """The result's cache instance is not on the worker's node: the TASK carries no ``put``, and the
    front end stores the result itself."""
    d, names = images

    async def main():
        async with transend_stack(d, workers=1, stub_cache=True, cache_node="n2") as (client, fe, peer, origin):
            wid, cid = ids(peer)
            assert peer.caches[cid][0] != peer.workers[wid].node
            url = f"{origin}/{names[0]}"
            r = await client.get("/distill", params={"url": url, "w": "80"})
            assert r.status == 200 and r.headers[X_CACHE] == "miss"
            body = await r.read()
            ((task, frames),) = peer.workers[wid].tasks
            assert "put" not in task and "probe" not in task and "in" not in task and frames == 1
            key = result_key("distill", [url], task["p"])
            await until(lambda: (cid, "put", key) in peer.cache_ops, what="the front end's put of the result")
            assert peer.stub_writes == [] and fe.cache.statistics()["stored_by_workers"] == 0
            r = await client.get("/distill", params={"url": url, "w": "80"})
            assert r.status == 200 and r.headers[X_CACHE] == "hit" and await r.read() == body
            assert peer.workers[wid].ran == 1

    run(main())


def test_an_older_stub_gets_neither_probe_nor_inputs_by_reference(images):
    """A node that never answers ``stored`` (the peer's default): the front end keeps sending the
    bytes and putting results itself, never ``probe`` nor ``in``."""
    d, names = images

    async def main():
        async with transend_stack(d, workers=1) as (client, fe, peer, origin):
            wid, cid = ids(peer)
            url = f"{origin}/{names[1]}"
            keys = []
            for w in ("120", "64", "120"):
                r = await client.get("/distill", params={"url": url, "w": w})
                assert r.status == 200, await r.text()
                if len(keys) < 2:
                    task = peer.workers[wid].tasks[-1][0]
                    keys.append(task["put"]["k"])
                    await until(lambda: (cid, "put", keys[-1]) in peer.cache_ops, what="the front end's put")
            assert r.headers[X_CACHE] == "hit"
            assert len(peer.workers[wid].tasks) == 2
            for task, frames in peer.workers[wid].tasks:
                assert "put" in task and "probe" not in task and "in" not in task and frames == 1
            assert peer.stub_writes == []
            assert fe.cache.statistics()["stored_by_workers"] == 0 and fe.cache.statistics()["probes"] == 0
            assert fe.tasks.statistics()["by_ref"] == 0

    run(main())


def test_task_client_reports_stored_hit_and_ref_missed():
    """TaskClient.call's result flags against a node that stores results, probes and reads inputs."""

    async def main():
        async with TaskPeer(stub_cache=True) as peer:
            wid = peer.add_worker("n1")  # echo: the result is the input
            cid = peer.add_cache("n1")
            store = peer.cache_store(cid)
            data = peer.endpoints["n1"]
            worker = peer.workers[wid]

            def at(k: str) -> dict:
                return {"w": cid, "k": k, "data": data}

            async with frontend(peer) as (_, _, tasks):
                # Before any `stored: true`: put only, the bytes sent, no probe.
                res = await tasks.call([b"abc"], put=at("r:1"), ref=at("o:1"), probe=True)
                assert res.data == b"abc" and res.stored and res.hit is None and not res.ref_missed
                assert store.peek("r:1").data == b"abc" and store.peek("r:1").meta["content_type"]
                assert "probe" not in worker.tasks[0][0] and worker.tasks[0][1] == 1
                # Now the input by reference, read on the node; the probe misses.
                store.put("o:1", b"cached original")
                res = await tasks.call([b"cached original"], put=at("r:2"), ref=at("o:1"), probe=True)
                assert res.data == b"cached original" and res.stored and res.hit is False and not res.ref_missed
                assert worker.tasks[1][1] == 0 and worker.ran == 2
                # The same again: a probe hit, nothing runs, nothing stored again.
                res = await tasks.call([b"cached original"], put=at("r:2"), ref=at("o:1"), probe=True)
                assert res.data == b"cached original" and res.hit is True and not res.stored
                assert worker.ran == 2 and len(peer.stub_writes) == 2
                # The input evicted: no_input, sent again with the bytes.
                store.delete("o:1")
                res = await tasks.call([b"fresh bytes"], put=at("r:3"), ref=at("o:1"))
                assert res.data == b"fresh bytes" and res.stored and res.ref_missed and res.hit is None
                assert [n for _, n in worker.tasks[-2:]] == [0, 1] and tasks.statistics()["no_input"] == 1
                # A put to a cache of another node is not `stored` (the node writes it after answering).
                other = peer.add_cache("n2")
                res = await tasks.call([b"xyz"], put={"w": other, "k": "r:4", "data": peer.endpoints["n2"]})
                assert not res.stored and "put" not in worker.tasks[-1][0]

    run(main())
