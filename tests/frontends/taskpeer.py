"""A test peer playing the manager and the worker stubs of docs/services.md, on real sockets.

* Control: a ROUTER that answers ``CTL_REQUEST svc_subscribe`` with a
  ``CTL_REPLY`` and pushes a ``BEACON`` to every live subscriber every
  ``beacon_interval`` seconds (a subscriber is dropped 5 s after its last
  renewal, as the manager does).
* Data: one ROUTER per simulated node.  A ``TASK`` for a worker instance is
  answered by its behaviour: after ``delay`` seconds, with an error ``code``
  (``worker_crashed``, ``overloaded``, ...), never (``silent``), or by running
  ``handler`` in a thread (e.g. ``examples.transend.distill.distill_worker``,
  so results are real bytes); the default handler echoes the first input.
  A ``TASK`` for a cache instance runs get/put/del on a real
  :class:`nodes.cachestore.CacheStore`.

By default a node is an *older stub* (docs/services.md): it ignores a TASK's
``put``, ``probe`` and ``in``, never answers ``stored``, so a front end keeps
putting results itself and sending the input bytes.  ``TaskPeer(stub_cache=True)``
makes every node behave like the real stub (nodes/stub.py, nodes/instance.py)
toward the cache instances it hosts:

* ``put: {w, k, meta?}`` naming a cache instance *of the worker's node*: after
  a successful run the result is stored there (meta plus ``content_type``)
  before the answer, which then says ``stored: true``; a ``put`` naming a
  cache instance of another node (with its ``data`` endpoint) is written
  after the answer, best effort, and the answer has no ``stored``; a ``put``
  that is not a map with string ``w`` and ``k`` is a bad task (``failed``).
* ``probe: true`` with a ``put``: if the result is already in that cache
  instance of this node, it is answered from there at once with ``hit: true``
  (``ct`` from the entry's metadata, ``info: {}``) whatever the behaviour;
  nothing runs.
* ``in: [{w, k}, ...]`` and no input frame: the inputs are read from those
  cache instances of this node; one that is not there is answered at once
  ``ok: false, code: no_input``; a malformed ``in`` is a bad task (``failed``).

Every TASK body a worker instance receives is kept in ``_Worker.tasks`` (with
its input frame count), every handler run is counted in ``_Worker.ran``, the
cache operations front ends send are logged in ``TaskPeer.cache_ops`` and the
results a node stored itself in ``TaskPeer.stub_writes``.

Beacon rows carry each worker's real queue (tasks received and not answered
yet), as ``q`` and ``r``, with its share per sender connection (``by``), as the
manager passes on the stubs' reports, unless a test pins ``q`` (then it is all
other front ends' load).  Everything runs on the caller's asyncio loop;
``async with TaskPeer() as peer`` closes every socket and the context.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import zmq

from bus import protocol
from bus.planes import PeerUnreachable, Plane, PlaneLoop, SocketFactory, endpoint_of
from bus.protocol import MAX_EXTRA, NO_INPUT, MsgType
from nodes.cachestore import CacheError, CacheStore, EntryTooLarge

__all__ = ["TaskPeer", "Behaviour", "echo", "transend_stack"]

SUBSCRIPTION_TTL = 5.0


def echo(request: dict) -> dict:
    """A trivial transformation: the input back."""
    data = request.get("data") if "data" in request else b"".join(request.get("items") or ())
    return {"data": data, "content_type": "application/octet-stream", "info": {"echo": True}}


@dataclass
class Behaviour:
    """How one worker instance answers."""

    delay: float = 0.0
    code: str | None = None  # answer ok: false with this code
    silent: bool = False  # never answer
    handler: Callable[[dict], dict] = echo
    q: float | None = None  # pin the beaconed queue length
    cost: float = 0.01


@dataclass
class _Worker:
    id: str
    w: str
    kind: str
    node: str
    behaviour: Behaviour
    queued: int = 0
    by: dict = field(default_factory=dict)  # sender identity (hex) -> its TASKs received and not answered
    received: list = field(default_factory=list)  # rids
    answered: int = 0
    tasks: list = field(default_factory=list)  # (TASK body, number of input frames), in arrival order
    ran: int = 0  # handler runs (a probe hit or a no_input answer runs nothing)


class TaskPeer:
    """The fake manager + stubs; ``control_endpoint`` is what a front end subscribes to."""

    def __init__(self, svc: str = "transend", *, beacon_interval: float = 0.1, stub_cache: bool = False):
        self.svc = svc
        self.beacon_interval = beacon_interval
        self.stub_cache = stub_cache  # nodes honour put/probe/in as the real stub does (module docstring)
        self.cache_ops: list[tuple[str, str, str]] = []  # (cache id, op, key) sent by front ends
        self.stub_writes: list[tuple[str, str, bool]] = []  # (cache id, key, on the worker's own node)
        self.beaconing = True  # False: subscriptions are answered, no BEACON is pushed
        self.answer_subscribe = True
        self.subscribes = 0
        self.beacons_sent = 0
        self.seq = 0
        self.workers: dict[str, _Worker] = {}
        self.caches: dict[str, tuple[str, CacheStore]] = {}
        self.nodes: dict[str, zmq.Socket] = {}
        self.endpoints: dict[str, str] = {}  # node -> data endpoint (kept after kill_node)
        self.subscribers: dict[bytes, float] = {}
        self._context: zmq.Context | None = None
        self._factory: SocketFactory | None = None
        self._loop: PlaneLoop | None = None
        self._control: zmq.Socket | None = None
        self._tasks: set[asyncio.Task] = set()
        self._n = 0

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        self._context = zmq.Context()
        self._factory = SocketFactory(self._context, linger=0)
        self._loop = PlaneLoop()
        await self._loop.start()
        self._control = self._factory.control_router("tcp://127.0.0.1:0")
        self._loop.add(self._control, Plane.CONTROL, self._on_control)
        self._spawn(self._beacon_forever())

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._loop is not None:
            await self._loop.stop()
        if self._factory is not None:
            self._factory.close(linger=0)
        if self._context is not None:
            self._context.term()
        self._context = None

    async def __aenter__(self) -> TaskPeer:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def control_endpoint(self) -> str:
        return endpoint_of(self._control)

    # -- the cluster -------------------------------------------------------------
    def add_node(self, name: str) -> str:
        """A node with its own data ROUTER; returns the data endpoint."""
        sock = self._factory.data_router("tcp://127.0.0.1:0")
        self._loop.add(sock, Plane.DATA, lambda batch: self._on_data(sock, batch))
        self.nodes[name] = sock
        self.endpoints[name] = endpoint_of(sock)
        return self.endpoints[name]

    def kill_node(self, name: str) -> None:
        """Close a node's data ROUTER; the beacon keeps listing its instances (as a stale manager would)."""
        sock = self.nodes.pop(name)
        self._loop.remove(sock)
        sock.close(0)

    def add_worker(self, node: str, w: str = "distill", kind: str = "transformation", **behaviour) -> str:
        """A worker instance on ``node``; returns its id (``svc/w@node#n``)."""
        if node not in self.endpoints:
            self.add_node(node)
        self._n += 1
        wid = f"{self.svc}/{w}@{node}#{self._n}"
        self.workers[wid] = _Worker(wid, w, kind, node, Behaviour(**behaviour))
        return wid

    def add_cache(self, node: str, max_bytes: int = 64 << 20) -> str:
        if node not in self.endpoints:
            self.add_node(node)
        self._n += 1
        cid = f"{self.svc}/cache@{node}#{self._n}"
        self.caches[cid] = (node, CacheStore(max_bytes))
        return cid

    def remove(self, instance: str) -> None:
        """Take a worker or cache out (later TASKs for it: no_such_worker)."""
        self.workers.pop(instance, None)
        self.caches.pop(instance, None)

    def set(self, wid: str, **behaviour) -> None:
        for key, value in behaviour.items():
            setattr(self.workers[wid].behaviour, key, value)

    def cache_store(self, cid: str) -> CacheStore:
        return self.caches[cid][1]

    def beacon(self) -> dict:
        """The BEACON body as the manager would send it now."""
        # A pinned ``q`` stands for other front ends' load: it is the raw load too, named as nobody's.
        workers = [{"id": w.id, "w": w.w, "kind": w.kind, "node": w.node, "data": self.endpoints[w.node],
                    "q": w.behaviour.q if w.behaviour.q is not None else w.queued, "cost": w.behaviour.cost,
                    "r": w.behaviour.q if w.behaviour.q is not None else w.queued,
                    "by": {} if w.behaviour.q is not None else dict(w.by)}
                   for w in self.workers.values()]  # fmt: skip
        caches = [{"id": cid, "node": node, "data": self.endpoints[node]}
                  for cid, (node, _) in self.caches.items()]  # fmt: skip
        self.seq += 1
        return {"svc": self.svc, "seq": self.seq, "workers": workers, "caches": caches}

    # -- control plane -------------------------------------------------------------
    async def _beacon_forever(self) -> None:
        while True:
            await asyncio.sleep(self.beacon_interval)
            now = time.monotonic()
            for ident, renewed in list(self.subscribers.items()):
                if now - renewed > SUBSCRIPTION_TTL:
                    del self.subscribers[ident]
            if self.beaconing and self.subscribers:
                frames = protocol.encode(MsgType.BEACON, self.beacon())
                for ident in list(self.subscribers):
                    try:
                        self._loop.send(self._control, [ident, *frames])
                        self.beacons_sent += 1
                    except PeerUnreachable:
                        del self.subscribers[ident]

    def _on_control(self, batch: list) -> None:
        for frames in batch:
            decoded = self._loop.decode(self._control, frames)
            if decoded is None:
                continue
            (ident,), msg = decoded
            if msg.header.type != MsgType.CTL_REQUEST:
                continue
            body = msg.body
            if body.get("cmd") == "svc_subscribe" and body.get("args", {}).get("svc") == self.svc:
                self.subscribes += 1
                if not self.answer_subscribe:
                    continue
                self.subscribers[ident] = time.monotonic()
                reply = {"ok": True, "result": {"svc": self.svc, "renew": 2.0}}
            else:
                reply = {"ok": False, "code": "UNKNOWN_SERVICE", "error": f"no service {body.get('args')}"}
            try:
                self._loop.send(self._control, [ident, *protocol.encode(MsgType.CTL_REPLY, reply,
                                                                        ref=msg.header.msg_id)])  # fmt: skip
            except PeerUnreachable:
                pass

    # -- data plane ----------------------------------------------------------------
    def _on_data(self, sock: zmq.Socket, batch: list) -> None:
        for frames in batch:
            decoded = self._loop.decode(sock, frames)
            if decoded is None or decoded[1].header.type != MsgType.TASK:
                continue
            (ident,), msg = decoded
            body = msg.body
            w = body.get("w")
            if w in self.caches:
                self._cache_op(sock, ident, body, msg.extra)
            elif w in self.workers:
                worker = self.workers[w]
                worker.received.append(body["rid"])
                worker.tasks.append((dict(body), len(msg.extra)))
                inputs = msg.extra
                if self.stub_cache:
                    inputs = self._stub_checks(sock, ident, worker, body, msg.extra)
                    if inputs is None:
                        continue  # answered by the stub itself: a probe hit, no_input or a bad task
                worker.queued += 1
                worker.by[ident.hex()] = worker.by.get(ident.hex(), 0) + 1
                self._spawn(self._run(sock, ident, worker, body, inputs))
            else:
                self._reply(sock, ident, {"rid": body.get("rid"), "ok": False, "code": "no_such_worker",
                                          "err": f"no worker {w} here", "q": 0})  # fmt: skip

    def _reply(self, sock, ident: bytes, body: dict, extra=()) -> None:
        try:
            self._loop.send(sock, [ident, *protocol.encode(MsgType.TASK_REPLY, body, extra=extra)])
        except (PeerUnreachable, ValueError):  # the front end left, or the node was killed
            pass

    # -- the real stub's put / probe / in (stub_cache) ---------------------------------
    def _local_cache(self, worker: _Worker, cid) -> CacheStore | None:
        """Cache instance ``cid`` if it is on ``worker``'s node (what the stub's ``_caches`` holds)."""
        found = self.caches.get(cid) if isinstance(cid, str) else None
        return found[1] if found is not None and found[0] == worker.node else None

    def _stub_checks(self, sock, ident: bytes, worker: _Worker, body: dict, extra: list) -> list | None:
        """What nodes/stub.py ``on_task`` does before queueing: the inputs to run on, or None if answered."""
        rid, put, refs = body.get("rid"), body.get("put"), body.get("in")
        q = worker.queued
        if body.get("probe") is True and isinstance(put, dict):
            store = self._local_cache(worker, put.get("w"))
            entry = store.get(put["k"]) if store is not None and isinstance(put.get("k"), str) else None
            if entry is not None:
                ct = entry.meta.get("content_type") or entry.meta.get("ct") or "application/octet-stream"
                self._reply(sock, ident, {"rid": rid, "ok": True, "ct": ct, "info": {}, "q": q, "hit": True},
                            [entry.data])  # fmt: skip
                return None
        inputs = list(extra) if refs is None else self._inputs(worker, refs, extra)
        if inputs is None:
            self._reply(sock, ident, {"rid": rid, "ok": False, "code": NO_INPUT,
                                      "err": f"an input of {worker.id} is not in the cache here", "q": q})  # fmt: skip
            return None
        problem = None
        if isinstance(inputs, str):
            problem = inputs
        elif put is not None and not (isinstance(put, dict) and isinstance(put.get("w"), str)
                                      and isinstance(put.get("k"), str)):  # fmt: skip
            problem = "'put' must be a map with the cache instance 'w' and the key 'k'"
        if problem is not None:
            self._reply(sock, ident, {"rid": rid, "ok": False, "code": "failed", "err": f"bad task: {problem}", "q": q})
            return None
        return inputs

    def _inputs(self, worker: _Worker, refs, extra: list) -> list | str | None:
        """The inputs named by ``in`` from the caches of ``worker``'s node; None if one is missing."""
        if extra or not isinstance(refs, list) or not 1 <= len(refs) <= MAX_EXTRA:
            return "'in' must list 1 to MAX_EXTRA inputs, and the TASK then carries no input frame"
        inputs = []
        for r in refs:
            if not (isinstance(r, dict) and isinstance(r.get("w"), str) and isinstance(r.get("k"), str)):
                return "each input of 'in' is a map with the cache instance 'w' and the key 'k'"
            store = self._local_cache(worker, r["w"])
            entry = store.get(r["k"]) if store is not None else None
            if entry is None:
                return None
            inputs.append(entry.data)
        return inputs

    def _stub_write(self, worker: _Worker, put: dict, data: bytes, ct, *, local: bool) -> bool:
        """Store a result as the stub's ``_cache_write`` does; True when stored in a cache of this node."""
        meta = dict(put.get("meta") or {}) if isinstance(put.get("meta"), dict) else {}
        if isinstance(ct, str):
            meta["content_type"] = ct
        if local:
            try:
                self._local_cache(worker, put["w"]).put(put["k"], data, meta)
            except (ValueError, TypeError, CacheError):
                return False
            self.stub_writes.append((put["w"], put["k"], True))
            return True
        # Another node's cache instance, through its data endpoint: after the answer, best effort.
        endpoint = put.get("data")
        target = self.caches.get(put["w"])
        if (isinstance(endpoint, str) and endpoint != self.endpoints[worker.node] and target is not None
                and self.endpoints.get(target[0]) == endpoint and target[0] in self.nodes):  # fmt: skip
            try:
                target[1].put(put["k"], data, meta)
                self.stub_writes.append((put["w"], put["k"], False))
            except (ValueError, TypeError, CacheError):
                pass
        return False

    def _cache_op(self, sock, ident: bytes, body: dict, extra: list) -> None:
        store = self.caches[body["w"]][1]
        op, key, rid = body.get("op"), body.get("k"), body.get("rid")
        self.cache_ops.append((body["w"], op, key))
        if op == "get":
            entry = store.get(key)
            if entry is None:
                self._reply(sock, ident, {"rid": rid, "ok": True, "hit": False, "meta": {}})
            else:
                self._reply(sock, ident, {"rid": rid, "ok": True, "hit": True, "meta": dict(entry.meta)}, [entry.data])
        elif op == "put":
            try:
                store.put(key, extra[0], body.get("meta") or {})
                self._reply(sock, ident, {"rid": rid, "ok": True, "hit": False, "meta": {}})
            except EntryTooLarge as e:
                self._reply(sock, ident, {"rid": rid, "ok": False, "code": "failed", "err": str(e)})
        elif op == "del":
            self._reply(sock, ident, {"rid": rid, "ok": True, "hit": store.delete(key), "meta": {}})

    async def _run(self, sock, ident: bytes, worker: _Worker, body: dict, extra: list) -> None:
        b = worker.behaviour
        put = body.get("put") if self.stub_cache else None
        try:
            if b.delay:
                await asyncio.sleep(b.delay)
            if b.silent:
                await asyncio.Event().wait()  # until the peer stops
            rid = body["rid"]
            if b.code is not None:
                reply, out = {"rid": rid, "ok": False, "code": b.code, "err": f"test peer: {b.code}"}, ()
            else:
                request: dict[str, Any] = {"params": body.get("p") or {}}
                if worker.kind == "aggregation":
                    request["items"] = list(extra)
                else:
                    request["data"] = extra[0] if extra else b""
                worker.ran += 1
                try:
                    result = await asyncio.to_thread(b.handler, request)
                    reply = {"rid": rid, "ok": True, "ct": result["content_type"], "info": result.get("info") or {}}
                    out = (result["data"],)
                except Exception as e:  # the callable raised: `failed`, as the stub answers
                    reply, out = {"rid": rid, "ok": False, "code": "failed", "err": f"{type(e).__name__}: {e}"}, ()
        finally:
            worker.queued -= 1
            left = worker.by.pop(ident.hex(), 1) - 1
            if left:
                worker.by[ident.hex()] = left
        worker.answered += 1
        reply["q"] = worker.queued
        local = put is not None and self._local_cache(worker, put["w"]) is not None
        if reply["ok"] and local and self._stub_write(worker, put, out[0], reply["ct"], local=True):
            reply["stored"] = True  # written here before the answer: a later get finds it
        self._reply(sock, ident, reply, out)
        if reply["ok"] and put is not None and not local:
            self._stub_write(worker, put, out[0], reply["ct"], local=False)  # another node, after the answer


@asynccontextmanager
async def transend_stack(images: Path, db: Path | None = None, *, workers: int = 2, sheet: bool = True,
                         cache: bool = True, behaviour: dict | None = None, stub_cache: bool = False,
                         cache_node: str = "n1", **config):  # fmt: skip
    """A whole TranSend service in this loop: origin + peer (distill workers, cache) + front end.

    Yields ``(client, frontend, peer, origin_url)``; ``client`` is an aiohttp
    TestClient on the front end.  Workers run the real Pillow distiller, on
    nodes n1..n<workers> (the sheet worker on n1); the cache instance is on
    ``cache_node``.  ``stub_cache``: the nodes honour ``put``/``probe``/``in``
    as the real stub does (:class:`TaskPeer`).
    """
    from aiohttp.test_utils import TestClient, TestServer

    from examples.transend.distill import contact_sheet_worker, distill_worker
    from examples.transend.origin import make_app
    from frontends.server import FrontEnd, FrontEndConfig

    async with TestServer(make_app(images), host="127.0.0.1") as origin, TaskPeer(stub_cache=stub_cache) as peer:
        origin_url = str(origin.make_url("")).rstrip("/")
        for i in range(workers):
            peer.add_worker(f"n{i + 1}", handler=distill_worker, **(behaviour or {}))
        if sheet:
            peer.add_worker("n1", "sheet", "aggregation", handler=contact_sheet_worker)
        if cache:
            peer.add_cache(cache_node)
        # Tests check what the cache holds, not its speed: a generous timeout
        # keeps a stall of the shared test machine from turning a hit into a miss.
        config.setdefault("cache_timeout", 0.5)
        cfg = FrontEndConfig(manager=peer.control_endpoint, origins=(origin_url,),
                             profiles=str(db) if db else None, **config)  # fmt: skip
        async with FrontEnd(cfg) as fe:
            await fe.beacons.next_beacon(5.0)
            async with TestClient(TestServer(fe.make_app(), host="127.0.0.1")) as client:
                yield client, fe, peer, origin_url
