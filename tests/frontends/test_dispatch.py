"""The front end's beacons, data plane and dispatch against a real-socket peer (tests/frontends/taskpeer.py)."""

from __future__ import annotations

import asyncio
import random
import time
from contextlib import asynccontextmanager

import pytest
import zmq

from bus.planes import PlaneLoop, SocketFactory
from frontends.beacon import Beacon, BeaconClient
from frontends.dataplane import DataPlane
from frontends.dispatch import (NO_WORKERS, SATURATED, TIMEOUT, NoWorkerAvailable, TaskClient, TaskFailed,
                                TaskRejected, TaskTimeout)  # fmt: skip
from tests.frontends.taskpeer import TaskPeer


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(cond, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


@asynccontextmanager
async def frontend(peer: TaskPeer, *, renew=2.0, stale_after=3.0, timeout=1.0, late_grace=2.0, **kw):
    """A BeaconClient + DataPlane + TaskClient subscribed to ``peer``, with its first beacon in."""
    ctx = zmq.Context()
    factory = SocketFactory(ctx, linger=0)
    loop = PlaneLoop()
    await loop.start()
    beacons = BeaconClient(factory, loop, peer.control_endpoint, peer.svc, renew=renew, stale_after=stale_after)
    plane = DataPlane(factory, loop, late_grace=late_grace, connect_timeout=0.2)
    tasks = TaskClient(plane, beacons, timeout=timeout, rng=random.Random(7), **kw)
    try:
        await plane.start()
        await beacons.start()
        await beacons.next_beacon(5.0)
        yield beacons, plane, tasks
    finally:
        await beacons.stop()
        await plane.stop()
        await loop.stop()
        factory.close(linger=0)
        ctx.term()


def test_subscription_beacons_renewal_and_staleness():
    async def main():
        async with TaskPeer() as peer:
            a = peer.add_worker("n1", cost=0.02)
            peer.add_worker("n2", "sheet", "aggregation")
            c = peer.add_cache("n2")
            async with frontend(peer, renew=0.1, stale_after=0.3) as (beacons, plane, tasks):
                b = beacons.latest
                assert b.svc == "transend" and {w.id for w in b.workers} >= {a} and [x.id for x in b.caches] == [c]
                assert not beacons.stale
                assert [w.id for w in tasks.workers("transformation")] == [a]
                # Both nodes' data endpoints are connected before any request.
                assert plane.endpoints() == sorted(peer.endpoints.values())
                # Renewal: the subscription is re-sent every `renew`.
                await until(lambda: peer.subscribes >= 4, what="renewals")
                # No beacon for stale_after: the table is kept, marked stale.
                peer.beaconing = False
                await until(lambda: beacons.statistics()["went_stale"] == 1, what="stale")
                assert beacons.stale and beacons.age() > 0.3
                assert beacons.latest is b or beacons.latest.seq >= b.seq
                assert [w.id for w in tasks.workers("transformation")] == [a]
                peer.beaconing = True
                await beacons.next_beacon(2.0)
                assert not beacons.stale
                stats = beacons.statistics()
                assert stats["beacons"] >= 2 and stats["refused"] == 0 and stats["workers"] == 2

    run(main())


def test_silent_manager_socket_is_reopened_and_resubscribes():
    async def main():
        async with TaskPeer() as peer:
            peer.add_worker("n1")
            async with frontend(peer, renew=0.1, stale_after=0.3) as (beacons, _, _):
                peer.answer_subscribe = False
                peer.subscribers.clear()  # a restarted manager: it knows nobody
                await until(lambda: beacons.statistics()["reopened"] >= 1, what="reopen")
                peer.answer_subscribe = True
                await beacons.next_beacon(2.0)
                assert not beacons.stale

    run(main())


def test_choose_spreads_by_inflight_and_beaconed_queue():
    async def main():
        async with TaskPeer() as peer:
            a = peer.add_worker("n1", delay=0.3)
            b = peer.add_worker("n2", delay=0.3)
            async with frontend(peer) as (_, plane, tasks):
                calls = [asyncio.ensure_future(tasks.call([b"x%d" % i])) for i in range(4)]
                await until(lambda: tasks.inflight(a) + tasks.inflight(b) == 4, what="4 in flight")
                # With two workers p2c is least-loaded on own in-flight: 2 and 2.
                assert (tasks.inflight(a), tasks.inflight(b)) == (2, 2)
                results = await asyncio.gather(*calls)
                assert sorted(r.data for r in results) == [b"x0", b"x1", b"x2", b"x3"]
                assert tasks.inflight(a) == tasks.inflight(b) == 0
                # A long beaconed queue on a moves everything to b.
                peer.set(a, q=10, delay=0.0)
                peer.set(b, delay=0.0)
                await until(lambda: tasks.load(a) >= 10, what="beaconed queue")
                results = await asyncio.gather(*(tasks.call([b"y"]) for _ in range(5)))
                assert {r.worker for r in results} == {b}
                assert tasks.statistics()["ok"] == 9 and plane.statistics()["inflight"] == 0

    run(main())


def test_our_share_of_a_beaconed_queue_is_counted_live():
    """The last beacon says a holds 6 requests, all ours (``by``); once 4 of them are answered, a holds 2 of
    ours and b 3: the next request goes to a.  Scoring a by its beaconed queue (6, stale until the next
    beacon) would send it to b: the overshoot that kept a newly spawned worker's queues unbalanced."""
    async def main():
        async with TaskPeer(beacon_interval=0.05) as peer:
            a = peer.add_worker("n1", delay=1.0)
            async with frontend(peer, timeout=30.0) as (_, plane, tasks):
                await until(lambda: [w.id for w in tasks.workers()] == [a], what="a beacon with a")
                calls = [asyncio.ensure_future(tasks.call([b"q%d" % i])) for i in range(4)]  # answered after 1 s
                await until(lambda: tasks.inflight(a) == 4, what="4 in flight at a")
                peer.set(a, delay=20.0)
                calls += [asyncio.ensure_future(tasks.call([b"h%d" % i])) for i in range(2)]  # held
                mine = lambda: dict(tasks._rows[a].by).get(plane.identity(tasks._rows[a].data))  # noqa: E731
                await until(lambda: mine() == 6, what="a beacon naming our 6 requests at a")
                peer.beaconing = False  # from now on the front end's view of a stays: 6, all ours
                b = peer.add_worker("n2", delay=20.0)
                tasks._on_beacon(Beacon.parse(peer.beacon(), time.monotonic()))
                assert tasks._rows[a].r == 6 and mine() == 6 and tasks.load(a) == 6
                calls += [asyncio.ensure_future(tasks.call([b"b%d" % i])) for i in range(3)]
                await until(lambda: tasks.inflight(b) == 3, what="3 in flight at b")
                await asyncio.gather(*calls[:4])  # the 4 quick ones at a are answered
                assert (tasks.inflight(a), tasks.inflight(b)) == (2, 3) and tasks.load(a) == 2
                calls.append(asyncio.ensure_future(tasks.call([b"next"])))
                await until(lambda: tasks.inflight(a) + tasks.inflight(b) == 6, what="the next request sent")
                assert (tasks.inflight(a), tasks.inflight(b)) == (3, 3)
                for c in calls:
                    c.cancel()
                await asyncio.gather(*calls, return_exceptions=True)

    run(main())


def test_timeout_redispatches_and_keeps_inflight_until_late_grace():
    async def main():
        async with TaskPeer() as peer:
            a = peer.add_worker("n1", silent=True)
            b = peer.add_worker("n2", q=5)  # a looks better: it is chosen first
            async with frontend(peer, timeout=0.2, late_grace=0.3) as (_, plane, tasks):
                t0 = time.monotonic()
                r = await tasks.call([b"hello"])
                assert r.worker == b and r.attempts == 2 and r.data == b"hello"
                assert 0.2 <= time.monotonic() - t0 < 1.0
                assert peer.workers[a].received and peer.workers[b].answered == 1
                # The silent worker keeps its in-flight count until late_grace passes.
                assert tasks.inflight(a) == 1
                await until(lambda: tasks.inflight(a) == 0, what="lost request settled")
                s = tasks.statistics()
                assert s["timeouts"] == 1 and s["redispatched"] == 1 and s["ok"] == 1
                assert plane.statistics()["lost"] == 1

    run(main())


def test_late_reply_is_matched_and_settles_inflight():
    async def main():
        async with TaskPeer() as peer:
            a = peer.add_worker("n1", delay=0.5)
            b = peer.add_worker("n2", q=5)
            async with frontend(peer, timeout=0.2, late_grace=5.0) as (_, plane, tasks):
                r = await tasks.call([b"z"])
                assert r.worker == b
                assert tasks.inflight(a) == 1
                await until(lambda: plane.statistics()["late"] == 1, what="late reply")
                assert tasks.inflight(a) == 0 and plane.statistics()["lost"] == 0

    run(main())


@pytest.mark.parametrize("code", ["worker_crashed", "no_such_worker", "overloaded", "deadline"])
def test_error_codes_redispatch_to_another_worker(code):
    async def main():
        async with TaskPeer() as peer:
            a = peer.add_worker("n1", code=code)
            b = peer.add_worker("n2", q=5)
            async with frontend(peer) as (_, _, tasks):
                r = await tasks.call([b"p"], {"max_width": 100})
                assert r.worker == b and r.attempts == 2
                assert peer.workers[a].received and tasks.statistics()[code] == 1
                assert tasks.inflight(a) == tasks.inflight(b) == 0

    run(main())


def test_unknown_worker_gets_no_such_worker_and_redispatch():
    async def main():
        async with TaskPeer() as peer:
            a = peer.add_worker("n1")
            b = peer.add_worker("n2", q=5)
            async with frontend(peer, renew=5.0) as (beacons, _, tasks):
                peer.beaconing = False  # the front end still believes in a
                peer.remove(a)
                r = await tasks.call([b"q"])
                assert r.worker == b and tasks.statistics()["no_such_worker"] == 1

    run(main())


def test_unreachable_node_redispatches():
    async def main():
        async with TaskPeer() as peer:
            peer.add_worker("n1")
            b = peer.add_worker("n2", q=5)
            async with frontend(peer) as (_, _, tasks):
                peer.beaconing = False
                peer.kill_node("n1")
                r = await tasks.call([b"u"])
                assert r.worker == b
                assert tasks.statistics()["unreachable"] + tasks.statistics()["timeouts"] == 1

    run(main())


def test_all_workers_silent_is_a_timeout_error():
    async def main():
        async with TaskPeer() as peer:
            a = peer.add_worker("n1", silent=True)
            b = peer.add_worker("n2", silent=True)
            async with frontend(peer, timeout=0.15, attempts=3) as (_, _, tasks):
                t0 = time.monotonic()
                with pytest.raises(TaskTimeout) as info:
                    await tasks.call([b"s"])
                assert info.value.code == TIMEOUT and set(info.value.tried) == {a, b}
                assert isinstance(info.value, TimeoutError)
                assert 0.3 <= time.monotonic() - t0 < 1.5
                # The overall deadline bounds the call whatever the attempts.
                t0 = time.monotonic()
                with pytest.raises(TaskTimeout):
                    await tasks.call([b"s"], deadline=0.1)
                assert time.monotonic() - t0 < 0.5

    run(main())


def test_all_workers_crashing_is_rejected():
    async def main():
        async with TaskPeer() as peer:
            peer.add_worker("n1", code="worker_crashed")
            peer.add_worker("n2", code="worker_crashed")
            async with frontend(peer) as (_, _, tasks):
                with pytest.raises(TaskRejected) as info:
                    await tasks.call([b"c"])
                assert info.value.code == "worker_crashed" and len(info.value.tried) == 2

    run(main())


def test_failed_is_final():
    def boom(request):
        raise ValueError("not an image")

    async def main():
        async with TaskPeer() as peer:
            peer.add_worker("n1", handler=boom)
            peer.add_worker("n2", handler=boom)
            async with frontend(peer) as (_, _, tasks):
                with pytest.raises(TaskFailed) as info:
                    await tasks.call([b"f"])
                assert "not an image" in info.value.err and len(info.value.tried) == 1

    run(main())


def test_no_workers_and_saturation():
    async def main():
        async with TaskPeer() as peer:
            peer.add_worker("n1", "sheet", "aggregation", q=5)
            async with frontend(peer, max_queue=4) as (_, _, tasks):
                with pytest.raises(NoWorkerAvailable) as info:
                    await tasks.call([b"n"])  # no transformation worker
                assert info.value.code == NO_WORKERS
                with pytest.raises(NoWorkerAvailable) as info:
                    await tasks.call([b"n"], kind="aggregation")  # queue 5 >= bound 4
                assert info.value.code == SATURATED
                s = tasks.statistics()
                assert s["no_workers"] == 1 and s["saturated"] == 1 and s["errors"] == 2

    run(main())


def test_aggregation_gets_every_input_frame():
    async def main():
        async with TaskPeer() as peer:
            peer.add_worker("n1", "sheet", "aggregation")
            async with frontend(peer) as (_, _, tasks):
                r = await tasks.call([b"a", b"b", b"c"], kind="aggregation")
                assert r.data == b"abc"
                r = await tasks.call([b"d"], name="sheet", kind=None)
                assert r.data == b"d"

    run(main())


def test_put_goes_only_to_a_worker_on_the_cache_node():
    async def main():
        async with TaskPeer() as peer:
            a = peer.add_worker("n1")
            b = peer.add_worker("n2", q=20)
            seen: dict = {}
            run_task, reply = peer._run, peer._reply

            async def spy(sock, ident, worker, body, extra):
                seen[worker.id] = body.get("put")
                await run_task(sock, ident, worker, body, extra)

            def stored(sock, ident, body, extra=()):
                # The real stub says so when it wrote the result into a cache instance of its node.
                if body.get("ok") and seen.get(a) is not None:
                    body = {**body, "stored": True}
                reply(sock, ident, body, extra)

            peer._run, peer._reply = spy, stored
            async with frontend(peer) as (_, _, tasks):
                await until(lambda: tasks.load(b) >= 20, what="the beaconed queue of b")
                put = {"w": "transend/cache@n1#9", "k": "r:key", "data": peer.endpoints["n1"], "meta": {"v": 1}}
                r = await tasks.call([b"x"], put=put)
                assert r.worker == a and r.stored is True
                assert seen[a] == {"w": "transend/cache@n1#9", "k": "r:key", "meta": {"v": 1}}
                # The cache's node has no worker: nobody is asked to store (the front end puts it itself).
                peer.set(a, q=50)
                peer.set(b, q=0)
                await until(lambda: tasks.load(a) >= 50 and tasks.load(b) == 0, what="the new beaconed queues")
                seen.clear()
                r = await tasks.call([b"y"], put=put)
                assert r.worker == b and r.stored is False and seen == {b: None}

    run(main())


def test_many_timeouts_share_one_timer():
    async def main():
        async with TaskPeer() as peer:
            peer.add_worker("n1", silent=True)
            async with frontend(peer, timeout=0.2, late_grace=0.2, attempts=1) as (_, plane, tasks):
                calls = [asyncio.ensure_future(tasks.call([b"%d" % i])) for i in range(50)]
                results = await asyncio.gather(*calls, return_exceptions=True)
                assert all(isinstance(r, TaskTimeout) for r in results)
                await until(lambda: plane.statistics()["inflight"] == 0, what="the lost requests settled")
                s = plane.statistics()
                assert s["timeouts"] == 50 and s["lost"] == 50 and not plane._dues

    run(main())
