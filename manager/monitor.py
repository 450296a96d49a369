"""The live web monitor, served by the manager on its own asyncio loop (aiohttp).

TranSend had a graphical monitor that showed every component and paged the
operator; this is ours.  One small page (``manager/static/``, no build step,
nothing from a CDN) draws the tree and the tables from a JSON snapshot that is
pushed over server-sent events once per ``interval`` (1 s).

Endpoints (every one but the static assets needs authorization, see below)::

    GET  /                       the page
    GET  /static/{file}          its script and style sheet (no secrets: no authorization)
    GET  /api/snapshot           the current snapshot, JSON (shape: Monitor.snapshot)
    GET  /api/events             text/event-stream: one "snapshot" event per interval
    GET  /metrics                Prometheus text format (manager/metrics.py)
    POST /api/disable            {"service", "worker"}: stop spawning that worker class and reap it
    POST /api/enable             {"service", "worker"}: allow it again

**Authorization.**  A request is allowed when it carries the token
(``?token=`` or ``Authorization: Bearer``, compared in constant time), or,
while ``trust_loopback`` (the default), when it comes from a loopback address
*and* names a loopback host (``Host: 127.0.0.1:...``/``localhost``/``[::1]``),
which keeps a DNS-rebinding page from passing as local.  The monitor refuses
to listen on a non-loopback address without a token.

**Actions** (POST) also need ``Content-Type: application/json`` and the
header ``X-Snsbus-Monitor: 1``: a cross-site form cannot send either, and a
cross-site script would need a CORS preflight, which is never granted.  A
request whose ``Origin`` or ``Sec-Fetch-Site`` says it is cross-site is refused.

**Data.**  The snapshot is built from what the manager has in memory
(``status()``, ``apps``, ``services.status()``, the loop's ``statistics()``).
Two things are polled on timers, never per page view: every node's process
CPU/memory and running processes (the ``proc`` operation broadcast every
``node_poll`` seconds), and each configured front end's ``GET /stats``
(``frontend_poll``), from which request rates, cache hit rates and latency
percentiles (when the front end reports a ``latency`` histogram) are computed.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import json
import logging
import time
from pathlib import Path

from aiohttp import web

from core.errors import BusError
from manager.alerts import AlertEngine

__all__ = ["Monitor", "MonitorError", "start_monitor", "ACTION_HEADER"]

log = logging.getLogger(__name__)

ACTION_HEADER = "X-Snsbus-Monitor"
STATIC_DIR = Path(__file__).resolve().parent / "static"
_STATIC = {"monitor.js": "text/javascript", "monitor.css": "text/css"}
_RATE_WINDOW = 10.0  # seconds over which rates and percentiles are computed
_EVENTS = 50  # entries of each feed in a snapshot
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the token may be in the page's URL
    "Cache-Control": "no-store",
}


class MonitorError(BusError, ValueError):
    """A monitor that cannot be started as asked (e.g. a public address without a token)."""


def is_loopback(host: str) -> bool:
    """True for loopback addresses and ``localhost``; False for anything else, names included."""
    host = (host or "").strip("[]")
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


# -- pure helpers ---------------------------------------------------------------------------

def totals_step(running: dict, prev: dict, rows: dict) -> dict:
    """Add to ``running`` (monotonic totals per key) the growth of every counter from ``prev`` to ``rows``.

    ``rows`` is ``{instance id: {counter: value}}``.  An instance seen for the
    first time counts whole; one that went away (reaped, lost) adds nothing, so
    the totals never go backwards when the instance table changes.
    """
    out = dict(running)
    for iid, counters in rows.items():
        before = prev.get(iid, {})
        for key, value in counters.items():
            delta = value - before.get(key, 0)
            if delta < 0:  # the instance restarted its counters
                delta = value
            out[key] = out.get(key, 0) + delta
    return out


def window_rate(samples, key, now: float, window: float = _RATE_WINDOW) -> float | None:
    """Per-second growth of ``key`` over the last ``window`` seconds of ``samples`` [(t, totals)]."""
    old = None
    for t, totals in samples:
        if now - t <= window + 1e-9:
            old = (t, totals)
            break
    if old is None or not samples or now - old[0] <= 0:
        return None
    newest = samples[-1][1]
    return max(0.0, (newest.get(key, 0) - old[1].get(key, 0)) / (now - old[0]))


def ratio(hits: float | None, misses: float | None) -> float | None:
    if hits is None or misses is None or hits + misses <= 0:
        return None
    return hits / (hits + misses)


# -- the monitor ----------------------------------------------------------------------------

class Monitor:
    """The web monitor of one running :class:`manager.server.Manager`.

    Lifecycle: ``await start(host, port)`` (binds, starts the samplers) and
    ``await stop()``; :func:`start_monitor` does the first.  ``url`` and
    ``port`` are known after ``start``.  Everything runs on the manager's loop.
    """

    def __init__(self, mgr, *, token: str | None = None, alerts: AlertEngine | None = None, frontends=(),
                 interval: float = 1.0, node_poll: float = 5.0, node_timeout: float = 3.0,
                 frontend_poll: float = 2.0, trust_loopback: bool = True, clock=time.monotonic, wall=time.time):
        if token is not None and not token:
            raise MonitorError("an empty monitor token would let anyone in; give a real one or none")
        self.mgr = mgr
        self.token = token
        self.alerts = alerts if alerts is not None else AlertEngine()
        self.frontends = [u.rstrip("/") for u in frontends]
        self.interval = interval
        self.node_poll = node_poll
        self.node_timeout = node_timeout
        self.frontend_poll = frontend_poll
        self.trust_loopback = trust_loopback
        self.clock = clock
        self.wall = wall
        self.url = ""
        self.port = 0
        self.counters = collections.Counter()
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task] = []
        self._streams: set[asyncio.Queue] = set()
        self._latest: dict | None = None
        self._seq = 0
        self._loads: dict[str, dict] = {}  # node name -> last proc answer (+ "at", "pid")
        self._fe: dict[str, dict] = {u: {"url": u, "ok": False, "stats": None, "error": "not polled yet",
                                         "last_ok": None} for u in self.frontends}
        self._samples: collections.deque = collections.deque()  # (t, running totals)
        self._running: dict = {}
        self._prev_rows: dict = {}
        self._fe_hist: dict[str, collections.deque] = {u: collections.deque() for u in self.frontends}
        self._registry = None
        self._static: dict[str, bytes] = {}
        self._session = None

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if not is_loopback(host) and not self.token:
            raise MonitorError(f"refusing to serve the monitor on {host!r} without a token: give it a token "
                               f"(--monitor-token-file) or listen on 127.0.0.1")
        self._static = {name: (STATIC_DIR / name).read_bytes() for name in ("index.html", *_STATIC)}
        app = web.Application(client_max_size=64 * 1024, middlewares=[self._headers])
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._asset)
        app.router.add_get("/api/snapshot", self._snapshot)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/api/disable", self._disable)
        app.router.add_post("/api/enable", self._enable)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        try:
            site = web.TCPSite(self._runner, host, port)
            await site.start()
        except OSError as e:
            await self._runner.cleanup()
            self._runner = None
            raise MonitorError(f"cannot listen on {host}:{port} for the monitor: {e}") from e
        self.port = self._runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}/"
        import aiohttp

        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=max(self.frontend_poll, 1.0)))
        await self.alerts.start()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._sample_forever()), loop.create_task(self._poll_nodes_forever())]
        # Always: front ends given by hand, and those that subscribe to the manager's beacons.
        self._tasks.append(loop.create_task(self._poll_frontends_forever()))
        log.info("monitor on %s%s", self.url, "" if self.token else " (loopback only, no token)")

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for q in list(self._streams):
            _offer(q, None)  # every event stream ends its response
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.alerts.stop()

    async def __aenter__(self) -> "Monitor":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- data ------------------------------------------------------------------------------
    def node_loads(self) -> dict[str, dict]:
        """{node name: its last ``proc`` answer} (read by /metrics)."""
        return dict(self._loads)

    def frontend_stats(self) -> dict[str, dict]:
        """{front end URL: {ok, stats, error, last_ok}} (read by /metrics)."""
        return dict(self._fe)

    def snapshot(self) -> dict:
        """The latest snapshot pushed to pages (built now if the sampler has not run yet)."""
        if self._latest is None:
            return self._with_alerts(self._build())
        return self._latest

    def sample(self) -> dict:
        """Build a snapshot, run the alert rules over it, keep it as the latest; returns it."""
        snap = self._build()
        self.alerts.observe(snap)
        self._latest = self._with_alerts(snap)
        return self._latest

    def _with_alerts(self, snap: dict) -> dict:
        snap["alerts"] = {"active": self.alerts.active(), "feed": list(self.alerts.feed)[-_EVENTS:]}
        return snap

    def _build(self) -> dict:
        mgr = self.mgr
        now, wall = self.clock(), self.wall()
        self._seq += 1
        st = mgr.status()
        svc = mgr.services.status() if mgr.services is not None else {"services": [], "events": [], "counters": {}}
        queued: dict[str, float] = collections.Counter()
        rows: dict = {}
        for s in svc.get("services", ()):
            for i in s.get("instances", ()):
                if i.get("cache"):
                    rows[i["id"]] = {(s["name"], "hits"): i.get("hits", 0), (s["name"], "misses"): i.get("misses", 0)}
                else:
                    queued[i["node"]] += i.get("q", 0) + i.get("busy", 0)
                    rows[i["id"]] = {(s["name"], "done"): i.get("done", 0), (s["name"], "failed"): i.get("failed", 0)}
        self._running = totals_step(self._running, self._prev_rows, rows)
        self._prev_rows = rows
        self._samples.append((now, self._running))
        while self._samples and now - self._samples[0][0] > _RATE_WINDOW + 2 * self.interval:
            self._samples.popleft()
        nodes = []
        for m in st["members"]:
            load = self._loads.get(m["name"])
            cpu = load.get("cpu", 0.0) if load else 0.0
            nodes.append({k: m[k] for k in ("id", "name", "parent", "depth", "children", "subtree", "pid", "state",
                                            "last_heard")}
                         | {"load": load, "load_age": round(wall - load["at"], 1) if load else None,
                            "queued": queued.get(m["name"], 0),
                            "weight": round(cpu / 100.0 + queued.get(m["name"], 0), 3)})
        counts = dict.fromkeys(("alive", "dead", "unreachable", "left"), 0)
        for n in nodes:
            counts[n["state"]] = counts.get(n["state"], 0) + 1
        services = []
        for s in svc.get("services", ()):
            name = s["name"]
            rate = {
                "tasks_per_s": window_rate(self._samples, (name, "done"), now),
                "failed_per_s": window_rate(self._samples, (name, "failed"), now),
                "cache_hit_rate": ratio(window_rate(self._samples, (name, "hits"), now),
                                        window_rate(self._samples, (name, "misses"), now)),
            }
            services.append(dict(s, rates=rate))
        snap = {
            "t": wall,
            "seq": self._seq,
            "interval": self.interval,
            "uptime": round(mgr.uptime(), 1),
            "root": st["root"],
            "counts": counts,
            "nodes": nodes,
            "events": st["events"][-_EVENTS:],
            "counters": st["counters"],
            "transfer": {k: st["transfer"].get(k, 0) for k in ("bytes_served", "chunks_served")}
            if st.get("transfer") else {},
            "apps": self._apps(),
            "services": services,
            "service_events": svc.get("events", [])[-_EVENTS:],
            "service_counters": svc.get("counters", {}),
            "subscribers": svc.get("subscribers", 0),
            "actions": hasattr(mgr.services, "set_enabled"),
            "frontends": [self._frontend_view(u, now) for u in self.frontends],
            "planes": mgr.loop.statistics().as_dict(),
            "node_poll": {"interval": self.node_poll, "polled": len(self._loads)},
        }
        return snap

    def _apps(self) -> list[dict]:
        apps = self.mgr.apps
        if apps is None:
            return []
        out = []
        for a in apps.list():
            try:
                phases = [{"key": ph.get("key"), "state": ph.get("state"), "done": len(ph.get("done") or ()),
                           "failed": len(ph.get("failed") or ())} for ph in apps.progress(a["name"])["phases"]]
            except Exception:  # an app cleaned up between list() and progress(): show it without phases
                phases = []
            out.append(dict(a, phases=phases))
        return out

    def _frontend_view(self, url: str, now: float) -> dict:
        from manager.metrics import histogram_delta, parse_histogram, quantile, served

        fe = self._fe[url]
        hist = self._fe_hist[url]
        stats = fe.get("stats") or {}
        view = {"url": url, "ok": fe["ok"], "error": fe["error"], "last_ok": fe["last_ok"],
                "requests_per_s": None, "hit_rate": None, "latency": None,
                "requests": served(stats.get("frontend") or {})}
        if len(hist) >= 2:
            (t0, old), (t1, new) = hist[0], hist[-1]
            dt = t1 - t0
            fo, fn = old.get("frontend") or {}, new.get("frontend") or {}
            if dt > 0 and served(fn) is not None:
                view["requests_per_s"] = max(0.0, (served(fn) - (served(fo) or 0)) / dt)
            view["hit_rate"] = ratio(fn.get("hits", 0) - fo.get("hits", 0), fn.get("misses", 0) - fo.get("misses", 0))
            hn, ho = parse_histogram(new.get("latency")), parse_histogram(old.get("latency"))
            if hn is not None:
                d = histogram_delta(hn, ho)
                view["latency"] = {f"p{int(q * 100)}": quantile(d, q) for q in (0.5, 0.9, 0.99)}
                view["latency"]["n"] = sum(d["counts"])
        return view

    # -- timers ------------------------------------------------------------------------------
    async def _sample_forever(self) -> None:
        while True:
            try:
                snap = self.sample()
                if self._streams:
                    data = b"event: snapshot\ndata: " + json.dumps(snap, separators=(",", ":")).encode() + b"\n\n"
                    for q in list(self._streams):
                        _offer(q, data)
            except Exception:  # a bug in one sample must not stop the monitor
                log.exception("monitor sample failed")
            await asyncio.sleep(self.interval)

    async def _poll_nodes_forever(self) -> None:
        while True:
            try:
                await self.poll_nodes()
            except Exception:
                log.exception("monitor node poll failed")
            await asyncio.sleep(self.node_poll)

    async def poll_nodes(self) -> None:
        """One ``proc`` broadcast to every live node; answers replace what we knew of each."""
        from nodes.ops import PROC_OP

        root = self.mgr.root
        expected = {m.id for m in self.mgr.membership.alive()}
        if not expected:
            return
        result = await root.broadcast(PROC_OP, {}, timeout=self.node_timeout)
        out = root.outcome(result, expected)
        wall = self.wall()
        self.counters["node_polls"] += 1
        for g in out["groups"]:
            value = g["value"]
            if not isinstance(value, dict) or "cpu" not in value:
                continue  # an agent without the proc operation answers an error
            for name in g["nodes"]:
                self._loads[name] = dict(value, at=wall)
        live = {m.name for m in self.mgr.membership.members.values()}
        for name in [n for n in self._loads if n not in live]:
            del self._loads[name]  # forgotten by the membership

    def _discover(self) -> None:
        """Add the front ends that told the manager their HTTP address when they subscribed."""
        services = getattr(self.mgr, "services", None)
        found = services.frontends() if services is not None and hasattr(services, "frontends") else []
        for url in found:
            url = url.rstrip("/")
            if url not in self._fe:
                self.frontends.append(url)
                self._fe[url] = {"url": url, "ok": False, "stats": None, "error": "not polled yet", "last_ok": None}
                self._fe_hist[url] = collections.deque()

    async def _poll_frontends_forever(self) -> None:
        while True:
            self._discover()
            await asyncio.gather(*(self._poll_frontend(u) for u in self.frontends))
            await asyncio.sleep(self.frontend_poll)

    async def _poll_frontend(self, url: str) -> None:
        import aiohttp

        fe = self._fe[url]
        try:
            async with self._session.get(url + "/stats") as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                stats = await resp.json()
                if not isinstance(stats, dict):
                    raise ValueError("/stats is not a JSON object")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            fe.update(ok=False, error=f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            self.counters["frontend_poll_failures"] += 1
            return
        now = self.clock()
        fe.update(ok=True, stats=stats, error="", last_ok=self.wall())
        hist = self._fe_hist[url]
        hist.append((now, stats))
        while len(hist) > 1 and now - hist[0][0] > _RATE_WINDOW:
            hist.popleft()

    # -- HTTP ----------------------------------------------------------------------------------
    @web.middleware
    async def _headers(self, request: web.Request, handler):
        resp = await handler(request)
        for k, v in _SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
        return resp

    def _allowed(self, request: web.Request) -> bool:
        if self.token:
            given = request.query.get("token", "")
            auth = request.headers.get("Authorization", "")
            if auth[:7].lower() == "bearer ":
                given = auth[7:].strip()
            if given and hmac.compare_digest(given.encode(), self.token.encode()):
                return True
        if not self.trust_loopback:
            return False
        peer = request.remote or ""
        return is_loopback(peer) and is_loopback(request.url.host or "")

    def _check(self, request: web.Request) -> None:
        if not self._allowed(request):
            self.counters["refused"] += 1
            raise web.HTTPUnauthorized(
                text=json.dumps({"ok": False, "error": "this monitor needs its token: add ?token=... to the URL "
                                                       "or send Authorization: Bearer ..."}),
                content_type="application/json", headers={"WWW-Authenticate": 'Bearer realm="snsbus"'})

    async def _page(self, request: web.Request) -> web.Response:
        self._check(request)
        return web.Response(body=self._static["index.html"], content_type="text/html", charset="utf-8")

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC:
            raise web.HTTPNotFound()
        return web.Response(body=self._static[name], content_type=_STATIC[name], charset="utf-8")

    async def _snapshot(self, request: web.Request) -> web.Response:
        self._check(request)
        return web.json_response(self.snapshot())

    async def _metrics(self, request: web.Request) -> web.Response:
        self._check(request)
        from manager import metrics

        if self._registry is None:
            self._registry = metrics.new_registry(self.mgr, self)
        resp = web.Response(body=metrics.render(self._registry))
        resp.headers["Content-Type"] = metrics.CONTENT_TYPE
        return resp

    async def _events(self, request: web.Request) -> web.StreamResponse:
        self._check(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        q: asyncio.Queue = asyncio.Queue(maxsize=2)
        self._streams.add(q)
        self.counters["streams"] += 1
        try:
            first = self.snapshot()
            await resp.write(b"retry: 1000\nevent: snapshot\ndata: "
                             + json.dumps(first, separators=(",", ":")).encode() + b"\n\n")
            while True:
                try:
                    data = await asyncio.wait_for(q.get(), timeout=15.0)
                except asyncio.TimeoutError:
                    data = b": keep-alive\n\n"
                if data is None:
                    break
                await resp.write(data)
        except (ConnectionResetError, ConnectionError):
            pass  # the page went away
        finally:
            self._streams.discard(q)
        return resp

    async def _action(self, request: web.Request, enabled: bool) -> web.Response:
        self._check(request)
        if request.headers.get(ACTION_HEADER) != "1" or request.content_type != "application/json":
            raise web.HTTPForbidden(text=json.dumps({"ok": False, "error": f"actions need the header "
                                                     f"{ACTION_HEADER}: 1 and a JSON body"}),
                                    content_type="application/json")
        origin = request.headers.get("Origin")
        site = request.headers.get("Sec-Fetch-Site", "same-origin")
        if (origin is not None and origin != f"{request.scheme}://{request.host}") or site not in ("same-origin",
                                                                                                   "none"):
            raise web.HTTPForbidden(text=json.dumps({"ok": False, "error": "cross-site request refused"}),
                                    content_type="application/json")
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("service"), str) \
                or not isinstance(body.get("worker"), str):
            return web.json_response({"ok": False, "error": "send {\"service\": ..., \"worker\": ...}"}, status=400)
        set_enabled = getattr(self.mgr.services, "set_enabled", None)
        if set_enabled is None:
            return web.json_response({"ok": False, "error": "this manager cannot disable worker classes "
                                                            "(ServiceManager.set_enabled is missing)"}, status=501)
        try:
            result = set_enabled(body["service"], body["worker"], enabled)
        except LookupError as e:  # KeyError included: no such service or worker class
            return web.json_response({"ok": False, "error": str(e.args[0]) if e.args else "unknown worker class"},
                                     status=404)
        self.counters["enabled" if enabled else "disabled"] += 1
        log.warning("monitor: worker class %s/%s %s by %s", body["service"], body["worker"],
                    "enabled" if enabled else "disabled", request.remote)
        return web.json_response({"ok": True, "result": result})

    async def _disable(self, request: web.Request) -> web.Response:
        return await self._action(request, False)

    async def _enable(self, request: web.Request) -> web.Response:
        return await self._action(request, True)


def _offer(q: asyncio.Queue, item) -> None:
    """Put without waiting; a slow page loses its oldest snapshot (it only needs the newest)."""
    while True:
        try:
            q.put_nowait(item)
            return
        except asyncio.QueueFull:
            try:
                q.get_nowait()
            except asyncio.QueueEmpty:
                pass


async def start_monitor(mgr, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None,
                        alerts: AlertEngine | None = None, **kw) -> Monitor:
    """Start the web monitor of ``mgr`` on ``host:port`` (0: any free port); returns it (``.url``, ``.stop()``).

    ``alerts`` (an :class:`AlertEngine`, with or without hooks) is started and
    stopped with the monitor; without it the alerts are only shown.  Other
    keywords go to :class:`Monitor` (``frontends``, ``interval``, ``node_poll``, ...).
    """
    mon = Monitor(mgr, token=token, alerts=alerts, **kw)
    await mon.start(host, port)
    return mon
