"""The front end's control plane: a service's load beacons, from the manager.

:class:`BeaconClient` keeps one DEALER to the manager's control endpoint.  It
sends ``CTL_REQUEST {"cmd": "svc_subscribe", "args": {"svc"}}`` at once and
every ``renew`` seconds (2 s; the manager drops a subscriber after 5 s without
renewal) and receives the ``BEACON`` bodies the manager pushes
(docs/services.md).  The latest beacon is soft state: after ``stale_after``
seconds (3 s) without one the table is *kept* but marked stale, so a front
end keeps serving with the last load table while the manager restarts.  A
connection that stayed silent for two renewal periods is reopened, which
drops subscriptions parked for a dead manager and restarts libzmq's reconnect
backoff.

A :class:`Beacon` is one load table as it arrived: a :class:`WorkerRow` per
worker instance (its kind, :data:`TRANSFORMATION` or :data:`AGGREGATION`) and
a :class:`CacheRow` per cache instance; rows missing an id or a data endpoint
are skipped and counted.  Its readers are :class:`frontends.dispatch.TaskClient`,
:class:`frontends.cacheclient.CacheClient` and :class:`frontends.peers.ManagerWatch`.

The client has an explicit lifecycle (no I/O in ``__init__``; the caller owns
the ``SocketFactory`` and the running ``PlaneLoop``) and keeps counters
exposed as a frozen ``statistics()`` snapshot.  Tested in
tests/frontends/test_dispatch.py against a real-socket peer
(tests/frontends/taskpeer.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

import zmq

from bus import protocol
from bus.planes import Plane, PlaneLoop, SocketFactory
from bus.protocol import MsgType

__all__ = ["TRANSFORMATION", "AGGREGATION", "WorkerRow", "CacheRow", "Beacon", "BeaconClient"]

log = logging.getLogger(__name__)

# Worker kinds (a beacon row's ``kind``).
TRANSFORMATION = "transformation"
AGGREGATION = "aggregation"


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
    r: float | None = None  # queued + running at the stub's last report, not smoothed (None: an older manager)
    by: tuple = ()  # ((sender identity hex, requests), ...) of those, per front-end connection


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
                                         _num(row.get("q")), _num(row.get("cost")),
                                         _num(row["r"]) if "r" in row else None, _senders(row.get("by"))))  # fmt: skip
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


def _senders(value) -> tuple:
    if not isinstance(value, dict):
        return ()
    return tuple((k, v) for k, v in list(value.items())[:16] if isinstance(k, str) and isinstance(v, int))


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
