"""The blocking control client against real sockets: answers, errors, silence."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from bus import protocol
from bus.protocol import BusError, MsgType
from fake_manager import FakeError
from tools.client import CtlClient, CtlError, CtlTimeout, ManagerNotRunning
from tools.cluster import free_port


def test_call_returns_result(fake):
    with CtlClient(fake.endpoint, timeout=5) as client:
        res = client.call("ping")
        assert res["members"] == 30
        res = client.call("exec", cmd="echo hi", selector="node-1*", timeout=1.0)
    assert res["expected"] == 11
    assert fake.requests[-1] == ("exec", {"cmd": "echo hi", "selector": "node-1*", "timeout": 1.0})


def test_manager_error_carries_code_and_sentence(fake):
    with CtlClient(fake.endpoint, timeout=5) as client:
        with pytest.raises(CtlError) as info:
            client.call("exec", cmd="true", selector="nope*")
    assert info.value.code == "BAD_SELECTOR"
    assert str(info.value) == "selector 'nope*' matches no node"
    assert isinstance(info.value, BusError)


def test_nobody_listening_is_not_running_and_fast():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with CtlClient(endpoint, timeout=10, connect_timeout=0.2) as client:
        with pytest.raises(ManagerNotRunning) as info:
            client.call("ping")
    assert time.monotonic() - t0 < 5  # the connect timeout, not the request timeout
    assert str(info.value) == f"manager not running at {endpoint} (start it with `bus-ctl up`)"
    assert info.value.code == "NOT_RUNNING"
    assert isinstance(info.value, ConnectionError)


def test_silent_manager_times_out():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    try:
        endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
        with CtlClient(endpoint, timeout=0.2) as client:
            with pytest.raises(CtlTimeout) as info:
                client.call("status")
        assert isinstance(info.value, TimeoutError)
        assert "did not answer `status` within 0.2s" in str(info.value)
        assert router.poll(1000)  # the request did arrive
    finally:
        router.close(0)
        ctx.term()


def test_stale_and_foreign_replies_are_skipped():
    """Only the reply whose ref matches the request's msg_id counts."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"

    def serve():
        ident, header, _body = router.recv_multipart()
        req = protocol.codec.parse(header)
        router.send_multipart([ident, *protocol.encode(MsgType.CTL_REPLY, {"ok": True, "result": "old"}, ref=12345)])
        router.send_multipart([ident, *protocol.encode(MsgType.PONG, {}, ref=req.msg_id)])
        router.send_multipart([ident, *protocol.encode(MsgType.CTL_REPLY, {"ok": True, "result": "new"}, ref=req.msg_id)])

    t = threading.Thread(target=serve)
    t.start()
    try:
        with CtlClient(endpoint, timeout=5) as client:
            assert client.call("ping") == "new"
            assert client.stale_replies == 2
    finally:
        t.join(5)
        router.close(0)
        ctx.term()


def test_manager_refusal_keeps_its_code(fake):
    def bad(args):
        raise FakeError("BUSY", "the manager is repairing the tree; retry in a second")

    fake.handlers["status"] = bad
    with CtlClient(fake.endpoint, timeout=5) as client:
        with pytest.raises(CtlError, match="repairing the tree") as info:
            client.call("status")
    assert info.value.code == "BUSY"


def test_malformed_reply_is_a_ctl_error():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"

    def serve():
        ident, _header, _body = router.recv_multipart()
        router.send_multipart([ident, b"not a header", b"\xc1"])

    t = threading.Thread(target=serve)
    t.start()
    try:
        with CtlClient(endpoint, timeout=5) as client:
            with pytest.raises(CtlError, match="malformed reply to `ping`") as info:
                client.call("ping")
        assert info.value.code == "BAD_REPLY"
        assert isinstance(info.value.__cause__, protocol.ProtocolError)
    finally:
        t.join(5)
        router.close(0)
        ctx.term()


def test_injected_context_is_left_open(fake):
    ctx = zmq.Context()
    try:
        client = CtlClient(fake.endpoint, context=ctx)
        assert client.call("ping")["members"] == 30
        client.close()
        assert not ctx.closed
    finally:
        ctx.term()
