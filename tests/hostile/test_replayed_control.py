"""Replayed, duplicated and reordered control messages against real TreeNodes (issue 7, item 3).

On the in-memory network of tests/bus/fakenet.py (real frames, a manual
clock), a peer re-sends messages it saw or sent before (REGISTER, ROUTE_ADD,
ROUTE_LOST, JOIN_ACCEPT, COMMAND, REPLY) and the network delivers out of
order.  The tree must stay one tree routing to exactly the live nodes
(repairs through anti-entropy within two ``route_sync`` periods), a command
must run once per node, and a reply must count once.  The fuzz target
``tree`` (tests/fuzz/targets.py) replays and reorders at random on top.
"""

from __future__ import annotations

import asyncio
import random

from bus import protocol as p
from bus.policy import TreeConfig
from bus.tree import ATTACHED
from tests.bus.fakenet import FakeNet


def build(n: int = 12, seed: int = 5, shuffle: random.Random | None = None) -> FakeNet:
    net = FakeNet(TreeConfig(max_children=3), seed=seed)
    calls: dict[str, int] = {}

    def count(node, args, budget):
        calls[node.name] = calls.get(node.name, 0) + 1
        return "ok"

    net.calls = calls
    for i in range(n):
        net.add(f"n{i}", handlers={"count": count})
        if shuffle is not None:
            shuffle.shuffle(net.queue)
        net.tick(0.01)
    net.tick(1.0)
    return net


def sent(net: FakeNet, mtype) -> list:
    """Every message of ``mtype`` any node sent so far, as (kind, endpoint, identity, frames) to re-queue."""
    out = []
    for ep, t in net.transports.items():
        for identity, frames in t.to_children:
            if p.codec.parse(frames[0]).type == mtype:
                out.append(("parent", net.identities.get(identity), identity, frames))
    return out


def broadcast(net: FakeNet, op: str, duplicate_replies: bool = False):
    """Run a root broadcast to completion on the manual clock; optionally deliver every REPLY twice."""
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(net.root.broadcast(op, {}, timeout=5.0))
        for _ in range(200):
            loop.run_until_complete(asyncio.sleep(0))
            if task.done():
                return task.result()
            if duplicate_replies:
                net.queue.extend([m for m in net.queue if p.codec.parse(m[3][0]).type == p.MsgType.REPLY])
            net.run()
            net.tick(0.05)
        raise AssertionError("the broadcast never finished")
    finally:
        loop.close()


def replay(net: FakeNet, kind: str, ep: str, identity: bytes, frames, times: int = 3) -> None:
    for _ in range(times):
        net.queue.append((kind, ep, identity, list(frames)))
    net.run()


def test_reordered_delivery_still_builds_one_tree():
    net = build(20, shuffle=random.Random(11))
    net.tick(12.0)  # two anti-entropy periods
    net.check_tree()


def test_replayed_command_runs_once_per_node():
    net = build()
    broadcast(net, "count")
    assert net.calls == {n.name: 1 for n in net.live()}
    commands = sent(net, p.MsgType.COMMAND)
    assert commands
    for kind, ep, identity, frames in commands:
        replay(net, kind, ep, identity, frames)
    net.tick(6.0)
    assert net.calls == {n.name: 1 for n in net.live()}, "a replayed COMMAND ran again"
    net.check_tree()


def test_duplicated_replies_count_once():
    net = build()
    result = broadcast(net, "count", duplicate_replies=True)
    out = net.root.outcome(result, {n.node_id for n in net.live()})
    names = [name for g in out["groups"] for name in g["nodes"]]
    assert sorted(names) == sorted(n.name for n in net.live()) and out["missing"] == []


def test_replayed_register_changes_nothing():
    net = build()
    members = {m.id: (m.name, m.parent, m.state) for m in net.root.membership.members.values()}
    events = len(net.root.membership.events)
    queued = []
    for ep, t in net.transports.items():
        if ep == "root":
            continue
        node = net.nodes[ep]
        body = node.registration("joined")
        queued.append(("child", t.parent, t.identity,
                       p.encode(p.MsgType.REGISTER, body, src=node.node_id, dst=net.root.node_id)))  # fmt: skip
    for item in queued:
        replay(net, *item)
    assert {m.id: (m.name, m.parent, m.state) for m in net.root.membership.members.values()} == members
    assert len(net.root.membership.events) - events <= len(queued) * 3  # bounded; never a second member
    net.tick(6.0)
    net.check_tree()


def test_stale_route_lost_is_repaired_by_anti_entropy():
    net = build()
    deep = max(net.live(), key=lambda n: n.depth)
    parent = net.parent_of(deep)
    assert deep.depth >= 2 and parent is not net.root
    # A ROUTE_LOST for a live node, replayed from its parent's link long after the fact.
    frames = p.encode(p.MsgType.ROUTE_LOST, {"ids": [deep.node_id], "reason": "dead", "dead": deep.node_id, "h": 0},
                      src=parent.node_id, dst=net.parent_of(parent).node_id)  # fmt: skip
    pt = net.transports[parent.name]
    replay(net, "child", pt.parent, pt.identity, frames)
    net.tick(12.0)  # route_sync is 5 s +-25%: two periods
    net.check_tree()
    assert net.root.routes.lookup(deep.node_id) >= 0


def test_stale_route_add_from_another_branch_is_repaired():
    net = build()
    a, b = [c for c in net.live() if net.parent_of(c) is net.root][:2]
    stolen = [i for i in b.routes_ids()] or [b.node_id]
    at = net.transports[a.name]
    frames = p.encode(p.MsgType.ROUTE_ADD, {"ids": stolen, "h": 0}, src=a.node_id, dst=net.root.node_id)
    replay(net, "child", at.parent, at.identity, frames)
    net.tick(12.0)
    net.check_tree()


def test_replayed_join_accept_to_an_attached_node_is_ignored():
    net = build()
    accepts = sent(net, p.MsgType.JOIN_ACCEPT)
    before = {n.name: (n.state, n.node_id, n.parent_id, n.depth) for n in net.live()}
    for kind, ep, identity, frames in accepts:
        if ep is not None:
            replay(net, kind, ep, identity, frames)
    assert {n.name: (n.state, n.node_id, n.parent_id, n.depth) for n in net.live()} == before
    assert all(n.state == ATTACHED for n in net.live())
    net.tick(6.0)
    net.check_tree()
