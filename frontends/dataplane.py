"""The front end's data plane: TASKs to nodes' data endpoints, TASK_REPLYs matched back.

:class:`DataPlane` keeps one DEALER per node data endpoint named in the
beacon, opened when the endpoint first appears (so it is connected before the
first request) and closed once the endpoint has been out of the beacon, with
nothing in flight, for ``idle_close`` seconds.  :meth:`DataPlane.request`
sends one ``TASK``, gives it a fresh ``rid`` and resolves the matching
``TASK_REPLY`` (any socket, any order).  A reply that arrives after its
timeout is still matched for ``late_grace`` seconds so the sender's in-flight
count stays true.  It carries the tasks of :class:`frontends.dispatch.TaskClient`
and the cache operations of :class:`frontends.cacheclient.CacheClient`.

It also owns :class:`DispatchError`, the base of every error of a task (the
rest are in :mod:`frontends.dispatch`), and :class:`Unreachable` (code
``unreachable``), which a request raises when it cannot be sent.

The plane has an explicit lifecycle (no I/O in ``__init__``; the caller owns
the ``SocketFactory`` and the running ``PlaneLoop``) and keeps counters
exposed as a frozen ``statistics()`` snapshot.  Tested in
tests/frontends/test_dispatch.py against a real-socket peer
(tests/frontends/taskpeer.py).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import time
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence

import zmq

from bus import protocol
from bus.planes import Plane, PlaneLoop, SocketFactory
from bus.protocol import BusError, MsgType
from frontends.beacon import _identity

__all__ = ["UNREACHABLE", "DispatchError", "Unreachable", "DataPlane"]

# The code of :class:`Unreachable` (see :data:`frontends.dispatch.RETRY_CODES`).
UNREACHABLE = "unreachable"


class DispatchError(BusError):
    """A task could not be answered by a worker; ``code`` names why, ``tried`` lists instance ids."""

    def __init__(self, message: str, code: str, tried: Sequence[str] = ()):
        super().__init__(message)
        self.code = code
        self.tried = tuple(tried)


class Unreachable(DispatchError, ConnectionError):
    """No connection to a node's data endpoint within the connect timeout, or its queue is full."""


class _Conn:
    __slots__ = ("sock", "endpoint", "identity", "pending", "unlisted_since")

    def __init__(self, sock: zmq.Socket, endpoint: str, identity: bytes):
        self.sock = sock
        self.endpoint = endpoint
        self.identity = identity.hex()  # as the stub names this connection in its load reports
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
            ident = _identity("data")
            sock = self._factory.data_dealer(endpoint, ident)
            conn = _Conn(sock, endpoint, ident)
            self._loop.add(sock, Plane.DATA, lambda batch: self._on_batch(conn, batch), name=endpoint)
            self._conns[endpoint] = conn
            self._c["opened"] += 1
        return conn

    def identity(self, endpoint: str) -> str | None:
        """The hex identity of our connection to ``endpoint``, as a stub's load report names it (None: none)."""
        conn = self._conns.get(endpoint)
        return None if conn is None else conn.identity

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
