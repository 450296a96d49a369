"""Oversized and malformed frames sent to a PlaneLoop over real sockets (issue 7, item 3).

A hostile peer connects a DEALER to a node's control ROUTER and sends what no
honest sender builds (``bus.protocol.encode`` refuses it): a header claiming a
body over ``MAX_BODY``, a body whose msgpack declares a huge string, header
fields at their limits, more extra frames than ``MAX_EXTRA``, a frame over
``MAX_FRAME`` (which libzmq's ``MAXMSGSIZE`` answers by dropping the
connection).  Each is counted under its error code and dropped; the loop and
the handler keep serving, and the valid message sent after them arrives.
"""

from __future__ import annotations

import asyncio
import struct

import pytest
import zmq

from bus import protocol as p
from bus.planes import PlaneLoop, SocketFactory
from core.errors import ErrorCode

HDR = struct.Struct("<BBHQQIIBBHI")


def header(mtype=p.MsgType.PING, body_len=0, extra=0, version=p.VERSION, ttl=64, src=7, dst=0xFFFFFFFF):
    return HDR.pack(version, int(mtype), 0xFFFF, 2**64 - 1, 2**64 - 1, src, dst, ttl, 255, extra, body_len)


def good(n: int) -> list:
    return p.encode(p.MsgType.PING, {"n": n})


def body_of(frames):
    try:
        return p.decode(frames[1:]).body
    except p.MalformedBody:
        return "bad body"


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


async def serve_and_send(zctx, messages, *, expect_good: int, hwm_bytes=None):
    """Bind a control ROUTER served by a PlaneLoop, send ``messages`` from a raw DEALER, wait for the good ones."""
    factory = SocketFactory(zctx, linger=0)
    loop = PlaneLoop()
    got: list = []
    try:
        router = factory.control_router("tcp://127.0.0.1:0")
        loop.add(router, p.Plane.CONTROL, got.extend)
        await loop.start()
        dealer = zctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.ROUTING_ID, b"\x01hostile")
        dealer.connect(router.getsockopt(zmq.LAST_ENDPOINT).decode())
        for frames in messages:
            dealer.send_multipart(frames, copy=True)
        deadline = asyncio.get_running_loop().time() + 10
        while sum(1 for f in got if isinstance(body_of(f), dict)) < expect_good:
            assert asyncio.get_running_loop().time() < deadline, f"only {len(got)} messages arrived"
            await asyncio.sleep(0.005)
        dealer.close(0)
        return got, loop.statistics().control
    finally:
        await loop.stop()
        factory.close(linger=0)


def test_bad_frames_are_counted_and_dropped_and_serving_goes_on(zctx):
    msgpack_huge_str = b"\x81\xa1s\xdb\xff\xff\xff\xff"  # {"s": <str of 4 GiB>}, 8 bytes on the wire
    bad = [
        [header(body_len=p.MAX_BODY + 1), b"x"],  # a body over the limit (header)
        [header(body_len=0xFFFFFFFF), b""],  # the largest length the header can say
        [header(body_len=len(msgpack_huge_str)), msgpack_huge_str],  # passes framing; the body decode fails
        [header(version=99, body_len=1), b"\x80"],
        [header(mtype=200, body_len=1), b"\x80"],
        [header(mtype=p.MsgType.TASK, body_len=1), b"\x80"],  # a data-plane type on the control plane
        [header(body_len=1, extra=0xFFFF), b"\x80"],  # claims 65535 extra frames, has none
        [header()[:20], b""],  # a truncated header
        [header() + b"x", b""],  # a long one
        [b"\x80"],  # no header at all
        [header(body_len=3), b"\x80"],  # body shorter than said
    ]
    messages = [good(0), *bad, good(1)]
    got, stats = asyncio.run(serve_and_send(zctx, messages, expect_good=2))
    bodies = [body_of(f) for f in got]
    # The msgpack bomb passes the framing checks (the PlaneLoop never decodes bodies);
    # its consumer's decode refuses it without allocating (max_str_len).
    assert bodies == [{"n": 0}, "bad body", {"n": 1}]
    d = stats.dropped
    assert d[ErrorCode.TOO_LARGE] == 2 and d[ErrorCode.BAD_VERSION] == 1 and d[ErrorCode.UNKNOWN_TYPE] == 2
    assert d[ErrorCode.TRUNCATED] == 1 and d[ErrorCode.MALFORMED_FRAME] == 4
    assert stats.dropped_total == len(bad) - 1 and stats.handler_errors == 0


def test_too_many_extra_frames_are_dropped(zctx):
    n = p.MAX_EXTRA + 1
    messages = [[header(body_len=1, extra=n), b"\x80", *([b"e"] * n)], good(0)]
    got, stats = asyncio.run(serve_and_send(zctx, messages, expect_good=1))
    assert len(got) == 1 and stats.dropped[ErrorCode.TOO_LARGE] == 1


def test_frame_over_max_frame_drops_the_connection_not_the_node(zctx):
    async def main():
        factory = SocketFactory(zctx, linger=0, max_msgsize=1 << 16)  # small, to keep the test light
        loop = PlaneLoop()
        got: list = []
        try:
            router = factory.control_router("tcp://127.0.0.1:0")
            loop.add(router, p.Plane.CONTROL, got.extend)
            await loop.start()
            endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
            hostile = zctx.socket(zmq.DEALER)
            hostile.setsockopt(zmq.LINGER, 0)
            hostile.connect(endpoint)
            hostile.send_multipart([header(body_len=1, extra=1), b"\x80", b"x" * (1 << 17)])
            honest = zctx.socket(zmq.DEALER)
            honest.setsockopt(zmq.LINGER, 0)
            honest.connect(endpoint)
            honest.send_multipart(good(5))
            deadline = asyncio.get_running_loop().time() + 10
            while not got:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            assert [p.decode(f[1:]).body for f in got] == [{"n": 5}]
            hostile.close(0)
            honest.close(0)
        finally:
            await loop.stop()
            factory.close(linger=0)

    asyncio.run(main())
