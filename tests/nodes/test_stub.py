"""The worker stub with real ZeroMQ sockets on 127.0.0.1 and real worker processes.

The tree is a test double (``FakeNode``: a name, an id, and ``send_up``
recording the load reports); the data plane is real: a front-end DEALER sends
TASKs to the node's data ROUTER.  Worker callables live in
``tests/nodes/crashy_worker.py``.  Overheads are printed (``-s``), never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import time

import psutil
import pytest
import zmq

from bus import protocol as p
from bus.link import NodeLink
from bus.planes import PlaneLoop, SocketFactory
from nodes.stub import SVC_HANDLERS, WorkerStub

LOOPBACK = "tcp://127.0.0.1:0"
SVC = "t"
CW = "tests.nodes.crashy_worker"


def wid(worker: str, n: int = 1, node: str = "w1") -> str:
    return f"{SVC}/{worker}@{node}#{n}"


# -- fixtures and doubles ----------------------------------------------------------------


@pytest.fixture
def factory():
    ctx = zmq.Context()
    f = SocketFactory(ctx, linger=0)
    try:
        yield f
    finally:
        f.close(linger=0)
        ctx.destroy(linger=0)


@pytest.fixture
def arun():
    def run(coro, timeout: float = 60.0):
        return asyncio.run(asyncio.wait_for(coro, timeout))

    return run


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Every worker process a test started is gone when it ends."""
    me = psutil.Process()
    before = {c.pid for c in me.children(recursive=True)}
    yield
    left = []
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.pid not in before and child.status() != psutil.STATUS_ZOMBIE:
                left.append(child)
    assert not left, f"processes left behind: {left}"


@pytest.fixture(autouse=True)
def no_error_logs(caplog):
    """asyncio and the stub log errors for what tests cannot see otherwise (a protocol callback that failed)."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and not getattr(r, "expected", False)]
    assert not errors, [r.getMessage() for r in errors]


async def until(cond, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.002)


class FakeNode:
    """The tree as the stub sees it; ``send_up`` records what would travel to the root."""

    def __init__(self, name: str = "w1", node_id: int = 7, transport=None):
        self.name, self.node_id, self.transport = name, node_id, transport
        self.reports: list[tuple[int, dict]] = []
        self.stub = None

    def send_up(self, msg_type, body, to_parent: bool = False) -> None:
        self.reports.append((msg_type, body))


class Client:
    """A front end's data-plane DEALER: sends TASKs, collects TASK_REPLYs by rid."""

    def __init__(self, factory, pl: PlaneLoop, endpoint: str):
        self.pl = pl
        self.sock = factory.data_dealer(endpoint, b"\x01" + os.urandom(7))
        self.replies: dict = {}
        self.order: list = []
        self.headers: dict = {}
        self._waiting: dict = {}  # rid -> future of its reply
        pl.add(self.sock, p.Plane.DATA, self._on_batch)

    def _on_batch(self, batch) -> None:
        for frames in batch:
            msg = p.decode(frames)
            assert msg.type == p.MsgType.TASK_REPLY
            self.replies[msg.body["rid"]] = msg
            self.headers[msg.body["rid"]] = msg.header
            self.order.append(msg.body["rid"])
            waiter = self._waiting.pop(msg.body["rid"], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(msg)

    async def send(self, w: str, rid, *inputs: bytes, params=None, **more) -> int:
        body = {"svc": SVC, "w": w, "rid": rid, "p": params or {}, **more}
        frames = p.encode(p.MsgType.TASK, body, extra=list(inputs))
        # The DEALER refuses sends until it is connected (IMMEDIATE).
        await until(lambda: self.pl.send(self.sock, frames), 5, "the DEALER to connect")
        return p.codec.parse(frames[0]).msg_id

    async def reply(self, rid, timeout: float = 20.0) -> p.Message:
        if rid in self.replies:
            return self.replies[rid]
        waiter = self._waiting[rid] = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"no reply to {rid!r} within {timeout}s") from None

    async def call(self, w: str, rid, *inputs: bytes, **kw) -> p.Message:
        await self.send(w, rid, *inputs, **kw)
        return await self.reply(rid)

    def close(self) -> None:
        self.pl.remove(self.sock)
        self.sock.close(0)


class Env:
    def __init__(self, factory, pl, **kw):
        self.link = NodeLink(factory, pl, control_bind=LOOPBACK, data_bind=LOOPBACK)
        self.link.open()
        self.node = FakeNode(transport=self.link)
        self.stub = self.node.stub = WorkerStub(self.node, self.link, **kw)
        self.link.on_data = self.stub.on_task  # the agent dispatches TASKs like this (see nodes/stub.py)
        self.client = Client(factory, pl, self.link.data_endpoint)

    async def spawn(self, worker: str, fn: str, n: int = 1, kind: str = "transformation") -> dict:
        res = await self.stub.spawn(SVC, worker, f"{CW}:{fn}" if ":" not in fn else fn, kind, wid(worker, n))
        assert "pid" in res, res
        return res

    def row(self, iid: str) -> dict:
        rows = [r for r in self.stub.list()["instances"] if r["id"] == iid]
        return rows[0] if rows else {}

    async def close(self) -> None:
        await self.stub.close()
        self.client.close()
        self.link.close()


@contextlib.asynccontextmanager
async def env(factory, **kw):
    async with PlaneLoop() as pl:
        e = Env(factory, pl, **kw)
        try:
            yield e
        finally:
            await e.close()


def ok_data(msg: p.Message) -> bytes:
    assert msg.body["ok"] is True, msg.body
    assert len(msg.extra) == 1
    return msg.extra[0]


def err_code(msg: p.Message) -> str:
    assert msg.body["ok"] is False, msg.body
    assert isinstance(msg.body["err"], str) and msg.body["err"]
    return msg.body["code"]


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the TranSend worker through the stub -----------------------------------------------------


def test_distill_a_real_image(factory, arun, tmp_path):
    from PIL import Image

    from tools.imagegen import make_image

    _, original, facts = make_image(1, 0)

    async def main():
        async with env(factory) as e:
            t0 = time.perf_counter()
            res = await e.stub.spawn(SVC, "distill", "examples.transend.distill:distill_worker", "transformation",
                                     wid("distill"))  # fmt: skip
            print(f"\ndistill worker ready in {time.perf_counter() - t0:.3f} s (pid {res['pid']}, "
                  f"start_s {e.stub.statistics()['start_s']:.3f})")  # fmt: skip
            assert res == {"id": wid("distill"), "pid": res["pid"]}
            assert psutil.Process(res["pid"]).is_running()
            msg = await e.client.call(wid("distill"), "r1", original, params={"max_width": 200, "max_height": 200})
            data = ok_data(msg)
            assert msg.body["ct"] == "image/jpeg" and msg.body["q"] == 0
            assert msg.body["info"]["bytes_in"] == len(original) and msg.body["info"]["width"] <= 200
            assert msg.header.ref == e.client.headers["r1"].ref and msg.header.src == 7
            with Image.open(io.BytesIO(data)) as im:
                assert max(im.size) <= 200 and im.format == "JPEG"
            # Bad input: the distiller raises, the stub answers failed, the process keeps serving.
            msg = await e.client.call(wid("distill"), "r2", b"not an image")
            assert err_code(msg) == "failed" and "DistillError" in msg.body["err"]
            assert ok_data(await e.client.call(wid("distill"), "r3", original, params={"max_width": 100}))
            assert e.stub.statistics()["workers"][wid("distill")]["pid"] == res["pid"]
            row = e.row(wid("distill"))
            assert row["done"] == 2 and row["failed"] == 1 and row["crashes"] == 0 and row["cost"] > 0

    arun(main())


def test_aggregation_and_bare_bytes(factory, arun):
    async def main():
        async with env(factory) as e:
            await e.spawn("cat", "concat", kind="aggregation")
            msg = await e.client.call(wid("cat"), 1, b"a", b"b", b"c")
            assert ok_data(msg) == b"a|b|c" and msg.body["ct"] == "text/plain" and msg.body["info"] == {"items": 3}
            assert err_code(await e.client.call(wid("cat"), 2)) == "failed"  # no input at all
            await e.spawn("bare", "bare")
            msg = await e.client.call(wid("bare"), 3, b"xyz")
            assert ok_data(msg) == b"xyz" and msg.body["ct"] == "application/octet-stream"
            msg = await e.client.call(wid("bare"), 4, b"x", b"y")  # a transformation takes one object
            assert err_code(msg) == "failed" and "one input" in msg.body["err"]
            await e.spawn("bad", "bad_result")
            msg = await e.client.call(wid("bad"), 5, b"x")
            assert err_code(msg) == "failed" and "TypeError" in msg.body["err"]

    arun(main())


# -- queueing ---------------------------------------------------------------------------------


def test_requests_queue_and_are_answered_in_order(factory, arun, tmp_path):
    gate = tmp_path / "gate"

    async def main():
        async with env(factory, report_interval=0.05) as e:
            await e.spawn("echo", "echo")
            w = wid("echo")
            for i in range(6):
                await e.client.send(w, i, b"%d" % i, params={"gate": str(gate), "n": i})
            await until(lambda: e.row(w).get("q") == 5 and e.row(w).get("busy") == 1, what="5 queued, 1 running")
            # The queue shows in the load reports while the worker is held.
            await until(lambda: any(r["q"] == 5 for _, b in e.node.reports for r in b["rows"]), what="a report with q=5")
            gate.touch()
            for i in range(6):
                assert ok_data(await e.client.reply(i)) == b"%d" % i
            assert e.client.order == list(range(6))
            assert [e.client.replies[i].body["q"] for i in range(6)] == [5, 4, 3, 2, 1, 0]
            assert e.row(w)["done"] == 6 and e.row(w)["q"] == 0 and e.row(w)["busy"] == 0

    arun(main())


def test_overloaded_when_the_queue_is_full(factory, arun, tmp_path):
    gate = tmp_path / "gate"

    async def main():
        async with env(factory, queue_limit=2) as e:
            await e.spawn("echo", "echo")
            w = wid("echo")
            await e.client.send(w, "run", b"x", params={"gate": str(gate)})
            await until(lambda: e.row(w).get("busy") == 1, what="the worker to be busy")
            await e.client.send(w, "q1", b"x")
            await e.client.send(w, "q2", b"x")
            msg = await e.client.call(w, "over", b"x")
            assert err_code(msg) == "overloaded" and msg.body["q"] == 2
            gate.touch()
            for rid in ("run", "q1", "q2"):
                assert ok_data(await e.client.reply(rid)) == b"x"
            assert e.stub.statistics()["overloaded"] == 1

    arun(main())


def test_deadline_passed_in_the_queue(factory, arun, tmp_path):
    gate = tmp_path / "gate"
    clock = FakeClock()

    async def main():
        async with env(factory, clock=clock) as e:
            await e.spawn("echo", "echo")
            w = wid("echo")
            await e.client.send(w, "run", b"x", params={"gate": str(gate)})
            await until(lambda: e.row(w).get("busy") == 1, what="the worker to be busy")
            await e.client.send(w, "late", b"x", dl=0.5)
            await e.client.send(w, "patient", b"x", dl=60)
            await e.client.send(w, "no-dl", b"x")
            await until(lambda: e.row(w).get("q") == 3, what="three queued")
            clock.now += 1.0  # "late" waited past its deadline
            gate.touch()
            assert err_code(await e.client.reply("late")) == "deadline"
            for rid in ("run", "patient", "no-dl"):
                assert ok_data(await e.client.reply(rid)) == b"x"
            assert e.client.order == ["run", "late", "patient", "no-dl"]

    arun(main())


def test_unknown_instance_and_bad_tasks(factory, arun):
    async def main():
        async with env(factory) as e:
            msg = await e.client.call("t/nope@w1#1", "a", b"x")
            assert err_code(msg) == "no_such_worker" and "nope" in msg.body["err"]
            await e.spawn("echo", "echo")
            msg = await e.client.call(wid("echo"), "b", b"x", dl="soon")
            assert err_code(msg) == "failed" and "'dl'" in msg.body["err"]
            s = e.stub.statistics()
            assert s["no_such_worker"] == 1 and s["bad_tasks"] == 1
            # Messages other than TASK are not the stub's.
            e.stub.on_task(b"\x01x", p.decode(p.encode(p.MsgType.CHUNK_REQUEST, {"d": "x"})))
            assert e.stub.statistics()["tasks"] == 2

    arun(main())


# -- failures ---------------------------------------------------------------------------------


def test_kill_9_mid_request_requeues_it(factory, arun, tmp_path):
    mark = tmp_path / "mark"

    async def main():
        async with env(factory) as e:
            first = (await e.spawn("slow", "once_slow"))["pid"]
            w = wid("slow")
            await e.client.send(w, "r", b"payload", params={"mark": str(mark)})
            await e.client.send(w, "next", b"second", params={"mark": str(mark)})
            await until(mark.exists, what="the first run to start")
            t0 = time.perf_counter()
            os.kill(first, signal.SIGKILL)
            msg = await e.client.reply("r")
            took = time.perf_counter() - t0
            assert ok_data(msg) == b"payload"
            second = msg.body["info"]["pid"]
            assert second != first
            await until(lambda: not psutil.pid_exists(first), what="the killed process to be reaped")
            assert ok_data(await e.client.reply("next")) == b"second"
            assert e.client.order == ["r", "next"]
            row = e.row(w)
            assert row["crashes"] == 1 and row["done"] == 2 and row["failed"] == 0
            s = e.stub.statistics()
            assert s["restarts"] == 1 and s["workers"][w]["pid"] == second
            print(f"\nkill -9 -> request answered by the restarted worker in {took * 1e3:.0f} ms")

    arun(main())


def test_kill_9_while_idle_restarts_at_once(factory, arun):
    async def main():
        async with env(factory) as e:
            first = (await e.spawn("echo", "echo"))["pid"]
            w = wid("echo")
            os.kill(first, signal.SIGKILL)
            await until(lambda: e.stub.statistics()["restarts"] == 1, what="the restart")
            assert e.row(w)["crashes"] == 1
            second = e.stub.statistics()["workers"][w]["pid"]
            assert second != first and psutil.pid_exists(second)
            # A print() in the callable goes to stderr, not into the pipe protocol.
            msg = await e.client.call(w, 1, b"x", params={"say": "a stray print from the callable"})
            assert ok_data(msg) == b"x" and msg.body["info"]["pid"] == second

    arun(main())


def test_a_request_that_crashes_two_processes_fails(factory, arun):
    async def main():
        async with env(factory) as e:
            await e.spawn("echo", "echo")
            w = wid("echo")
            msg = await e.client.call(w, "boom", b"x", params={"crash": True})
            assert err_code(msg) == "worker_crashed" and "2 worker processes" in msg.body["err"]
            row = e.row(w)
            assert row["crashes"] == 2 and row["failed"] == 1
            # The instance is back and serves the next request.
            msg = await e.client.call(w, "fine", b"y")
            assert ok_data(msg) == b"y"
            assert e.stub.statistics()["restarts"] == 2

            await e.spawn("crash", "crash")
            assert err_code(await e.client.call(wid("crash"), "c", b"x")) == "worker_crashed"

    arun(main())


def test_a_raising_callable_fails_and_the_worker_keeps_serving(factory, arun):
    async def main():
        async with env(factory) as e:
            pid = (await e.spawn("fail", "fail"))["pid"]
            w = wid("fail")
            msg = await e.client.call(w, 1, b"x")
            assert err_code(msg) == "failed" and msg.body["err"] == "ValueError: this input cannot be used"
            msg = await e.client.call(w, 2, b"x", params={"ok": True})
            assert ok_data(msg) == b"fine" and msg.body["info"]["pid"] == pid
            row = e.row(w)
            assert row["failed"] == 1 and row["done"] == 1 and row["crashes"] == 0

    arun(main())


def test_spawn_errors(factory, arun):
    async def main():
        async with env(factory) as e:
            res = await e.stub.spawn(SVC, "x", f"{CW}:missing", "transformation", wid("x"))
            assert "error" in res and "missing" in res["error"]
            res = await e.stub.spawn(SVC, "x", "no.such.module:f", "transformation", wid("x", 2))
            assert "error" in res and "No module named" in res["error"]
            assert (await e.stub.spawn(SVC, "x", "nocolon", "transformation", wid("x", 3)))["error"]
            assert (await e.stub.spawn(SVC, "x", f"{CW}:echo", "pipeline", wid("x", 4)))["error"]
            assert (await e.stub.spawn(SVC, "x", f"{CW}:echo", "transformation", "other/x@w1#1"))["error"]
            assert e.stub.list() == {"instances": []} and e.stub.report() is None
            # Idempotent: the same spawn twice is one process; another callable under that id is refused.
            a = await e.spawn("echo", "echo")
            assert await e.spawn("echo", "echo") == a
            assert "error" in await e.stub.spawn(SVC, "echo", f"{CW}:fail", "transformation", wid("echo"))
            assert e.stub.statistics()["spawns"] == 1 + 2  # two that failed to start, one that did

    arun(main())


def test_big_inputs_and_results(factory, arun):
    blob = os.urandom(3 << 20)  # far more than a pipe holds

    async def main():
        async with env(factory) as e:
            await e.spawn("bare", "bare")
            await e.spawn("cat", "concat", kind="aggregation")
            assert ok_data(await e.client.call(wid("bare"), 1, blob)) == blob
            msg = await e.client.call(wid("cat"), 2, blob[:1 << 20], blob[1 << 20:])
            assert ok_data(msg) == blob[:1 << 20] + b"|" + blob[1 << 20:]

    arun(main())


def test_gives_up_when_the_worker_cannot_be_restarted(factory, arun, tmp_path, caplog):
    # The callable lives in a module on the spawn's extra path; once the module is
    # gone, every restart fails at its import.
    (tmp_path / "vanishing.py").write_text(
        "import os, time\n"
        "def work(request):\n"
        "    while not os.path.exists(request['params']['gate']):\n"
        "        time.sleep(0.002)\n"
        "    return request['data']\n"
    )
    gate = tmp_path / "gate"

    async def main():
        async with env(factory) as e:
            w = wid("v")
            res = await e.stub.spawn(SVC, "v", "vanishing:work", "transformation", w, path=[str(tmp_path)])
            assert res["pid"]
            await e.client.send(w, "held", b"x", params={"gate": str(gate)})
            await until(lambda: e.row(w).get("busy") == 1, what="the worker to be busy")
            (tmp_path / "vanishing.py").unlink()
            os.kill(res["pid"], signal.SIGKILL)
            msg = await e.client.reply("held")
            assert err_code(msg) == "worker_crashed" and "cannot be restarted" in msg.body["err"]
            assert e.stub.list() == {"instances": []}
            assert err_code(await e.client.call(w, "after", b"x")) == "no_such_worker"

    arun(main())
    gave_up = [r for r in caplog.records if r.levelno == logging.ERROR and "giving up" in r.getMessage()]
    assert len(gave_up) == 1
    gave_up[0].expected = True


# -- requests written ahead to a quick worker, replies at the HWM ------------------------------


async def _warm(e, w: str, n: int = 3) -> None:
    """A few answered requests: the instance's cost is measured, so the next ones may be written ahead."""
    for i in range(n):
        ok_data(await e.client.call(w, f"warm-{i}", b"w"))
    assert e.row(w)["cost"] > 0


@pytest.fixture
def write_ahead(monkeypatch):
    """Every measured instance counts as quick, whatever this machine's speed: requests are written ahead."""
    import nodes.instance as instance_module

    monkeypatch.setattr(instance_module, "PIPELINE_AHEAD", 60.0)
    return instance_module


def test_a_quick_worker_gets_requests_written_ahead_in_order(factory, arun, write_ahead):
    instance_module = write_ahead

    async def main():
        async with env(factory, queue_limit=512) as e:
            await e.spawn("bare", "bare")
            w = wid("bare")
            await _warm(e, w)
            inst = e.stub._workers[w]
            deepest = []
            send_many = inst.pipe.send_many

            def spy(batch):
                send_many(batch)
                deepest.append(len(inst.inflight))

            inst.pipe.send_many = spy
            for i in range(200):
                await e.client.send(w, i, b"%d" % i)
            for i in range(200):
                assert ok_data(await e.client.reply(i)) == b"%d" % i
            assert e.client.order[3:] == list(range(200))
            assert max(deepest) > 1, "never more than one request written ahead"
            assert max(deepest) <= instance_module.PIPELINE_MAX
            row = e.row(w)
            assert row["done"] == 203 and row["q"] == 0 and row["busy"] == 0 and row["crashes"] == 0

    arun(main())


def test_kill_9_with_requests_written_ahead(factory, arun, tmp_path, write_ahead):
    gate = tmp_path / "gate"

    async def main():
        async with env(factory) as e:
            first = (await e.spawn("echo", "echo"))["pid"]
            w = wid("echo")
            await _warm(e, w)
            await e.client.send(w, "held", b"h", params={"gate": str(gate)})
            for rid in ("a", "b", "c"):
                await e.client.send(w, rid, rid.encode())
            inst = e.stub._workers[w]
            await until(lambda: len(inst.inflight) == 4, what="four requests written to the process")
            assert e.row(w)["q"] == 3 and e.row(w)["busy"] == 1
            os.kill(first, signal.SIGKILL)
            gate.touch()
            msg = await e.client.reply("held")
            assert ok_data(msg) == b"h" and msg.body["info"]["pid"] != first  # run again by the new process
            for rid in ("a", "b", "c"):
                assert ok_data(await e.client.reply(rid)) == rid.encode()
            assert e.client.order[3:] == ["held", "a", "b", "c"]
            row = e.row(w)
            assert row["crashes"] == 1 and row["done"] == 7 and row["failed"] == 0
            assert e.stub.statistics()["worker_crashed"] == 0

    arun(main())


def test_a_request_written_ahead_keeps_its_deadline(factory, arun, tmp_path, write_ahead):
    gate = tmp_path / "gate"

    async def main():
        async with env(factory) as e:
            await e.spawn("echo", "echo")
            w = wid("echo")
            await _warm(e, w)
            await e.client.send(w, "held", b"h", params={"gate": str(gate)})
            sent = time.monotonic()
            await e.client.send(w, "late", b"x", dl=0.05)
            await e.client.send(w, "patient", b"x", dl=60)
            inst = e.stub._workers[w]
            await until(lambda: len(inst.inflight) == 3, what="three requests written to the process")
            await until(lambda: time.monotonic() > sent + 0.2, what="the deadline of 'late' to pass")
            gate.touch()
            assert ok_data(await e.client.reply("held")) == b"h"
            assert err_code(await e.client.reply("late")) == "deadline"
            assert ok_data(await e.client.reply("patient")) == b"x"
            assert e.stub.statistics()["deadline"] == 1 and e.row(w)["failed"] == 0

    arun(main())


class _FullLoop:
    """A PlaneLoop whose data ROUTER has no room for anyone while ``full``."""

    def __init__(self):
        self.full = True
        self.sent: list = []

    def send(self, sock, frames) -> bool:
        if self.full:
            return False
        self.sent.append(frames)
        return True


class _OpenSocket:
    closed = False


class _FullLink:
    data_endpoint = "tcp://127.0.0.1:1"

    def __init__(self):
        self.loop = _FullLoop()
        self.data = _OpenSocket()


def test_replies_wait_for_room_at_the_hwm():
    async def main():
        link = _FullLink()
        stub = WorkerStub(FakeNode(transport=link), link)
        try:
            for rid, peer in ((1, b"\x01a"), (2, b"\x01a"), (3, b"\x01b")):
                stub._reply(peer, rid, {"rid": rid, "ok": True})
            s = stub.statistics()
            assert s["replies_parked"] == 3 and s["replies"] == 0 and s["replies_dropped"] == 0
            link.loop.full = False
            await until(lambda: stub.statistics()["replies"] == 3, what="the parked replies to leave")
            to_a = [p.decode(f[1:]).body["rid"] for f in link.loop.sent if f[0] == b"\x01a"]
            assert to_a == [1, 2]  # in order per peer
            stub._reply(b"\x01a", 4, {"rid": 4, "ok": True})  # nothing parked any more: straight out
            assert stub.statistics()["replies"] == 4 and stub.statistics()["replies_parked"] == 3
        finally:
            await stub.close()

    asyncio.run(asyncio.wait_for(main(), 30))


# -- reap, stop, close -----------------------------------------------------------------------


def test_reap_finishes_the_queue_then_stops(factory, arun, tmp_path):
    gate = tmp_path / "gate"

    async def main():
        async with env(factory, report_interval=0.05) as e:
            pid = (await e.spawn("echo", "echo"))["pid"]
            w = wid("echo")
            for i in range(3):
                await e.client.send(w, i, b"%d" % i, params={"gate": str(gate)})
            await until(lambda: e.row(w).get("q") == 2, what="two queued")
            reaping = asyncio.ensure_future(e.stub.reap(SVC, w, 30))
            await until(lambda: not e.stub.statistics()["workers"][w]["accepting"], what="the reap to begin")
            msg = await e.client.call(w, "late", b"x")
            assert err_code(msg) == "no_such_worker"
            assert not reaping.done()
            gate.touch()
            assert await reaping == "reaped"
            for i in range(3):
                assert ok_data(await e.client.reply(i)) == b"%d" % i
            assert not psutil.pid_exists(pid)
            assert e.stub.list() == {"instances": []}
            assert await e.stub.reap(SVC, w, 1) == "reaped"  # idempotent
            # The last report has no rows, and the reports stop.
            await until(lambda: not e.stub.statistics()["reporting"], what="the reports to stop")
            assert e.node.reports[-1][1]["rows"] == []
            assert [b["rows"] for _, b in e.node.reports].count([]) == 1

    arun(main())


def test_reap_grace_expires(factory, arun, tmp_path):
    gate = tmp_path / "gate"  # never opened

    async def main():
        async with env(factory) as e:
            pid = (await e.spawn("echo", "echo"))["pid"]
            w = wid("echo")
            await e.client.send(w, "run", b"x", params={"gate": str(gate)})
            await e.client.send(w, "queued", b"x")
            await until(lambda: e.row(w).get("q") == 1, what="one queued")
            assert await e.stub.reap(SVC, w, 0.1) == "reaped"
            assert err_code(await e.client.reply("run")) == "no_such_worker"
            assert err_code(await e.client.reply("queued")) == "no_such_worker"
            assert not psutil.pid_exists(pid)

    arun(main())


def test_stop_and_close_leave_no_process(factory, arun, tmp_path):
    gate = tmp_path / "gate"

    async def main():
        async with env(factory) as e:
            pids = [(await e.spawn("echo", "echo", n))["pid"] for n in (1, 2, 3)]
            other = (await e.stub.spawn("u", "echo", f"{CW}:echo", "transformation", "u/echo@w1#1"))["pid"]
            assert e.stub.cache(SVC, wid("cache"), 1000) == {"id": wid("cache")}
            await e.client.send(wid("echo", 1), "busy", b"x", params={"gate": str(gate)})
            await e.client.send(wid("echo", 1), "queued", b"x")
            await until(lambda: e.row(wid("echo", 1)).get("q") == 1, what="one queued")
            assert await e.stub.stop(SVC) == "stopped"
            assert err_code(await e.client.reply("busy")) == "no_such_worker"
            assert err_code(await e.client.reply("queued")) == "no_such_worker"
            assert not any(psutil.pid_exists(pid) for pid in pids)
            assert [r["id"] for r in e.stub.list()["instances"]] == ["u/echo@w1#1"]
            await e.stub.close()
            assert not psutil.pid_exists(other)
            assert e.stub.list() == {"instances": []}

    arun(main())


def test_stop_and_close_during_a_start(factory, arun):
    async def main():
        async with env(factory) as e:
            spawning = asyncio.ensure_future(e.stub.spawn(SVC, "echo", f"{CW}:echo", "transformation", wid("echo")))
            await until(lambda: e.stub.list()["instances"], what="the instance to exist")
            await e.client.send(wid("echo"), "early", b"x")  # queued while the process starts
            await until(lambda: e.row(wid("echo")).get("q") == 1, what="the early request to queue")
            assert await e.stub.stop(SVC) == "stopped"
            assert "error" in await spawning
            assert err_code(await e.client.reply("early")) == "no_such_worker"
            spawning = asyncio.ensure_future(e.stub.spawn(SVC, "echo", f"{CW}:echo", "transformation", wid("echo", 2)))
            await until(lambda: e.stub.list()["instances"], what="the second instance to exist")
            await e.stub.close()
            assert "error" in await spawning
            assert "error" in await e.stub.spawn(SVC, "echo", f"{CW}:echo", "transformation", wid("echo", 3))

    arun(main())


# -- cache instances ----------------------------------------------------------------------------


def test_cache_instance_get_put_del(factory, arun):
    async def main():
        async with env(factory) as e:
            c = wid("cache")
            assert e.stub.cache(SVC, c, 10_000) == {"id": c}
            assert e.stub.cache(SVC, c, 10_000) == {"id": c}  # idempotent
            assert "error" in e.stub.cache(SVC, c.replace("#1", "#2"), 0)
            cl = e.client
            msg = await cl.call(c, 1, op="get", k="img")
            assert msg.body == {"rid": 1, "ok": True, "hit": False, "meta": {}, "q": 0} and msg.extra == []
            msg = await cl.call(c, 2, b"\x89PNG...", op="put", k="img", meta={"content_type": "image/png"})
            assert msg.body["ok"] is True and msg.body["hit"] is False
            msg = await cl.call(c, 3, op="get", k="img")
            assert msg.body["hit"] is True and msg.body["meta"] == {"content_type": "image/png"}
            assert msg.extra == [b"\x89PNG..."]
            msg = await cl.call(c, 4, op="del", k="img")
            assert msg.body["hit"] is True
            assert (await cl.call(c, 5, op="get", k="img")).body["hit"] is False
            assert err_code(await cl.call(c, 6, b"x" * 20_000, op="put", k="big")) == "failed"
            assert err_code(await cl.call(c, 7, op="frob", k="img")) == "failed"
            row = e.row(c)
            assert row["cache"] is True and row["hits"] == 1 and row["misses"] == 2 and row["bytes"] == 0
            assert row["done"] == 5 and row["failed"] == 2
            assert await e.stub.reap(SVC, c, 0) == "reaped"
            assert err_code(await cl.call(c, 8, op="get", k="img")) == "no_such_worker"

    arun(main())


def test_results_written_into_local_and_remote_caches(factory, arun):
    async def main():
        async with PlaneLoop() as pl:
            a, b = Env(factory, pl), Env(factory, pl)
            try:
                b.node.name = "w2"
                await a.spawn("echo", "echo")
                local, remote = wid("cache"), wid("cache", 1, "w2")
                a.stub.cache(SVC, local, 10_000)
                b.stub.cache(SVC, remote, 10_000)
                msg = await a.client.call(wid("echo"), 1, b"result-1", put={"w": local, "k": "k1"})
                assert ok_data(msg) == b"result-1" and msg.body["stored"] is True  # written before the answer
                got = await a.client.call(local, 2, op="get", k="k1")
                assert got.extra == [b"result-1"] and got.body["meta"] == {"content_type": "application/octet-stream"}
                put = {"w": remote, "k": "k2", "data": b.link.data_endpoint, "meta": {"v": 2}}
                msg = await a.client.call(wid("echo"), 3, b"result-2", put=put)
                assert ok_data(msg) == b"result-2" and "stored" not in msg.body  # another node: after the answer
                await until(lambda: b.row(remote).get("done") == 1, what="the remote put")
                got = await b.client.call(remote, 4, op="get", k="k2")
                assert got.extra == [b"result-2"] and got.body["meta"]["v"] == 2
                s = a.stub.statistics()
                assert s["cache_writes"] == 1 and s["cache_writes_remote"] == 1 and s["cache_write_failures"] == 0
            finally:
                await a.close()
                await b.close()

    arun(main())


# -- load reports and the tree operations -------------------------------------------------------


def test_load_report_rows(factory, arun):
    async def main():
        async with env(factory, report_interval=0.05) as e:
            assert e.stub.report() is None and e.node.reports == []  # nothing before the first spawn
            await e.spawn("echo", "echo")
            e.stub.cache(SVC, wid("cache"), 5000)
            assert ok_data(await e.client.call(wid("echo"), 1, b"x")) == b"x"
            await until(lambda: len(e.node.reports) >= 3, what="three reports")
            kind, body = e.node.reports[-1]
            assert kind == p.MsgType.LOAD_REPORT
            assert set(body) == {"node", "data", "rows"}
            assert body["node"] == "w1" and body["data"] == e.link.data_endpoint
            worker, cache = sorted(body["rows"], key=lambda r: r["cache"])
            assert set(worker) == {"svc", "id", "w", "kind", "q", "busy", "cost", "done", "failed", "crashes", "cache",
                                   "by"}  # fmt: skip
            assert worker["by"] == {}  # nothing waits or runs
            assert worker["svc"] == SVC and worker["id"] == wid("echo") and worker["w"] == "echo"
            assert worker["kind"] == "transformation" and worker["cache"] is False and worker["done"] == 1
            assert 0 < worker["cost"] < 5
            assert set(cache) == set(worker) | {"bytes", "hits", "misses"} and cache["cache"] is True
            p.packb(body)  # it travels as msgpack
            assert e.stub.report()["rows"] == e.stub.list()["instances"]

    arun(main())


def test_load_report_names_each_senders_share_of_the_queue(factory, arun, tmp_path):
    """A row's ``by`` counts what waits or runs per sender (the front end's connection), so a front end
    can take its own share out of the beaconed load and count it live."""
    gate = tmp_path / "gate"

    async def main():
        async with env(factory) as e:
            await e.spawn("echo", "echo")
            other = Client(factory, e.link.loop, e.link.data_endpoint)
            try:
                for i in range(3):
                    await e.client.send(wid("echo"), i, b"x", params={"gate": str(gate)})
                await other.send(wid("echo"), "o", b"y", params={"gate": str(gate)})
                mine, theirs = e.client.sock.identity.hex(), other.sock.identity.hex()
                await until(lambda: sum(e.stub.report()["rows"][0]["by"].values()) == 4, what="four requests held")
                (row,) = e.stub.report()["rows"]
                assert row["by"] == {mine: 3, theirs: 1} and row["q"] + row["busy"] == 4
                gate.touch()
                for rid in (0, 1, 2):
                    await e.client.reply(rid)
                await other.reply("o")
                assert e.stub.report()["rows"][0]["by"] == {}
            finally:
                other.close()

    arun(main())


def test_tree_operations(factory, arun):
    async def main():
        async with PlaneLoop() as pl:
            link = NodeLink(factory, pl, control_bind=LOOPBACK, data_bind=LOOPBACK)
            link.open()
            node = FakeNode(transport=link)
            try:
                # Without a stub, the first op makes one.
                res = await SVC_HANDLERS["svc.spawn"](node, {"svc": SVC, "worker": "echo", "callable": f"{CW}:echo",
                                                             "kind": "transformation", "id": wid("echo")}, 10.0)  # fmt: skip
                assert isinstance(node.stub, WorkerStub) and res["id"] == wid("echo")
                assert SVC_HANDLERS["svc.cache"](node, {"svc": SVC, "id": wid("cache"), "max_bytes": 100}, 1.0) == {
                    "id": wid("cache")}  # fmt: skip
                rows = SVC_HANDLERS["svc.list"](node, {"svc": SVC}, 1.0)["instances"]
                assert {r["id"] for r in rows} == {wid("echo"), wid("cache")}
                assert SVC_HANDLERS["svc.list"](node, {"svc": "other"}, 1.0) == {"instances": []}
                p.packb(rows)
                assert await SVC_HANDLERS["svc.reap"](node, {"svc": SVC, "id": wid("echo"), "grace": 5}, 10.0) == "reaped"
                assert "error" in await SVC_HANDLERS["svc.stop"](node, {}, 1.0)
                assert await SVC_HANDLERS["svc.stop"](node, {"svc": SVC}, 1.0) == "stopped"
                assert SVC_HANDLERS["svc.list"](node, {}, 1.0) == {"instances": []}
            finally:
                if node.stub is not None:
                    await node.stub.close()
                link.close()

    arun(main())


# -- overhead (printed, not asserted) ----------------------------------------------------------


def test_overhead_against_direct_calls(factory, arun):
    """Prints what the stub adds to a request, against baselines from the same run:

    * the callable called directly in this process;
    * a bare data-plane echo on the same PlaneLoop (the bus round trip without the stub);
    * the stub's own measure of the time a request spends outside the callable
      (pipe, process switches, event loop): ``statistics()["workers"][id]["overhead_s"]``.
    """
    from examples.transend import distill
    from tests.nodes import crashy_worker
    from tools.imagegen import make_image

    _, image, _ = make_image(3, 0)
    params = {"max_width": 320, "max_height": 320, "quality": 60}
    n_tiny, n_img = 300, 20

    def direct(fn, request, n):
        t0 = time.perf_counter()
        for _ in range(n):
            fn(request)
        return (time.perf_counter() - t0) / n

    tiny_direct = direct(crashy_worker.bare, {"data": b"x" * 100, "params": {}}, n_tiny)
    img_direct = direct(distill.distill_worker, {"data": image, "params": params}, n_img)

    async def through(e, w, payload, n, p_=None):
        # One request in flight at a time: the latency a front end sees, queue empty.
        await e.client.call(w, f"{w}-warm", payload, params=p_)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            ok_data(await e.client.call(w, f"{w}-{i}", payload, params=p_))
        return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n

    async def main():
        async with env(factory, queue_limit=n_tiny) as e:
            stub_on_task = e.link.on_data

            def echo_or_stub(identity, msg):
                # The baseline: answer at once from the data-plane callback, no stub.
                if msg.body.get("w") != "echo":
                    return stub_on_task(identity, msg)
                body = {"rid": msg.body["rid"], "ok": True, "ct": "x", "info": {}, "q": 0}
                frames = p.encode(p.MsgType.TASK_REPLY, body, ref=msg.header.msg_id, extra=msg.extra)
                e.link.loop.send(e.link.data, [identity, *frames])

            e.link.on_data = echo_or_stub
            await e.spawn("bare", "bare")
            await e.stub.spawn(SVC, "distill", "examples.transend.distill:distill_worker", "transformation",
                               wid("distill"))  # fmt: skip
            echo = await through(e, "echo", b"x" * 100, n_tiny)
            tiny = await through(e, wid("bare"), b"x" * 100, n_tiny)
            img = await through(e, wid("distill"), image, n_img, params)
            workers = e.stub.statistics()["workers"]
            # Queued: the next request is written in the callback that answers the last one.
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(n_tiny):
                await e.client.send(wid("bare"), f"burst-{i}", b"x" * 100)
            for i in range(n_tiny):
                ok_data(await e.client.reply(f"burst-{i}"))
            burst = (time.perf_counter() - t0) / n_tiny, (time.process_time() - c0) / n_tiny
            return echo, tiny, img, burst, workers[wid("bare")]["overhead_s"], workers[wid("distill")]["overhead_s"]

    (echo_wall, echo_cpu), (tiny_wall, tiny_cpu), (img_wall, img_cpu), burst, tiny_out, img_out = arun(main())
    print(f"\ntiny task ({tiny_direct * 1e6:.1f} us direct): bus echo without the stub {echo_wall * 1e6:.0f} us, "
          f"through the stub {tiny_wall * 1e6:.0f} us round trip (+{(tiny_wall - echo_wall) * 1e6:.0f} us; CPU in "
          f"this process {echo_cpu * 1e6:.0f} -> {tiny_cpu * 1e6:.0f} us); outside the callable: "
          f"{tiny_out * 1e6:.0f} us")  # fmt: skip
    print(f"distill {len(image) >> 10} KiB: direct {img_direct * 1e3:.2f} ms, through the stub {img_wall * 1e3:.2f} ms "
          f"({img_direct / img_wall:.0%} of direct, one request at a time); outside the callable: "
          f"{img_out * 1e3:.2f} ms")  # fmt: skip
    print(f"tiny tasks queued {n_tiny} deep on one worker instance: {1 / burst[0]:.0f} req/s, "
          f"{burst[1] * 1e6:.0f} us CPU per request in this process (client + stub)")
    assert tiny_out > 0 and img_out > 0


def test_a_pipeline_chains_stages_like_a_shell_pipe():
    """``a | b``: the grey stage's PNG is the distiller's input; both stages' info come back."""
    import io

    from PIL import Image

    from nodes.worker import load_callable
    from tools.imagegen import make_image

    data = make_image(5, 0)[1]
    fn = load_callable("examples.transend.filters:grayscale_worker | examples.transend.distill:distill_worker")
    out = fn({"data": data, "params": {"max_width": 120, "format": "jpeg"}})
    img = Image.open(io.BytesIO(out["data"]))
    assert out["content_type"] == "image/jpeg" and img.mode == "L" and img.width <= 120
    assert [s["stage"] for s in out["info"]["stages"]] == ["examples.transend.filters:grayscale_worker",
                                                           "examples.transend.distill:distill_worker"]
    with pytest.raises(ValueError):
        load_callable("examples.transend.filters:grayscale_worker | not-a-callable")


def test_workers_registered_as_entry_points_load_by_name():
    from nodes.worker import load_callable

    from examples.transend.distill import contact_sheet_worker

    assert load_callable("entrypoint:contact-sheet") is contact_sheet_worker
    with pytest.raises(LookupError, match="no worker 'nope' in the 'snsbus.workers' entry points; installed: "):
        load_callable("entrypoint:nope")
