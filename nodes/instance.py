"""A worker instance of the stub: its queue, its process (restarted when it dies) and its counters.

The worker stub (:mod:`nodes.stub`) hosts the worker instances of one
logical node, an :class:`_Instance` each: one OS process (``python -m
nodes.worker``, :mod:`nodes.worker`) running a registered callable, one
request at a time, fed from a bounded FIFO queue (a quick one gets the next
requests written ahead, see :class:`_Instance`).  The instance talks to it
over pipes, never blocking the event loop.  A process that dies (kill -9,
``os._exit``, a segfault) is seen at once, since its pipe closes, and
restarted with backoff; the request it was running is re-queued at the head
once, and answered ``worker_crashed`` when it kills a second process.  A
callable that raises answers ``failed`` and the process keeps serving.  A
request whose deadline passed while it waited is answered ``deadline``
without running.

The stub checks and queues the requests (:class:`_Request`), owns the
counters, the data socket and the cache instances: an instance answers
through it.  The TASK_REPLY error codes are named here, since both answer
with them; :mod:`nodes.stub` exports them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bus import protocol as p
from bus.protocol import DEADLINE, FAILED, NO_SUCH_WORKER, WORKER_CRASHED  # TASK_REPLY codes
from nodes.worker import WorkerProcess

if TYPE_CHECKING:
    from nodes.stub import WorkerStub

__all__ = ["COST_ALPHA"]

log = logging.getLogger(__name__)

COST_ALPHA = 0.3  # weight of the newest sample in the cost EWMA
BY_SENDERS = 8  # senders named per instance in a load report (the rest count as others' load)
PIPELINE_AHEAD = 0.002  # seconds a request may be expected to wait in a worker's pipe behind others
PIPELINE_MAX = 32  # requests written to one worker process and not answered yet, at most
MAX_START_FAILURES = 5  # restarts in a row that die before ready: the instance is broken
RESTART_BASE, RESTART_CAP = 0.05, 2.0  # backoff between restarts after crashes in a row


class _StartFailed(Exception):
    """A worker process did not become ready; the message says why."""


def _restart_delay(crashes_in_row: int) -> float:
    # The first restart is immediate: one crash is an accident, a series is a pattern.
    if crashes_in_row <= 1:
        return 0.0
    return min(RESTART_CAP, RESTART_BASE * 2 ** (crashes_in_row - 2))


def _error(rid, code: str, err: str, q: int) -> dict:
    return {"rid": rid, "ok": False, "code": code, "err": err, "q": q}


@dataclass(slots=True)
class _Request:
    identity: bytes
    ref: int  # msg_id of the TASK, echoed in the reply header
    rid: object
    params: dict
    inputs: list
    deadline: float | None
    put: dict | None
    attempts: int = 0  # worker processes that died running it


STARTING, READY, RECOVERING, ENDED = "starting", "ready", "recovering", "ended"


class _Instance:
    """One worker instance: its queue, its process (replaced when it dies) and its counters.

    The hot path is callbacks only: the TASKs of one data-plane batch are
    queued (:meth:`submit`) and written to the process together once the
    batch is read; the replies of one pipe read are answered and the next
    requests written in the same callback.  Tasks run only to start a
    process, to recover from a crash and to stop.

    Pipelining: once the instance's cost is known, the next request is
    written while the process runs one (so it starts the moment the last one
    is done), and more behind it when the process is quick (its cost times
    the requests ahead of it at most ``PIPELINE_AHEAD``), at most
    ``PIPELINE_MAX`` deep.  A request whose deadline is near stays queued
    here; one written ahead carries its deadline (``dl``, on the host's
    monotonic clock), which the process checks before running it.
    ``inflight`` holds the written requests in order: the first is the one
    running, so a crash re-queues it (once) and puts the others back at the
    head of the queue as they were.
    """

    def __init__(self, stub: "WorkerStub", svc: str, worker: str, fn: str, kind: str, iid: str, path: list):
        self.stub = stub
        self.svc, self.worker, self.callable, self.kind, self.id = svc, worker, fn, kind, iid
        self.path = path
        self.queue: deque[_Request] = deque()
        self.reported_q = 0  # queue length in the last load report (a doubling reports at once)
        self.state = STARTING
        self.pipe: WorkerProcess | None = None
        self.pid: int | None = None
        self.inflight: deque[_Request] = deque()  # written to the process, answered in this order
        self.t0 = 0.0  # when the first in-flight request started: written to an idle process, or the last reply
        self._pump_soon: asyncio.Handle | None = None
        self.accepting = True  # False once reaped or stopped: new requests get no_such_worker
        self._loop = loop = asyncio.get_running_loop()
        self.ready: asyncio.Future = loop.create_future()  # None once up, or why it could not start
        self._hello: asyncio.Future | None = None
        self._drained: asyncio.Future | None = None
        self._starter: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()
        self.cost = stub._known_cost.get((svc, worker), 0.0)
        self.done = self.failed = self.crashes = self.restarts = 0
        self.crashes_in_row = 0
        self.start_s: float | None = None  # the last process's start: exec, import, ready
        self.overhead = 0.0  # EWMA seconds a request spends outside the callable (pipe, switches, loop)

    # -- rows and answers -----------------------------------------------------------
    @property
    def queued(self) -> int:
        """Requests waiting: in the queue, or written behind the running one."""
        return len(self.queue) + max(len(self.inflight) - 1, 0)

    def row(self) -> dict:
        q = self.reported_q = self.queued
        return {
            "svc": self.svc, "id": self.id, "w": self.worker, "kind": self.kind,
            "q": q, "busy": 1 if self.inflight else 0, "cost": self.cost,
            "done": self.done, "failed": self.failed, "crashes": self.crashes, "cache": False,
            "by": self.by_sender(),
        }  # fmt: skip

    def by_sender(self) -> dict:
        """``{sender identity (hex): requests}`` of what waits or runs here, the BY_SENDERS largest:
        a front end subtracts its own share from the beaconed queue and counts it live instead."""
        counts: dict[bytes, int] = {}
        for reqs in (self.queue, self.inflight):
            for req in reqs:
                counts[req.identity] = counts.get(req.identity, 0) + 1
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:BY_SENDERS]
        return {ident.hex(): n for ident, n in top}

    def _fail(self, req: _Request, code: str, err: str) -> None:
        self.stub._count(code)
        self.stub._reply(req.identity, req.ref, _error(req.rid, code, err, len(self.queue) + len(self.inflight)))

    def _answer_all(self, code: str, err: str) -> None:
        while self.queue:
            self._fail(self.queue.popleft(), code, err)

    # -- the hot path -------------------------------------------------------------
    def submit(self, req: _Request) -> None:
        self.queue.append(req)
        if self.state == READY and self._pump_soon is None:
            # Written once the data-plane batch is read: the batch's requests go in one write.
            self._pump_soon = self._loop.call_soon(self._pump)
        if len(self.queue) > 2 * self.reported_q + 1:
            # The queue doubled since the last report: tell the manager now, not at the next
            # interval, so a burst is answered by a spawn within a fraction of a second.
            self.stub._report_soon()

    def _pump(self) -> None:
        """Write what the process may take now (answering the expired requests on the way)."""
        if self._pump_soon is not None:
            self._pump_soon.cancel()
            self._pump_soon = None
        inflight, queue = self.inflight, self.queue
        if self.state == READY and queue:
            now = self.stub.clock()
            batch = []
            cost = self.cost
            while queue:
                ahead = len(inflight)
                if ahead and (ahead >= PIPELINE_MAX or cost <= 0.0 or (ahead > 1 and cost * ahead > PIPELINE_AHEAD)):
                    break  # the process is busy and not known to be quick enough: wait for its answer
                req = queue.popleft()
                if req.deadline is not None and now >= req.deadline:
                    self._fail(req, DEADLINE, "its deadline passed while it waited in the queue")
                    continue
                if ahead and req.deadline is not None and req.deadline - now < 2 * cost * ahead:
                    queue.appendleft(req)  # it may well expire in the pipe: it waits here, where it is checked
                    break
                meta = {"p": req.params}
                if ahead and req.deadline is not None:
                    # The process checks it before running the request, on the host's monotonic clock.
                    meta["dl"] = time.monotonic() + (req.deadline - now)
                elif not ahead:
                    self.t0 = now
                inflight.append(req)
                batch.append([p.packb(meta), *req.inputs])
            if batch:
                self.pipe.send_many(batch)
        if self._drained is not None and not inflight and not queue and not self._drained.done():
            self._drained.set_result(None)

    def _on_message(self, pipe: WorkerProcess, messages: list) -> None:
        if pipe is not self.pipe:
            return
        if self._hello is not None and not self._hello.done():
            self._hello.set_result(messages[0])
            messages = messages[1:]
            if not messages:
                return
        now = self.stub.clock()
        # The process served these one after the other since the first started: each took its share.
        took = max(now - self.t0, 0.0) / len(messages)
        self.t0 = now
        for frames in messages:
            if not self.inflight:
                pipe._lose("it spoke out of turn")  # treated as a crash: restarted
                return
            req = self.inflight.popleft()
            self.cost = took if self.cost <= 0.0 else self.cost + COST_ALPHA * (took - self.cost)
            self._finish(req, frames, took)
        self.crashes_in_row = 0
        self.stub._known_cost[(self.svc, self.worker)] = self.cost
        self._pump()

    def _finish(self, req: _Request, frames: list, took: float) -> None:
        try:
            meta = p.unpackb(frames[0])
            ok = meta.get("ok") is True
        except (p.MalformedBody, AttributeError):
            meta, ok = {"err": "the worker process sent an unreadable reply"}, False
        if not ok and meta.get("code") == DEADLINE:
            self._fail(req, DEADLINE, "its deadline passed while it waited in the queue")
            return
        if ok and len(frames) == 2:
            self.done += 1
            run = meta.get("run_s")
            if isinstance(run, float):
                # What the pipe, the process switch and our loop add to the callable's own time.
                extra = max(took - run, 0.0)
                self.overhead = extra if self.done == 1 else self.overhead + COST_ALPHA * (extra - self.overhead)
            ct = meta.get("ct")
            body = {"rid": req.rid, "ok": True, "ct": ct, "info": meta.get("info") or {},
                    "q": len(self.queue) + len(self.inflight)}
            put = req.put
            local = put is not None and put["w"] in self.stub._caches
            if local and self.stub._cache_write(put, frames[1], ct):
                body["stored"] = True  # written here before the answer: a later get finds it
            self.stub._reply(req.identity, req.ref, body, [frames[1]])
            if put is not None and not local:
                self.stub._cache_write(put, frames[1], ct)  # to another node, after the answer
            return
        self.failed += 1
        self._fail(req, FAILED, str(meta.get("err") or "the worker failed without saying why"))

    # -- crashes ----------------------------------------------------------------------
    def _on_lost(self, pipe: WorkerProcess, why: str) -> None:
        if pipe is not self.pipe:
            return
        self.pipe = None
        self._retire(pipe, graceful=False)
        if self.state != READY:
            # Still starting: _launch sees the loss and reports the failed start.
            if self._hello is not None and not self._hello.done():
                self._hello.set_result(None)
            return
        self.crashes += 1
        self.crashes_in_row += 1
        self.stub._c["crashes"] += 1
        written = list(self.inflight)
        self.inflight.clear()
        req = written[0] if written else None
        log.warning("%s: worker process %d died (%s)%s; restarting", self.id, pipe.pid, why,
                    f" running request {req.rid!r}" if req else "")  # fmt: skip
        # The process wrote every answer it had before it died, so the first request not answered is the
        # one it was running; the ones written behind it never started: first in line again, as they were.
        self.queue.extendleft(reversed(written[1:]))
        if req is not None:
            req.attempts += 1
            if req.attempts >= 2:
                self.failed += 1
                self._fail(req, WORKER_CRASHED, f"it crashed {req.attempts} worker processes of {self.id}")
            else:
                self.queue.appendleft(req)  # first in line on the next process
        self.state = RECOVERING
        self._starter = asyncio.get_running_loop().create_task(self._start(), name=f"restart {self.id}")

    def _retire(self, pipe: WorkerProcess, graceful: bool) -> None:
        task = asyncio.get_running_loop().create_task(pipe.retire(graceful), name=f"retire {self.id}")
        for owner in (self._retiring, self.stub._retiring):  # the stub's close() waits for them all
            owner.add(task)
            task.add_done_callback(owner.discard)

    # -- starting -----------------------------------------------------------------------
    def start(self) -> None:
        self._starter = asyncio.get_running_loop().create_task(self._start(), name=f"start {self.id}")

    async def _start(self) -> None:
        failures = 0
        while True:
            if self.ready.done():
                await asyncio.sleep(_restart_delay(self.crashes_in_row))
            try:
                await self._launch()
                break
            except _StartFailed as e:
                if not self.ready.done():  # the first start: the spawn fails
                    await self.end(NO_SUCH_WORKER, f"worker instance {self.id} could not be started: {e}")
                    return
                failures += 1
                self.crashes_in_row += 1
                log.warning("%s: restart %d failed: %s", self.id, failures, e)
                if failures >= MAX_START_FAILURES:
                    log.error("%s: giving up after %d failed restarts", self.id, failures)
                    await self.end(WORKER_CRASHED, f"worker instance {self.id} cannot be restarted: {e}")
                    return
        if self.ready.done():
            self.restarts += 1
            self.stub._c["restarts"] += 1
        else:
            self.ready.set_result(None)
        self.state = READY
        self._pump()

    async def _launch(self) -> None:
        t0 = time.perf_counter()
        self._hello = hello = asyncio.get_running_loop().create_future()
        try:
            pipe = await WorkerProcess.start(self.callable, self.kind, self.path, self._on_message, self._on_lost)
        except OSError as e:
            raise _StartFailed(f"cannot start a worker process: {e}") from e
        self.pipe = pipe
        if pipe.lost and not hello.done():
            hello.set_result(None)  # it died before we could even listen
        try:
            frames = await asyncio.wait_for(asyncio.shield(hello), self.stub.start_timeout)
        except asyncio.TimeoutError:
            frames, why = None, f"it was not ready after {self.stub.start_timeout:g} s"
        else:
            why = "the process exited before it was ready (its stderr is in the node's log)"
        try:
            answer = p.unpackb(frames[0]) if frames else {"err": why}
        except p.MalformedBody:
            answer = {"err": "the process sent an unreadable greeting"}
        if not isinstance(answer, dict) or answer.get("ready") is not True:
            if self.pipe is pipe:
                self.pipe = None
                self._retire(pipe, graceful=False)
            raise _StartFailed(str(answer.get("err") if isinstance(answer, dict) else answer))
        self._hello = None
        if self.pipe is not pipe:
            raise _StartFailed("the process died right after it said it was ready")
        self.pid = pipe.pid
        self.start_s = time.perf_counter() - t0
        self.stub._c["starts"] += 1
        self.stub._c["start_s"] = self.start_s

    # -- endings -----------------------------------------------------------------------
    async def drain(self, grace: float) -> None:
        """Take no new request, finish the queue within ``grace`` seconds, then stop."""
        self.accepting = False
        self._drained = asyncio.get_running_loop().create_future()
        if self.state == READY:
            self._pump()
        try:
            await asyncio.wait_for(asyncio.shield(self._drained), grace)
        except asyncio.TimeoutError:
            pass
        await self.stop(NO_SUCH_WORKER, f"worker instance {self.id} was reaped before it answered")

    async def stop(self, code: str, err: str) -> None:
        """Stop now: what is queued or running is answered ``code``; the process is ended and reaped."""
        self.accepting = False
        starter = self._starter
        if starter is not None and not starter.done() and starter is not asyncio.current_task():
            starter.cancel()
            await asyncio.gather(starter, return_exceptions=True)
        await self.end(code, err)

    async def end(self, code: str, err: str) -> None:
        if self.state != ENDED:
            self.state = ENDED
            self.accepting = False
            busy = bool(self.inflight)
            while self.inflight:
                self._fail(self.inflight.popleft(), code, err)
            self._answer_all(code, err)
            self.stub._gone(self)
            pipe, self.pipe = self.pipe, None
            if pipe is not None:
                # An idle process exits by itself once its stdin closes; a busy one is killed.
                self._retire(pipe, graceful=not busy)
        await asyncio.gather(*self._retiring, return_exceptions=True)
        if not self.ready.done():
            self.ready.set_result(err)
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
