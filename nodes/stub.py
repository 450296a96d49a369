"""The worker stub: TACC worker instances and cache instances of one logical node.

SNS (Fox et al., SOSP '97, section 3.1) puts a *worker stub* beside each
worker: it queues the requests the front ends send, reports the queue length
to the manager and hides the worker's failures.  :class:`WorkerStub` is that
stub for every instance a logical node hosts (``docs/services.md`` has the
contracts):

* **Worker instances.**  One OS process each (``python -m nodes.worker``)
  running a registered callable, one request at a time, fed from a bounded
  FIFO queue.  :mod:`nodes.instance` runs them: the pipe, the requests
  written ahead, the restarts after a crash, and the answers ``deadline``,
  ``failed`` and ``worker_crashed``.  The stub checks each TASK and queues
  it; a request that finds the queue full is answered ``overloaded``.
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

from bus import protocol as p
from bus.planes import PlaneError
from bus.protocol import DEADLINE, FAILED, NO_INPUT, NO_SUCH_WORKER, OVERLOADED  # TASK_REPLY codes
from bus.protocol import TASK_CODES as CODES
from nodes.cachestore import CacheError, CacheStore
from nodes.instance import COST_ALPHA, _error, _Instance, _Request
from nodes.worker import KINDS, tune_allocator

__all__ = ["WorkerStub", "SVC_HANDLERS"]

log = logging.getLogger(__name__)

CACHE_KIND = "cache"
START_TIMEOUT = 30.0  # seconds for a worker process to import its callable and say ready
REAP_GRACE = 30.0  # default seconds a reaped instance gets to finish its queue
MAX_PUT_PEERS = 32  # data DEALERs kept open to other nodes' cache instances
PUT_BACKLOG = 64  # results waiting per peer for its DEALER to connect or drain
PUT_PATIENCE, PUT_RETRY = 2.0, 0.005  # seconds a result may wait to leave, and between tries
# Replies to one front end that meet its HWM on the data ROUTER wait here: at most PARK_LIMIT per peer,
# PARK_PATIENCE seconds each, retried every PARK_RETRY seconds.
PARK_LIMIT, PARK_PATIENCE, PARK_RETRY = 4096, 10.0, 0.001

_STAGE = r"(?:entrypoint:[\w.-]+|[A-Za-z_][\w.]*:[A-Za-z_][\w.]*)"
_CALLABLE = re.compile(rf"^{_STAGE}(\s*\|\s*{_STAGE})*$")  # module:function, entrypoint:NAME, a | b


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
            "cost": self.cost, "done": self.done, "failed": self.failed, "crashes": 0, "cache": True, "by": {},
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
