"""``/metrics``: parsed with prometheus-client's own parser; counters move when traffic flows.

A real Manager and NodeHost run in-process; the traffic is real broadcasts
through the tree.  The collector's service and front-end families are also
checked against a manager-shaped fake (its inputs are plain snapshots).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from types import SimpleNamespace

import aiohttp
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bus.policy import TreeConfig
from manager import metrics
from manager.alerts import AlertEngine
from manager.monitor import start_monitor
from manager.server import Manager
from nodes.agent import NodeHost


@contextlib.asynccontextmanager
async def running(names, **monitor_kw):
    cfg = TreeConfig(max_children=2)
    mgr = Manager(control="tcp://127.0.0.1:0", config=cfg)
    await mgr.start()
    host = NodeHost(mgr.link.control_endpoint, list(names), config=cfg)
    mon = None
    try:
        await host.start()
        deadline = time.monotonic() + 15
        while sum(1 for m in mgr.membership.alive() if m.name) < len(names):
            assert time.monotonic() < deadline, "nodes did not join"
            await asyncio.sleep(0.05)
        mon = await start_monitor(mgr, **monitor_kw)
        yield mgr, host, mon
    finally:
        if mon is not None:
            await mon.stop()
        await host.stop()
        await mgr.stop()


async def scrape(mon) -> dict:
    """{(sample name, sorted labels): value} of one scrape, through the parser of prometheus-client."""
    async with aiohttp.ClientSession() as s:
        async with s.get(mon.url + "metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def test_counters_move_when_traffic_flows():
    async def go():
        async with running(["a", "b", "c", "d"], node_poll=60.0) as (mgr, host, mon):
            before = await scrape(mon)
            assert value(before, "snsbus_members", state="alive") == 4
            assert value(before, "snsbus_members", state="dead") == 0
            assert value(before, "snsbus_membership_events_total", kind="joined") == 4
            for _ in range(20):
                out = mgr.root.outcome(await mgr.root.broadcast("ping", {}, timeout=5.0),
                                       {m.id for m in mgr.membership.alive()})
                assert out["answered"] == 4
            after = await scrape(mon)
            for direction in ("received", "sent"):
                key = ("snsbus_plane_messages_total", (("direction", direction), ("plane", "control")))
                assert after[key] >= before[key] + 20, direction
            ops = ("snsbus_tree_operations_total", (("outcome", "started"),))
            assert after[ops] >= before[ops] + 20
            assert value(after, "snsbus_tree_children_lost_total") == 0
            # The node process stops: members by state follow.  Nodes whose parent
            # left first cannot say goodbye through it, so they show as unreachable.
            await host.stop()
            deadline = time.monotonic() + 10
            while value(await scrape(mon), "snsbus_members", state="alive") > 0:
                assert time.monotonic() < deadline, "the nodes still show alive"
                await asyncio.sleep(0.1)
            final = await scrape(mon)
            gone = {s: value(final, "snsbus_members", state=s) for s in ("left", "unreachable", "dead")}
            assert sum(gone.values()) == 4 and gone["left"] >= 1
            assert value(final, "snsbus_membership_events_total", kind="left") == gone["left"]
    asyncio.run(go())


def test_the_registry_is_private():
    async def go():
        async with running(["a"], node_poll=0.2) as (mgr, host, mon):
            while not mon.node_loads():
                await asyncio.sleep(0.05)
            samples = await scrape(mon)
            assert value(samples, "snsbus_node_rss_bytes", node="a") > 0
            assert value(samples, "snsbus_alerts_active") == 0
            assert value(samples, "snsbus_manager_uptime_seconds") > 0
        global_names = {m.name for m in prometheus_client.REGISTRY.collect()}
        assert not any(n.startswith("snsbus") for n in global_names)
    asyncio.run(go())


# -- the collector over fakes --------------------------------------------------------------------

class _Loop:
    def statistics(self):
        from bus.planes import PlaneLoop

        return PlaneLoop().statistics()  # all zero: a loop that never ran


def fake_manager(services):
    membership = SimpleNamespace(counters={"joined": 2, "rejoined": 1, "lost": 1, "left": 0, "replaced": 0},
                                 members={1: SimpleNamespace(state="alive"), 2: SimpleNamespace(state="dead")})
    return SimpleNamespace(
        root=SimpleNamespace(counters={"children_lost": 3, "heartbeats_sent": 9, "ops": 4, "ops_expired": 1},
                             children={}),
        loop=_Loop(), membership=membership, uptime=lambda: 12.5,
        services=SimpleNamespace(status=lambda: services),
        chunks=SimpleNamespace(statistics=lambda: {"bytes_served": 4096}),
        apps=SimpleNamespace(list=lambda: [{"name": "x", "phase": "running"}, {"name": "y", "phase": "failed"}]))


SERVICES = {
    "services": [{"name": "tr", "app": "t", "classes": [{"worker": "distill"}, {"worker": "sheet"}], "instances": [
        {"id": "tr/distill@w1#1", "w": "distill", "node": "w1", "cache": False, "q": 5, "busy": 1, "smoothed": 4.5,
         "cost": 0.03, "done": 100, "failed": 2, "crashes": 1},
        {"id": "tr/cache@w2#2", "w": "cache", "node": "w2", "cache": True, "bytes": 777, "hits": 8, "misses": 2},
    ]}],
    "events": [], "counters": {"spawns": 3, "reaps": 1, "op_failures": 0}, "subscribers": 2,
}


class FakeMonitor:
    def __init__(self):
        self.alerts = AlertEngine()

    def node_loads(self):
        return {"w1": {"cpu": 12.5, "rss": 1 << 20}}

    def frontend_stats(self):
        return {"http://fe:8080": {"ok": True, "stats": {
            "frontend": {"requests": 15, "distill": 7, "sheet": 3},
            "latency": {"bounds": [0.01, 0.1], "counts": [6, 3, 1], "sum": 0.4}}},
            "http://fe2:8080": {"ok": False, "stats": None}}


def test_collector_families_from_statistics():
    registry = metrics.new_registry(fake_manager(SERVICES), FakeMonitor())
    families = {f.name: f for f in text_string_to_metric_families(metrics.render(registry).decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    w = (("instance", "tr/distill@w1#1"), ("node", "w1"), ("service", "tr"), ("worker", "distill"))
    assert samples[("snsbus_worker_queue_length", w)] == 5
    assert samples[("snsbus_worker_busy", w)] == 1
    assert samples[("snsbus_worker_queue_smoothed", w)] == 4.5
    assert samples[("snsbus_worker_cost_seconds", w)] == 0.03
    assert samples[("snsbus_worker_requests_total", tuple(sorted((*w, ("outcome", "done")))))] == 100
    assert samples[("snsbus_worker_requests_total", tuple(sorted((*w, ("outcome", "failed")))))] == 2
    assert samples[("snsbus_worker_crashes_total", w)] == 1
    c = (("instance", "tr/cache@w2#2"), ("node", "w2"), ("service", "tr"))
    assert samples[("snsbus_cache_bytes", c)] == 777
    assert samples[("snsbus_cache_lookups_total", tuple(sorted((*c, ("result", "hit")))))] == 8
    assert samples[("snsbus_service_instances", (("service", "tr"), ("worker", "distill")))] == 1
    assert samples[("snsbus_service_instances", (("service", "tr"), ("worker", "sheet")))] == 0
    assert samples[("snsbus_service_spawns_total", ())] == 3
    assert samples[("snsbus_service_reaps_total", ())] == 1
    assert samples[("snsbus_packages_served_bytes_total", ())] == 4096
    assert samples[("snsbus_tree_children_lost_total", ())] == 3
    assert samples[("snsbus_tree_repairs_total", ())] == 1
    assert samples[("snsbus_members", (("state", "dead"),))] == 1
    assert samples[("snsbus_applications", (("phase", "failed"),))] == 1
    assert samples[("snsbus_node_cpu_percent", (("node", "w1"),))] == 12.5
    assert families["snsbus_frontend_request_duration_seconds"].type == "histogram"
    fe = (("frontend", "http://fe:8080"),)
    assert samples[("snsbus_frontend_request_duration_seconds_bucket", (*fe, ("le", "0.01")))] == 6
    assert samples[("snsbus_frontend_request_duration_seconds_bucket", (*fe, ("le", "0.1")))] == 9
    assert samples[("snsbus_frontend_request_duration_seconds_bucket", (*fe, ("le", "+Inf")))] == 10
    assert samples[("snsbus_frontend_request_duration_seconds_count", fe)] == 10
    assert samples[("snsbus_frontend_request_duration_seconds_sum", fe)] == pytest.approx(0.4)
    assert samples[("snsbus_frontend_up", (("frontend", "http://fe2:8080"),))] == 0
    assert samples[("snsbus_frontend_requests_total", fe)] == 10  # /distill + /sheet, not /stats


# -- histogram helpers (pure) ----------------------------------------------------------------------

def test_quantiles_interpolate_inside_buckets():
    h = metrics.parse_histogram({"bounds": [0.1, 0.2, 0.4], "counts": [0, 10, 10, 0], "sum": 5.0})
    assert metrics.quantile(h, 0.5) == pytest.approx(0.2)
    assert metrics.quantile(h, 0.25) == pytest.approx(0.15)
    assert metrics.quantile(h, 0.99) == pytest.approx(0.2 + 0.2 * 0.98)
    over = metrics.parse_histogram({"bounds": [0.1], "counts": [1, 9], "sum": 3.0})
    assert metrics.quantile(over, 0.9) == 0.1  # above the last bound: that bound, no invention
    empty = metrics.parse_histogram({"bounds": [0.1], "counts": [0, 0]})
    assert metrics.quantile(empty, 0.5) is None


def test_histograms_are_checked_and_differenced():
    assert metrics.parse_histogram(None) is None
    assert metrics.parse_histogram({"bounds": [0.1, 0.05], "counts": [1, 1, 1]}) is None  # not increasing
    assert metrics.parse_histogram({"bounds": [0.1], "counts": [1]}) is None  # no overflow bucket
    assert metrics.parse_histogram({"bounds": [0.1], "counts": [1, -1]}) is None
    assert metrics.parse_histogram({"bounds": ["x"], "counts": [1, 1]}) is None
    old = metrics.parse_histogram({"bounds": [1.0], "counts": [2, 1], "sum": 3.0})
    new = metrics.parse_histogram({"bounds": [1.0], "counts": [5, 1], "sum": 4.5})
    assert metrics.histogram_delta(new, old) == {"bounds": [1.0], "counts": [3, 0], "sum": 1.5}
    assert metrics.histogram_delta(old, new) is old  # counts went down: the front end restarted
    assert math.isclose(metrics.quantile(metrics.histogram_delta(new, old), 0.5), 0.5)
