"""``/metrics``: the manager's counters in Prometheus text format (prometheus-client).

:class:`ManagerCollector` reads the ``statistics()`` snapshots at scrape time
(nothing is copied between scrapes) and is registered in its own
``CollectorRegistry``, never the process-global one, so two managers in one
process (tests) do not collide.  Sources:

=====================================  ==================================================
``Manager.loop.statistics()``          messages received/sent/dropped per plane
``Manager.root.counters``              children lost (deadline missed or connection closed), ops
``Membership.counters`` / members      events by kind (``rejoined`` = repairs), members by state
``ServiceManager.status()``            per-instance queues, cost, done/failed/crashes, caches,
                                       spawns and reaps
``ChunkService.statistics()``          package bytes served by the root
the monitor (optional)                 nodes' CPU/RSS, front ends' latency histograms, alerts
=====================================  ==================================================

Front-end latency histograms come from each front end's ``GET /stats`` when it
carries a ``latency`` block (see :func:`parse_histogram`); without one there is
no request latency to export, only the workers' service time (``cost``).
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["ManagerCollector", "new_registry", "render", "CONTENT_TYPE", "parse_histogram", "quantile",
           "histogram_delta", "served"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
_STATES = ("alive", "dead", "unreachable", "left")


# -- histograms as front ends report them (pure) ------------------------------------------------

def parse_histogram(block) -> dict | None:
    """A front end's ``latency`` block, checked: ``{"bounds": [upper bounds, s], "counts": [per bucket,
    the last one above every bound], "sum": seconds}``; None when absent or malformed."""
    if not isinstance(block, dict):
        return None
    bounds, counts = block.get("bounds"), block.get("counts")
    if not isinstance(bounds, list) or not isinstance(counts, list) or len(counts) != len(bounds) + 1:
        return None
    try:
        bounds = [float(b) for b in bounds]
        counts = [int(c) for c in counts]
        total = float(block.get("sum", 0.0))
    except (TypeError, ValueError):
        return None
    if any(b2 <= b1 for b1, b2 in zip(bounds, bounds[1:])) or any(c < 0 for c in counts):
        return None
    return {"bounds": bounds, "counts": counts, "sum": total}


def histogram_delta(new: dict, old: dict | None) -> dict:
    """Observations between two readings of the same histogram (``new`` alone after a restart)."""
    if old is None or old["bounds"] != new["bounds"] or any(a < b for a, b in zip(new["counts"], old["counts"])):
        return new
    return {"bounds": new["bounds"], "counts": [a - b for a, b in zip(new["counts"], old["counts"])],
            "sum": new["sum"] - old["sum"]}


def quantile(h: dict, q: float) -> float | None:
    """The ``q`` quantile by linear interpolation inside its bucket (as PromQL's
    ``histogram_quantile``); None without observations.  Beyond the last bound,
    the last bound is the answer (the histogram cannot say more)."""
    counts = h["counts"]
    n = sum(counts)
    if n == 0:
        return None
    rank = q * n
    seen = 0
    lower = 0.0
    for i, c in enumerate(counts):
        if i == len(h["bounds"]):
            return h["bounds"][-1] if h["bounds"] else None
        upper = h["bounds"][i]
        if c and seen + c >= rank:
            return lower + (upper - lower) * (rank - seen) / c
        seen += c
        lower = upper
    return h["bounds"][-1] if h["bounds"] else None


def served(frontend: dict) -> int | None:
    """Service requests a front end answered (``/distill`` + ``/sheet``; its ``requests`` counter
    also counts ``/stats`` and ``/health``, which include the monitor's own polls)."""
    if "distill" in frontend or "sheet" in frontend:
        return frontend.get("distill", 0) + frontend.get("sheet", 0)
    return frontend.get("requests")


# -- the collector ---------------------------------------------------------------------------

def _counter(name, doc, labels=()):
    return CounterMetricFamily(name, doc, labels=list(labels))


def _gauge(name, doc, labels=()):
    return GaugeMetricFamily(name, doc, labels=list(labels))


class ManagerCollector:
    """A custom collector over a running :class:`manager.server.Manager` (and its monitor)."""

    def __init__(self, mgr, monitor=None):
        self.mgr = mgr
        self.monitor = monitor

    def collect(self):
        mgr = self.mgr
        if mgr.root is None:
            return
        yield from self._planes()
        yield from self._tree()
        if mgr.services is not None:
            yield from self._services(mgr.services.status())
        transfer = mgr.chunks.statistics() if mgr.chunks is not None else {}
        served = _counter("snsbus_packages_served_bytes", "Package bytes the root served to its children")
        served.add_metric([], transfer.get("bytes_served", 0))
        yield served
        if mgr.apps is not None:
            apps = _gauge("snsbus_applications", "Applications by phase", ["phase"])
            by_phase: dict = {}
            for a in mgr.apps.list():
                by_phase[a["phase"]] = by_phase.get(a["phase"], 0) + 1
            for phase, n in sorted(by_phase.items()):
                apps.add_metric([phase], n)
            yield apps
        if self.monitor is not None:
            yield from self._monitor()

    def _planes(self):
        stats = self.mgr.loop.statistics()
        msgs = _counter("snsbus_plane_messages", "Messages handled by the root's loop, per plane and direction",
                        ["plane", "direction"])
        dropped = _counter("snsbus_plane_dropped", "Messages dropped by the root's loop, per plane and reason",
                           ["plane", "reason"])
        eagain = _counter("snsbus_plane_send_eagain", "Sends that met a full queue or no peer", ["plane"])
        errors = _counter("snsbus_plane_handler_errors", "Handler calls that raised", ["plane"])
        pending = _gauge("snsbus_plane_pending", "Control messages waiting for a writable socket")
        for plane in ("control", "data"):
            s = getattr(stats, plane)
            msgs.add_metric([plane, "received"], s.messages)
            msgs.add_metric([plane, "sent"], s.sent)
            for code, n in sorted(s.dropped.items()):
                dropped.add_metric([plane, code.name.lower()], n)
            dropped.add_metric([plane, "send_queue"], s.send_dropped)
            dropped.add_metric([plane, "unreachable"], s.unreachable)
            eagain.add_metric([plane], s.send_eagain)
            errors.add_metric([plane], s.handler_errors)
        pending.add_metric([], stats.pending)
        yield from (msgs, dropped, eagain, errors, pending)

    def _tree(self):
        mgr = self.mgr
        c = mgr.root.counters
        lost = _counter("snsbus_tree_children_lost",
                        "Children the root declared dead: heartbeat deadline missed or connection closed")
        lost.add_metric([], c.get("children_lost", 0))
        beats = _counter("snsbus_tree_heartbeats_sent", "Heartbeats the root sent to its children")
        beats.add_metric([], c.get("heartbeats_sent", 0))
        ops = _counter("snsbus_tree_operations", "Operations the root started, and those that hit their deadline",
                       ["outcome"])
        ops.add_metric(["started"], c.get("ops", 0))
        ops.add_metric(["expired"], c.get("ops_expired", 0))
        mc = mgr.membership.counters
        events = _counter("snsbus_membership_events", "Membership events by kind", ["kind"])
        for kind in sorted(mc):
            events.add_metric([kind], mc[kind])
        repairs = _counter("snsbus_tree_repairs", "Orphans that rejoined the tree (repairs)")
        repairs.add_metric([], mc.get("rejoined", 0))
        members = _gauge("snsbus_members", "Members by state", ["state"])
        by_state = dict.fromkeys(_STATES, 0)
        for m in mgr.membership.members.values():
            by_state[m.state] = by_state.get(m.state, 0) + 1
        for state, n in by_state.items():
            members.add_metric([state], n)
        children = _gauge("snsbus_root_children", "Direct children of the root")
        children.add_metric([], len(mgr.root.children))
        uptime = _gauge("snsbus_manager_uptime_seconds", "Seconds since the manager started")
        uptime.add_metric([], mgr.uptime())
        yield from (lost, beats, ops, events, repairs, members, children, uptime)

    def _services(self, st: dict):
        labels = ["service", "worker", "instance", "node"]
        queue = _gauge("snsbus_worker_queue_length", "Requests queued at a worker instance (last report)", labels)
        busy = _gauge("snsbus_worker_busy", "Requests running at a worker instance (last report)", labels)
        smoothed = _gauge("snsbus_worker_queue_smoothed", "The manager's smoothed queue length (spawn decisions)",
                          labels)
        cost = _gauge("snsbus_worker_cost_seconds", "EWMA seconds per request at a worker instance", labels)
        reqs = _counter("snsbus_worker_requests", "Requests a worker instance finished", [*labels, "outcome"])
        crashes = _counter("snsbus_worker_crashes", "Worker processes that died under an instance", labels)
        cache_bytes = _gauge("snsbus_cache_bytes", "Bytes held by a cache partition", ["service", "instance", "node"])
        cache_ops = _counter("snsbus_cache_lookups", "Cache partition lookups", ["service", "instance", "node",
                                                                                  "result"])
        instances = _gauge("snsbus_service_instances", "Worker instances per class", ["service", "worker"])
        for svc in st.get("services", ()):
            per_class = {c["worker"]: 0 for c in svc.get("classes", ())}
            for i in svc.get("instances", ()):
                if i.get("cache"):
                    lv = [svc["name"], i["id"], i["node"]]
                    cache_bytes.add_metric(lv, i.get("bytes", 0))
                    cache_ops.add_metric([*lv, "hit"], i.get("hits", 0))
                    cache_ops.add_metric([*lv, "miss"], i.get("misses", 0))
                    continue
                per_class[i["w"]] = per_class.get(i["w"], 0) + 1
                lv = [svc["name"], i["w"], i["id"], i["node"]]
                queue.add_metric(lv, i.get("q", 0))
                busy.add_metric(lv, i.get("busy", 0))
                smoothed.add_metric(lv, i.get("smoothed", 0.0))
                cost.add_metric(lv, i.get("cost", 0.0))
                reqs.add_metric([*lv, "done"], i.get("done", 0))
                reqs.add_metric([*lv, "failed"], i.get("failed", 0))
                crashes.add_metric(lv, i.get("crashes", 0))
            for w, n in sorted(per_class.items()):
                instances.add_metric([svc["name"], w], n)
        counters = st.get("counters", {})
        spawns = _counter("snsbus_service_spawns", "Worker instances the manager spawned")
        spawns.add_metric([], counters.get("spawns", 0))
        reaps = _counter("snsbus_service_reaps", "Worker instances the manager reaped")
        reaps.add_metric([], counters.get("reaps", 0))
        failures = _counter("snsbus_service_op_failures", "svc.spawn/reap/cache operations that failed")
        failures.add_metric([], counters.get("op_failures", 0))
        subs = _gauge("snsbus_service_subscribers", "Front ends subscribed to beacons")
        subs.add_metric([], st.get("subscribers", 0))
        yield from (queue, busy, smoothed, cost, reqs, crashes, cache_bytes, cache_ops, instances, spawns, reaps,
                    failures, subs)

    def _monitor(self):
        mon = self.monitor
        cpu = _gauge("snsbus_node_cpu_percent", "CPU of a node's process, percent of one core (last poll)",
                     ["node"])
        rss = _gauge("snsbus_node_rss_bytes", "Resident memory of a node's process (last poll)", ["node"])
        for name, load in sorted(mon.node_loads().items()):
            cpu.add_metric([name], load.get("cpu", 0.0))
            rss.add_metric([name], load.get("rss", 0))
        yield cpu
        yield rss
        latency = HistogramMetricFamily("snsbus_frontend_request_duration_seconds",
                                        "Request latency measured by each front end", labels=["frontend"])
        requests = _counter("snsbus_frontend_requests", "Service requests (/distill, /sheet) a front end answered",
                            ["frontend"])
        up = _gauge("snsbus_frontend_up", "1 if the front end's /stats answered at the last poll", ["frontend"])
        for url, fe in sorted(mon.frontend_stats().items()):
            up.add_metric([url], 1 if fe.get("ok") else 0)
            stats = fe.get("stats") or {}
            n = served(stats.get("frontend") or {})
            if n is not None:
                requests.add_metric([url], n)
            h = parse_histogram(stats.get("latency"))
            if h is not None:
                cumulative, running = [], 0
                for bound, c in zip([*h["bounds"], math.inf], h["counts"]):
                    running += c
                    cumulative.append(("+Inf" if bound == math.inf else repr(bound), running))
                latency.add_metric([url], cumulative, sum_value=h["sum"])
        yield from (latency, requests, up)
        alerts = mon.alerts.statistics()
        active = _gauge("snsbus_alerts_active", "Alerts firing now")
        active.add_metric([], alerts.get("active", 0))
        sent = _counter("snsbus_alerts", "Alert transitions", ["status"])
        sent.add_metric(["firing"], alerts.get("fired", 0))
        sent.add_metric(["resolved"], alerts.get("resolved", 0))
        hooks = _counter("snsbus_alert_hook_failures", "Alert deliveries that failed (command or webhook)")
        hooks.add_metric([], alerts.get("hook_failures", 0))
        yield from (active, sent, hooks)


def new_registry(mgr, monitor=None) -> CollectorRegistry:
    """A registry of its own holding one :class:`ManagerCollector` (never the global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ManagerCollector(mgr, monitor))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The exposition text of ``registry`` (what ``GET /metrics`` returns)."""
    return generate_latest(registry)
