"""Alert rules (pure, over hand-made snapshots), their de-duplication, and the hooks for real.

The hooks are exercised with a real shell command writing to a file and a real
aiohttp webhook receiver on 127.0.0.1; the last test kills a real bus-node
process under an in-process manager and waits for the command to be run.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from aiohttp import web

from manager.alerts import (FIRING, RESOLVED, AlertConfig, AlertEngine, AlertHooks, RuleState, evaluate,
                            flapping, frontend_silent, node_down, transitions, tree_loss, worker_silent)

CFG = AlertConfig(lost_percent=20.0, flap_restarts=3, flap_window=60.0, frontend_silence=10.0,
                  unreachable_hold=3.0)


def node(name, state="alive", procs=None):
    return {"name": name, "state": state, "load": {"procs": procs or []} if procs is not None else None}


def snap(t, nodes=(), services=(), service_events=(), frontends=()):
    return {"t": t, "nodes": list(nodes), "services": list(services), "service_events": list(service_events),
            "frontends": list(frontends)}


def inst(iid, crashes=0):
    svc, rest = iid.split("/", 1)
    w, rest = rest.split("@", 1)
    return {"id": iid, "w": w, "node": rest.split("#")[0], "crashes": crashes, "cache": False}


def run_engine(engine, snaps):
    sent = []
    for s in snaps:
        sent += engine.observe(s)
    return sent


# -- rules -----------------------------------------------------------------------------------

def test_node_down_names_dead_nodes_but_not_left_or_renamed_ones():
    s = snap(0, [node("a"), node("b", "dead"), node("c", "left"), node("d", "dead"), node("d", "alive")])
    conds = {c.key: c for c in node_down(s, CFG)}
    assert set(conds) == {"node:b"}  # d died but a new instance took its name; c left cleanly
    assert conds["node:b"].severity == "critical" and conds["node:b"].hold == 0.0
    assert "dead" in conds["node:b"].summary


def test_an_orphan_unreachable_for_a_moment_sends_nothing():
    engine = AlertEngine(CFG)
    sent = run_engine(engine, [snap(0, [node("a"), node("b", "unreachable")]),
                               snap(1, [node("a"), node("b", "unreachable")]),
                               snap(2, [node("a"), node("b")])])
    assert sent == [] and engine.active() == []  # neither node:b nor a 50% tree loss
    # ... but one that stays unreachable past the hold fires once.
    sent = run_engine(engine, [snap(t, [node("a"), node("b", "unreachable")]) for t in (10, 11, 12, 13, 14)])
    assert [(a["status"], a["key"]) for a in sent] == [(FIRING, "node:b"), (FIRING, "tree:loss")]
    assert {a["at"] for a in sent} == {13}


def test_transitions_fire_once_and_resolve_once():
    engine = AlertEngine(CFG)
    down = [node("a"), node("b", "dead")]
    sent = run_engine(engine, [snap(t, down) for t in range(5)])
    assert [(a["status"], a["key"]) for a in sent] == [(FIRING, "node:b")]
    assert [a["key"] for a in engine.active()] == ["node:b"]
    sent = run_engine(engine, [snap(t, [node("a"), node("b")]) for t in range(5, 9)])
    assert [(a["status"], a["key"], a["since"], a["at"]) for a in sent] == [(RESOLVED, "node:b", 0, 5)]
    assert engine.active() == []
    assert engine.statistics() == {"active": 0, "fired": 1, "resolved": 1}
    assert [a["status"] for a in engine.feed] == [FIRING, RESOLVED]
    assert "sent" not in engine.feed[0]  # bookkeeping stays inside the engine


def test_transitions_are_pure():
    from manager.alerts import Condition

    c = Condition("k", "node_down", "s")
    active, out = transitions({}, {"k": c}, 1.0)
    active2, out2 = transitions(active, {"k": c}, 2.0)
    assert len(out) == 1 and out2 == [] and active2["k"]["since"] == 1.0
    assert transitions(active2, {}, 3.0)[1][0]["status"] == RESOLVED
    assert active["k"]["sent"] is True  # inputs untouched by later calls


def test_tree_loss_against_the_baseline_and_clean_leaves():
    alive = [node(f"n{i}") for i in range(10)]
    st, conds = tree_loss(RuleState(), snap(0, alive), CFG)
    assert st.baseline == 10 and conds == []
    # 2 of 10 dead: 20% is not more than 20%
    st, conds = tree_loss(st, snap(1, alive[:8] + [node("n8", "dead"), node("n9", "dead")]), CFG)
    assert conds == []
    st, conds = tree_loss(st, snap(2, alive[:7] + [node(f"n{i}", "dead") for i in (7, 8, 9)]), CFG)
    assert [c.key for c in conds] == ["tree:loss"] and "3 of 10" in conds[0].summary and conds[0].hold == 0
    # Dead nodes over the threshold fire at once; orphans about to rejoin are not counted as lost.
    st, conds = tree_loss(st, snap(3, alive[:2] + [node(f"n{i}", "unreachable") for i in range(2, 7)]
                                   + [node(f"n{i}", "dead") for i in (7, 8, 9)]), CFG)
    assert conds[0].hold == 0 and conds[0].summary.startswith("the tree lost 3 of 10")
    assert "5 more unreachable" in conds[0].summary
    # Orphans alone must stay unreachable for the hold.
    st, conds = tree_loss(st, snap(4, alive[:5] + [node(f"n{i}", "unreachable") for i in range(5, 10)]), CFG)
    assert conds[0].hold == CFG.unreachable_hold and "5 of them unreachable" in conds[0].summary
    # Nodes that leave cleanly lower the baseline: shrinking on purpose is no loss.
    st = RuleState()
    st, _ = tree_loss(st, snap(0, alive), CFG)
    st, conds = tree_loss(st, snap(1, alive[:5] + [node(f"n{i}", "left") for i in range(5, 10)]), CFG)
    assert st.baseline == 5 and conds == []
    # Members forgotten after leaving do not raise it again.
    st, conds = tree_loss(st, snap(2, alive[:5]), CFG)
    assert st.baseline == 5 and conds == []


def test_worker_silent_until_its_class_is_whole_again():
    svc = lambda *ids: {"name": "tr", "instances": [inst(i) for i in ids]}  # noqa: E731
    lost = {"t": 100.0, "kind": "lost", "svc": "tr", "detail": "tr/distill@w1#3 on w1: no load report for 2s"}
    st = RuleState()
    st, conds = worker_silent(st, snap(0, services=[svc("tr/distill@w1#3", "tr/distill@w2#4")]))
    assert conds == []
    st, conds = worker_silent(st, snap(1, services=[svc("tr/distill@w2#4")], service_events=[lost]))
    assert [c.key for c in conds] == ["worker:tr/distill@w1"]
    assert "1 of 2" in conds[0].summary
    # The same event seen again changes nothing; the condition holds until a replacement reports.
    st, conds = worker_silent(st, snap(2, services=[svc("tr/distill@w2#4")], service_events=[lost]))
    assert [c.key for c in conds] == ["worker:tr/distill@w1"]
    st, conds = worker_silent(st, snap(3, services=[svc("tr/distill@w2#4", "tr/distill@w3#5")],
                                       service_events=[lost]))
    assert conds == [] and st.lost_workers == ()
    # A reap is no loss.
    reap = {"t": 101.0, "kind": "reap", "svc": "tr", "detail": "tr/distill@w3#5 on w3: idle"}
    st, conds = worker_silent(st, snap(4, services=[svc("tr/distill@w2#4")], service_events=[lost, reap]))
    assert conds == []


def test_flapping_from_restart_counters_and_the_supervisor_mark():
    def procs(restarts, state="running"):
        return [node("a", procs=[{"app": "web", "name": "srv", "state": state, "restarts": restarts}])]

    st = RuleState()
    for t, r in ((0, 0), (10, 1), (20, 2)):
        st, conds = flapping(st, snap(t, procs(r)), CFG)
        assert conds == []
    st, conds = flapping(st, snap(30, procs(3)), CFG)
    assert [c.key for c in conds] == ["flap:a/web/srv"] and "3 restarts" in conds[0].summary
    # Quiet for a window: cleared.
    st, conds = flapping(st, snap(95, procs(3)), CFG)
    assert conds == []
    st, conds = flapping(st, snap(96, procs(3, "flapping")), CFG)
    assert "gave up" in conds[0].summary
    # Worker crashes count the same way.
    svc = {"name": "tr", "instances": [inst("tr/d@w1#1", crashes=0)]}
    st2, _ = flapping(RuleState(), snap(0, services=[svc]), CFG)
    svc = {"name": "tr", "instances": [inst("tr/d@w1#1", crashes=5)]}
    _, conds = flapping(st2, snap(5, services=[svc]), CFG)
    assert [c.key for c in conds] == ["flap:tr/d@w1#1"]


def test_frontend_silent_after_its_grace():
    st = RuleState(started=0.0)
    fe = {"url": "http://127.0.0.1:9", "ok": False, "last_ok": None, "error": "refused"}
    assert frontend_silent(st, snap(5, frontends=[fe]), CFG) == []
    conds = frontend_silent(st, snap(11, frontends=[fe]), CFG)
    assert [c.key for c in conds] == ["frontend:http://127.0.0.1:9"] and "refused" in conds[0].summary
    ok = dict(fe, ok=True, last_ok=20.0)
    assert frontend_silent(st, snap(25, frontends=[ok]), CFG) == []


def test_evaluate_combines_every_rule():
    st, conds = evaluate(RuleState(), snap(7, [node("a", "dead")]), CFG)
    assert st.started == 7 and set(conds) == {"node:a"}
    with pytest.raises(ValueError):
        AlertConfig(lost_percent=0)


# -- hooks, for real -------------------------------------------------------------------------

def _script(tmp_path, body: str) -> str:
    path = tmp_path / "hook.sh"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_command_hook_gets_json_on_stdin_and_env(tmp_path):
    out = tmp_path / "alerts.jsonl"
    env_out = tmp_path / "env.txt"
    cmd = _script(tmp_path, f'cat >> "{out}"\necho >> "{out}"\n'
                            f'echo "$SNSBUS_ALERT_STATUS $SNSBUS_ALERT_KIND $SNSBUS_ALERT_KEY" >> "{env_out}"\n')

    async def go():
        engine = AlertEngine(CFG, AlertHooks(command=cmd, timeout=10), source="test")
        await engine.start()
        try:
            engine.observe(snap(0, [node("a", "dead")]))
            engine.observe(snap(1, [node("a", "dead")]))
            engine.observe(snap(2, [node("a")]))
            assert await engine.hooks.drain(10)
        finally:
            await engine.stop()
        return engine.statistics()

    stats = asyncio.run(go())
    alerts = [json.loads(line) for line in out.read_text().splitlines() if line]
    assert [(a["status"], a["key"], a["source"]) for a in alerts] == [(FIRING, "node:a", "test"),
                                                                     (RESOLVED, "node:a", "test")]
    assert env_out.read_text().splitlines() == ["firing node_down node:a", "resolved node_down node:a"]
    assert stats["hook_sent"] == 2 and stats["hook_failures"] == 0


def test_command_hook_failures_and_timeouts_are_counted(tmp_path):
    async def go(cmd, timeout):
        hooks = AlertHooks(command=cmd, timeout=timeout)
        await hooks.start()
        try:
            t0 = time.monotonic()
            hooks.submit({"status": FIRING, "key": "k", "kind": "node_down", "severity": "critical", "summary": "s"})
            assert await hooks.drain(10)
            return hooks.statistics(), time.monotonic() - t0
        finally:
            await hooks.stop()

    stats, _ = asyncio.run(go("exit 3", 5))
    assert stats == {"hook_sent": 0, "hook_failures": 1, "hook_dropped": 0}
    stats, took = asyncio.run(go("sleep 30", 0.3))
    assert stats["hook_failures"] == 1 and took < 5


class Receiver:
    """A real webhook receiver on 127.0.0.1 that records what it is sent."""

    def __init__(self, status=200):
        self.status = status
        self.got = []
        self.runner = None
        self.url = ""

    async def start(self):
        app = web.Application()
        app.router.add_post("/hook", self.hook)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/hook"

    async def hook(self, request):
        self.got.append((request.headers.get("Content-Type"), await request.json()))
        return web.Response(status=self.status)

    async def stop(self):
        await self.runner.cleanup()


def test_webhook_receives_firing_then_resolved():
    async def go():
        rx = Receiver()
        await rx.start()
        engine = AlertEngine(CFG, AlertHooks(webhook=rx.url, timeout=5))
        await engine.start()
        try:
            nodes = [node(f"n{i}") for i in range(4)]
            engine.observe(snap(0, nodes))
            engine.observe(snap(1, nodes[:2] + [node("n2", "dead"), node("n3", "dead")]))
            engine.observe(snap(2, nodes))
            assert await engine.hooks.drain(10)
        finally:
            await engine.stop()
            await rx.stop()
        return rx.got, engine.statistics()

    got, stats = asyncio.run(go())
    assert all(ct == "application/json" for ct, _ in got)
    seen = [(a["status"], a["key"]) for _, a in got]
    assert seen == [(FIRING, "node:n2"), (FIRING, "node:n3"), (FIRING, "tree:loss"),
                    (RESOLVED, "node:n2"), (RESOLVED, "node:n3"), (RESOLVED, "tree:loss")]
    assert stats["hook_sent"] == 6


def test_webhook_refusal_is_a_failure_not_a_retry_storm():
    async def go():
        rx = Receiver(status=400)
        await rx.start()
        hooks = AlertHooks(webhook=rx.url, timeout=5)
        await hooks.start()
        try:
            hooks.submit({"status": FIRING, "key": "k", "kind": "x", "severity": "warning", "summary": "s"})
            assert await hooks.drain(10)
        finally:
            await hooks.stop()
            await rx.stop()
        return rx.got, hooks.statistics()

    got, stats = asyncio.run(go())
    assert len(got) == 1 and stats["hook_failures"] == 1


def test_hooks_need_somewhere_to_go():
    with pytest.raises(ValueError):
        AlertHooks()


def test_a_killed_node_process_runs_the_alert_command(tmp_path):
    """Manager in-process, one real bus-node process, kill -9: the command is run with the alert."""
    from bus.policy import TreeConfig
    from manager.monitor import start_monitor
    from manager.server import Manager
    from tools import cluster

    out = tmp_path / "alerts.jsonl"
    cmd = _script(tmp_path, f'cat >> "{out}"\necho >> "{out}"\n')
    sdir = tmp_path / "cluster"

    def fired():
        if not out.exists():
            return []
        return [json.loads(line) for line in out.read_text().splitlines() if line]

    async def go():
        cfg = TreeConfig(max_children=4, heartbeat=0.5, misses=3)
        mgr = Manager(control="tcp://127.0.0.1:0", config=cfg)
        await mgr.start()
        mon = None
        try:
            entries = await asyncio.to_thread(cluster.start_nodes, sdir, 2, per_process=2,
                                              join=mgr.link.control_endpoint, insecure=True)
            await _until(lambda: sum(1 for m in mgr.membership.alive() if m.name) == 2, 30)
            engine = AlertEngine(AlertConfig(lost_percent=50.0), AlertHooks(command=cmd, timeout=10))
            mon = await start_monitor(mgr, alerts=engine, interval=0.2, node_poll=1.0)
            await asyncio.sleep(0.5)
            assert await asyncio.to_thread(cluster.kill_node, entries[0]["pid"], state_dir=sdir)
            await _until(lambda: {a["key"] for a in fired()} >= {"node:node-0-0", "node:node-0-1", "tree:loss"}, 15)
        finally:
            if mon is not None:
                await mon.stop()
            await mgr.stop()
            await asyncio.to_thread(cluster.down, sdir, grace=1.0)

    asyncio.run(go())
    alerts = fired()
    assert all(a["status"] == FIRING for a in alerts)
    assert len({a["key"] for a in alerts}) == len(alerts)  # each condition once


async def _until(predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)

