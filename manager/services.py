"""The SNS manager: load reports in, beacons out, workers spawned and reaped by load.

State here is soft (Fox et al.): the table of worker instances is rebuilt from
the stubs' ``LOAD_REPORT`` messages, an instance not heard for ``report_ttl``
is gone (its node died), subscriptions of front ends expire unless renewed.
A restarted manager therefore needs nothing from disk but the services'
definitions, which the application records carry.

Decisions are the pure functions of :mod:`manager.lbpolicy`; this module holds
the state and does the I/O: ``svc.spawn`` / ``svc.reap`` / ``svc.cache``
operations unicast to nodes through the tree, ``BEACON`` pushed to front ends
on the control plane.  Contracts: docs/services.md.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field

from bus import protocol as p
from manager import lbpolicy

__all__ = ["ServiceManager"]

log = logging.getLogger(__name__)

SUBSCRIPTION_TTL = 5.0  # a front end renews every 2 s
SPAWN_TIMEOUT = 20.0
SETTLE_CAP = 10  # report periods after a manager (re)start after which a missing node no longer holds scaling
# Time constant of the queue smoothing: two reports (0.25 s apart) of a real burst cross H,
# one spike does not; D keeps a burst from spawning more than one worker per D.
SMOOTHING = 0.5


@dataclass
class Instance:
    id: str
    svc: str
    w: str  # worker class (or "cache")
    node: str
    data: str = ""
    kind: str = "transformation"
    queue: lbpolicy.Ewma | None = None
    q: int = 0
    busy: int = 0
    cost: float = 0.05
    heard: float = 0.0
    idle_since: float | None = None
    overflow: bool = False
    cache: bool = False
    extra: dict = field(default_factory=dict)
    by: dict = field(default_factory=dict)  # sender identity (hex) -> requests, at the last report


@dataclass
class _Class:
    """One worker class of a service, with the scaling state the policies need."""

    svc: str
    spec: object  # manager.spec.ServiceWorker
    config: lbpolicy.ScalingConfig
    last_spawn: float | None = None
    calm: float | None = None
    pending: dict = field(default_factory=dict)  # id -> (node, started)
    decision: str = ""
    enabled: bool = True  # an operator can disable a class (the monitor): no spawns, instances reaped


@dataclass
class _Service:
    name: str
    app: str
    spec: object  # manager.spec.Service
    main: dict  # component -> [node names]
    overflow: dict  # component -> [node names]
    classes: dict = field(default_factory=dict)  # worker name -> _Class
    seq: int = 0
    n: int = 0  # instance counter


class ServiceManager:
    def __init__(self, mgr, *, report_ttl: float = 2.0, beacon_interval: float = 0.25, clock=time.monotonic):
        self.mgr = mgr
        self.report_ttl = report_ttl
        self.beacon_interval = beacon_interval
        self.clock = clock
        self.services: dict[str, _Service] = {}
        self.instances: dict[str, Instance] = {}
        self.subscribers: dict[bytes, tuple[str, float]] = {}  # identity -> (svc, expires)
        self.frontend_urls: dict[bytes, str] = {}  # identity -> the front end's HTTP address (monitor)
        self.retired: dict[str, float] = {}  # reaped instance ids -> when: their draining reports are ignored
        self.events: collections.deque = collections.deque(maxlen=200)
        self.counters = collections.Counter()
        self._tasks: set[asyncio.Task] = set()
        self._ticker: asyncio.Task | None = None
        self._started = clock()

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())

    async def close(self) -> None:
        tasks = [t for t in (self._ticker, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _event(self, kind: str, svc: str, detail: str) -> None:
        self.events.append({"t": time.time(), "kind": kind, "svc": svc, "detail": detail})
        log.info("service %s: %s %s", svc, kind, detail)

    # -- registration (from the application controller) ------------------------------------
    def register(self, app: str, service, main: dict, overflow: dict) -> None:
        """Run ``service`` (a manager.spec.Service) on ``main`` nodes per component (+ ``overflow``)."""
        old = self.services.get(service.name)
        svc = _Service(service.name, app, service, main, overflow)
        for w in service.workers:
            cfg = lbpolicy.ScalingConfig(high_water=w.high_water, delay=w.delay, minimum=w.min, maximum=w.max,
                                         idle_after=w.idle_after, calm_for=w.calm_for,
                                         low_water=min(0.5, w.high_water), tau=SMOOTHING)
            cls = old.classes.get(w.name) if old else None
            svc.classes[w.name] = _Class(service.name, w, cfg, cls.last_spawn if cls else None)
        if old is not None:
            svc.n = old.n
        self.services[service.name] = svc
        self._event("registered", service.name, f"app {app}: {', '.join(w.name for w in service.workers)}")

    def unregister(self, app: str) -> list[str]:
        gone = [name for name, s in self.services.items() if s.app == app]
        for name in gone:
            del self.services[name]
            for i in [i for i, inst in self.instances.items() if inst.svc == name]:
                del self.instances[i]
            self._event("unregistered", name, f"app {app} cleaned up")
        return gone

    async def wait_ready(self, name: str, timeout: float) -> bool:
        """Until every worker class of ``name`` has its minimum and its caches are up."""
        end = self.clock() + timeout
        while self.clock() < end:
            if self._ready(name):
                return True
            await asyncio.sleep(0.05)
        return self._ready(name)

    def _ready(self, name: str) -> bool:
        svc = self.services.get(name)
        if svc is None:
            return False
        for cls in svc.classes.values():
            if len(self._of(name, cls.spec.name)) < cls.config.minimum:
                return False
        want = sum(c.instances for c in svc.spec.caches)
        return len([i for i in self.instances.values() if i.svc == name and i.cache]) >= want

    # -- reports and subscriptions ---------------------------------------------------------------
    def on_report(self, body: dict) -> None:
        """A stub's LOAD_REPORT (docs/services.md)."""
        if not isinstance(body, dict) or not isinstance(body.get("rows"), list):
            self.counters["reports_bad"] += 1
            return
        self.counters["reports"] += 1
        now = self.clock()
        fresh = False
        node, data = body.get("node", ""), body.get("data", "")
        for row in body["rows"]:
            try:
                iid, svc = str(row["id"]), str(row["svc"])
            except (KeyError, TypeError):
                self.counters["reports_bad"] += 1
                continue
            if svc not in self.services or iid in self.retired:
                continue  # a service we no longer run, or an instance reaped and draining
            inst = self.instances.get(iid)
            if inst is None:
                inst = self.instances[iid] = Instance(iid, svc, str(row.get("w", "")), node,
                                                      cache=bool(row.get("cache")), kind=row.get("kind", ""))
                inst.overflow = node in self._overflow_nodes(svc)
                fresh = True  # a new worker: the front ends learn of it now, not at the next beacon
            inst.node, inst.data, inst.heard = node, data, now
            q = float(row.get("q", 0)) + float(row.get("busy", 0))
            cls = self.services[svc].classes.get(inst.w)
            tau = cls.config.tau if cls else 1.0
            inst.queue = lbpolicy.Ewma.first(q, now) if inst.queue is None else inst.queue.update(q, now, tau)
            inst.q, inst.busy = int(row.get("q", 0)), int(row.get("busy", 0))
            by = row.get("by")
            inst.by = {k: v for k, v in list(by.items())[:16] if isinstance(k, str) and len(k) <= 128
                       and isinstance(v, int)} if isinstance(by, dict) else {}  # fmt: skip
            inst.cost = float(row.get("cost") or inst.cost)
            if q == 0:
                inst.idle_since = inst.idle_since or now
            else:
                inst.idle_since = None
            inst.extra = {k: row[k] for k in ("done", "failed", "crashes", "bytes", "hits", "misses") if k in row}
            if cls is not None:
                cls.pending.pop(iid, None)
        if fresh and self.subscribers and getattr(self.mgr, "link", None) is not None:
            self._send_beacons(now)

    def frontends(self) -> list[str]:
        """HTTP addresses of the front ends subscribed now."""
        return sorted({u for i, u in self.frontend_urls.items() if i in self.subscribers})

    def subscribe(self, identity: bytes, svc: str, http: str | None = None) -> dict:
        if svc not in self.services:
            # Soft state: the front end keeps renewing; beacons start once the service runs.
            self.counters["subscribe_unknown"] += 1
        self.subscribers[identity] = (svc, self.clock() + SUBSCRIPTION_TTL)
        if isinstance(http, str) and http.startswith("http://") and len(http) < 256:
            self.frontend_urls[identity] = http
        out = {"svc": svc, "known": svc in self.services, "interval": self.beacon_interval}
        restart = getattr(self.mgr, "restart_info", None)
        if restart:
            out["restart"] = restart  # process peers: front ends restart a dead manager with this
        return out

    def beacon(self, name: str) -> dict:
        svc = self.services.get(name)
        seq = 0
        if svc is not None:
            svc.seq += 1
            seq = svc.seq
        rows = [i for i in self.instances.values() if i.svc == name]
        return {
            "svc": name, "seq": seq,
            "workers": [{"id": i.id, "w": i.w, "kind": i.kind, "node": i.node, "data": i.data,
                         "q": round(i.queue.value if i.queue else 0.0, 3), "cost": round(i.cost, 5),
                         "r": i.q + i.busy, "by": i.by}
                        for i in rows if not i.cache],
            "caches": [{"id": i.id, "node": i.node, "data": i.data} for i in rows if i.cache],
        }

    # -- the loop ------------------------------------------------------------------------------
    async def _tick_forever(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # a policy bug must not stop the beacons
                log.exception("service tick failed")
            await asyncio.sleep(self.beacon_interval)

    def tick(self) -> None:
        now = self.clock()
        self._expire(now)
        self._send_beacons(now)
        if now - self._started < self.report_ttl * 1.5:
            return  # after a (re)start, let the stubs report before judging the pool
        for svc in list(self.services.values()):
            if not self._settled(svc, now):
                continue
            self._keep_caches(svc)
            for cls in svc.classes.values():
                self._scale(svc, cls, now)

    def _settled(self, svc: _Service, now: float) -> bool:
        """Whether ``svc``'s pool can be judged: after a (re)start of the manager, every node of the
        service is back in the tree and has had time to report (its workers run there still: judging
        earlier would spawn minimums and caches twice), or ``SETTLE_CAP`` report periods have passed
        (a node that does not come back must not freeze the service)."""
        if now - self._started > SETTLE_CAP * self.report_ttl:
            return True
        since = {m.name: m.since for m in self.mgr.membership.alive() if m.name}
        nodes = {n for names in (*svc.main.values(), *svc.overflow.values()) for n in names}
        return all(n in since and now - since[n] >= self.report_ttl * 1.5 for n in nodes)

    def _expire(self, now: float) -> None:
        for iid, inst in list(self.instances.items()):
            if now - inst.heard > self.report_ttl:
                del self.instances[iid]
                self._event("lost", inst.svc, f"{iid} on {inst.node}: no load report for {self.report_ttl:g}s")
        for ident, (_, exp) in list(self.subscribers.items()):
            if exp < now:
                del self.subscribers[ident]
                self.frontend_urls.pop(ident, None)
        for iid, at in list(self.retired.items()):
            if now - at > 120.0:  # long drained and gone
                del self.retired[iid]
        for svc in self.services.values():
            for cls in svc.classes.values():
                for iid, (node, started) in list(cls.pending.items()):
                    if now - started > SPAWN_TIMEOUT:
                        del cls.pending[iid]

    def _send_beacons(self, now: float) -> None:
        if not self.subscribers:
            return
        if now - self._started < self.report_ttl * 1.5:
            # Just (re)started: the table holds only the stubs that reported so far. Front ends
            # keep their last table (marked stale) rather than get a nearly empty one.
            return
        frames_of = {}
        for ident, (name, _) in list(self.subscribers.items()):
            if name not in frames_of:
                frames_of[name] = p.encode(p.MsgType.BEACON, self.beacon(name), src=self.mgr.root.node_id)
            if not self.mgr.link.send_child(ident, frames_of[name]):
                del self.subscribers[ident]  # that front end is gone
            else:
                self.counters["beacons"] += 1

    # -- scaling -------------------------------------------------------------------------------
    def _of(self, svc: str, w: str) -> list[Instance]:
        return [i for i in self.instances.values() if i.svc == svc and i.w == w and not i.cache]

    def _overflow_nodes(self, svc: str) -> list[str]:
        s = self.services.get(svc)
        return [n for names in (s.overflow.values() if s else ()) for n in names]

    def _live(self) -> set[str]:
        return {m.name for m in self.mgr.membership.alive() if m.name}

    def _load_of(self, node: str) -> int:
        pending = sum(1 for s in self.services.values() for c in s.classes.values()
                      for n, _ in c.pending.values() if n == node)
        return pending + sum(1 for i in self.instances.values() if i.node == node and not i.cache)

    def _free(self, svc: _Service, nodes: list[str]) -> list[str]:
        live = self._live()
        return [n for n in nodes if n in live and self._load_of(n) < svc.spec.slots]

    def set_enabled(self, svc: str, worker: str, enabled: bool) -> dict:
        """Disable a worker class (its instances are reaped, none is spawned) or enable it again."""
        s = self.services.get(svc)
        if s is None or worker not in s.classes:
            known = {n: sorted(x.classes) for n, x in self.services.items()}
            raise LookupError(f"no worker class {worker!r} in service {svc!r}; known: {known}")
        cls = s.classes[worker]
        if cls.enabled != enabled:
            cls.enabled = enabled
            self._event("enabled" if enabled else "disabled", svc, f"worker class {worker} by the operator")
            if not enabled:
                for inst in self._of(svc, worker):
                    self._reap(s, inst.id, "its class was disabled by the operator")
        return {"svc": svc, "worker": worker, "enabled": cls.enabled}

    def _scale(self, svc: _Service, cls: _Class, now: float) -> None:
        if not cls.enabled:
            cls.decision = "disabled by the operator"
            for inst in self._of(svc.name, cls.spec.name):  # e.g. reported again after a restart
                self._reap(svc, inst.id, "its class is disabled")
            return
        comp = cls.spec.component
        workers = self._of(svc.name, cls.spec.name)
        main_free = self._free(svc, svc.main.get(comp, []))
        over_free = self._free(svc, svc.overflow.get(comp, []))
        if workers:
            per_worker = sum(i.queue.value for i in workers if i.queue) / len(workers)
        else:
            per_worker = 0.0
        pool = lbpolicy.PoolState(len(workers), len(main_free), len(over_free), len(cls.pending),
                                  cls.config.minimum, cls.config.maximum)
        d = lbpolicy.should_spawn(per_worker, cls.config.high_water, cls.last_spawn, now, cls.config.delay, pool)
        cls.decision = d.reason
        if d.spawn:
            nodes = main_free if d.pool == lbpolicy.MAIN else over_free
            node = min(nodes, key=lambda n: (self._load_of(n), n))
            self._spawn(svc, cls, node, now, d.reason, overflow=d.pool == lbpolicy.OVERFLOW)
            return
        idle = [lbpolicy.WorkerIdle(i.id, i.idle_since, i.overflow) for i in workers]
        cls.calm = lbpolicy.calm_since(cls.calm, per_worker, cls.config.low_water, now)
        give = lbpolicy.give_back_overflow(idle, cls.calm, now, cls.config.calm_for, cls.config.minimum,
                                           len(main_free))
        for _ in range(give.respawn_main):
            node = min(main_free, key=lambda n: (self._load_of(n), n))
            self._spawn(svc, cls, node, now, "replacing an overflow worker after the burst")
        for iid in give.release:
            self._reap(svc, iid, give.reason)
        if give.release:
            return
        r = lbpolicy.should_reap(idle, now, cls.config.minimum, cls.config.idle_after)
        if r.worker is not None:
            self._reap(svc, r.worker, r.reason)

    def _spawn(self, svc: _Service, cls: _Class, node: str, now: float, why: str, overflow: bool = False) -> None:
        svc.n += 1
        iid = f"{svc.name}/{cls.spec.name}@{node}#{svc.n}"
        cls.pending[iid] = (node, now)
        cls.last_spawn = now
        self.counters["spawns"] += 1
        self._event("spawn", svc.name, f"{iid}{' (overflow)' if overflow else ''}: {why}")
        args = {"svc": svc.name, "app": svc.app, "worker": cls.spec.name, "callable": cls.spec.callable,
                "kind": cls.spec.kind, "id": iid}
        self._run(self._call(node, "svc.spawn", args, svc.name, iid, cls))

    def _reap(self, svc: _Service, iid: str, why: str) -> None:
        inst = self.instances.pop(iid, None)  # out of the beacon first: no new request reaches it
        if inst is None:
            return
        self.retired[iid] = self.clock()  # its reports while it drains must not put it back
        self.counters["reaps"] += 1
        self._event("reap", svc.name, f"{iid} on {inst.node}: {why}")
        self._run(self._call(inst.node, "svc.reap", {"svc": svc.name, "id": iid, "grace": 10.0}, svc.name, iid))

    def _keep_caches(self, svc: _Service) -> None:
        for spec in svc.spec.caches:
            have = [i for i in self.instances.values() if i.svc == svc.name and i.cache]
            pending = getattr(svc, "_cache_pending", {})
            svc._cache_pending = pending
            now = self.clock()
            for k in [k for k, t in pending.items() if now - t > SPAWN_TIMEOUT or k in self.instances]:
                del pending[k]
            missing = spec.instances - len(have) - len(pending)
            live = [n for n in svc.main.get(spec.component, []) if n in self._live()]
            used = {i.node for i in have} | {k.split("@", 1)[1].split("#")[0] for k in pending}
            for _ in range(max(missing, 0)):
                free = [n for n in live if n not in used] or live
                if not free:
                    return
                node = free[0]
                used.add(node)
                svc.n += 1
                iid = f"{svc.name}/cache@{node}#{svc.n}"
                pending[iid] = now
                self._event("cache", svc.name, f"{iid}: starting a cache partition")
                self._run(self._call(node, "svc.cache", {"svc": svc.name, "id": iid, "max_bytes": spec.max_bytes},
                                     svc.name, iid))

    async def _call(self, node: str, op: str, args: dict, svc: str, iid: str, cls: _Class | None = None) -> None:
        try:
            value = await self.mgr.root.ask(node, op, args, timeout=SPAWN_TIMEOUT)
        except (LookupError, asyncio.TimeoutError) as e:
            value = {"error": str(e) or f"no answer within {SPAWN_TIMEOUT:g}s"}
        if isinstance(value, dict) and "error" in value:
            self.counters["op_failures"] += 1
            self._event("failed", svc, f"{op} {iid} on {node}: {value['error']}")
            if cls is not None:
                cls.pending.pop(iid, None)

    def _run(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- views ---------------------------------------------------------------------------------
    def status(self) -> dict:
        now = self.clock()
        out = []
        for svc in self.services.values():
            rows = sorted((i for i in self.instances.values() if i.svc == svc.name), key=lambda i: i.id)
            out.append({
                "name": svc.name, "app": svc.app,
                "classes": [{"worker": c.spec.name, "enabled": c.enabled, "min": c.config.minimum,
                             "max": c.config.maximum,
                             "high_water": c.config.high_water, "pending": sorted(c.pending),
                             "decision": c.decision} for c in svc.classes.values()],
                "instances": [{"id": i.id, "w": i.w, "node": i.node, "cache": i.cache, "overflow": i.overflow,
                               "q": i.q, "busy": i.busy, "smoothed": round(i.queue.value, 3) if i.queue else 0.0,
                               "cost": round(i.cost, 5), "heard": round(now - i.heard, 2), **i.extra}
                              for i in rows],
            })
        return {"services": out, "events": list(self.events)[-50:], "counters": dict(self.counters),
                "subscribers": len(self.subscribers), "frontends": self.frontends()}
