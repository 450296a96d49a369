"""The front end's side of the bus: load beacons in, tasks out, replies matched back.

Three pieces, wired together by :mod:`frontends.server` (and by tests):

* :class:`BeaconClient` (control plane): one DEALER to the manager's control
  endpoint.  It sends ``CTL_REQUEST {"cmd": "svc_subscribe", "args": {"svc"}}``
  at once and every ``renew`` seconds (2 s; the manager drops a subscriber
  after 5 s without renewal) and receives the ``BEACON`` bodies the manager
  pushes (docs/services.md).  The latest beacon is soft state: after
  ``stale_after`` seconds (3 s) without one the table is *kept* but marked
  stale, so a front end keeps serving with the last load table while the
  manager restarts.  A connection that stayed silent for two renewal periods
  is reopened, which drops subscriptions parked for a dead manager and
  restarts libzmq's reconnect backoff.
* :class:`DataPlane` (data plane): one DEALER per node data endpoint named in
  the beacon, opened when the endpoint first appears (so it is connected before
  the first request) and closed once the endpoint has been out of the beacon,
  with nothing in flight, for ``idle_close`` seconds.  :meth:`DataPlane.request`
  sends one ``TASK``, gives it a fresh ``rid`` and resolves the matching
  ``TASK_REPLY`` (any socket, any order).  A reply that arrives after its
  timeout is still matched for ``late_grace`` seconds so the sender's in-flight
  count stays true.
* :class:`TaskClient`: picks a worker with :func:`manager.lbpolicy.choose`
  (power of two choices on ``(queue + own in-flight + 1) * cost``) over the
  latest beacon, keeping its own in-flight counts in the fast path's
  :class:`~core.fastpath.LoadTable`, and re-dispatches to a worker not tried
  yet on a timeout, an unreachable node or a reply coded ``worker_crashed``,
  ``no_such_worker``, ``overloaded`` or ``deadline``, within one overall
  deadline.  ``failed`` (the callable raised) is final: the same input would
  fail anywhere.

Every class has an explicit lifecycle (no I/O in ``__init__``; the caller owns
the ``SocketFactory`` and the running ``PlaneLoop``), and keeps counters
exposed as a frozen ``statistics()`` snapshot.  Tested in
tests/frontends/test_dispatch.py against a real-socket peer
(tests/frontends/taskpeer.py).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import random
import statistics as _stats
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence

import zmq

from bus import protocol
from bus.planes import Plane, PlaneLoop, SocketFactory
from bus.protocol import BusError, MsgType
from core.errors import NoWorkers
from core.fastpath import LoadTable
from manager.lbpolicy import P2C, WorkerLoad, choose

__all__ = [
    "TRANSFORMATION", "AGGREGATION", "NO_SUCH_WORKER", "OVERLOADED", "DEADLINE", "WORKER_CRASHED", "FAILED",
    "NO_INPUT", "TIMEOUT", "UNREACHABLE", "BAD_REPLY", "NO_WORKERS", "SATURATED", "RETRY_CODES", "DispatchError",
    "NoWorkerAvailable", "TaskTimeout", "TaskRejected", "TaskFailed", "Unreachable", "WorkerRow", "CacheRow",
    "Beacon", "BeaconClient", "DataPlane", "TaskResult", "TaskClient",
]  # fmt: skip

log = logging.getLogger(__name__)

TRANSFORMATION = "transformation"
AGGREGATION = "aggregation"

# TASK_REPLY codes of the worker stub (docs/services.md).
NO_SUCH_WORKER = "no_such_worker"
OVERLOADED = "overloaded"
DEADLINE = "deadline"
WORKER_CRASHED = "worker_crashed"
FAILED = "failed"
NO_INPUT = "no_input"  # an input named by reference is not in that cache instance: sent again with its bytes
# Codes this module gives its own errors.
TIMEOUT = "timeout"
UNREACHABLE = "unreachable"
BAD_REPLY = "bad_reply"
NO_WORKERS = "no_workers"
SATURATED = "saturated"

#: Reply codes after which another worker may well succeed.
RETRY_CODES = frozenset({NO_SUCH_WORKER, OVERLOADED, DEADLINE, WORKER_CRASHED, UNREACHABLE, BAD_REPLY})


# -- errors ----------------------------------------------------------------------


class DispatchError(BusError):
    """A task could not be answered by a worker; ``code`` names why, ``tried`` lists instance ids."""

    def __init__(self, message: str, code: str, tried: Sequence[str] = ()):
        super().__init__(message)
        self.code = code
        self.tried = tuple(tried)


class NoWorkerAvailable(DispatchError, LookupError):
    """No worker to send to: none in the beacon (``no_workers``) or all over the queue bound (``saturated``)."""


class TaskTimeout(DispatchError, TimeoutError):
    """The workers tried did not answer in time (``timeout``)."""


class TaskRejected(DispatchError):
    """Every worker tried refused or lost the task (crashed, overloaded, gone, unreachable)."""


class TaskFailed(DispatchError, ValueError):
    """The worker's callable raised on this input (``failed``); ``err`` is its sentence.  Not retried."""

    def __init__(self, message: str, err: str, tried: Sequence[str] = ()):
        super().__init__(message, FAILED, tried)
        self.err = err


class Unreachable(DispatchError, ConnectionError):
    """No connection to a node's data endpoint within the connect timeout, or its queue is full."""


# -- beacons ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """One worker instance of a beacon: ``q`` queue and ``cost`` seconds per request, smoothed."""

    id: str
    w: str
    kind: str
    node: str
    data: str
    q: float = 0.0
    cost: float = 0.0  # 0: not measured yet


@dataclass(frozen=True, slots=True)
class CacheRow:
    """One cache instance of a beacon."""

    id: str
    node: str
    data: str


def _num(value, default: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        return default
    return float(value)


@dataclass(frozen=True)
class Beacon:
    """A load table as the manager beaconed it, with the (front end's) clock time it arrived."""

    svc: str
    seq: int
    workers: tuple[WorkerRow, ...]
    caches: tuple[CacheRow, ...]
    at: float
    bad_rows: int = 0

    @classmethod
    def parse(cls, body: Any, at: float) -> Beacon:
        """Validate a ``BEACON`` body; rows missing an id or endpoint are skipped (counted in ``bad_rows``)."""
        if not isinstance(body, dict) or not isinstance(body.get("svc"), str):
            raise protocol.MalformedBody("a BEACON body must be a map with a string `svc`")
        seq = body.get("seq", 0)
        workers, caches, bad = [], [], 0
        for row in body.get("workers") or ():
            try:
                workers.append(WorkerRow(str(row["id"]), str(row.get("w", "")), str(row.get("kind", TRANSFORMATION)),
                                         str(row.get("node", "")), _endpoint(row["data"]),
                                         _num(row.get("q")), _num(row.get("cost"))))  # fmt: skip
            except (KeyError, TypeError, AttributeError, ValueError):
                bad += 1
        for row in body.get("caches") or ():
            try:
                caches.append(CacheRow(str(row["id"]), str(row.get("node", "")), _endpoint(row["data"])))
            except (KeyError, TypeError, AttributeError, ValueError):
                bad += 1
        return cls(body["svc"], seq if isinstance(seq, int) else 0, tuple(workers), tuple(caches), at, bad)

    def endpoints(self) -> set[str]:
        """Every data endpoint the beacon names (workers and caches)."""
        return {w.data for w in self.workers} | {c.data for c in self.caches}


def _endpoint(value) -> str:
    if not isinstance(value, str) or "://" not in value:
        raise ValueError(f"not an endpoint: {value!r}")
    return value


def _identity(kind: str) -> bytes:
    # Never starts with a zero byte (reserved by libzmq); unique per socket, so
    # the peer's ROUTER_HANDOVER never hands one of our connections to another.
    return f"fe{os.getpid()}-{kind}-{os.urandom(6).hex()}".encode()


class BeaconClient:
    """Subscribes to a service's load beacons on the manager's control endpoint.

    ``latest`` is the last beacon (None before the first), ``stale`` is True
    when there is none or it is older than ``stale_after`` seconds.  Listeners
    added with :meth:`add_listener` are called with every beacon, in the
    loop's thread, and must not block.
    """

    def __init__(self, factory: SocketFactory, loop: PlaneLoop, endpoint: str, svc: str, *,
                 renew: float = 2.0, stale_after: float = 3.0, clock: Callable[[], float] = time.monotonic):
        if renew <= 0 or stale_after <= 0:
            raise ValueError("renew and stale_after must be > 0 seconds")
        self.endpoint = endpoint
        self.svc = svc
        self._factory = factory
        self._loop = loop
        self._renew = float(renew)
        self._stale_after = float(stale_after)
        self._clock = clock
        self._sock: zmq.Socket | None = None
        self._opened_at = 0.0
        self._last_heard = 0.0
        self._latest: Beacon | None = None
        self._listeners: list[Callable[[Beacon], Any]] = []
        self._waiters: list[asyncio.Future] = []
        self._task: asyncio.Task | None = None
        self._stale_timer: asyncio.TimerHandle | None = None
        self._was_stale = True
        self._last_error: str | None = None
        self.restart_info: dict | None = None  # how the manager was started (see frontends.peers)
        self.http_url: str | None = None  # our HTTP address, told to the manager (its monitor polls /stats)
        self._c = dict.fromkeys(("beacons", "subscribes", "replies", "refused", "malformed", "foreign",
                                 "unexpected", "seq_regress", "reopened", "went_stale",
                                 "listener_errors"), 0)  # fmt: skip

    # -- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        """Open the DEALER and start subscribing (the first request goes out at once)."""
        if self._task is not None:
            raise RuntimeError("BeaconClient is already started")
        self._open()
        self._task = asyncio.get_running_loop().create_task(self._renew_forever(), name=f"beacons:{self.svc}")

    async def stop(self) -> None:
        """Stop renewing and close the socket (the manager forgets us after 5 s)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._stale_timer is not None:
            self._stale_timer.cancel()
            self._stale_timer = None
        self._close()
        for fut in self._waiters:
            if not fut.done():
                fut.cancel()
        self._waiters.clear()

    async def __aenter__(self) -> BeaconClient:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _open(self) -> None:
        self._sock = self._factory.control_dealer(self.endpoint, _identity("ctl"))
        sock = self._sock
        self._loop.add(sock, Plane.CONTROL, lambda batch: self._on_batch(sock, batch), name=f"manager {self.endpoint}")
        self._opened_at = self._clock()

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                self._loop.remove(sock)
            except ValueError:
                pass  # the loop dropped it after a socket error
            sock.close(0)

    # -- state -----------------------------------------------------------------
    @property
    def latest(self) -> Beacon | None:
        """The last beacon received (kept when stale)."""
        return self._latest

    def age(self) -> float | None:
        """Seconds since the last beacon arrived, None before the first."""
        return None if self._latest is None else self._clock() - self._latest.at

    @property
    def stale(self) -> bool:
        """No beacon yet, or none for ``stale_after`` seconds."""
        age = self.age()
        return age is None or age > self._stale_after

    @property
    def last_error(self) -> str | None:
        """The manager's last refusal of our subscription, if any."""
        return self._last_error

    def add_listener(self, fn: Callable[[Beacon], Any]) -> None:
        """Call ``fn(beacon)`` on every beacon (at once with the latest, if there is one)."""
        self._listeners.append(fn)
        if self._latest is not None:
            fn(self._latest)

    async def next_beacon(self, timeout: float | None = None) -> Beacon:
        """Wait for the next beacon to arrive; ``TimeoutError`` after ``timeout`` seconds."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def statistics(self) -> Mapping[str, Any]:
        """Frozen counters plus the table's age, staleness and size."""
        b = self._latest
        return MappingProxyType({**self._c, "age": self.age(), "stale": self.stale,
                                 "seq": b.seq if b else None, "workers": len(b.workers) if b else 0,
                                 "caches": len(b.caches) if b else 0, "last_error": self._last_error})  # fmt: skip

    # -- I/O ---------------------------------------------------------------------
    async def _renew_forever(self) -> None:
        while True:
            now = self._clock()
            if now - max(self._last_heard, self._opened_at) > 2 * self._renew:
                # Nothing heard for two periods: the manager is down or moved.
                # A fresh socket drops the subscriptions parked for the dead
                # connection and reconnects at the shortest backoff.
                self._close()
                self._open()
                self._c["reopened"] += 1
            self._subscribe()
            await asyncio.sleep(self._renew)

    def _check_stale(self) -> None:
        self._stale_timer = None
        if self.stale and not self._was_stale:
            self._was_stale = True
            self._c["went_stale"] += 1
            n = len(self._latest.workers) if self._latest else 0
            log.warning("no %s beacon from %s for %.1fs: keeping the last load table (%d workers), marked stale",
                        self.svc, self.endpoint, self.age() or 0.0, n)  # fmt: skip

    def _subscribe(self) -> None:
        args = {"svc": self.svc}
        if self.http_url:
            args["http"] = self.http_url
        frames = protocol.encode(MsgType.CTL_REQUEST, {"cmd": "svc_subscribe", "args": args})
        if self._loop.send(self._sock, frames):
            self._c["subscribes"] += 1

    def _on_batch(self, sock: zmq.Socket, batch: list) -> None:
        if sock is not self._sock:
            return  # a batch drained from a socket we replaced
        for frames in batch:
            decoded = self._loop.decode(sock, frames)
            if decoded is None:
                continue
            msg = decoded[1]
            self._last_heard = self._clock()
            if msg.header.type == MsgType.BEACON:
                self._on_beacon(msg.body)
            elif msg.header.type == MsgType.CTL_REPLY:
                self._on_reply(msg.body)
            else:
                self._c["unexpected"] += 1

    def _on_reply(self, body) -> None:
        self._c["replies"] += 1
        if isinstance(body, dict) and body.get("ok"):
            self._last_error = None
            result = body.get("result")
            if isinstance(result, dict) and isinstance(result.get("restart"), dict):
                self.restart_info = result["restart"]
            # A manager may answer the subscription with the current table.
            if isinstance(result, dict) and "workers" in result:
                self._on_beacon(result)
            return
        self._c["refused"] += 1
        error = str(body.get("error") if isinstance(body, dict) else body)
        if error != self._last_error:
            log.warning("the manager at %s refused the %s subscription: %s", self.endpoint, self.svc, error)
        self._last_error = error

    def _on_beacon(self, body) -> None:
        try:
            beacon = Beacon.parse(body, self._clock())
        except protocol.ProtocolError as e:
            self._c["malformed"] += 1
            log.warning("dropped a malformed beacon from %s: %s", self.endpoint, e)
            return
        if beacon.svc != self.svc:
            self._c["foreign"] += 1
            return
        self._c["beacons"] += 1
        if self._latest is not None and beacon.seq < self._latest.seq:
            self._c["seq_regress"] += 1  # a restarted manager counts from 0 again: take it
        if self._was_stale:
            self._was_stale = False
            log.info("%s beacons from %s: %d workers, %d caches", self.svc, self.endpoint,
                     len(beacon.workers), len(beacon.caches))  # fmt: skip
        self._latest = beacon
        if self._stale_timer is not None:
            self._stale_timer.cancel()
        self._stale_timer = asyncio.get_running_loop().call_later(self._stale_after * 1.01, self._check_stale)
        for fn in self._listeners:
            try:
                fn(beacon)
            except Exception:
                self._c["listener_errors"] += 1
                log.exception("beacon listener %r failed", fn)
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(beacon)


# -- data plane -------------------------------------------------------------------


class _Conn:
    __slots__ = ("sock", "endpoint", "pending", "unlisted_since")

    def __init__(self, sock: zmq.Socket, endpoint: str):
        self.sock = sock
        self.endpoint = endpoint
        self.pending = 0
        self.unlisted_since: float | None = None


class _Pending:
    __slots__ = ("fut", "conn", "on_settle", "due", "expired")

    def __init__(self, fut: asyncio.Future, conn: _Conn, on_settle: Callable[[], Any] | None, due: float):
        self.fut = fut
        self.conn = conn
        self.on_settle = on_settle
        self.due = due  # loop time of its timeout, then of the end of its late grace
        self.expired = False


class DataPlane:
    """Request/reply over data-plane DEALERs, one per node data endpoint.

    ``connect_timeout`` bounds the wait for a connection (or for room under
    the HWM) before a request fails with :class:`Unreachable`.

    Timeouts: one timer for all requests, over a heap of ``(due, rid)``
    tuples, armed for the earliest request still waiting (answered ones are
    dropped when they reach the top), so a request costs a heap push instead
    of an event-loop timer handle, and no wakeup once answered.
    """

    def __init__(self, factory: SocketFactory, loop: PlaneLoop, *, connect_timeout: float = 0.5,
                 late_grace: float = 2.0, idle_close: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self._factory = factory
        self._loop = loop
        self._connect_timeout = float(connect_timeout)
        self._late_grace = float(late_grace)
        self._idle_close = float(idle_close)
        self._clock = clock
        self._conns: dict[str, _Conn] = {}
        self._pending: dict[str, _Pending] = {}
        self._rids = itertools.count(1)
        self._prefix = os.urandom(3).hex() + "-"
        self._aio: asyncio.AbstractEventLoop | None = None
        self._dues: list[tuple[float, str]] = []  # heap of (loop time, rid); stale entries skipped
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._c = dict.fromkeys(("requests", "replies", "timeouts", "late", "lost", "unreachable",
                                 "unknown_rid", "unexpected", "opened", "closed"), 0)  # fmt: skip

    async def start(self) -> None:
        self._aio = asyncio.get_running_loop()

    async def stop(self) -> None:
        """Fail every request still waiting and close every socket."""
        pending, self._pending = self._pending, {}
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, float("inf")
        self._dues.clear()
        for entry in pending.values():
            if not entry.fut.done():
                entry.fut.cancel()
        for conn in list(self._conns.values()):
            self._close(conn)
        self._aio = None

    async def __aenter__(self) -> DataPlane:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- connections -----------------------------------------------------------
    def endpoints(self) -> list[str]:
        """Endpoints with an open socket."""
        return sorted(self._conns)

    def connect(self, endpoint: str) -> None:
        """Open the DEALER to ``endpoint`` now, so it is connected before the first request."""
        self._conn(endpoint)

    def retain(self, endpoints: Iterable[str]) -> None:
        """Connect to these endpoints; close others that have been unlisted and idle for ``idle_close``."""
        now = self._clock()
        listed = set(endpoints)
        for ep in listed:
            self._conn(ep).unlisted_since = None
        for conn in list(self._conns.values()):
            if conn.endpoint in listed:
                continue
            if conn.unlisted_since is None:
                conn.unlisted_since = now
            elif conn.pending == 0 and now - conn.unlisted_since >= self._idle_close:
                self._close(conn)

    def _conn(self, endpoint: str) -> _Conn:
        conn = self._conns.get(endpoint)
        if conn is None:
            sock = self._factory.data_dealer(endpoint, _identity("data"))
            conn = _Conn(sock, endpoint)
            self._loop.add(sock, Plane.DATA, lambda batch: self._on_batch(conn, batch), name=endpoint)
            self._conns[endpoint] = conn
            self._c["opened"] += 1
        return conn

    def _close(self, conn: _Conn) -> None:
        if self._conns.get(conn.endpoint) is conn:
            del self._conns[conn.endpoint]
        try:
            self._loop.remove(conn.sock)
        except ValueError:
            pass
        conn.sock.close(0)
        self._c["closed"] += 1

    # -- requests --------------------------------------------------------------
    async def request(self, endpoint: str, body: Mapping[str, Any], extra: Sequence = (), *, timeout: float,
                      on_settle: Callable[[], Any] | None = None) -> tuple[dict, list]:  # fmt: skip
        """Send ``TASK`` ``body`` (+ ``extra`` frames) to ``endpoint``; return the reply's ``(body, extra)``.

        ``rid`` is set here.  Raises :class:`Unreachable` when the message
        cannot be handed to libzmq within the connect timeout,
        ``TimeoutError`` after ``timeout`` seconds.  ``on_settle()`` runs
        exactly once, when the request stops being in flight: it could not be
        sent, its reply arrived (in time or late), or ``late_grace`` passed
        after the timeout.
        """
        if self._aio is None:
            raise RuntimeError("DataPlane is not started")
        try:
            conn = self._conn(endpoint)
            rid = f"{self._prefix}{next(self._rids):x}"
            frames = protocol.encode(MsgType.TASK, {**body, "rid": rid}, extra=extra)
            if not self._loop.send(conn.sock, frames):
                # IMMEDIATE: no connection yet (or the HWM is full); wait for room.
                ok = await self._loop.writable(conn.sock, min(self._connect_timeout, timeout))
                if not ok or self._conns.get(endpoint) is not conn or not self._loop.send(conn.sock, frames):
                    self._c["unreachable"] += 1
                    raise Unreachable(f"no connection to the data endpoint {endpoint}", UNREACHABLE)
        except BaseException:
            # Never sent (unreachable, too large, cancelled while waiting): settled now.
            if on_settle is not None:
                on_settle()
            raise
        self._c["requests"] += 1
        aio = self._aio
        entry = _Pending(aio.create_future(), conn, on_settle, aio.time() + timeout)
        self._pending[rid] = entry
        conn.pending += 1
        self._due(entry.due, rid)
        return await entry.fut

    def _due(self, when: float, rid: str) -> None:
        """Have :meth:`_on_timer` look at ``rid`` at loop time ``when``."""
        dues = self._dues
        if len(dues) > 2 * len(self._pending) + 1024:
            # Mostly answered requests: keep the heap as small as what is in flight.
            dues[:] = [(e.due, r) for r, e in self._pending.items()]
            heapq.heapify(dues)
        heapq.heappush(dues, (when, rid))
        if when < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = when
            self._timer = self._aio.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        if self._aio is None:
            return
        dues, pending = self._dues, self._pending
        now = self._aio.time()
        while dues:
            when, rid = dues[0]
            entry = pending.get(rid)
            if entry is not None and entry.due == when:
                if when > now:
                    break  # the next live deadline: the timer waits for it
                heapq.heappop(dues)
                if not entry.expired:
                    self._expire(rid, entry)
                else:
                    self._lose(rid)
            else:
                heapq.heappop(dues)  # answered (or due later): no wakeup for it
        if dues:
            self._timer_at = dues[0][0]
            self._timer = self._aio.call_at(self._timer_at, self._on_timer)

    def _expire(self, rid: str, entry: _Pending) -> None:
        entry.expired = True
        if not entry.fut.done():
            self._c["timeouts"] += 1
            entry.fut.set_exception(TimeoutError(f"no reply from {entry.conn.endpoint}"))
        # Keep matching a late reply for a while; then the request is lost.
        entry.due = self._aio.time() + self._late_grace
        self._due(entry.due, rid)

    def _lose(self, rid: str) -> None:
        entry = self._pending.pop(rid, None)
        if entry is not None:
            self._c["lost"] += 1
            self._settle(entry)

    def _settle(self, entry: _Pending) -> None:
        entry.conn.pending -= 1
        if entry.on_settle is not None:
            entry.on_settle()

    def _on_batch(self, conn: _Conn, batch: list) -> None:
        for frames in batch:
            decoded = self._loop.decode(conn.sock, frames)
            if decoded is None:
                continue
            msg = decoded[1]
            body = msg.body
            if msg.header.type != MsgType.TASK_REPLY or not isinstance(body, dict):
                self._c["unexpected"] += 1
                continue
            entry = self._pending.pop(body.get("rid"), None)
            if entry is None:
                self._c["unknown_rid"] += 1
                continue
            if entry.fut.done():
                self._c["late"] += 1  # timed out (or its caller went away) before the reply
            else:
                self._c["replies"] += 1
                entry.fut.set_result((body, msg.extra))
            self._settle(entry)

    def statistics(self) -> Mapping[str, int]:
        """Frozen counters, plus requests in flight and open sockets."""
        return MappingProxyType({**self._c, "inflight": len(self._pending), "sockets": len(self._conns)})


# -- tasks ------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskResult:
    """A worker's answer: the result bytes, its content type and info, who answered and after how much.

    ``stored``: the worker's node wrote the result into the cache instance the call's ``put`` named;
    ``ref_missed``: the input named by the call's ``ref`` was not in that cache instance (it was sent);
    ``hit``: None unless the call probed the cache (``probe``), else whether ``data`` is the cached result.
    """

    data: bytes
    content_type: str
    info: dict
    worker: str
    attempts: int
    elapsed: float
    queue: int | None = None
    stored: bool = False
    ref_missed: bool = False
    hit: bool | None = None


class _InflightView(Mapping):
    """``worker id -> in-flight count`` read straight from the LoadTable (what ``choose`` needs).

    The beaconed queue of a worker already holds the requests this front end
    had queued there when it was reported, so adding all of our in-flight
    count on top would count them twice and send everyone away from a worker
    the moment it is known (a newly spawned one: herding).  ``choose`` scores
    ``(queue + extra + 1) * cost``; the extra given here is the part of our
    in-flight count the beacon cannot hold yet, ``max(0, inflight - queue)``,
    so the score's queue is ``max(beaconed queue, our in-flight)``.
    """

    __slots__ = ("_table", "_num", "_queued")

    def __init__(self, table: LoadTable, num: dict[str, int], queued: dict[str, float] | None = None):
        self._table = table
        self._num = num
        self._queued = queued if queued is not None else {}

    def _extra(self, key, n) -> int:
        own = self._table.inflight(n)
        return max(0, own - int(self._queued.get(key, 0)))

    def get(self, key, default=0):
        n = self._num.get(key)
        return default if n is None else self._extra(key, n)

    def __getitem__(self, key):
        return self._extra(key, self._num[key])

    def __iter__(self):
        return iter(self._num)

    def __len__(self):
        return len(self._num)


class TaskClient:
    """Dispatches TASKs of service ``svc`` to the workers of the latest beacon.

    ``timeout`` is the default per-attempt timeout, ``deadline`` the default
    budget of a whole call (all attempts; default ``timeout * attempts``),
    ``attempts`` the most workers tried per call.  ``max_queue`` (None: no
    bound) is the load (beaconed queue + own in-flight) at which a worker
    counts as full; when every candidate is full the call fails at once with
    :class:`NoWorkerAvailable` code ``saturated``, so the front end can answer
    approximately instead of queueing.
    """

    def __init__(self, plane: DataPlane, beacons: BeaconClient, *, timeout: float = 2.0,
                 deadline: float | None = None, attempts: int = 3, max_queue: int | None = None,
                 method: str = P2C, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic):  # fmt: skip
        if timeout <= 0 or attempts < 1:
            raise ValueError("timeout must be > 0 and attempts >= 1")
        self.svc = beacons.svc
        self._plane = plane
        self._beacons = beacons
        self._timeout = float(timeout)
        self._deadline = float(deadline) if deadline is not None else self._timeout * attempts
        self._attempts = int(attempts)
        self._max_queue = max_queue
        self._method = method
        self._rng = rng or random.Random()
        self._clock = clock
        self._table = LoadTable()
        self._num: dict[str, int] = {}  # instance id -> LoadTable key (u32, never reused)
        self._next_num = itertools.count(1)
        self._queued: dict[str, float] = {}  # worker id -> beaconed queue (see _InflightView)
        self._inflight = _InflightView(self._table, self._num, self._queued)
        self._rows: dict[str, WorkerRow] = {}
        self._groups: dict[tuple, list[WorkerLoad]] = {}
        self._fast: dict[tuple, list[tuple]] = {}  # (kind, name) -> (id, queue, cost, LoadTable key) per worker
        self._by_ref: set[str] = set()  # data endpoints whose stub takes inputs by reference (it said "stored")
        self._c = dict.fromkeys(("calls", "ok", "failed", "errors", "attempts", "redispatched", "timeouts",
                                 "no_workers", "saturated", "unreachable", "bad_replies", "by_ref", NO_INPUT,
                                 NO_SUCH_WORKER, OVERLOADED, DEADLINE, WORKER_CRASHED), 0)  # fmt: skip
        beacons.add_listener(self._on_beacon)

    # -- the load table --------------------------------------------------------
    def _on_beacon(self, beacon: Beacon) -> None:
        rows = {w.id: w for w in beacon.workers}
        for wid in list(self._num):
            if wid not in rows:
                self._table.remove(self._num.pop(wid))
        for wid, row in rows.items():
            n = self._num.get(wid)
            if n is None:
                n = self._num[wid] = next(self._next_num) & 0xFFFFFFFF
                self._table.add(n)
            self._table.report(n, min(int(round(row.q)), 0xFFFFFFFF))
        self._rows = rows
        self._queued.clear()
        self._queued.update((wid, row.q) for wid, row in rows.items())
        self._groups.clear()
        self._fast.clear()
        self._plane.retain(beacon.endpoints())

    def _group(self, kind: str | None, name: str | None) -> list[WorkerLoad]:
        key = (kind, name)
        group = self._groups.get(key)
        if group is None:
            rows = [r for r in self._rows.values() if (r.w == name if name else kind is None or r.kind == kind)]
            # A worker without a measured cost is assumed as costly as the median one.
            known = [r.cost for r in rows if r.cost > 0]
            default = _stats.median(known) if known else 1.0
            group = self._groups[key] = [WorkerLoad(r.id, r.q, r.cost if r.cost > 0 else default) for r in rows]
        return group

    def workers(self, kind: str | None = None, name: str | None = None) -> list[WorkerRow]:
        """Rows of the latest beacon of this kind (or worker name)."""
        return [self._rows[w.worker] for w in self._group(kind, name)]

    def inflight(self, worker_id: str) -> int:
        """Requests this client sent to ``worker_id`` and has not seen answered (nor given up on)."""
        n = self._num.get(worker_id)
        return 0 if n is None else self._table.inflight(n)

    def load(self, worker_id: str) -> int:
        """Beaconed queue plus own in-flight count (0 for an unknown worker)."""
        n = self._num.get(worker_id)
        return 0 if n is None else self._table.load(n)

    def _p2c(self, kind: str | None, name: str | None) -> str | None:
        """:func:`manager.lbpolicy.choose`'s p2c without exclusions, on precomputed rows (the hot path).

        The same decision: two distinct workers drawn at random, the lower
        ``(queue + extra in-flight + 1) * cost`` wins (ties to the first
        drawn), with the extra in-flight count of :class:`_InflightView`.
        None when the group has fewer than two workers.
        """
        key = (kind, name)
        rows = self._fast.get(key)
        if rows is None:
            rows = self._fast[key] = [(w.worker, w.queue, w.cost, self._num[w.worker])
                                      for w in self._group(kind, name)]  # fmt: skip
        n = len(rows)
        if n < 2:
            return None
        k = int(self._rng.random() * (n * (n - 1)))  # one draw: an ordered pair of distinct workers
        i, j = divmod(k, n - 1)
        a, b = rows[i], rows[j + (j >= i)]
        inflight = self._table.inflight
        sa = (a[1] + max(0, inflight(a[3]) - int(a[1])) + 1.0) * a[2]
        sb = (b[1] + max(0, inflight(b[3]) - int(b[1])) + 1.0) * b[2]
        return b[0] if sb < sa else a[0]

    def pick(self, kind: str | None = TRANSFORMATION, name: str | None = None,
             exclude: Iterable[str] = ()) -> WorkerRow:  # fmt: skip
        """Choose a worker: p2c over the group, skipping ``exclude`` and workers at ``max_queue``."""
        exclude = tuple(exclude)
        fast = self._p2c(kind, name) if not exclude and self._method == P2C else None
        if fast is not None and (self._max_queue is None or self.load(fast) < self._max_queue):
            return self._rows[fast]
        group = self._group(kind, name)
        try:
            choice = choose(group, self._inflight, self._rng, method=self._method, exclude=exclude)
            if self._max_queue is not None and self.load(choice.worker) >= self._max_queue:
                # The sampled pair is full; is anyone below the bound?
                banned = set(exclude)
                room = [w for w in group if w.worker not in banned and self.load(w.worker) < self._max_queue]
                if not room:
                    self._c["saturated"] += 1
                    raise NoWorkerAvailable(f"every {name or kind} worker of {self.svc} has {self._max_queue} or more "
                                            "requests queued", SATURATED, exclude)  # fmt: skip
                choice = choose(room, self._inflight, self._rng, method=self._method)
        except NoWorkers:
            self._c["no_workers"] += 1
            what = f"{name or kind or 'any'} worker of {self.svc}"
            why = " not tried yet" if exclude else (" (no beacon yet)" if self._beacons.latest is None else "")
            raise NoWorkerAvailable(f"no {what}{why}", NO_WORKERS, exclude) from None
        return self._rows[choice.worker]

    def local_to(self, endpoint: str, kind: str | None = TRANSFORMATION, name: str | None = None) -> bool:
        """Whether every worker of the class runs on the node at ``endpoint``, whose stub takes inputs by
        reference and probes the cache: a call with ``put`` there can then skip the cache lookup before it."""
        group = self._group(kind, name)
        return bool(group) and endpoint in self._by_ref and all(self._rows[w.worker].data == endpoint for w in group)

    def _dispatched(self, worker_id: str) -> Callable[[], None]:
        n = self._num[worker_id]
        self._table.dispatched(n)

        def settle() -> None:
            if n in self._table:  # the worker may have left the beacon meanwhile
                self._table.completed(n)

        return settle

    # -- calls -----------------------------------------------------------------
    async def call(self, inputs: Sequence[bytes], params: Mapping[str, Any] | None = None, *,
                   kind: str | None = TRANSFORMATION, name: str | None = None, timeout: float | None = None,
                   deadline: float | None = None, attempts: int | None = None,
                   put: Mapping[str, Any] | None = None, ref: Mapping[str, Any] | None = None,
                   probe: bool = False) -> TaskResult:  # fmt: skip
        """Run one task on a worker of ``kind`` (or named ``name``) and return its result.

        ``inputs`` become the TASK's extra frames, ``params`` its ``p``.
        ``put`` (``{w: cache instance id, k: key, data: its node's data
        endpoint, meta?}``) asks a worker on that same node to write the
        result into that cache instance before answering (the TASK's ``put``,
        docs/services.md); the result says whether it did (``stored``).
        ``ref`` (same keys) names where the single input is cached: a worker
        on that node whose stub takes inputs by reference (it said
        ``stored`` once) gets the name instead of the bytes, and the bytes
        only if it answers ``no_input``.  With ``probe``, such a worker's
        stub answers from ``put``'s cache instance when the result is already
        there (``hit``), without running anything; see :meth:`local_to`.
        Each attempt waits at most ``timeout`` (and what is left of
        ``deadline``); the next goes to a worker not tried yet.  Raises
        :class:`TaskFailed` (final), or when no attempt succeeded in the
        budget: :class:`TaskTimeout` if any attempt timed out, else
        :class:`TaskRejected`, or :class:`NoWorkerAvailable` if no worker
        could be tried at all.
        """
        timeout = self._timeout if timeout is None else timeout
        attempts = self._attempts if attempts is None else attempts
        start = self._clock()
        end = start + (self._deadline if deadline is None else deadline)
        params = dict(params or {})
        self._c["calls"] += 1
        tried: list[str] = []
        errors: list[DispatchError] = []
        while len(tried) < attempts:
            left = end - self._clock()
            if left <= 0:
                break
            try:
                row = self.pick(kind, name, tried)
            except NoWorkerAvailable:
                if not errors:
                    self._c["errors"] += 1
                    raise
                break
            if tried:
                self._c["redispatched"] += 1
            tried.append(row.id)
            self._c["attempts"] += 1
            wait = min(timeout, left)
            body = {"svc": self.svc, "w": row.id, "p": params, "dl": round(wait, 3)}
            if put is not None and put.get("data") == row.data:
                body["put"] = {"w": put["w"], "k": put["k"], "meta": put.get("meta") or {}}
                if probe and row.data in self._by_ref:
                    body["probe"] = True
            by_ref = ref is not None and len(inputs) == 1 and ref.get("data") == row.data and row.data in self._by_ref
            if by_ref:
                self._c["by_ref"] += 1
                body["in"] = [{"w": ref["w"], "k": ref["k"]}]
            try:
                reply, extra = await self._plane.request(row.data, body, () if by_ref else inputs, timeout=wait,
                                                         on_settle=self._dispatched(row.id))  # fmt: skip
                if by_ref and reply.get("code") == NO_INPUT and reply.get("ok") is False:
                    # Evicted there (or the ring moved it): the same worker, with the bytes this time.
                    self._c[NO_INPUT] += 1
                    del body["in"]
                    body["dl"] = round(max(min(timeout, end - self._clock()), 0.001), 3)
                    reply, extra = await self._plane.request(row.data, body, inputs, timeout=body["dl"],
                                                             on_settle=self._dispatched(row.id))  # fmt: skip
            except Unreachable as e:
                self._c["unreachable"] += 1
                errors.append(TaskRejected(f"{row.id}: {e}", UNREACHABLE))
                continue
            except TimeoutError:
                self._c["timeouts"] += 1
                errors.append(TaskTimeout(f"{row.id} did not answer within {wait:.2f}s", TIMEOUT))
                continue
            if reply.get("ok") is True and len(extra) == 1:
                self._c["ok"] += 1
                q = reply.get("q")
                info = reply.get("info")
                stored = "put" in body and reply.get("stored") is True
                if stored:
                    self._by_ref.add(row.data)  # a stub that stores results takes inputs by reference too
                return TaskResult(bytes(extra[0]), str(reply.get("ct") or "application/octet-stream"),
                                  info if isinstance(info, dict) else {}, row.id, len(tried),
                                  self._clock() - start, q if isinstance(q, int) else None, stored,
                                  by_ref and "in" not in body,
                                  (reply.get("hit") is True) if "probe" in body else None)  # fmt: skip
            code = reply.get("code") if reply.get("ok") is False else BAD_REPLY
            err = str(reply.get("err") or code)
            if code == FAILED:
                self._c["failed"] += 1
                raise TaskFailed(f"worker {row.id} failed: {err}", err, tried)
            if code not in RETRY_CODES:
                code = BAD_REPLY
            self._c["bad_replies" if code == BAD_REPLY else code] += 1
            errors.append(TaskRejected(f"{row.id}: {code}: {err}", code))
        self._c["errors"] += 1
        raise self._final(errors, tried, kind, name, self._clock() - start)

    def _final(self, errors: list[DispatchError], tried: list[str], kind, name, took: float) -> DispatchError:
        what = f"{name or kind or 'any'} task of {self.svc}"
        detail = "; ".join(str(e) for e in errors) or "no time left"
        if not errors or any(isinstance(e, TaskTimeout) for e in errors):
            return TaskTimeout(f"{what} not answered after {took:.2f}s and {len(tried)} attempt(s): {detail}",
                               TIMEOUT, tried)  # fmt: skip
        return TaskRejected(f"{what} refused by {len(tried)} worker(s): {detail}", errors[-1].code, tried)

    def statistics(self) -> Mapping[str, Any]:
        """Frozen counters plus the current in-flight count per worker."""
        inflight = {wid: self._table.inflight(n) for wid, n in self._num.items()}
        return MappingProxyType({**self._c, "workers": len(self._rows), "inflight": inflight})
