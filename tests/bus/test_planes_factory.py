"""SocketFactory: the four sockets of a node, their options, errors and cleanup."""

from __future__ import annotations

import pytest
import zmq

from tests.helpers import wait_for

from bus.planes import SocketFactory, SocketSetupError, endpoint_of
from bus.protocol import MAX_FRAME, BusError, Plane


def _port(sock) -> int:
    return int(endpoint_of(sock).rsplit(":", 1)[1])


def test_builds_the_four_sockets_of_a_node(zctx):
    f = SocketFactory(zctx, control_hwm=50, data_hwm=700, linger=0, reconnect_ivl=150, reconnect_ivl_max=3000)
    try:
        crouter = f.control_router("tcp://127.0.0.1:0")
        drouter = f.data_router("tcp://127.0.0.1:0")
        cdealer = f.control_dealer(endpoint_of(crouter), b"node-7")
        ddealer = f.data_dealer(endpoint_of(drouter), b"node-7")

        assert [s.type for s in (crouter, cdealer, drouter, ddealer)] == [
            zmq.ROUTER,
            zmq.DEALER,
            zmq.ROUTER,
            zmq.DEALER,
        ]
        # Separate ports, real ones (not the 0 we asked for).
        ports = {_port(crouter), _port(drouter)}
        assert len(ports) == 2 and 0 not in ports
        for sock in (crouter, cdealer):
            assert sock.getsockopt(zmq.SNDHWM) == 50 and sock.getsockopt(zmq.RCVHWM) == 50
        assert ddealer.getsockopt(zmq.SNDHWM) == 700 and ddealer.getsockopt(zmq.RCVHWM) == 700
        # A data ROUTER queues little per peer: a peer that asks and never reads is bounded.
        from bus.planes import DATA_ROUTER_SNDHWM

        assert drouter.getsockopt(zmq.SNDHWM) == DATA_ROUTER_SNDHWM and drouter.getsockopt(zmq.RCVHWM) == 700
        assert f.hwm(Plane.CONTROL) == 50 and f.hwm(Plane.DATA) == 700
        for sock in (crouter, cdealer, drouter, ddealer):
            assert sock.getsockopt(zmq.LINGER) == 0
            assert sock.getsockopt(zmq.MAXMSGSIZE) == MAX_FRAME
            assert sock.getsockopt(zmq.TCP_KEEPALIVE) == 1
        for sock in (cdealer, ddealer):
            assert sock.getsockopt(zmq.IMMEDIATE) == 1
            assert sock.getsockopt(zmq.ROUTING_ID) == b"node-7"
            assert sock.getsockopt(zmq.RECONNECT_IVL) == 150
            assert sock.getsockopt(zmq.RECONNECT_IVL_MAX) == 3000
        assert zctx.get(zmq.MAX_SOCKETS) >= 4096
    finally:
        f.close(0)
    assert all(s.closed for s in (crouter, cdealer, drouter, ddealer))


def test_planes_are_separate_paths(factory):
    crouter = factory.control_router("tcp://127.0.0.1:0")
    drouter = factory.data_router("tcp://127.0.0.1:0")
    cdealer = factory.control_dealer(endpoint_of(crouter), b"c")
    ddealer = factory.data_dealer(endpoint_of(drouter), b"d")
    for sock in (crouter, drouter):
        sock.setsockopt(zmq.RCVTIMEO, 5000)
    cdealer.send(b"ctl")
    ddealer.send(b"dat")
    assert crouter.recv_multipart() == [b"c", b"ctl"]
    assert drouter.recv_multipart() == [b"d", b"dat"]
    # ROUTER_MANDATORY: a send to a peer that is not connected fails loudly.
    with pytest.raises(zmq.ZMQError) as info:
        crouter.send_multipart([b"nobody", b"x"], zmq.NOBLOCK)
    assert info.value.errno == zmq.EHOSTUNREACH


def test_bind_conflict_is_a_setup_error_and_leaks_nothing(factory):
    first = factory.control_router("tcp://127.0.0.1:0")
    with pytest.raises(SocketSetupError) as info:
        factory.data_router(endpoint_of(first))
    assert isinstance(info.value, (BusError, OSError))
    assert isinstance(info.value.__cause__, zmq.ZMQError)
    assert [s for s in factory._built if not s.closed] == [first]


@pytest.mark.parametrize("identity", [b"", b"\x00abc", "text", b"x" * 256])
def test_bad_identity_is_refused(factory, identity):
    with pytest.raises(ValueError):
        factory.control_dealer("tcp://127.0.0.1:5555", identity)


def test_bad_options_and_async_context_are_refused(zctx):
    with pytest.raises(ValueError):
        SocketFactory(zctx, data_hwm=0)
    with pytest.raises(ValueError):
        SocketFactory(zctx, linger=-1)
    import zmq.asyncio

    actx = zmq.asyncio.Context()
    try:
        with pytest.raises(TypeError):
            SocketFactory(actx)
    finally:
        actx.term()


def test_context_holds_more_than_the_default_1023_sockets():
    # A process hosts ~100 logical nodes of 4 sockets each; check well past 1023.
    ctx = zmq.Context()
    socks = []
    try:
        SocketFactory(ctx, max_sockets=2048)
        for _ in range(1100):
            socks.append(ctx.socket(zmq.DEALER))
        assert len(socks) == 1100
    finally:
        for s in socks:
            s.close(0)
        ctx.term()


def test_every_socket_passes_through_the_one_security_hook(zctx):
    seen = []

    class Recording(SocketFactory):
        def _secure(self, sock, *, server, endpoint=""):
            # Called before bind/connect, where CURVE options must be set; returns the endpoint to use.
            seen.append((sock.type, server, endpoint_of(sock)))
            return endpoint

    f = Recording(zctx, linger=0)
    try:
        cr = f.control_router("tcp://127.0.0.1:0")
        dr = f.data_router("tcp://127.0.0.1:0")
        f.control_dealer(endpoint_of(cr), b"a")
        f.data_dealer(endpoint_of(dr), b"a")
    finally:
        f.close(0)
    assert seen == [
        (zmq.ROUTER, True, ""),
        (zmq.ROUTER, True, ""),
        (zmq.DEALER, False, ""),
        (zmq.DEALER, False, ""),
    ]


def test_routers_listen_with_a_deep_backlog():
    ctx = zmq.Context()
    try:
        f = SocketFactory(ctx)
        r = f.control_router("tcp://127.0.0.1:0")
        assert r.getsockopt(zmq.BACKLOG) == 4096
        f.close(0)
    finally:
        ctx.term()


def test_new_context_runs_the_io_thread_as_sched_batch():
    import os

    from bus.planes import new_context

    ctx = new_context()
    try:
        if hasattr(os, "SCHED_BATCH"):
            assert ctx.get(zmq.THREAD_SCHED_POLICY) == os.SCHED_BATCH
        sock = ctx.socket(zmq.DEALER)  # the I/O thread starts with the first socket
        try:
            if hasattr(os, "SCHED_BATCH"):
                def policies():
                    out = set()
                    for t in os.listdir("/proc/self/task"):
                        try:
                            out.add(os.sched_getscheduler(int(t)))
                        except ProcessLookupError:
                            pass  # a thread of an earlier test ending meanwhile
                    return out

                # The I/O thread applies its policy itself once it runs.
                wait_for(lambda: os.SCHED_BATCH in policies(), timeout=2)
        finally:
            sock.close(0)
    finally:
        ctx.term()
