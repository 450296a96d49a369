"""drain() and relay() over real zmq sockets (inproc and tcp loopback), both twins.

The compiled twin calls libzmq directly; these tests check it behaves exactly
like the pure twin, which uses pyzmq's methods.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import zmq

BCAST = 0xFFFFFFFF
NODE = 10
_endpoints = itertools.count()


def connect(ctx, transport, send_type=zmq.PUSH, recv_type=zmq.PULL, hwm=None):
    """(sender, receiver): receiver binds, sender connects."""
    sender, receiver = ctx.socket(send_type), ctx.socket(recv_type)
    for s in (sender, receiver):
        s.linger = 0
        if hwm is not None:
            s.sndhwm = s.rcvhwm = hwm
    if transport == "inproc":
        endpoint = f"inproc://fastpath-{next(_endpoints)}"
        receiver.bind(endpoint)
    else:
        port = receiver.bind_to_random_port("tcp://127.0.0.1")
        endpoint = f"tcp://127.0.0.1:{port}"
    sender.connect(endpoint)
    return sender, receiver


def collect(fp, sock, n, timeout=10.0):
    """Drain until ``n`` messages arrived or the deadline passed."""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if sock.poll(int(left * 1000) + 1, zmq.POLLIN):
            out.extend(fp.drain(sock, n - len(out)))
    return out


def relay_n(fp, ins, outs, fwd, n, header_index=0, timeout=10.0):
    """relay() until ``n`` messages were received; returns (received, forwarded)."""
    received = forwarded = 0
    deadline = time.monotonic() + timeout
    while received < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        if ins.poll(int(left * 1000) + 1, zmq.POLLIN):
            r, f = fp.relay(ins, outs, fwd, n - received, header_index)
            received += r
            forwarded += f
    return received, forwarded


def nothing_more(sock):
    return sock.poll(50, zmq.POLLIN) == 0


@pytest.fixture(params=["inproc", "tcp"])
def transport(request):
    return request.param


@pytest.fixture
def forwarder(fp, codec):
    routes = fp.RoutingTable()
    routes.add_subtree(1, [20, 21])
    return fp.Forwarder(NODE, codec, routes)


def mixed_messages(codec):
    """Messages of every kind, and the ones a relay sends on (header index 0)."""
    h = codec.pack
    msgs = [
        [h(64, msg_id=1, src=3, dst=20, ttl=5, hops=1, body_len=4), b"body", b"extra"],  # down: forwarded
        [h(64, msg_id=2, src=3, dst=99, body_len=0), b""],  # unknown, came from the parent: dropped
        [h(64, msg_id=3, src=3, dst=NODE), b"local"],  # for this node: not relayed
        [h(16, msg_id=4, src=3, dst=BCAST, ttl=0, hops=255), b"all"],  # broadcast: forwarded
        [h(16, msg_id=4, src=3, dst=BCAST), b"all"],  # the same broadcast again: dropped
        [h(64, msg_id=5, src=3, dst=21, ttl=0), b"expired"],  # ttl 0: dropped
        [b"not a header", b"x"],  # malformed
        [h(65, msg_id=6, src=3, dst=21, ttl=1, hops=254), b"b" * 100_000],  # big body
    ]
    advanced = [
        [h(64, msg_id=1, src=3, dst=20, ttl=4, hops=2, body_len=4), b"body", b"extra"],
        [h(16, msg_id=4, src=3, dst=BCAST, ttl=0, hops=255), b"all"],
        [h(65, msg_id=6, src=3, dst=21, ttl=0, hops=255), b"b" * 100_000],
    ]
    return msgs, advanced


def test_drain(fp, zctx, transport):
    tx, rx = connect(zctx, transport)
    assert fp.drain(rx, 10) == []
    msgs = [[b"a%d" % i, b"b" * i] for i in range(5)] + [[b"single"], [b"f%d" % i for i in range(20)]]
    for m in msgs:
        tx.send_multipart(m)
    got = collect(fp, rx, 3)
    got += collect(fp, rx, len(msgs) - 3)
    assert got == msgs
    assert all(type(f) is bytes for m in got for f in m)
    assert fp.drain(rx, 10) == [] and fp.drain(rx, 0) == []


def test_drain_stops_at_max_msgs(fp, zctx):
    tx, rx = connect(zctx, "inproc")
    for i in range(5):
        tx.send(b"%d" % i)
    assert rx.poll(1000)
    assert fp.drain(rx, 2) == [[b"0"], [b"1"]]
    assert fp.drain(rx, 2.5) == [[b"2"], [b"3"], [b"4"]]  # `while count < max_msgs`, like the twin


def test_relay_routes_and_rewrites(fp, zctx, transport, codec, forwarder):
    tx, rx = connect(zctx, transport)
    out, sink = connect(zctx, transport)
    msgs, advanced = mixed_messages(codec)
    for m in msgs:
        tx.send_multipart(m)
    assert relay_n(fp, rx, out, forwarder, len(msgs)) == (len(msgs), len(advanced))
    assert collect(fp, sink, len(advanced)) == advanced
    assert nothing_more(sink)
    assert dict(forwarder.statistics()) == {
        "routed": 8, "delivered": 1, "forwarded_down": 2, "forwarded_up": 0, "broadcast": 1,
        "dropped_duplicate": 1, "dropped_ttl": 1, "dropped_malformed": 1,
        "dropped_unroutable": 1, "dropped_loop": 0,
    }
    # Forwarded headers are parsed twice (route, then advance), as in the pure twin.
    assert codec.statistics()["parsed"] == 7 + 3


def test_relay_header_index_behind_routing_ids(fp, zctx, codec, forwarder):
    dealer, router = connect(zctx, "inproc", zmq.DEALER, zmq.ROUTER)
    out, sink = connect(zctx, "inproc")
    dealer.send_multipart([codec.pack(1, dst=20, ttl=2), b"x"])
    dealer.send_multipart([codec.pack(1, dst=20, ttl=2)])  # id + header only: still routable
    assert relay_n(fp, router, out, forwarder, 2, header_index=1) == (2, 2)
    got = collect(fp, sink, 2)
    assert [len(m) for m in got] == [3, 2]
    assert codec.parse(got[0][1]).ttl == 1 and got[0][2] == b"x"
    dealer.send_multipart([codec.pack(1, dst=20)])
    assert relay_n(fp, router, out, forwarder, 1, header_index=2) == (1, 0)  # too few frames
    assert forwarder.statistics()["dropped_malformed"] == 1
    assert forwarder.statistics()["routed"] == 2


def test_relay_stops_at_max_msgs(fp, zctx, codec, forwarder):
    tx, rx = connect(zctx, "inproc")
    out, sink = connect(zctx, "inproc")
    for i in range(5):
        tx.send_multipart([codec.pack(1, msg_id=i, dst=20), b"%d" % i])
    assert rx.poll(1000)
    assert fp.relay(rx, out, forwarder, 2) == (2, 2)
    assert fp.relay(rx, out, forwarder, 0) == (0, 0)
    assert fp.relay(rx, out, forwarder, 10) == (3, 3)
    assert fp.relay(rx, out, forwarder, 10) == (0, 0)
    assert [m[1] for m in collect(fp, sink, 5)] == [b"%d" % i for i in range(5)]


def test_relay_leaves_shared_frames_alone(fp, zctx, codec, forwarder):
    # inproc PUB hands each subscriber the same message buffer: the relay must
    # rewrite its own copy, not what the other subscriber reads.
    pub = zctx.socket(zmq.PUB)
    pub.bind("inproc://fastpath-pub")
    subs = []
    for _ in range(2):
        sub = zctx.socket(zmq.SUB)
        sub.subscribe(b"")
        sub.connect("inproc://fastpath-pub")
        subs.append(sub)
    out, sink = connect(zctx, "inproc")
    header = codec.pack(1, dst=20, ttl=9, hops=0) + b""
    body = b"p" * 200
    deadline = time.monotonic() + 10
    while not subs[0].poll(10) and time.monotonic() < deadline:  # subscriptions travel asynchronously
        pub.send_multipart([header, body])
    assert subs[1].poll(5000)
    assert fp.relay(subs[0], out, forwarder, 1) == (1, 1)
    assert codec.parse(collect(fp, sink, 1)[0][0]).as_tuple()[7:9] == (8, 1)
    assert fp.drain(subs[1], 1) == [[header, body]]


def test_relay_leaves_zero_copy_sender_buffer_alone(fp, zctx, codec, forwarder):
    # A zero-copy frame shares the sender's bytes object over inproc.
    tx, rx = connect(zctx, "inproc")
    out, sink = connect(zctx, "inproc")
    header = codec.pack(1, dst=20, ttl=9)
    pristine = bytes(bytearray(header))
    tx.send_multipart([zmq.Frame(header, copy=False), b"x"], copy=False)
    assert rx.poll(1000)
    assert fp.relay(rx, out, forwarder, 1) == (1, 1)
    assert codec.parse(collect(fp, sink, 1)[0][0]).ttl == 8
    assert header == pristine


def test_relay_blocks_on_full_peer_until_it_drains(fp, zctx, codec, forwarder):
    # Back-pressure: with tiny HWMs the relay's sends must wait for the sink,
    # and must let other threads (the sink's reader) run meanwhile.
    n = 200
    tx, rx = connect(zctx, "inproc")
    out, sink = connect(zctx, "inproc", hwm=1)
    for i in range(n):
        tx.send_multipart([codec.pack(1, msg_id=i, dst=20), b"%d" % i])
    got = []
    sink.rcvtimeo = 10_000

    def read():
        try:
            for _ in range(n):
                got.append(sink.recv_multipart())
        except zmq.Again:
            pass

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert rx.poll(1000)
        assert fp.relay(rx, out, forwarder, n) == (n, n)
    finally:
        reader.join(15)
    assert [m[1] for m in got] == [b"%d" % i for i in range(n)]


def test_relay_argument_errors(fp, zctx, codec, forwarder):
    tx, rx = connect(zctx, "inproc")
    out, _ = connect(zctx, "inproc")
    with pytest.raises(ValueError):
        fp.relay(rx, out, forwarder, 1, header_index=-1)
    rx.close()
    with pytest.raises(zmq.ZMQError) as info:
        fp.relay(rx, out, forwarder, 1)
    assert info.value.errno == zmq.ENOTSOCK
    with pytest.raises(zmq.ZMQError):
        fp.drain(rx, 1)
    assert fp.relay(rx, out, forwarder, 0) == (0, 0)  # nothing to receive: sockets untouched


def test_relay_to_closed_socket_raises(fp, zctx, codec, forwarder):
    tx, rx = connect(zctx, "inproc")
    out, _ = connect(zctx, "inproc")
    tx.send_multipart([codec.pack(1, dst=20), b"x"])
    assert rx.poll(1000)
    out.close()
    with pytest.raises(zmq.ZMQError) as info:
        fp.relay(rx, out, forwarder, 1)
    assert info.value.errno == zmq.ENOTSOCK


def test_twins_relay_alike(both, zctx, mkcodec):
    # The same traffic through each twin: same decisions, frames and statistics.
    import random

    rnd = random.Random(7)
    results = []
    for mod in both:
        codec = mkcodec(mod)
        routes = mod.RoutingTable()
        routes.add_subtree(1, range(20, 40))
        fwd = mod.Forwarder(NODE, codec, routes, window=8)
        tx, rx = connect(zctx, "tcp")
        out, sink = connect(zctx, "tcp")
        rnd.seed(7)
        msgs = []
        for i in range(300):
            dst = rnd.choice([NODE, BCAST, 99, *range(20, 40)])
            frames = [codec.pack(rnd.choice([1, 16, 64]), msg_id=rnd.randrange(12), src=rnd.randrange(3), dst=dst,
                                 ttl=rnd.randrange(3), hops=rnd.choice([0, 255])), b"%d" % i]
            if rnd.random() < 0.1:
                frames[0] = frames[0][: rnd.randrange(40)]
            msgs.append(frames + [b"e"] * rnd.randrange(3))
        for m in msgs:
            tx.send_multipart(m)
        counts = relay_n(mod, rx, out, fwd, len(msgs))
        got = collect(mod, sink, counts[1])
        assert nothing_more(sink)
        results.append((counts, got, dict(fwd.statistics()), dict(codec.statistics())))
    assert results[0] == results[1]
    assert results[0][0][1] > 50


def test_send_nowait_sends_whole_messages_and_reports_a_full_queue(fp, zctx):
    a = zctx.socket(zmq.PAIR)
    b = zctx.socket(zmq.PAIR)
    a.setsockopt(zmq.SNDHWM, 5)
    b.setsockopt(zmq.RCVHWM, 5)
    a.bind("inproc://send-nowait")
    b.connect("inproc://send-nowait")
    assert fp.send_nowait(a, [b"h", bytearray(b"b"), memoryview(b"mv"), b""]) is True
    assert b.recv_multipart() == [b"h", b"b", b"mv", b""]
    sent = 0
    while fp.send_nowait(a, [b"x", b"y"]):
        sent += 1
        assert sent < 1000, "a full queue must answer False, not block"
    got = fp.drain(b, 10_000)
    assert len(got) == sent and all(m == [b"x", b"y"] for m in got), "no partial message"
    with pytest.raises(ValueError):
        fp.send_nowait(a, [])


def test_send_nowait_raises_for_an_unknown_router_peer(fp, zctx):
    r = zctx.socket(zmq.ROUTER)
    r.setsockopt(zmq.ROUTER_MANDATORY, 1)
    r.bind("inproc://send-nowait-router")
    with pytest.raises(zmq.ZMQError) as e:
        fp.send_nowait(r, [b"nobody", b"x"])
    assert e.value.errno == zmq.EHOSTUNREACH


def test_events_reports_pollin_and_pollout(fp, zctx):
    a = zctx.socket(zmq.PAIR)
    b = zctx.socket(zmq.PAIR)
    a.bind("inproc://events")
    b.connect("inproc://events")
    assert fp.events(b) & zmq.POLLOUT
    assert not fp.events(b) & zmq.POLLIN
    a.send(b"x")
    assert fp.events(b) & zmq.POLLIN
    assert fp.events(b) == b.getsockopt(zmq.EVENTS)
    b.close(0)
    with pytest.raises(zmq.ZMQError):
        fp.events(b)
