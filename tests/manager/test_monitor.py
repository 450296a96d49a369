"""The web monitor: snapshot, page and assets, event stream, authorization, actions, polls.

A real Manager and a NodeHost with three logical nodes run in-process on
loopback; HTTP goes through aiohttp's client.  Pure helpers and the ``proc``
operation are tested on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web

from bus.policy import TreeConfig
from manager.monitor import (ACTION_HEADER, Monitor, MonitorError, is_loopback, ratio, start_monitor, totals_step,
                             window_rate)
from manager.server import Manager
from manager.spec import Service, ServiceWorker
from nodes import ops
from nodes.agent import NodeHost

NAMES = ["a", "b", "c"]


@contextlib.asynccontextmanager
async def running(names=NAMES, state_dir=None, **monitor_kw):
    """A manager, ``names`` joined under it, and its monitor; everything stopped afterwards."""
    cfg = TreeConfig(max_children=2)
    mgr = Manager(control="tcp://127.0.0.1:0", config=cfg, state_dir=state_dir)
    await mgr.start()
    host = NodeHost(mgr.link.control_endpoint, list(names), config=cfg)
    mon = None
    try:
        await host.start()
        await until(lambda: sum(1 for m in mgr.membership.alive() if m.name) == len(names))
        monitor_kw.setdefault("interval", 0.2)
        monitor_kw.setdefault("node_poll", 0.5)
        mon = await start_monitor(mgr, **monitor_kw)
        yield mgr, mon
    finally:
        if mon is not None:
            await mon.stop()
        await host.stop()
        await mgr.stop()


async def until(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)


async def get(url, **kw):
    async with aiohttp.ClientSession() as s:
        async with s.get(url, **kw) as r:
            return r.status, r.headers, await r.read()


# -- snapshot, page, assets ----------------------------------------------------------------------

def test_snapshot_page_and_assets_from_loopback(tmp_path):
    async def go():
        async with running(state_dir=tmp_path / "mgr") as (mgr, mon):
            assert mon.url == f"http://127.0.0.1:{mon.port}/"
            status, headers, body = await get(mon.url)
            assert status == 200 and b"snsbus monitor" in body
            assert "script-src 'self'" in headers["Content-Security-Policy"]
            assert headers["Referrer-Policy"] == "no-referrer"
            status, headers, body = await get(mon.url + "static/monitor.js")
            assert status == 200 and headers["Content-Type"].startswith("text/javascript") and b"EventSource" in body
            assert (await get(mon.url + "static/index.py"))[0] == 404
            assert (await get(mon.url + "static/%2e%2e%2fmonitor.py"))[0] == 404
            # Node CPU/memory arrive with the first proc poll.
            await until(lambda: all(n["load"] for n in mon.snapshot()["nodes"]))
            status, _, body = await get(mon.url + "api/snapshot")
            snap = json.loads(body)
            assert status == 200
            assert sorted(n["name"] for n in snap["nodes"]) == NAMES
            assert snap["counts"] == {"alive": 3, "dead": 0, "unreachable": 0, "left": 0}
            assert all(n["load"]["pid"] == os.getpid() and n["load"]["rss"] > 0 for n in snap["nodes"])
            assert {n["depth"] for n in snap["nodes"]} <= {1, 2}
            assert [e["kind"] for e in snap["events"]].count("joined") == 3
            assert snap["apps"] == [] and snap["services"] == [] and snap["frontends"] == []
            assert snap["planes"]["control"]["messages"] > 0
            assert snap["alerts"] == {"active": [], "feed": []}
            assert mon.counters["node_polls"] >= 1
    asyncio.run(go())


def test_services_rows_and_rates_in_the_snapshot():
    svc = Service("tr", (ServiceWorker("distill", "m:f", "workers", min=0, max=4, high_water=100.0),))

    def report(done, hits):
        return {"node": "a", "data": "tcp://127.0.0.1:1", "rows": [
            {"svc": "tr", "id": "tr/distill@a#1", "w": "distill", "kind": "transformation", "q": 3, "busy": 1,
             "cost": 0.02, "done": done, "failed": 0, "crashes": 0},
            {"svc": "tr", "id": "tr/cache@a#2", "w": "cache", "cache": True, "q": 0, "busy": 0,
             "bytes": 1000, "hits": hits, "misses": 10}]}

    async def go():
        async with running(interval=0.1) as (mgr, mon):
            mgr.services.register("app", svc, {"workers": ["a"]}, {})
            mgr.services.on_report(report(0, 0))
            await asyncio.sleep(0.3)
            mgr.services.on_report(report(50, 30))
            await asyncio.sleep(0.3)
            snap = mon.snapshot()
            (s,) = snap["services"]
            assert [i["id"] for i in s["instances"]] == ["tr/cache@a#2", "tr/distill@a#1"]
            worker = s["instances"][1]
            assert (worker["q"], worker["busy"], worker["done"]) == (3, 1, 50)
            assert s["rates"]["tasks_per_s"] > 0
            assert s["rates"]["cache_hit_rate"] == pytest.approx(1.0)  # 30 hits, no new miss in the window
            assert next(n for n in snap["nodes"] if n["name"] == "a")["queued"] == 4
            assert [e["kind"] for e in snap["service_events"]] == ["registered"]
            mgr.services.unregister("app")
    asyncio.run(go())


# -- the event stream ------------------------------------------------------------------------------

def test_event_stream_pushes_a_snapshot_every_second_and_ends_on_stop():
    async def go():
        async with running(names=["a"], interval=1.0) as (mgr, mon):
            arrivals, seqs = [], []
            async with aiohttp.ClientSession() as s:
                async with s.get(mon.url + "api/events") as r:
                    assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
                    event = None
                    async for raw in r.content:
                        line = raw.decode().rstrip("\n")
                        if line.startswith("event: "):
                            event = line[7:]
                        elif line.startswith("data: ") and event == "snapshot":
                            arrivals.append(time.monotonic())
                            seqs.append(json.loads(line[6:])["seq"])
                            if len(seqs) == 4:
                                break
                    assert seqs == sorted(seqs) and len(set(seqs)) == 4
                    gaps = [b - a for a, b in zip(arrivals[1:], arrivals[2:])]
                    assert max(gaps) < 1.5, gaps  # pushed about once a second, without asking
                async with s.get(mon.url + "api/events") as r:
                    await r.content.readline()
                    await mon.stop()  # the stream ends instead of hanging the shutdown
                    rest = await asyncio.wait_for(r.content.read(), 5)
                    assert isinstance(rest, bytes)
    asyncio.run(go())


# -- authorization ---------------------------------------------------------------------------------

def test_token_is_required_when_loopback_is_not_trusted():
    async def go():
        async with running(names=["a"], token="s3cret-token", trust_loopback=False) as (mgr, mon):
            for path in ("", "api/snapshot", "api/events", "metrics"):
                status, headers, body = await get(mon.url + path)
                assert status == 401, path
                assert "Bearer" in headers["WWW-Authenticate"] and b"token" in body
            assert (await get(mon.url + "api/snapshot?token=wrong"))[0] == 401
            assert (await get(mon.url + "api/snapshot", headers={"Authorization": "Bearer wrong"}))[0] == 401
            assert (await get(mon.url + "api/snapshot?token=s3cret-token"))[0] == 200
            assert (await get(mon.url + "metrics", headers={"Authorization": "Bearer s3cret-token"}))[0] == 200
            assert (await get(mon.url + "static/monitor.css"))[0] == 200  # assets hold no data
            assert mon.counters["refused"] >= 6
    asyncio.run(go())


def test_loopback_trust_needs_a_loopback_host_name():
    async def go():
        async with running(names=["a"]) as (mgr, mon):
            assert (await get(mon.url + "api/snapshot"))[0] == 200
            assert (await get(f"http://localhost:{mon.port}/api/snapshot"))[0] == 200
            # A DNS-rebinding page reaches 127.0.0.1 under its own name: refused.
            status, _, _ = await get(mon.url + "api/snapshot", headers={"Host": f"evil.example:{mon.port}"})
            assert status == 401
    asyncio.run(go())


def test_a_public_address_needs_a_token():
    async def go():
        mgr = SimpleNamespace()
        with pytest.raises(MonitorError, match="without a token"):
            await Monitor(mgr).start("0.0.0.0", 0)
        with pytest.raises(MonitorError, match="empty"):
            Monitor(mgr, token="")
    asyncio.run(go())


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("127.9.9.9") and is_loopback("::1")
    assert is_loopback("[::1]") and is_loopback("localhost") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("evil.example")
    assert not is_loopback("") and not is_loopback("localhost.evil.example")


# -- actions -----------------------------------------------------------------------------------------

class FakeServices:
    """The real ServiceManager's status, plus the set_enabled the monitor calls (recorded)."""

    def __init__(self, real, known=("tr/distill",)):
        self.real = real
        self.known = set(known)
        self.calls = []

    def status(self):
        return self.real.status()

    def set_enabled(self, svc, worker, enabled):
        if f"{svc}/{worker}" not in self.known:
            raise KeyError(f"no worker class {worker!r} in service {svc!r}")
        self.calls.append((svc, worker, enabled))
        return {"service": svc, "worker": worker, "enabled": enabled}


class NoActions:
    def __init__(self, real):
        self.real = real

    def status(self):
        return self.real.status()


def test_disable_and_enable_a_worker_class():
    async def post(url, body, headers):
        async with aiohttp.ClientSession() as s:
            async with s.post(url, data=json.dumps(body), headers=headers) as r:
                return r.status, await r.json()

    async def go():
        async with running(names=["a"]) as (mgr, mon):
            real = mgr.services
            ok = {"Content-Type": "application/json", ACTION_HEADER: "1"}
            body = {"service": "tr", "worker": "distill"}
            try:
                mgr.services = NoActions(real)
                await until(lambda: mon.snapshot()["actions"] is False)
                status, reply = await post(mon.url + "api/disable", body, ok)
                assert status == 501 and "set_enabled" in reply["error"]
                fake = mgr.services = FakeServices(real)
                await until(lambda: mon.snapshot()["actions"])
                # CSRF: no custom header, a form content type, a foreign origin, a cross-site fetch.
                assert (await post(mon.url + "api/disable", body, {"Content-Type": "application/json"}))[0] == 403
                assert (await post(mon.url + "api/disable", body,
                                   {"Content-Type": "text/plain", ACTION_HEADER: "1"}))[0] == 403
                assert (await post(mon.url + "api/disable", body,
                                   {**ok, "Origin": "http://evil.example"}))[0] == 403
                assert (await post(mon.url + "api/disable", body, {**ok, "Sec-Fetch-Site": "cross-site"}))[0] == 403
                assert fake.calls == []
                assert (await post(mon.url + "api/disable", {"service": "tr"}, ok))[0] == 400
                assert (await post(mon.url + "api/disable", {"service": "tr", "worker": "nope"}, ok))[0] == 404
                status, reply = await post(mon.url + "api/disable", body,
                                           {**ok, "Origin": f"http://127.0.0.1:{mon.port}"})
                assert status == 200 and reply["result"]["enabled"] is False
                status, reply = await post(mon.url + "api/enable", body, ok)
                assert status == 200 and reply["result"]["enabled"] is True
                assert fake.calls == [("tr", "distill", False), ("tr", "distill", True)]
            finally:
                mgr.services = real
    asyncio.run(go())


def test_disable_through_the_real_service_manager():
    svc = Service("tr", (ServiceWorker("distill", "m:f", "workers", min=0, max=2),))

    async def go():
        async with running(names=["a"]) as (mgr, mon):
            if not hasattr(mgr.services, "set_enabled"):
                pytest.fail("ServiceManager.set_enabled is missing (see the monitor's docstring)")
            mgr.services.register("app", svc, {"workers": ["a"]}, {})
            hdr = {"Content-Type": "application/json", ACTION_HEADER: "1"}
            async with aiohttp.ClientSession() as s:
                async with s.post(mon.url + "api/disable", json={"service": "tr", "worker": "distill"},
                                  headers=hdr) as r:
                    assert r.status == 200 and (await r.json())["result"]["enabled"] is False
                async with s.post(mon.url + "api/disable", json={"service": "tr", "worker": "nope"},
                                  headers=hdr) as r:
                    assert r.status == 404 and "nope" in (await r.json())["error"]
            await until(lambda: mon.snapshot()["services"]
                        and mon.snapshot()["services"][0]["classes"][0]["enabled"] is False)
            assert "disabled" in [e["kind"] for e in mon.snapshot()["service_events"]]
            mgr.services.unregister("app")
    asyncio.run(go())


def test_actions_need_the_token_too():
    async def go():
        async with running(names=["a"], token="tok", trust_loopback=False) as (mgr, mon):
            real = mgr.services
            mgr.services = fake = FakeServices(real)
            try:
                async with aiohttp.ClientSession() as s:
                    hdr = {"Content-Type": "application/json", ACTION_HEADER: "1"}
                    body = json.dumps({"service": "tr", "worker": "distill"})
                    async with s.post(mon.url + "api/disable", data=body, headers=hdr) as r:
                        assert r.status == 401
                    async with s.post(mon.url + "api/disable", data=body,
                                      headers={**hdr, "Authorization": "Bearer tok"}) as r:
                        assert r.status == 200
                assert fake.calls == [("tr", "distill", False)]
            finally:
                mgr.services = real
    asyncio.run(go())


# -- front ends --------------------------------------------------------------------------------------

class FakeFrontEnd:
    """A real HTTP server answering /stats like a front end that reports a latency histogram."""

    def __init__(self):
        self.requests = 0
        self.runner = None
        self.url = ""

    async def start(self):
        app = web.Application()
        app.router.add_get("/stats", self.stats)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stats(self, request):
        self.requests += 10
        n = self.requests
        # 10 requests per poll: 6 under 10 ms, 3 under 100 ms, 1 under 1 s.
        counts = [6 * n // 10, 3 * n // 10, n // 10, 0]
        # "requests" also counts /stats and /health; "distill" + "sheet" are the service requests.
        return web.json_response({"frontend": {"requests": n + 999, "distill": n, "sheet": 0, "hits": n // 2,
                                               "misses": n // 2},
                                  "latency": {"bounds": [0.01, 0.1, 1.0], "counts": counts, "sum": 0.05 * n}})

    async def stop(self):
        await self.runner.cleanup()


def test_front_ends_are_polled_for_rates_and_latency():
    async def go():
        fe = FakeFrontEnd()
        await fe.start()
        dead = "http://127.0.0.1:9"  # nothing listens on the discard port
        try:
            async with running(names=["a"], frontends=[fe.url, dead], frontend_poll=0.2) as (mgr, mon):
                await until(lambda: fe.requests >= 40)
                view = {f["url"]: f for f in mon.snapshot()["frontends"]}
                f = view[fe.url]
                assert f["ok"] and f["requests_per_s"] > 0 and f["hit_rate"] == pytest.approx(0.5)
                assert 0 < f["requests"] <= fe.requests  # /distill + /sheet: the 999 /stats requests left out
                assert 0 < f["latency"]["p50"] <= 0.01 < f["latency"]["p90"] <= 0.1 < f["latency"]["p99"] <= 1.0
                assert not view[dead]["ok"] and view[dead]["error"]
        finally:
            await fe.stop()
    asyncio.run(go())


# -- pure helpers --------------------------------------------------------------------------------------

def test_totals_never_go_backwards_when_instances_come_and_go():
    t = totals_step({}, {}, {"w1": {"done": 5}, "w2": {"done": 2}})
    assert t == {"done": 7}
    t = totals_step(t, {"w1": {"done": 5}, "w2": {"done": 2}}, {"w1": {"done": 8}})  # w2 reaped
    assert t == {"done": 10}
    t = totals_step(t, {"w1": {"done": 8}}, {"w1": {"done": 1}, "w3": {"done": 4}})  # w1 restarted, w3 new
    assert t == {"done": 15}


def test_window_rate_and_ratio():
    samples = [(0.0, {"k": 0}), (5.0, {"k": 10}), (10.0, {"k": 30}), (12.0, {"k": 40})]
    assert window_rate(samples, "k", 12.0, window=10.0) == pytest.approx(30 / 7)  # from t=5
    assert window_rate(samples[:1], "k", 0.0) is None
    assert window_rate([], "k", 1.0) is None
    assert ratio(3, 1) == 0.75 and ratio(0, 0) is None and ratio(None, 1) is None


# -- the proc operation ------------------------------------------------------------------------------------

def test_proc_op_reports_the_process_and_what_it_runs():
    sup = SimpleNamespace(status=lambda: [{"name": "srv", "state": "running", "pid": 42, "restarts": 1,
                                          "exit_code": None, "since": 0.0, "reason": ""}])
    stub = SimpleNamespace(statistics=lambda: {"workers": {"tr/d@a#1": {
        "state": "ready", "pid": 43, "queued": 2, "busy": True, "restarts": 0, "crashes": 1, "start_s": 0.1,
        "overhead_s": 0.0, "accepting": True}}})
    node = SimpleNamespace(name="a", apps=SimpleNamespace(_supervisors={"web": sup}), stub=stub)
    v = ops.op_proc(node, {}, 1.0)
    assert v["pid"] == os.getpid() and v["rss"] > 0 and v["cpu"] >= 0.0 and v["source"] in ("psutil", "os")
    assert v["procs"] == [{"app": "web", "name": "srv", "state": "running", "pid": 42, "restarts": 1,
                           "exit_code": None}]
    assert v["workers"] == [{"id": "tr/d@a#1", "state": "ready", "pid": 43, "restarts": 0, "crashes": 1,
                             "queued": 2}]
    # Logical nodes of one process asked in the same broadcast share one sample.
    bare = ops.op_proc(SimpleNamespace(name="b"), {}, 1.0)
    assert (bare["cpu"], bare["rss"]) == (v["cpu"], v["rss"]) and bare["procs"] == bare["workers"] == []
    assert ops.HANDLERS[ops.PROC_OP] is ops.op_proc


def test_proc_op_without_psutil(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "psutil", None)  # `import psutil` raises ImportError
    monkeypatch.setattr(ops, "_sample", {})
    v = ops.op_proc(SimpleNamespace(name="a"), {}, 1.0)
    assert v["source"] == "os" and v["rss"] > 0 and v["pid"] == os.getpid()
