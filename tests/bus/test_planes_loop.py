"""PlaneLoop: batches, control priority, bad input, sends and lifecycle, on real sockets."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest
import zmq

from bus import protocol
from bus.planes import PeerUnreachable, PlaneLoop, SocketFactory, endpoint_of, split_routed
from bus.protocol import HEADER_SIZE, MAX_BODY, ErrorCode, MsgType, Plane, ProtocolError, encode

DATA = Plane.DATA
CONTROL = Plane.CONTROL


def _pair(factory, plane: Plane, name: str, identity: bytes = b"peer"):
    """A bound ROUTER and a DEALER connected to it, on inproc."""
    ep = f"inproc://{name}"
    if plane is CONTROL:
        return factory.control_router(ep), factory.control_dealer(ep, identity)
    return factory.data_router(ep), factory.data_dealer(ep, identity)


class Collector:
    """A batch handler that records batches (and optionally decodes them)."""

    def __init__(self, loop: PlaneLoop | None = None, socket=None):
        self.batches: list[list] = []
        self.decoded: list = []
        self._loop, self._socket = loop, socket

    def __call__(self, batch):
        self.batches.append(batch)
        if self._loop is not None:
            for frames in batch:
                msg = self._loop.decode(self._socket, frames)
                if msg is not None:
                    self.decoded.append(msg)

    @property
    def count(self) -> int:
        return sum(len(b) for b in self.batches)


# -- lifecycle -------------------------------------------------------------


def test_lifecycle_without_io_in_init(factory, arun, until):
    pl = PlaneLoop()  # no running event loop needed: __init__ does no I/O
    router, dealer = _pair(factory, DATA, "life")
    got = Collector()
    pl.add(router, DATA, got)  # added before start: served once started
    dealer.send_multipart(encode(MsgType.DATA, {"n": 1}))
    assert not pl.running and pl.statistics().data.messages == 0
    spawned = []

    async def main():
        async with pl:
            assert pl.running
            with pytest.raises(RuntimeError):
                await pl.start()
            await until(lambda: got.count == 1)
            spawned.append(pl.spawn(asyncio.Event().wait(), name="forever"))
        assert not pl.running
        await pl.stop()  # idempotent

    arun(main())
    assert spawned[0].cancelled()
    with pytest.raises(RuntimeError):
        pl.spawn(asyncio.sleep(0))
    with pytest.raises(TypeError):
        import zmq.asyncio

        pl.add(zmq.asyncio.Socket.from_socket(router), DATA, got)
    with pytest.raises(ValueError):
        pl.add(router, DATA, got)  # already registered
    with pytest.raises(ValueError):
        PlaneLoop(data_batch=0)


# -- delivery in batches -----------------------------------------------------


def test_delivers_every_message_in_batches(factory, arun, until):
    n_per_sender = 20_000
    router = factory.data_router("tcp://127.0.0.1:0")
    senders = [factory.data_dealer(endpoint_of(router), b"s%d" % i) for i in range(2)]
    got = Collector()

    async def flood(pl, sock):
        frames = encode(MsgType.DATA, {})
        i = 0
        while i < n_per_sender:
            if pl.send(sock, [*frames[:1], frames[1]]):
                i += 1
                if i % 500 == 0:
                    await asyncio.sleep(0)
            else:
                assert await pl.writable(sock, timeout=5.0)

    async def main():
        async with PlaneLoop() as pl:
            pl.add(router, DATA, got)
            for s in senders:
                pl.add(s, DATA, lambda batch: None)
            tasks = [pl.spawn(flood(pl, s)) for s in senders]
            await until(lambda: got.count == 2 * n_per_sender, timeout=30, what="all messages")
            await asyncio.gather(*tasks)
            return pl.statistics()

    stats = arun(main(), timeout=40)
    assert stats.data.messages == 2 * n_per_sender
    assert stats.data.max_batch > 1
    assert stats.data.batches < stats.data.messages
    assert stats.data.sent == 2 * n_per_sender
    assert stats.data.dropped_total == 0 and stats.control.messages == 0
    assert {b[0][0] for b in got.batches} <= {b"s0", b"s1"}  # routing id first


# -- control before data -------------------------------------------------------


def test_control_is_served_before_a_data_backlog(zctx, arun, until):
    backlog = 50_000
    f = SocketFactory(zctx, data_hwm=backlog, linger=0)
    try:
        drouter, ddealer = _pair(f, DATA, "backlog-d")
        crouter, cdealer = _pair(f, CONTROL, "backlog-c")
        data = encode(MsgType.DATA, {})
        for _ in range(backlog):
            ddealer.send_multipart(data, zmq.NOBLOCK)  # inproc: queued right away
        cdealer.send_multipart(encode(MsgType.HEARTBEAT), zmq.NOBLOCK)
        order = []
        data_msgs = [0]

        def on_data(batch):
            order.append("data")
            data_msgs[0] += len(batch)

        async def main():
            pl = PlaneLoop()
            pl.add(drouter, DATA, on_data)  # registered first on purpose
            pl.add(crouter, CONTROL, lambda batch: order.append("control"))
            async with pl:
                await until(lambda: data_msgs[0] == backlog, timeout=30)

        arun(main(), timeout=40)
    finally:
        f.close(0)
    # Required: at most one data batch before the heartbeat; we serve it first.
    assert order.index("control") <= 1
    assert order[0] == "control"
    assert order.count("data") > 1


def test_control_is_checked_between_data_batches(zctx, arun, until):
    backlog = 20_000
    f = SocketFactory(zctx, data_hwm=backlog, linger=0)
    try:
        drouter, ddealer = _pair(f, DATA, "mid-d")
        crouter, cdealer = _pair(f, CONTROL, "mid-c")
        data = encode(MsgType.DATA, {})
        for _ in range(backlog):
            ddealer.send_multipart(data, zmq.NOBLOCK)
        order = []
        data_msgs = [0]

        def on_data(batch):
            order.append("data")
            data_msgs[0] += len(batch)
            if order.count("data") == 1:
                # A heartbeat arrives while a long data backlog is being served.
                cdealer.send_multipart(encode(MsgType.HEARTBEAT), zmq.NOBLOCK)

        async def main():
            async with PlaneLoop(data_batch=128, data_rounds=64) as pl:
                pl.add(drouter, DATA, on_data)
                pl.add(crouter, CONTROL, lambda batch: order.append("control"))
                await until(lambda: data_msgs[0] == backlog, timeout=30)

        arun(main(), timeout=40)
    finally:
        f.close(0)
    # Served right after the batch during which it arrived, not after the backlog.
    assert order.index("control") == 1


# -- bad input -----------------------------------------------------------------


def _header(**changes) -> bytearray:
    h = bytearray(protocol.codec.pack(int(MsgType.DATA), body_len=len(protocol.packb({}))))
    for offset, value in changes.items():
        h[int(offset[1:])] = value
    return h


_BODY = protocol.packb({})
_rng = random.Random(7)
_BAD = [
    ("random-one-frame", [_rng.randbytes(40)], ErrorCode.MALFORMED_FRAME),
    ("random-two-frames", [_rng.randbytes(50), _rng.randbytes(9)], ErrorCode.MALFORMED_FRAME),
    ("truncated-header", [bytes(_header())[:20], _BODY], ErrorCode.TRUNCATED),
    ("wrong-version", [bytes(_header(o0=99)), _BODY], ErrorCode.BAD_VERSION),
    ("unknown-type", [bytes(_header(o1=250)), _BODY], ErrorCode.UNKNOWN_TYPE),
    ("body-too-large", [protocol.codec.pack(int(MsgType.DATA), body_len=MAX_BODY)[:32] + (MAX_BODY + 1).to_bytes(4, "little"), b""], ErrorCode.TOO_LARGE),
    ("body-length-mismatch", [bytes(_header()), _BODY + b"x"], ErrorCode.MALFORMED_FRAME),
    ("extra-count-mismatch", [bytes(_header()), _BODY, b"extra"], ErrorCode.MALFORMED_FRAME),
]


@pytest.mark.parametrize("name,frames,code", _BAD, ids=[b[0] for b in _BAD])
def test_loop_checks_agree_with_protocol_decode(name, frames, code):
    # The loop checks frames without unpacking bodies; it must reject exactly
    # what the wire-format owner rejects, with the same code.
    with pytest.raises(ProtocolError) as info:
        protocol.decode(frames)
    assert info.value.code == code


def test_bad_frames_are_counted_dropped_and_logged_once(factory, arun, until, caplog):
    router, dealer = _pair(factory, DATA, "bad", identity=b"bad-peer")
    for _, frames, _ in _BAD:
        dealer.send_multipart(frames)
    dealer.send_multipart(encode(MsgType.PING))  # a control type on the data plane
    dealer.send_multipart(encode(MsgType.DATA, {"ok": True}))  # still delivered
    got = Collector()

    async def main():
        async with PlaneLoop() as pl:
            got._loop, got._socket = pl, router
            pl.add(router, DATA, got)
            await until(lambda: got.count == 1)
            return pl.statistics()

    with caplog.at_level(logging.WARNING, logger="bus.planes"):
        stats = arun(main())
    expected = {code: 0 for code in ErrorCode}
    for _, _, code in _BAD:
        expected[code] += 1
    expected[ErrorCode.UNKNOWN_TYPE] += 1  # the PING on the data plane
    assert dict(stats.data.dropped) == expected
    assert stats.data.messages == 1 and stats.data.dropped_total == len(_BAD) + 1
    assert got.decoded[0][0] == [b"bad-peer"] and got.decoded[0][1].body == {"ok": True}
    lines = [r for r in caplog.records if r.name == "bus.planes"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert b"bad-peer".hex() in lines[0].getMessage() and "data-plane" in lines[0].getMessage()


def test_bad_body_found_by_decode_is_counted(factory, arun, until):
    router, dealer = _pair(factory, CONTROL, "badbody")
    header = protocol.codec.pack(int(MsgType.COMMAND), body_len=1)
    dealer.send_multipart([header, b"\xc1"])  # 0xc1: never valid msgpack
    dealer.send_multipart(encode(MsgType.COMMAND, {"cmd": "ok"}))
    got = Collector()

    async def main():
        async with PlaneLoop() as pl:
            got._loop, got._socket = pl, router
            pl.add(router, CONTROL, got)
            await until(lambda: got.count == 2)
            return pl.statistics()

    stats = arun(main())
    assert stats.control.dropped[ErrorCode.MALFORMED_BODY] == 1
    assert [m.body for _, m in got.decoded] == [{"cmd": "ok"}]


def test_log_lines_are_rate_limited_per_peer(factory, arun, until, caplog):
    now = [1000.0]
    router, dealer = _pair(factory, CONTROL, "ratelimit", identity=b"noisy")
    junk = [b"junk"]

    async def main():
        async with PlaneLoop(clock=lambda: now[0], log_interval=10.0) as pl:
            pl.add(router, CONTROL, lambda batch: None)
            for _ in range(3):
                dealer.send_multipart(junk)
            await until(lambda: pl.statistics().control.dropped_total == 3)
            now[0] += 10.0
            dealer.send_multipart(junk)
            await until(lambda: pl.statistics().control.dropped_total == 4)

    with caplog.at_level(logging.WARNING, logger="bus.planes"):
        arun(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "bus.planes"]
    assert len(lines) == 2
    assert "(2 more from this peer suppressed)" in lines[1]


def test_handler_errors_are_counted_and_serving_goes_on(factory, arun, until, caplog):
    router, dealer = _pair(factory, DATA, "boom")
    calls = []

    def handler(batch):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("boom")

    async def main():
        async with PlaneLoop() as pl:
            pl.add(router, DATA, handler)
            dealer.send_multipart(encode(MsgType.DATA))
            await until(lambda: len(calls) == 1)
            dealer.send_multipart(encode(MsgType.DATA))
            await until(lambda: len(calls) == 2)
            return pl.statistics()

    with caplog.at_level(logging.ERROR, logger="bus.planes"):
        stats = arun(main())
    assert stats.data.handler_errors == 1 and stats.data.messages == 2
    assert any(r.exc_info for r in caplog.records if r.name == "bus.planes")


# -- sending -------------------------------------------------------------------


def test_send_on_a_full_data_socket_returns_false(zctx, arun, until):
    f = SocketFactory(zctx, data_hwm=5, linger=0)
    try:
        router, dealer = _pair(f, DATA, "full")  # nobody reads the router yet
        frames = encode(MsgType.DATA)

        async def main():
            async with PlaneLoop() as pl:
                pl.add(dealer, DATA, lambda batch: None)
                accepted = 0
                while pl.send(dealer, frames):
                    accepted += 1
                    assert accepted < 1000, "HWM never reached"
                assert not pl.send(dealer, frames)
                assert not await pl.writable(dealer, timeout=0.05)
                stats = pl.statistics()
                assert stats.data.send_eagain == 2 and stats.data.sent == accepted
                # The reader catches up: the DEALER becomes writable again.
                for _ in range(accepted):
                    router.recv_multipart()
                assert await pl.writable(dealer, timeout=5.0)
                assert pl.send(dealer, frames)

        arun(main())
    finally:
        f.close(0)


def test_data_send_without_a_connected_peer_returns_false(factory, arun):
    dealer = factory.data_dealer("tcp://127.0.0.1:9", b"lonely")  # IMMEDIATE: no peer, no queue

    async def main():
        async with PlaneLoop() as pl:
            pl.add(dealer, DATA, lambda batch: None)
            assert pl.send(dealer, encode(MsgType.DATA)) is False
            with pytest.raises(ValueError):
                pl.send(factory.data_router("inproc://unregistered"), encode(MsgType.DATA))
            return pl.statistics()

    assert arun(main()).data.send_eagain == 1


def test_control_sends_wait_in_order_when_the_queue_is_full(zctx, arun, until):
    f = SocketFactory(zctx, control_hwm=2, linger=0)
    try:
        router, dealer = _pair(f, CONTROL, "park")
        n = 40
        got = Collector()

        async def main():
            async with PlaneLoop() as pl:
                got._loop, got._socket = pl, router
                pl.add(dealer, CONTROL, lambda batch: None)
                for i in range(n):
                    assert pl.send(dealer, encode(MsgType.COMMAND, {"i": i}))
                assert pl.statistics().pending > 0
                pl.add(router, CONTROL, got)  # the reader arrives; parked ones flow
                await until(lambda: got.count == n)
                await until(lambda: pl.statistics().pending == 0)
                return pl.statistics()

        stats = arun(main())
    finally:
        f.close(0)
    assert [m.body["i"] for _, m in got.decoded] == list(range(n))
    assert stats.control.send_queued > 0 and stats.control.sent == n
    assert stats.control.send_eagain >= 1 and stats.control.send_dropped == 0


def test_control_pending_queue_is_bounded(zctx, arun):
    f = SocketFactory(zctx, control_hwm=1, linger=0)
    try:
        router, dealer = _pair(f, CONTROL, "bounded")

        async def main():
            async with PlaneLoop(pending_limit=3) as pl:
                pl.add(dealer, CONTROL, lambda batch: None)
                results = [pl.send(dealer, encode(MsgType.HEARTBEAT)) for _ in range(20)]
                return results, pl.statistics()

        results, stats = arun(main())
    finally:
        f.close(0)
    assert results.count(False) == stats.control.send_dropped > 0
    assert stats.pending == 3


def test_a_full_peer_does_not_block_control_to_other_peers(zctx, arun, until):
    f = SocketFactory(zctx, control_hwm=2, linger=0)
    try:
        router = f.control_router("inproc://fanout")
        slow = f.control_dealer("inproc://fanout", b"slow")
        fast = f.control_dealer("inproc://fanout", b"fast")
        got = Collector()

        async def main():
            async with PlaneLoop() as pl:
                pl.add(router, CONTROL, lambda batch: None)
                for d in (slow, fast):  # make the router learn both routing ids
                    d.send_multipart(encode(MsgType.HEARTBEAT))
                await until(lambda: pl.statistics().control.messages == 2)
                for _ in range(10):
                    assert pl.send(router, [b"slow", *encode(MsgType.HEARTBEAT)])
                assert pl.statistics().pending > 0
                pl.add(fast, CONTROL, got)
                assert pl.send(router, [b"fast", *encode(MsgType.HEARTBEAT)])
                await until(lambda: got.count == 1)
                assert pl.statistics().pending > 0  # still parked for "slow"

        arun(main())
    finally:
        f.close(0)


def test_send_to_a_gone_peer_raises_peer_unreachable(factory, arun):
    router = factory.control_router("inproc://ghosts")

    async def main():
        async with PlaneLoop() as pl:
            pl.add(router, CONTROL, lambda batch: None)
            with pytest.raises(PeerUnreachable) as info:
                pl.send(router, [b"ghost", *encode(MsgType.HEARTBEAT)])
            assert info.value.peer == b"ghost" and isinstance(info.value, ConnectionError)
            return pl.statistics()

    assert arun(main()).control.unreachable == 1


# -- registration --------------------------------------------------------------


def test_remove_stops_serving_and_allows_re_adding(factory, arun, until):
    router, dealer = _pair(factory, DATA, "remove")
    first, second = Collector(), Collector()

    async def main():
        async with PlaneLoop() as pl:
            pl.add(router, DATA, first)
            dealer.send_multipart(encode(MsgType.DATA))
            await until(lambda: first.count == 1)
            pl.remove(router)
            with pytest.raises(ValueError):
                pl.remove(router)
            dealer.send_multipart(encode(MsgType.DATA))
            pl.add(router, DATA, second)
            await until(lambda: second.count == 1)
            assert pl.statistics().sockets == 1

    arun(main())
    assert first.count == 1


def test_hundreds_of_sockets_in_one_loop(factory, arun, until):
    pairs = 150  # 300 registered sockets
    per_socket = 20
    routers, dealers = [], []
    for i in range(pairs):
        plane = CONTROL if i % 2 else DATA
        r, d = _pair(factory, plane, f"many-{i}", identity=b"d%d" % i)
        routers.append((r, plane))
        dealers.append((d, plane))
    counts = [0] * pairs

    def counter(i):
        def handler(batch):
            counts[i] += len(batch)

        return handler

    async def main():
        async with PlaneLoop() as pl:
            for i, (r, plane) in enumerate(routers):
                pl.add(r, plane, counter(i))
            for d, plane in dealers:
                pl.add(d, plane, lambda batch: None)
            for d, plane in dealers:
                t = MsgType.DATA if plane is DATA else MsgType.HEARTBEAT
                for _ in range(per_socket):
                    assert pl.send(d, encode(t))
            await until(lambda: sum(counts) == pairs * per_socket, timeout=20)
            return pl.statistics()

    stats = arun(main(), timeout=30)
    assert counts == [per_socket] * pairs
    assert stats.sockets == 2 * pairs


# -- helpers -------------------------------------------------------------------


def test_split_routed():
    frames = encode(MsgType.PING, {"x": 1})
    ids, msg = split_routed([b"A", *frames])
    assert ids == [b"A"] and msg.type is MsgType.PING and msg.body == {"x": 1}
    ids, msg = split_routed(frames, 0)
    assert ids == [] and msg.body == {"x": 1}
    # Scan mode: the first HEADER_SIZE frame after the first id frame.
    ids, msg = split_routed([b"proxy", b"A", *frames], None)
    assert ids == [b"proxy", b"A"] and msg.body == {"x": 1}
    ids, _ = split_routed([b"x" * HEADER_SIZE, *frames], None)  # an id as long as a header
    assert ids == [b"x" * HEADER_SIZE]
    with pytest.raises(ProtocolError):
        split_routed([b"A", b"B", b"C"], None)
    with pytest.raises(ProtocolError):
        split_routed([b"A", frames[0]])


def test_a_handler_may_remove_sockets_mid_batch(factory, arun, until):
    r1, d1 = _pair(factory, CONTROL, "rm-self")
    r2, d2 = _pair(factory, CONTROL, "rm-other")
    calls = {"r1": 0, "r2": 0}

    async def main():
        async with PlaneLoop(control_batch=1) as pl:

            def on_r1(batch):
                calls["r1"] += 1
                pl.remove(r1)  # itself, with more queued
                pl.remove(r2)  # another socket that is also ready

            def on_r2(batch):
                calls["r2"] += 1

            pl.add(r1, CONTROL, on_r1)
            pl.add(r2, CONTROL, on_r2)
            for _ in range(3):
                d1.send_multipart(encode(MsgType.HEARTBEAT))
                d2.send_multipart(encode(MsgType.HEARTBEAT))
            await until(lambda: calls["r1"] == 1)
            # A later message through a fresh socket proves the loop still turns.
            r3, d3 = _pair(factory, CONTROL, "rm-after")
            seen = Collector()
            pl.add(r3, CONTROL, seen)
            d3.send_multipart(encode(MsgType.HEARTBEAT))
            await until(lambda: seen.count == 1)
            return pl.statistics()

    stats = arun(main())
    # Once remove() returns, that socket's handler is never called again.
    assert calls == {"r1": 1, "r2": 0}
    assert stats.sockets == 1


def test_slow_data_work_yields_to_timers_within_the_slice(factory, arun):
    """A backlog of slow data batches must not hold back timers (heartbeats) for long."""
    import time

    router, dealer = _pair(factory, DATA, "slice")
    frames = encode(MsgType.DATA, {})
    for _ in range(2000):
        dealer.send_multipart(frames)
    handled = []

    def slow(batch):
        handled.append(len(batch))
        time.sleep(0.004)  # 4 ms of work per batch

    async def main():
        async with PlaneLoop(data_batch=16, data_rounds=64, data_slice=0.01) as pl:
            pl.add(router, DATA, slow)
            fired = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_later(0.005, fired.set_result, sum(handled))
            t0 = time.perf_counter()
            done_before = await asyncio.wait_for(fired, 5)
            late = time.perf_counter() - t0
            while sum(handled) < 2000:
                await asyncio.sleep(0.01)
            return done_before, late

    done_before, late = arun(main(), timeout=30)
    # 64 rounds x 4 ms would keep the timer waiting >= 256 ms without the slice.
    assert done_before < 2000 and late < 0.2
