"""The worker stub: TACC worker instances and cache instances of one logical node.

SNS (Fox et al., SOSP '97, section 3.1) puts a *worker stub* beside each
worker: it queues the requests the front ends send, reports the queue length
to the manager and hides the worker's failures.  :class:`WorkerStub` is that
stub for every instance a logical node hosts (``docs/services.md`` has the
contracts):

* **Worker instances.**  One OS process each (``python -m nodes.worker``)
  running a registered callable, one request at a time, fed from a bounded
  FIFO queue (a quick one gets the next requests written ahead, see
  :class:`_Instance`).  The stub talks to it over pipes, never blocking the
  event loop.  A process that dies (kill -9, ``os._exit``, a segfault) is seen at
  once, since its pipe closes, and restarted with backoff; the request it was
  running is re-queued at the head once, and answered ``worker_crashed``
  when it kills a second process.  A callable that raises answers ``failed``
  and the process keeps serving.  A request whose deadline passed while it
  waited is answered ``deadline`` without running; a request that finds the
  queue full is answered ``overloaded``.
* **Cache instances.**  A :class:`~nodes.cachestore.CacheStore` each, inside
  this process (they are state, not stateless workers), answering get, put
  and del at once.  A worker request may ask for its result to be written into
  a cache instance, here or on another node (``put`` below).
* **Load reports.**  Every ``report_interval`` while it has instances, the
  stub sends ``LOAD_REPORT`` toward the root (``node.send_up``); right after a
  spawn, and once more with no rows when the last instance goes.  Soft state:
  a report sent while detached is dropped and the next one replaces it.

Nothing is created before the first spawn or cache: no task, no process, no
socket.  The tree operations are ``SVC_HANDLERS`` (``op(node, args, budget)``,
see :mod:`nodes.ops`); they find the stub as ``node.stub``.

A TASK with a ``put`` to a cache instance of this node may also say
``probe: true``: if the result is already there, it is answered from there at
once (``hit: true``), whatever the worker's queue.

A TASK for a worker instance may name its inputs instead of carrying them:
``in: [{w: cache instance id, k: key}, ...]`` and no input frame; each is
taken from that cache instance of this node, and a TASK whose input is not
there is answered ``no_input`` (the front end sends it again with the bytes).

A TASK for a worker instance may carry, besides the contract's fields,
``put: {w: cache instance id, k: key, data?: that node's data endpoint,
meta?: map}``: after a successful run the result is stored there with
``content_type`` in its metadata.  A cache instance of this node is written
before the answer, which then says ``stored: true``; one on another node gets
the result after the answer (best effort, never delaying it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import time
from collections import deque
from dataclasses import dataclass

from bus import protocol as p
from bus.planes import PlaneError
from nodes.cachestore import CacheError, CacheStore
from nodes.worker import KINDS, WorkerProcess, tune_allocator

__all__ = [
    "WorkerStub",
    "SVC_HANDLERS",
    "NO_SUCH_WORKER",
    "OVERLOADED",
    "DEADLINE",
    "WORKER_CRASHED",
    "FAILED",
    "NO_INPUT",
    "CODES",
]

log = logging.getLogger(__name__)

# TASK_REPLY error codes (docs/services.md).
NO_SUCH_WORKER = "no_such_worker"
OVERLOADED = "overloaded"
DEADLINE = "deadline"
WORKER_CRASHED = "worker_crashed"
FAILED = "failed"
NO_INPUT = "no_input"  # an input named by reference ("in") is not in that cache instance of this node
CODES = (NO_SUCH_WORKER, OVERLOADED, DEADLINE, WORKER_CRASHED, FAILED, NO_INPUT)

CACHE_KIND = "cache"
COST_ALPHA = 0.3  # weight of the newest sample in the cost EWMA
PIPELINE_AHEAD = 0.002  # seconds a request may be expected to wait in a worker's pipe behind others
PIPELINE_MAX = 32  # requests written to one worker process and not answered yet, at most
START_TIMEOUT = 30.0  # seconds for a worker process to import its callable and say ready
MAX_START_FAILURES = 5  # restarts in a row that die before ready: the instance is broken
RESTART_BASE, RESTART_CAP = 0.05, 2.0  # backoff between restarts after crashes in a row
REAP_GRACE = 30.0  # default seconds a reaped instance gets to finish its queue
MAX_PUT_PEERS = 32  # data DEALERs kept open to other nodes' cache instances
PUT_BACKLOG = 64  # results waiting per peer for its DEALER to connect or drain
PUT_PATIENCE, PUT_RETRY = 2.0, 0.005  # seconds a result may wait to leave, and between tries
# Replies to one front end that meet its HWM on the data ROUTER wait here: at most PARK_LIMIT per peer,
# PARK_PATIENCE seconds each, retried every PARK_RETRY seconds.
PARK_LIMIT, PARK_PATIENCE, PARK_RETRY = 4096, 10.0, 0.001

_STAGE = r"(?:entrypoint:[\w.-]+|[A-Za-z_][\w.]*:[A-Za-z_][\w.]*)"
_CALLABLE = re.compile(rf"^{_STAGE}(\s*\|\s*{_STAGE})*$")  # module:function, entrypoint:NAME, a | b


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
        }  # fmt: skip

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


class _Cache:
    """One cache instance: a CacheStore and the counters of its row."""

    def __init__(self, svc: str, iid: str, max_bytes: int):
        self.svc, self.id = svc, iid
        self.store = CacheStore(max_bytes)
        self.done = self.failed = 0
        self.cost = 0.0

    def row(self) -> dict:
        s = self.store.statistics()
        return {
            "svc": self.svc, "id": self.id, "w": CACHE_KIND, "kind": CACHE_KIND, "q": 0, "busy": 0,
            "cost": self.cost, "done": self.done, "failed": self.failed, "crashes": 0, "cache": True,
            "bytes": s.bytes, "hits": s.hits, "misses": s.misses,
        }  # fmt: skip

    def serve(self, body: dict, extra: list) -> tuple[dict, list]:
        """One get/put/del; ``(reply body without rid, extra frames)``; raises ValueError/CacheError."""
        op, key = body.get("op"), body.get("k")
        if not isinstance(key, str):
            raise ValueError(f"a cache key is a string, got {type(key).__name__}")
        if op == "get":
            entry = self.store.get(key)
            if entry is None:
                return {"ok": True, "hit": False, "meta": {}}, []
            return {"ok": True, "hit": True, "meta": dict(entry.meta)}, [entry.data]
        if op == "put":
            if len(extra) != 1:
                raise ValueError(f"a cache put carries one value frame, got {len(extra)}")
            had = key in self.store
            self.store.put(key, extra[0], body.get("meta"))
            return {"ok": True, "hit": had, "meta": {}}, []
        if op == "del":
            return {"ok": True, "hit": self.store.delete(key), "meta": {}}, []
        raise ValueError(f"unknown cache operation {op!r} (get, put or del)")


class WorkerStub:
    """The worker and cache instances of one logical node (see the module docstring).

    ``node`` is the logical node (``name``, ``node_id``, ``send_up``);
    ``link`` its :class:`bus.link.NodeLink` (replies leave on ``link.data``
    through ``link.loop``).  No I/O here: the first spawn or cache starts it.
    """

    def __init__(self, node, link, *, report_interval: float = 0.25, queue_limit: int = 256,
                 clock=time.monotonic, start_timeout: float = START_TIMEOUT):
        if report_interval <= 0 or queue_limit < 1:
            raise ValueError("report_interval must be > 0 and queue_limit >= 1")
        self.node = node
        self.link = link
        self.report_interval = report_interval
        self.queue_limit = queue_limit
        self.clock = clock
        self.start_timeout = start_timeout
        self._workers: dict[str, _Instance] = {}
        self._caches: dict[str, _Cache] = {}
        self._known_cost: dict[tuple, float] = {}  # (svc, worker) -> last cost: a new instance's first guess
        self._reporter: asyncio.Task | None = None
        self._poke: asyncio.Event | None = None
        self._peers: dict[str, object] = {}  # data endpoint -> DEALER, for results put into remote caches
        self._retiring: set[asyncio.Task] = set()  # worker processes being ended and reaped
        self._pending_puts: dict[str, deque] = {}  # data endpoint -> (frames, since) not sent yet
        self._flush_handle: asyncio.TimerHandle | None = None
        self._parked: dict[bytes, deque] = {}  # front end identity -> (reply frames, since) waiting for room
        self._park_handle: asyncio.TimerHandle | None = None
        self._closed = False
        self._c = dict.fromkeys((
            "tasks", "replies", "replies_dropped", "replies_parked", "probe_hits", "bad_tasks", "cache_ops", "spawns",
            "spawn_failures", "starts", "restarts", "crashes", "reaps", "reports", "cache_writes", "cache_writes_remote",
            "cache_write_failures", *CODES,
        ), 0)  # fmt: skip
        self._c["start_s"] = 0.0
        tune_allocator()  # this process now moves inputs and results: keep large buffers for reuse

    # -- the data plane ------------------------------------------------------------
    def on_task(self, identity: bytes, msg: p.Message) -> None:
        """A decoded data-plane message from a front end; anything but a TASK is ignored."""
        if msg.header.type != p.MsgType.TASK:
            return
        self._c["tasks"] += 1
        body = msg.body if isinstance(msg.body, dict) else {}
        rid, wid, ref = body.get("rid"), body.get("w"), msg.header.msg_id
        inst = self._workers.get(wid) if isinstance(wid, str) else None
        if inst is None or not inst.accepting:
            cache = self._caches.get(wid) if isinstance(wid, str) else None
            if cache is not None:
                self._cache_op(identity, ref, cache, body, msg.extra)
                return
            self._count(NO_SUCH_WORKER)
            self._reply(identity, ref, _error(rid, NO_SUCH_WORKER, f"no worker instance {wid!r} on node {self.node.name}", 0))
            return
        q = inst.queued
        params, dl, put, refs = body.get("p") or {}, body.get("dl"), body.get("put"), body.get("in")
        if body.get("probe") is True and isinstance(put, dict) and self._probe(identity, ref, rid, put, q):
            return
        inputs = msg.extra if refs is None else self._inputs(refs, msg.extra)
        if inputs is None:
            self._count(NO_INPUT)
            self._reply(identity, ref, _error(rid, NO_INPUT, f"an input of {wid} is not in the cache here", q))
            return
        problem = None
        if isinstance(inputs, str):
            problem = inputs
        elif not isinstance(params, dict):
            problem = "'p' (the parameters) must be a map"
        elif dl is not None and (not isinstance(dl, (int, float)) or isinstance(dl, bool) or not math.isfinite(dl)):
            problem = "'dl' (seconds left) must be a number"
        elif put is not None and not (isinstance(put, dict) and isinstance(put.get("w"), str) and isinstance(put.get("k"), str)):
            problem = "'put' must be a map with the cache instance 'w' and the key 'k'"
        elif inst.kind == "transformation" and len(inputs) != 1:
            problem = f"a transformation takes one input object, got {len(inputs)}"
        elif not inputs:
            problem = "an aggregation takes at least one input object"
        if problem is not None:
            self._c["bad_tasks"] += 1
            self._count(FAILED)
            self._reply(identity, ref, _error(rid, FAILED, f"bad task: {problem}", q))
            return
        if q >= self.queue_limit:
            self._count(OVERLOADED)
            self._reply(identity, ref, _error(rid, OVERLOADED, f"the queue of {wid} is full ({q} requests)", q))
            return
        deadline = None if dl is None else self.clock() + dl
        inst.submit(_Request(identity, ref, rid, params, inputs, deadline, put))

    def _probe(self, identity: bytes, ref: int, rid, put: dict, q: int) -> bool:
        """A TASK with ``probe``: when its result is already in ``put``'s cache instance here, answer it
        from there at once (``hit: true``, nothing runs); True if answered."""
        cache = self._caches.get(put.get("w")) if isinstance(put.get("w"), str) else None
        entry = cache.store.get(put["k"]) if cache is not None and isinstance(put.get("k"), str) else None
        if entry is None:
            return False
        ct = entry.meta.get("content_type") or entry.meta.get("ct") or "application/octet-stream"
        self._c["probe_hits"] += 1
        self._reply(identity, ref, {"rid": rid, "ok": True, "ct": ct, "info": {}, "q": q, "hit": True}, [entry.data])
        return True

    def _inputs(self, refs, extra: list) -> list | str | None:
        """The inputs a TASK names by reference (``in``): their bytes, None if one is not cached here, or
        a sentence saying what is wrong with ``in``."""
        if extra or not isinstance(refs, list) or not 1 <= len(refs) <= p.MAX_EXTRA:
            return "'in' must list 1 to MAX_EXTRA inputs, and the TASK then carries no input frame"
        inputs = []
        for r in refs:
            if not (isinstance(r, dict) and isinstance(r.get("w"), str) and isinstance(r.get("k"), str)):
                return "each input of 'in' is a map with the cache instance 'w' and the key 'k'"
            cache = self._caches.get(r["w"])
            entry = cache.store.get(r["k"]) if cache is not None else None
            if entry is None:
                return None
            inputs.append(entry.data)
        return inputs

    def _cache_op(self, identity: bytes, ref: int, cache: _Cache, body: dict, extra: list) -> None:
        self._c["cache_ops"] += 1
        rid = body.get("rid")
        dl = body.get("dl")
        if isinstance(dl, (int, float)) and dl <= 0:
            self._count(DEADLINE)
            self._reply(identity, ref, _error(rid, DEADLINE, "its deadline had passed when it arrived", 0))
            return
        t0 = self.clock()
        try:
            reply, frames = cache.serve(body, extra)
        except (ValueError, TypeError, CacheError) as e:
            cache.failed += 1
            self._count(FAILED)
            self._reply(identity, ref, _error(rid, FAILED, str(e), 0))
            return
        cache.done += 1
        took = self.clock() - t0
        cache.cost = took if cache.cost <= 0.0 else cache.cost + COST_ALPHA * (took - cache.cost)
        self._reply(identity, ref, {"rid": rid, **reply, "q": 0}, frames)

    def _reply(self, identity: bytes, ref: int, body: dict, extra=()) -> None:
        sock = self.link.data
        try:
            frames = p.encode(p.MsgType.TASK_REPLY, body, src=self.node.node_id, ref=ref, extra=extra)
        except p.ProtocolError as e:  # an oversized or unpackable result: say so instead
            frames = p.encode(p.MsgType.TASK_REPLY, _error(body.get("rid"), FAILED, f"the result cannot be sent: {e}",
                                                           body.get("q", 0)), src=self.node.node_id, ref=ref)  # fmt: skip
        frames = [identity, *frames]
        parked = self._parked.get(identity)
        if parked is not None:
            # Replies to this front end already wait for room: this one waits behind them (order per peer).
            self._park(parked, frames)
            return
        sent = None
        if sock is not None and not sock.closed:
            try:
                sent = self.link.loop.send(sock, frames)
            except (PlaneError, ValueError):  # the front end is gone (PeerUnreachable), or the socket is
                sent = None
        if sent is False:
            # The front end's queue on our ROUTER is at its HWM (a burst of replies to one peer): the
            # reply waits for room instead of being lost.
            self._park(self._parked.setdefault(identity, deque()), frames)
            return
        self._c["replies" if sent else "replies_dropped"] += 1

    def _park(self, parked: deque, frames: list) -> None:
        if len(parked) >= PARK_LIMIT:
            parked.popleft()  # a peer that never reads: its oldest reply goes
            self._c["replies_dropped"] += 1
        parked.append((frames, time.monotonic()))
        self._c["replies_parked"] += 1
        if self._park_handle is None and not self._closed:
            self._park_handle = asyncio.get_running_loop().call_later(PARK_RETRY, self._unpark)

    def _unpark(self) -> None:
        """Send the parked replies that fit now; the rest wait for the next try (PARK_PATIENCE at most)."""
        self._park_handle = None
        sock = self.link.data
        now = time.monotonic()
        for identity, parked in list(self._parked.items()):
            while parked:
                frames, since = parked[0]
                sent = None
                if sock is not None and not sock.closed and now - since <= PARK_PATIENCE:
                    try:
                        sent = self.link.loop.send(sock, frames)
                    except (PlaneError, ValueError):
                        sent = None
                if sent is False:
                    break  # still no room for this peer: later
                parked.popleft()
                self._c["replies" if sent else "replies_dropped"] += 1
            if not parked:
                del self._parked[identity]
        if self._parked and not self._closed:
            self._park_handle = asyncio.get_running_loop().call_later(PARK_RETRY, self._unpark)

    def _count(self, code: str) -> None:
        self._c[code] += 1

    # -- results into the cache ----------------------------------------------------------
    def _cache_write(self, put: dict, data: bytes, ct) -> bool:
        """Write a result into cache instance ``put["w"]``: True when stored here (a local instance)."""
        meta = dict(put.get("meta") or {}) if isinstance(put.get("meta"), dict) else {}
        if isinstance(ct, str):
            meta["content_type"] = ct
        local = self._caches.get(put["w"])
        if local is not None:
            try:
                local.store.put(put["k"], data, meta)
                self._c["cache_writes"] += 1
                return True
            except (ValueError, TypeError, CacheError) as e:
                self._c["cache_write_failures"] += 1
                log.debug("cache write to %s failed: %s", put["w"], e)
            return False
        endpoint = put.get("data")
        if not isinstance(endpoint, str) or endpoint == self.link.data_endpoint:
            self._c["cache_write_failures"] += 1  # no such cache here, and nowhere else to send it
            return False
        try:
            frames = p.encode(p.MsgType.TASK, {"svc": put.get("svc", ""), "w": put["w"], "rid": None, "op": "put",
                                               "k": put["k"], "meta": meta}, src=self.node.node_id, extra=[data])  # fmt: skip
            self._peer(endpoint)
        except (p.ProtocolError, PlaneError) as e:  # best effort: a cache write never fails the request
            log.debug("cache write to %s at %s failed: %s", put["w"], endpoint, e)
            self._c["cache_write_failures"] += 1
            return False
        waiting = self._pending_puts.setdefault(endpoint, deque())
        if len(waiting) >= PUT_BACKLOG:
            waiting.popleft()
            self._c["cache_write_failures"] += 1
        waiting.append((frames, time.monotonic()))
        self._flush_puts()
        return False

    def _flush_puts(self) -> None:
        # A fresh DEALER refuses sends until it is connected (IMMEDIATE), and a
        # busy one may be at its HWM: what cannot leave now is retried shortly,
        # for at most PUT_PATIENCE seconds.
        self._flush_handle = None
        now = time.monotonic()
        for endpoint, waiting in list(self._pending_puts.items()):
            dealer = self._peers.get(endpoint)
            while waiting:
                frames, since = waiting[0]
                sent = False
                if dealer is not None and now - since <= PUT_PATIENCE:
                    try:
                        sent = self.link.loop.send(dealer, frames)
                    except (PlaneError, ValueError):
                        dealer = None
                    if not sent and dealer is not None:
                        break  # not connected yet, or full: later
                waiting.popleft()
                self._c["cache_writes_remote" if sent else "cache_write_failures"] += 1
            if not waiting:
                del self._pending_puts[endpoint]
        if self._pending_puts and not self._closed:
            self._flush_handle = asyncio.get_running_loop().call_later(PUT_RETRY, self._flush_puts)

    def _peer(self, endpoint: str):
        dealer = self._peers.pop(endpoint, None)
        if dealer is None:
            if len(self._peers) >= MAX_PUT_PEERS:
                self._drop_peer(next(iter(self._peers)))
            dealer = self.link.factory.data_dealer(endpoint, b"\x03" + os.urandom(7))
            self.link.loop.add(dealer, p.Plane.DATA, self._on_put_replies, name=f"cache-put->{endpoint}")
        self._peers[endpoint] = dealer  # most recently used last
        return dealer

    def _on_put_replies(self, batch: list) -> None:
        for frames in batch:
            try:
                body = p.decode(frames).body
            except p.ProtocolError:
                continue
            if not (isinstance(body, dict) and body.get("ok")):
                self._c["cache_write_failures"] += 1

    def _drop_peer(self, endpoint: str) -> None:
        dealer = self._peers.pop(endpoint)
        try:
            self.link.loop.remove(dealer)
        except ValueError:
            pass
        dealer.close(0)

    # -- operations ----------------------------------------------------------------
    async def spawn(self, svc, worker, callable, kind, id, path=None) -> dict:  # noqa: A002 (the op's names)
        """Start worker instance ``id`` running ``callable``; ``{"id", "pid"}`` once it is ready, or ``{"error"}``.

        Idempotent: spawning a live id again answers the same.  ``path``:
        directories put in front of the worker's ``sys.path`` (an application's
        directory).
        """
        problem = self._check(svc, id)
        if problem is None and (not isinstance(worker, str) or not worker):
            problem = "'worker' must be a non-empty string"
        if problem is None and (not isinstance(callable, str) or not _CALLABLE.match(callable)):
            problem = f"'callable' must name 'module:function', not {callable!r}"
        if problem is None and kind not in KINDS:
            problem = f"'kind' must be one of {', '.join(KINDS)}, not {kind!r}"
        if problem is None and path is not None and not (isinstance(path, list) and all(isinstance(x, str) for x in path)):
            problem = "'path' must be a list of directories"
        if problem is None and id in self._caches:
            problem = f"{id} is a cache instance here"
        if problem is not None:
            return {"error": problem}
        inst = self._workers.get(id)
        if inst is not None:
            if (inst.callable, inst.kind) != (callable, kind):
                return {"error": f"{id} already runs {inst.callable} ({inst.kind}) here"}
            if not inst.accepting:
                return {"error": f"{id} is being reaped or stopped here"}
        else:
            inst = self._workers[id] = _Instance(self, svc, worker, callable, kind, id, list(path or ()))
            inst.start()
            self._c["spawns"] += 1
        failure = await asyncio.shield(inst.ready)
        if failure is not None:
            self._c["spawn_failures"] += 1
            return {"error": failure}
        log.info("%s: worker %s (%s) ready as pid %d in %.3f s", self.node.name, id, callable, inst.pid, inst.start_s)
        self._report_soon()
        return {"id": id, "pid": inst.pid}

    def cache(self, svc, id, max_bytes) -> dict:  # noqa: A002
        """Create cache instance ``id`` bounded to ``max_bytes``; ``{"id"}`` or ``{"error"}``.  Idempotent."""
        problem = self._check(svc, id)
        if problem is None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1):
            problem = f"'max_bytes' must be a positive integer, not {max_bytes!r}"
        if problem is None and id in self._workers:
            problem = f"{id} is a worker instance here"
        if problem is not None:
            return {"error": problem}
        if id not in self._caches:
            self._caches[id] = _Cache(svc, id, max_bytes)
            self._report_soon()
        return {"id": id}

    async def reap(self, svc, id, grace=None) -> str:  # noqa: A002
        """Retire instance ``id``: no new requests, its queue finished (within ``grace`` s), then gone.

        ``"reaped"`` also for an id that is not here (already reaped): reaping is idempotent.
        """
        self._c["reaps"] += 1
        if self._caches.pop(id, None) is not None:
            self._after_removal()
            return "reaped"
        inst = self._workers.get(id)
        if inst is not None:
            await inst.drain(REAP_GRACE if grace is None else max(float(grace), 0.0))
        return "reaped"

    def list(self, svc=None) -> dict:
        """``{"instances": rows}`` (the rows of a load report), of one service or all."""
        return {"instances": [row for row in self._rows() if svc is None or row["svc"] == svc]}

    async def stop(self, svc=None) -> str:
        """Stop every instance of ``svc`` (of all services when None) now; ``"stopped"``."""
        for iid in [i for i, c in self._caches.items() if svc is None or c.svc == svc]:
            del self._caches[iid]
        doomed = [w for w in self._workers.values() if svc is None or w.svc == svc]
        await asyncio.gather(*(w.stop(NO_SUCH_WORKER, f"service {w.svc} was stopped on this node") for w in doomed))
        self._after_removal()
        return "stopped"

    async def close(self) -> None:
        """Stop every worker process, answer what is queued, stop reporting, close the sockets."""
        self._closed = True
        doomed = list(self._workers.values())
        await asyncio.gather(*(w.stop(NO_SUCH_WORKER, f"node {self.node.name} is shutting down") for w in doomed))
        await asyncio.gather(*self._retiring, return_exceptions=True)
        self._caches.clear()
        if self._reporter is not None:
            self._reporter.cancel()
            await asyncio.gather(self._reporter, return_exceptions=True)
            self._reporter = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._park_handle is not None:
            self._park_handle.cancel()
            self._park_handle = None
        self._unpark()  # a last try; what still finds no room is lost with the node
        for parked in self._parked.values():
            self._c["replies_dropped"] += len(parked)
        self._parked.clear()
        for waiting in self._pending_puts.values():
            self._c["cache_write_failures"] += len(waiting)
        self._pending_puts.clear()
        for endpoint in list(self._peers):
            self._drop_peer(endpoint)

    def _check(self, svc, iid) -> str | None:
        if self._closed:
            return f"node {self.node.name} is shutting down"
        if not isinstance(svc, str) or not svc:
            return "'svc' must be a non-empty string"
        if not isinstance(iid, str) or not iid.startswith(f"{svc}/"):
            return f"'id' must be an instance id of service {svc} ('{svc}/name@node#n'), not {iid!r}"
        return None

    def _gone(self, inst: _Instance) -> None:
        # Called by the instance's task as it ends (reaped, stopped, broken).
        if self._workers.get(inst.id) is inst:
            del self._workers[inst.id]
            self._after_removal()

    def _after_removal(self) -> None:
        if self._poke is not None:
            self._poke.set()  # the reporter sends the change (or its last, empty, report) now

    # -- load reports ------------------------------------------------------------------
    def _rows(self) -> list:
        return [w.row() for w in self._workers.values()] + [c.row() for c in self._caches.values()]

    def report(self) -> dict | None:
        """The LOAD_REPORT body ``{node, data, rows}``, or None when this node hosts no instance."""
        if not self._workers and not self._caches:
            return None
        return {"node": self.node.name, "data": self.link.data_endpoint, "rows": self._rows()}

    def _report_soon(self) -> None:
        if self._closed:
            return
        if self._reporter is None or self._reporter.done():
            self._poke = asyncio.Event()
            self._reporter = asyncio.get_running_loop().create_task(self._report_loop(), name="load reports")
        else:
            self._poke.set()

    async def _report_loop(self) -> None:
        while True:
            body = self.report()
            if body is None:
                # The last instance is gone: one empty report so the manager forgets them now.
                self._send_report({"node": self.node.name, "data": self.link.data_endpoint, "rows": []})
                return
            self._send_report(body)
            self._poke.clear()
            try:
                await asyncio.wait_for(self._poke.wait(), self.report_interval)
            except asyncio.TimeoutError:
                pass

    def _send_report(self, body: dict) -> None:
        self._c["reports"] += 1
        self.node.send_up(p.MsgType.LOAD_REPORT, body)

    def statistics(self) -> dict:
        """A snapshot of the counters and of each instance (pid, state, start time)."""
        snap = dict(self._c)
        snap["workers"] = {
            w.id: {"state": w.state, "pid": w.pid, "queued": w.queued, "busy": bool(w.inflight),
                   "restarts": w.restarts, "crashes": w.crashes, "start_s": w.start_s, "overhead_s": w.overhead,
                   "accepting": w.accepting}
            for w in self._workers.values()
        }  # fmt: skip
        snap["caches"] = {c.id: c.row() for c in self._caches.values()}
        snap["reporting"] = self._reporter is not None and not self._reporter.done()
        return snap


# -- tree operations (op(node, args, budget), see nodes/ops.py) ---------------------------


def _stub(node) -> WorkerStub:
    stub = getattr(node, "stub", None)
    if stub is None:
        # The agent normally creates it (and wires link.on_task); this keeps an op
        # on a node without one from failing.
        stub = node.stub = WorkerStub(node, node.transport)
    return stub


async def op_spawn(node, args: dict, budget: float) -> dict:
    """``svc.spawn {svc, worker, callable, kind, id, app?, path?}`` -> ``{"id", "pid"}`` | ``{"error"}``.

    With ``app``, the application's directory on this node (its installed
    packages) comes first on the worker's import path.
    """
    path = list(args.get("path") or [])
    apps = getattr(node, "apps", None)
    if isinstance(args.get("app"), str) and apps is not None:
        try:
            path.insert(0, str(apps.app_dir(args["app"])))
        except Exception:  # a bad app name: the worker runs without its directory
            pass
    return await _stub(node).spawn(args.get("svc"), args.get("worker"), args.get("callable"),
                                   args.get("kind", "transformation"), args.get("id"), path or None)  # fmt: skip


async def op_reap(node, args: dict, budget: float) -> str:
    """``svc.reap {svc, id, grace}`` -> ``"reaped"`` once its queue is done (within grace and the op's budget)."""
    grace = args.get("grace")
    grace = budget if not isinstance(grace, (int, float)) else min(float(grace), budget)
    return await _stub(node).reap(args.get("svc"), args.get("id"), grace)


def op_cache(node, args: dict, budget: float) -> dict:
    """``svc.cache {svc, id, max_bytes}`` -> ``{"id"}`` | ``{"error"}``."""
    return _stub(node).cache(args.get("svc"), args.get("id"), args.get("max_bytes"))


def op_list(node, args: dict, budget: float) -> dict:
    """``svc.list {svc?}`` -> ``{"instances": [rows]}``."""
    return _stub(node).list(args.get("svc"))


async def op_stop(node, args: dict, budget: float) -> str:
    """``svc.stop {svc}`` -> ``"stopped"``: every instance of the service here is gone."""
    svc = args.get("svc")
    if not isinstance(svc, str) or not svc:
        return {"error": "'svc' must be a non-empty string"}
    return await _stub(node).stop(svc)


SVC_HANDLERS = {"svc.spawn": op_spawn, "svc.reap": op_reap, "svc.cache": op_cache, "svc.list": op_list,
                "svc.stop": op_stop}  # fmt: skip
