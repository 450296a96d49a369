"""The front end's dispatch: tasks out to the workers of the latest beacon, replies back.

:class:`TaskClient` picks a worker with :func:`manager.lbpolicy.choose`
(power of two choices on ``(queue + own in-flight + 1) * cost``) over the
latest beacon, keeping its own in-flight counts in the fast path's
:class:`~core.fastpath.LoadTable`, and re-dispatches to a worker not tried
yet on a timeout, an unreachable node or a reply coded ``worker_crashed``,
``no_such_worker``, ``overloaded`` or ``deadline``, within one overall
deadline.  ``failed`` (the callable raised) is final: the same input would
fail anywhere.  It reads beacons from a
:class:`~frontends.beacon.BeaconClient` (control plane) and sends over a
:class:`~frontends.dataplane.DataPlane` (data plane); :mod:`frontends.server`
(and tests) wire the three together.

Here too: the worker stub's ``TASK_REPLY`` codes, the codes of the errors a
call raises, and those errors, all :class:`~frontends.dataplane.DispatchError`
subclasses (the base and :class:`~frontends.dataplane.Unreachable` live with
the data plane, which raises the latter).

The client has an explicit lifecycle (no I/O in ``__init__``) and keeps
counters exposed as a frozen ``statistics()`` snapshot.  Tested in
tests/frontends/test_dispatch.py against a real-socket peer
(tests/frontends/taskpeer.py).
"""

from __future__ import annotations

import itertools
import random
import statistics as _stats
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Sequence

from bus.protocol import DEADLINE, FAILED, NO_INPUT, NO_SUCH_WORKER, OVERLOADED, WORKER_CRASHED  # TASK_REPLY codes
from core.errors import NoWorkers
from core.fastpath import LoadTable
from frontends.beacon import TRANSFORMATION, Beacon, BeaconClient, WorkerRow
from frontends.dataplane import UNREACHABLE, DataPlane, DispatchError, Unreachable
from manager.lbpolicy import P2C, WorkerLoad, choose

__all__ = [
    "NO_SUCH_WORKER", "OVERLOADED", "DEADLINE", "WORKER_CRASHED", "FAILED", "NO_INPUT", "TIMEOUT", "BAD_REPLY",
    "NO_WORKERS", "SATURATED", "RETRY_CODES", "NoWorkerAvailable", "TaskTimeout", "TaskRejected", "TaskFailed",
    "TaskResult", "TaskClient",
]  # fmt: skip

# Codes this module gives its own errors (and UNREACHABLE, which frontends.dataplane gives Unreachable).
TIMEOUT = "timeout"
BAD_REPLY = "bad_reply"
NO_WORKERS = "no_workers"
SATURATED = "saturated"

#: Reply codes after which another worker may well succeed.
RETRY_CODES = frozenset({NO_SUCH_WORKER, OVERLOADED, DEADLINE, WORKER_CRASHED, UNREACHABLE, BAD_REPLY})


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

    ``choose`` scores ``(queue + in-flight + 1) * cost``.  The queue it is given
    (the group's ``WorkerLoad.queue``, set by ``TaskClient._on_beacon``) is the
    others' share of the worker's load: the stub's last report (``r``) less the
    requests it named as ours (``by``, per front-end connection).  Our own share
    is then counted here, live and exactly: a worker we are draining looks lighter
    at once rather than at the next beacon, and a new worker is not counted twice
    for the requests we already sent it (no herding away from it).  A beacon from
    a manager that sends no ``r`` gives its smoothed queue less our in-flight count.
    """

    __slots__ = ("_table", "_num")

    def __init__(self, table: LoadTable, num: dict[str, int]):
        self._table = table
        self._num = num

    def _extra(self, key, n) -> int:
        return self._table.inflight(n)

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
        self._others: dict[str, float] = {}  # worker id -> the others' share of its load (see _InflightView)
        self._inflight = _InflightView(self._table, self._num)
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
            if row.r is not None:
                mine = dict(row.by).get(self._plane.identity(row.data), 0) if row.by else 0
                others = max(0.0, row.r - mine)
            else:
                others = max(0.0, row.q - self._table.inflight(n))
            self._others[wid] = others
            self._table.report(n, min(int(round(others)), 0xFFFFFFFF))
        self._rows = rows
        for wid in [w for w in self._others if w not in rows]:
            del self._others[wid]
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
            group = self._groups[key] = [WorkerLoad(r.id, self._others.get(r.id, r.q), r.cost if r.cost > 0 else default)
                                         for r in rows]  # fmt: skip
        return group

    def workers(self, kind: str | None = None, name: str | None = None) -> list[WorkerRow]:
        """Rows of the latest beacon of this kind (or worker name)."""
        return [self._rows[w.worker] for w in self._group(kind, name)]

    def inflight(self, worker_id: str) -> int:
        """Requests this client sent to ``worker_id`` and has not seen answered (nor given up on)."""
        n = self._num.get(worker_id)
        return 0 if n is None else self._table.inflight(n)

    def load(self, worker_id: str) -> int:
        """The others' share of the worker's load plus our own in-flight count, now (0 for an unknown worker)."""
        n = self._num.get(worker_id)
        return 0 if n is None else self._table.load(n)

    def _p2c(self, kind: str | None, name: str | None) -> str | None:
        """:func:`manager.lbpolicy.choose`'s p2c without exclusions, on precomputed rows (the hot path).

        The same decision: two distinct workers drawn at random, the lower
        ``(others' queue + our in-flight + 1) * cost`` wins (ties to the first
        drawn), as :class:`_InflightView` explains.
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
        sa = (a[1] + inflight(a[3]) + 1.0) * a[2]
        sb = (b[1] + inflight(b[3]) + 1.0) * b[2]
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
