"""The SNS manager's state machine: reports in, beacons out, spawn/reap decisions.

The tree is replaced by a recorder of the operations the manager sends (the
real path is covered end to end in tests/tools/test_transend.py); the clock is
a variable, so every decision is deterministic.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from manager.services import ServiceManager
from manager.spec import Service, ServiceCache, ServiceWorker


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class FakeMgr:
    def __init__(self, nodes):
        self.calls = []
        self.sent = []
        self.membership = SimpleNamespace(alive=lambda: [SimpleNamespace(name=n, since=-1e9) for n in nodes])
        self.root = SimpleNamespace(node_id=1, ask=self._ask)
        self.link = SimpleNamespace(send_child=lambda ident, frames: self.sent.append(ident) or True)

    async def _ask(self, node, op, args, timeout):
        self.calls.append((node, op, args))
        return {"id": args.get("id")}


SVC = Service("tr", (ServiceWorker("distill", "m:f", "workers", min=1, max=4, high_water=2.0, delay=1.0,
                                   idle_after=5.0, calm_for=3.0),),
              (ServiceCache("workers", 1, 1000),), slots=2)


def report(node, rows):
    return {"node": node, "data": f"tcp://{node}:1", "rows": rows}


def row(iid, q=0, busy=0, cost=0.1, w="distill", cache=False):
    return {"svc": "tr", "id": iid, "w": w, "kind": "transformation", "q": q, "busy": busy, "cost": cost,
            "cache": cache}


def make(nodes=("a", "b"), overflow=("o",)):
    clock = Clock()
    mgr = FakeMgr([*nodes, *overflow])
    sm = ServiceManager(mgr, report_ttl=2.0, beacon_interval=0.5, clock=clock)
    sm.register("app", SVC, {"workers": list(nodes)}, {"workers": list(overflow)})
    clock.t += 10  # past the start-up grace
    return sm, mgr, clock


def run_tick(sm):
    async def go():
        sm.tick()
        await asyncio.sleep(0)
        await asyncio.gather(*sm._tasks)
    asyncio.run(go())


def test_the_beacon_carries_the_raw_load_and_each_senders_share():
    """Beside the smoothed queue (scaling), the beacon passes on the last report's queued + running (``r``) and
    the requests it named per front-end connection (``by``): a front end counts its own share live."""
    sm, mgr, clock = make()
    sm.on_report(report("a", [dict(row("tr/distill@a#1", q=5, busy=1), by={"fe1": 4, "fe2": 2})]))
    sm.on_report(report("a", [dict(row("tr/distill@a#1", q=1, busy=1), by={"fe1": 2})]))
    (w,) = sm.beacon("tr")["workers"]
    assert w["r"] == 2 and w["by"] == {"fe1": 2} and w["q"] > 2  # the smoothed queue lags behind
    sm.on_report(report("a", [dict(row("tr/distill@a#1", q=0, busy=0), by=["not", "a", "map"])]))
    (w,) = sm.beacon("tr")["workers"]
    assert w["r"] == 0 and w["by"] == {}


def test_minimum_worker_and_cache_are_spawned_on_the_main_pool():
    sm, mgr, clock = make()
    run_tick(sm)
    ops = sorted((op, node) for node, op, _ in mgr.calls)
    assert ops == [("svc.cache", "a"), ("svc.spawn", "a")]
    spawn = next(args for _, op, args in mgr.calls if op == "svc.spawn")
    assert spawn["callable"] == "m:f" and spawn["id"].startswith("tr/distill@a#")
    # pending: no second spawn before the first reports, even after D
    clock.t += 5
    mgr.calls.clear()
    run_tick(sm)
    assert [op for _, op, _ in mgr.calls] == []


def test_reports_build_the_beacon_and_expire():
    sm, mgr, clock = make()
    sm.on_report(report("a", [row("tr/distill@a#1", q=3, busy=1, cost=0.2), row("tr/cache@a#2", cache=True)]))
    b = sm.beacon("tr")
    assert [w["id"] for w in b["workers"]] == ["tr/distill@a#1"] and b["workers"][0]["q"] == 4.0
    assert b["workers"][0]["data"] == "tcp://a:1" and b["caches"] == [{"id": "tr/cache@a#2", "node": "a",
                                                                      "data": "tcp://a:1"}]
    clock.t += 2.5  # silent longer than report_ttl: the node is gone
    sm._expire(clock.t)
    assert sm.beacon("tr")["workers"] == [] and any(e["kind"] == "lost" for e in sm.events)


def test_queue_above_h_spawns_then_waits_d_then_overflow_when_main_full():
    sm, mgr, clock = make(nodes=("a",), overflow=("o",))
    rows = [row("tr/distill@a#1", q=6), row("tr/distill@a#2", q=6), row("tr/cache@a#3", cache=True)]
    sm.on_report(report("a", rows))
    run_tick(sm)  # node a has 2 slots, both used: the main pool is full -> overflow
    spawns = [(node, args["id"]) for node, op, args in mgr.calls if op == "svc.spawn"]
    assert len(spawns) == 1 and spawns[0][0] == "o"
    assert "overflow" in sm.events[-1]["detail"] or any("overflow" in e["detail"] for e in sm.events)
    # the new worker reports; load is still high but D has not passed
    mgr.calls.clear()
    clock.t += 0.5
    sm.on_report(report("a", rows))
    sm.on_report(report("o", [row(spawns[0][1], q=6)]))
    run_tick(sm)
    assert not [c for c in mgr.calls if c[1] == "svc.spawn"]
    assert "waiting D" in sm.services["tr"].classes["distill"].decision


def test_idle_workers_are_reaped_down_to_the_minimum_overflow_first():
    sm, mgr, clock = make(nodes=("a", "b"), overflow=("o",))
    rows = {"a": [row("tr/distill@a#1"), row("tr/cache@a#9", cache=True)], "b": [row("tr/distill@b#2")],
            "o": [row("tr/distill@o#3")]}
    for node, r in rows.items():
        sm.on_report(report(node, r))
    clock.t += 6  # idle for longer than idle_after (and calm for longer than calm_for)
    for node, r in rows.items():
        sm.on_report(report(node, r))
    run_tick(sm)
    reaped = [args["id"] for _, op, args in mgr.calls if op == "svc.reap"]
    assert reaped == ["tr/distill@o#3"]  # the borrowed overflow worker goes back first
    assert "tr/distill@o#3" not in [w["id"] for w in sm.beacon("tr")["workers"]]  # out of the beacon at once


def test_subscriptions_are_soft_state():
    sm, mgr, clock = make()
    assert sm.subscribe(b"fe1", "tr")["known"] is True
    assert sm.subscribe(b"fe2", "nope")["known"] is False
    sm._send_beacons(clock.t)
    assert sorted(mgr.sent) == [b"fe1", b"fe2"]
    clock.t += 6
    sm._expire(clock.t)
    assert sm.subscribers == {}


@pytest.mark.parametrize("bad", [None, {"rows": "x"}, {"rows": [{"no": "id"}]}])
def test_bad_reports_are_counted_and_dropped(bad):
    sm, mgr, clock = make()
    sm.on_report(bad)
    assert sm.counters["reports_bad"] == 1 and sm.instances == {}


def test_a_disabled_class_is_reaped_and_not_spawned_until_enabled():
    sm, mgr, clock = make()
    sm.on_report(report("a", [row("tr/distill@a#1", q=9), row("tr/cache@a#2", cache=True)]))

    async def disable():
        out = sm.set_enabled("tr", "distill", False)
        await asyncio.gather(*sm._tasks)
        return out

    assert asyncio.run(disable()) == {"svc": "tr", "worker": "distill", "enabled": False}
    assert [args["id"] for _, op, args in mgr.calls if op == "svc.reap"] == ["tr/distill@a#1"]
    mgr.calls.clear()
    clock.t += 5
    run_tick(sm)  # below the minimum: still nothing, the class is off
    assert not [c for c in mgr.calls if c[1] == "svc.spawn"]
    assert sm.status()["services"][0]["classes"][0]["enabled"] is False
    sm.set_enabled("tr", "distill", True)
    run_tick(sm)
    assert [node for node, op, _ in mgr.calls if op == "svc.spawn"] == ["a"]
    with pytest.raises(LookupError, match="no worker class 'nope'"):
        sm.set_enabled("tr", "nope", False)


def test_after_a_restart_the_pool_is_judged_once_every_node_is_back_and_had_time_to_report():
    """A restarted manager must not spawn minimums (or caches) that still run on nodes still rejoining."""
    clock = Clock()
    back = {"a": None, "b": None, "o": None}  # when each node registered again; None: not yet
    mgr = FakeMgr([])
    mgr.membership = SimpleNamespace(alive=lambda: [SimpleNamespace(name=n, since=t) for n, t in back.items()
                                                    if t is not None])
    sm = ServiceManager(mgr, report_ttl=2.0, beacon_interval=0.5, clock=clock)
    sm.register("app", SVC, {"workers": ["a", "b"]}, {"workers": ["o"]})
    clock.t += 3.5  # past the fixed start-up grace, but node b has not rejoined yet
    back["a"] = back["o"] = clock.t - 3.5
    run_tick(sm)
    assert mgr.calls == []
    back["b"] = clock.t  # b is back: it still needs a report period
    clock.t += 1.0
    run_tick(sm)
    assert mgr.calls == []
    clock.t += 2.5
    run_tick(sm)
    assert sorted(op for _, op, _ in mgr.calls) == ["svc.cache", "svc.spawn"]  # nobody reported: judged now


def test_a_node_that_never_comes_back_does_not_hold_scaling_forever():
    from manager.services import SETTLE_CAP

    clock = Clock()
    mgr = FakeMgr(["a"])  # b never comes back
    sm = ServiceManager(mgr, report_ttl=2.0, beacon_interval=0.5, clock=clock)
    sm.register("app", SVC, {"workers": ["a", "b"]}, {"workers": []})
    clock.t += 5
    run_tick(sm)
    assert mgr.calls == []
    clock.t += SETTLE_CAP * 2.0
    run_tick(sm)
    assert sorted(op for _, op, _ in mgr.calls) == ["svc.cache", "svc.spawn"]
