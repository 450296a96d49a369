"""Counters of the PlaneLoop: frozen statistics snapshots and the log-line rate limiter."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

from bus.protocol import ErrorCode, Plane

__all__ = ["PlaneStatistics", "LoopStatistics"]


@dataclass(frozen=True)
class PlaneStatistics:
    """Counters of one plane, summed over its sockets (a snapshot)."""

    messages: int  #: valid messages handed to handlers
    batches: int  #: non-empty drains
    max_batch: int  #: largest drain, in messages
    dropped: Mapping[ErrorCode, int]  #: invalid messages dropped, per code
    handler_errors: int  #: handler calls that raised
    sent: int  #: messages accepted by libzmq through ``send``
    send_eagain: int  #: sends that met a full queue (HWM) or no connected peer
    send_queued: int  #: control messages parked on the pending queue
    send_dropped: int  #: control messages dropped: pending queue full or peer gone
    unreachable: int  #: sends to a ROUTER peer that is not connected

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def as_dict(self) -> dict:
        """Plain, msgpack/JSON-ready dict (``dropped`` keyed by code name)."""
        out = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "dropped"}
        out["dropped"] = {code.name: n for code, n in self.dropped.items()}
        return out


@dataclass(frozen=True)
class LoopStatistics:
    """A frozen snapshot of a :class:`PlaneLoop`'s counters."""

    control: PlaneStatistics
    data: PlaneStatistics
    sockets: int  #: registered sockets
    pending: int  #: control messages waiting for a writable socket
    wakeups: int  #: times the loop served its ready sockets

    def plane(self, plane: Plane) -> PlaneStatistics:
        return self.data if Plane(plane) is Plane.DATA else self.control

    def as_dict(self) -> dict:
        """Plain, msgpack/JSON-ready dict, for the monitor and for replies."""
        return {"control": self.control.as_dict(), "data": self.data.as_dict(), "sockets": self.sockets,
                "pending": self.pending, "wakeups": self.wakeups}  # fmt: skip


class _Counters:
    __slots__ = ("messages", "batches", "max_batch", "dropped", "handler_errors",
                 "sent", "send_eagain", "send_queued", "send_dropped", "unreachable")  # fmt: skip

    def __init__(self):
        self.messages = self.batches = self.max_batch = self.handler_errors = 0
        self.sent = self.send_eagain = self.send_queued = self.send_dropped = self.unreachable = 0
        self.dropped = dict.fromkeys(ErrorCode, 0)

    def snapshot(self) -> PlaneStatistics:
        values = {f: getattr(self, f) for f in self.__slots__}
        values["dropped"] = MappingProxyType(dict(self.dropped))
        return PlaneStatistics(**values)


class _LogLimiter:
    """At most one log line per key per ``interval`` seconds; counts the rest."""

    def __init__(self, interval: float, clock: Callable[[], float], cap: int = 4096):
        self._interval = interval
        self._clock = clock
        self._cap = cap
        self._last: dict = {}  # key -> [time of last line, suppressed since]

    def allow(self, key) -> int | None:
        """None to stay quiet, else how many lines were suppressed before this one."""
        now = self._clock()
        slot = self._last.get(key)
        if slot is not None and now - slot[0] < self._interval:
            slot[1] += 1
            return None
        if slot is None and len(self._last) >= self._cap:
            # A peer cycling identities must not grow this without bound.
            self._last = {k: v for k, v in self._last.items() if now - v[0] < self._interval}
            if len(self._last) >= self._cap:
                self._last.clear()
        suppressed = slot[1] if slot is not None else 0
        self._last[key] = [now, 0]
        return suppressed


