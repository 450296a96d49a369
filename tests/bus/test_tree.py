"""The tree protocol on an in-memory network with a manual clock (no sockets)."""

import asyncio
import math

import pytest

from bus import protocol as p
from bus.policy import TreeConfig
from bus.tree import ATTACHED, JOINING
from tests.bus.fakenet import FakeNet


def build(n, **cfg):
    net = FakeNet(TreeConfig(**cfg))
    for i in range(n):
        net.add(f"n{i}")
        net.tick(0.01)
    net.tick(0.5)
    return net


def depth_of(net, node):
    d = 0
    while node is not net.root:
        node = net.parent_of(node)
        d += 1
    return d


@pytest.mark.parametrize("policy", ["randtree", "balanced"])
def test_nodes_form_one_tree_with_bounded_fanout(policy):
    net = build(60, max_children=4, policy=policy)
    net.check_tree()
    assert len(net.root.children) == 4
    assert all(len(n.children) <= 4 for n in net.live())
    assert len({n.node_id for n in net.live()}) == 60
    assert {m.name for m in net.root.membership.alive()} == {f"n{i}" for i in range(60)}
    depths = [depth_of(net, n) for n in net.live()]
    assert all(n.depth == depth_of(net, n) for n in net.live()), "nodes know their depth"
    if policy == "balanced":
        assert max(depths) <= math.ceil(math.log(60, 4)) + 1


def test_star_puts_everyone_under_the_root():
    net = build(30, max_children=4, policy="star")
    net.check_tree()
    assert len(net.root.children) == 30


def test_snapshot_depths_match_membership():
    net = build(30, max_children=3)
    snap = {m["name"]: m for m in net.root.membership.snapshot()}
    for node in net.live():
        assert snap[node.name]["depth"] == depth_of(net, node)
        assert snap[node.name]["children"] == len(node.children)


def interior(net):
    return max((n for n in net.live() if n.children), key=lambda n: len(n.routes))


def test_dead_interior_node_is_repaired_and_orphans_keep_their_subtrees():
    net = build(40, max_children=3)
    victim = interior(net)
    orphans = [c.name for c in victim.children.values()]
    grandkids = {o: sorted(c.name for c in net.nodes[o].children.values()) for o in orphans}
    net.kill(victim.name)
    net.tick(net.config.dead_after + 0.5)
    net.check_tree()
    for o in orphans:
        # The orphan rejoined somewhere else, with its own children still under it.
        assert sorted(c.name for c in net.nodes[o].children.values()) == grandkids[o]
        assert net.nodes[o].counters["rejoins"] == 1
    m = net.root.membership.by_name(victim.name)
    assert m.state == "dead"
    kinds = [(e["kind"], e["node"]) for e in net.root.membership.events]
    assert ("lost", victim.name) in kinds
    assert all(("rejoined", o) in kinds for o in orphans)


def test_repair_within_the_heartbeat_deadline():
    net = build(40, max_children=3)
    victim = interior(net)
    net.kill(victim.name)
    t0 = net.now
    while True:
        net.tick(net.config.heartbeat / 4)
        try:
            net.check_tree()
            break
        except AssertionError:
            assert net.now - t0 < net.config.dead_after + 2 * net.config.heartbeat + 1.0
    assert net.now - t0 <= net.config.dead_after + 2 * net.config.heartbeat


def test_parent_drops_a_dead_child_route_at_once_when_the_connection_is_gone():
    net = build(10, max_children=3)
    leaf = next(n for n in net.live() if not n.children)
    parent = net.parent_of(leaf)
    net.kill(leaf.name)
    net.tick(net.config.heartbeat + 0.01)  # one heartbeat: the send fails, no need to wait for silence
    assert parent.routes.lookup(leaf.node_id) < 0
    assert net.root.routes.lookup(leaf.node_id) < 0


def test_cut_off_node_keeps_no_stale_route_and_retries_with_backoff():
    net = build(12, max_children=3)
    net.kill("root")
    top = [n for n in net.live() if n.parent_id == 1]
    net.tick(30.0, step=0.05)
    for n in top:
        assert n.state == JOINING
        assert not n.forwarder.has_parent, "an orphan must not route anything up a dead link"
    # Exponential backoff up to backoff_cap (5 s) + a 1 s join timeout: about a dozen JOINs in 30 s.
    joins = [n.transport.joins for n in top]
    assert max(joins) <= 20, joins
    # Their subtrees stay attached to them, routes intact.
    for n in top:
        assert sorted(n.routes_ids()) == sorted(
            i for c in n.children.values() for i in [c.node_id, *net.nodes[c.name].routes_ids()])


def test_restarted_root_gets_every_node_back_with_their_names():
    net = build(40, max_children=4)
    names = {n.name for n in net.live()}
    ids = {n.name: n.node_id for n in net.live()}
    net.kill("root")
    net.tick(net.config.dead_after + 0.5)
    root = net.restart_root(epoch=99)
    net.tick(12.0, step=0.05)
    net.check_tree()
    assert {m.name for m in root.membership.alive()} == names
    assert {n.name: n.node_id for n in net.live()} == ids, "nodes keep their ids across a root restart"
    assert all(n.epoch == 99 for n in net.live())


def test_unknown_child_is_told_to_rejoin():
    net = build(5, max_children=8)
    node = net.live()[0]
    # The root forgets it (as after a restart without a heartbeat miss).
    net.root._drop_child(net.root._links[node.transport.identity], "forgotten", net.now)
    net.tick(net.config.heartbeat * 2)
    net.check_tree()
    assert node.counters["parent_lost"] == 1


def test_join_that_would_make_a_cycle_is_refused():
    net = build(6, max_children=1)  # a chain
    chain = sorted(net.live(), key=lambda n: depth_of(net, n))
    top, bottom = chain[0], chain[-1]
    bottom.on_child(b"x", p.decode(p.encode(p.MsgType.JOIN, {"id": top.node_id, "name": top.name,
                                                              "sub": top.routes_ids()})))
    ident, frames = bottom.transport.to_children[-1]
    assert ident == b"x"
    assert p.decode(frames).type == p.MsgType.JOIN_REJECT
    assert "cycle" in p.decode(frames).body["reason"]


def test_clean_leave_lets_children_rejoin_without_waiting():
    net = build(20, max_children=2)
    victim = interior(net)
    kids = [c.name for c in victim.children.values()]

    async def leave():
        await victim.stop()

    asyncio.run(leave())
    del net.nodes[victim.name]
    net.tick(net.config.heartbeat)  # well under dead_after
    net.check_tree()
    assert all(net.nodes[k].state == ATTACHED for k in kids)
    assert net.root.membership.by_name(victim.name).state == "left"


async def drive(net, coro, step=0.02, limit=20.0):
    task = asyncio.ensure_future(coro)
    start = net.now
    while not task.done():
        net.tick(step)
        for _ in range(5):
            await asyncio.sleep(0)
        assert net.now - start < limit, "operation never finished"
    return task.result()


async def ping(node, args, budget):
    return "pong"


async def whoami(node, args, budget):
    return {"name": node.name}


async def hang(node, args, budget):
    await asyncio.sleep(3600)


def test_broadcast_reaches_everyone_and_merges_identical_answers():
    async def main():
        net = FakeNet(TreeConfig(max_children=3))
        for i in range(30):
            net.add(f"n{i}", handlers={"ping": ping, "who": whoami})
        net.tick(1.0)
        res = await drive(net, net.root.broadcast("ping", {}, timeout=2.0))
        assert len(res.groups) == 1
        (value, ids), = res.groups.values()
        assert value == "pong" and sorted(ids) == sorted(n.node_id for n in net.live())
        assert res.missing == {}
        res = await drive(net, net.root.broadcast("who", {}, timeout=2.0))
        assert len(res.groups) == 30
        # Selected ids only.
        some = [n.node_id for n in net.live()][:5]
        res = await drive(net, net.root.broadcast("ping", {}, ids=some, timeout=2.0))
        (value, ids), = res.groups.values()
        assert sorted(ids) == sorted(some)

    asyncio.run(main())


def test_root_handles_only_fanout_messages_per_broadcast():
    async def main():
        net = FakeNet(TreeConfig(max_children=4))
        for i in range(60):
            net.add(f"n{i}", handlers={"ping": ping})
        net.tick(1.0)
        sent = net.transports["root"].sent
        res = await drive(net, net.root.broadcast("ping", {}, timeout=2.0), step=0.001)
        assert sum(len(ids) for _, ids in res.groups.values()) == 60
        assert net.transports["root"].sent - sent <= 4 + 4  # the command to 4 children (+ a heartbeat round)

    asyncio.run(main())


def test_silent_and_dead_nodes_are_named_with_a_reason():
    async def main():
        net = FakeNet(TreeConfig(max_children=3))
        for i in range(20):
            net.add(f"n{i}", handlers={"ping": hang if i == 5 else ping})
        net.tick(1.0)
        victim = next(n for n in net.live() if not n.children and n.name != "n5")
        net.kill(victim.name)
        res = await drive(net, net.root.broadcast("ping", {}, timeout=1.5))
        expected = {n.node_id for n in net.nodes.values() if n is not net.root}
        out = net.root.outcome(res, expected)
        missing = {m["node"]: m["reason"] for m in out["missing"]}
        assert missing["n5"] == "timed out"
        assert missing[victim.name] in ("dead", "timed out")
        assert out["answered"] + len(missing) == 20, "every node is either answered or named"

    asyncio.run(main())


def test_expired_subtree_is_reported_per_node():
    async def main():
        net = FakeNet(TreeConfig(max_children=2, misses=100))  # silence is never detected here
        for i in range(14):
            net.add(f"n{i}", handlers={"ping": ping})
        net.tick(1.0)
        victim = interior(net)
        behind = set(victim.routes_ids()) | {victim.node_id}
        net.hang(victim.name)
        res = await drive(net, net.root.broadcast("ping", {}, timeout=1.0))
        assert behind <= set(res.missing)
        assert all(res.missing[i] == "timed out" for i in behind)
        answered = {i for _, ids in res.groups.values() for i in ids}
        assert answered == {n.node_id for n in net.live()} - behind


def test_broadcast_to_a_closed_connection_names_the_subtree_dead_at_once():
    async def main():
        net = FakeNet(TreeConfig(max_children=2, misses=100))
        for i in range(14):
            net.add(f"n{i}", handlers={"ping": ping})
        net.tick(1.0)
        victim = interior(net)
        net.kill(victim.name)
        t0 = net.now
        res = await drive(net, net.root.broadcast("ping", {}, timeout=5.0))
        assert net.now - t0 < 1.0, "no need to wait for the deadline"
        assert res.missing[victim.node_id] == "dead"
        assert all(res.missing[i] in ("dead", "unreachable") for i in victim.routes_ids())

    asyncio.run(main())


def test_a_death_below_a_joining_orphan_is_not_resurrected():
    net = build(3, max_children=1, heartbeat=0.5)  # a chain: root - n0 - n1 - n2; a beat < join timeout
    n0, mid, leaf = net.nodes["n0"], net.nodes["n1"], net.nodes["n2"]
    assert net.parent_of(mid) is n0 and net.parent_of(leaf) is mid
    net.kill("n0")
    net.now += net.config.heartbeat
    net.root.tick()  # the root's heartbeat to n0 fails: n0 dead, n1 and n2 unreachable
    assert net.root.membership.members[leaf.node_id].state == "unreachable"
    mid.parent_lost()
    mid.tick()  # JOIN to the root is now in flight, announcing n2 in its subtree
    net.kill("n2")
    net.now += net.config.heartbeat
    mid.tick()  # its heartbeat to n2 fails: n2 is dropped while mid is still joining
    net.tick(1.0)  # the JOIN is accepted with the stale subtree; mid must correct it
    net.check_tree()
    assert net.root.routes.lookup(leaf.node_id) < 0
    assert net.root.membership.members[leaf.node_id].state == "dead"


def test_a_lost_registration_is_sent_again_until_acknowledged():
    net = FakeNet(TreeConfig(max_children=2))
    node = net.add("n0")
    real = net.root.deliver

    def drop_first_register(msg, link, dropped=[]):
        if msg.header.type == p.MsgType.REGISTER and not dropped:
            dropped.append(msg)  # lost on the way (a hop had no parent at that moment)
            return
        real(msg, link)

    net.root.deliver = drop_first_register
    net.tick(0.5)
    assert net.root.membership.members[node.node_id].name == ""  # known only by its route
    net.tick(5.0)
    assert net.root.membership.members[node.node_id].name == "n0"
    assert node._register_due is None, "the root acknowledged it; no more re-sends"
    sent = node.transport.sent
    net.tick(5.0)
    assert node.transport.sent - sent <= 5 / net.config.heartbeat + 1, "only heartbeats from now on"


def test_leaves_and_interior_nodes_answer_sync_async_and_awaitable_handlers():
    calls = []

    def sync(node, args, budget):
        calls.append(node.name)
        return "s"

    async def coro(node, args, budget):
        calls.append(node.name)
        await asyncio.sleep(0)
        return "c"

    def returns_future(node, args, budget):
        calls.append(node.name)
        fut = asyncio.get_running_loop().create_future()
        fut.set_result("f")
        return fut

    async def main():
        net = FakeNet(TreeConfig(max_children=2))
        for i in range(9):
            net.add(f"n{i}", handlers={"sync": sync, "coro": coro, "fut": returns_future})
        net.tick(1.0)
        for op, value in (("sync", "s"), ("coro", "c"), ("fut", "f")):
            calls.clear()
            res = await drive(net, net.root.broadcast(op, {}, timeout=2.0))
            (v, ids), = res.groups.values()
            assert v == value and len(ids) == 9 and res.missing == {}
            assert sorted(calls) == sorted(f"n{i}" for i in range(9)), "each handler ran exactly once per node"

    asyncio.run(main())


def test_unicast_by_id_or_name_goes_down_the_routing_tables_only():
    seen = []

    def who(node, args, budget):
        seen.append(node.name)
        return {"name": node.name, "x": args.get("x")}

    async def main():
        net = FakeNet(TreeConfig(max_children=2))
        for i in range(15):
            net.add(f"n{i}", handlers={"who": who})
        net.tick(1.0)
        deep = max(net.live(), key=lambda n: depth_of(net, n))
        assert depth_of(net, deep) >= 3
        res = await drive(net, net.root.request(deep.node_id, "who", {"x": 1}, timeout=2.0))
        (value, ids), = [(g[1], g[2]) for g in res["g"]]
        assert value == {"name": deep.name, "x": 1} and ids == [deep.node_id]
        assert seen == [deep.name], "only the target ran it; the hops just forwarded"
        res = await drive(net, net.root.request("n3", "who", {}, timeout=2.0))
        assert res["g"][0][1]["name"] == "n3"
        with pytest.raises(LookupError):
            await net.root.request("nobody", "who", {}, timeout=1.0)

    asyncio.run(main())


@pytest.mark.parametrize("reached", [False, True])
def test_a_join_waits_for_a_reached_candidates_handshake_not_for_an_unreachable_one(reached):
    """A candidate that accepted the TCP connection (its CURVE handshake queued behind a join storm) is
    given HANDSHAKE_ALLOWANCE join timeouts, then join_timeout once the handshake is done; one that never
    answers the connect (dead, or cut off by a partition) is given up after join_timeout."""
    from bus.tree import HANDSHAKE_ALLOWANCE

    net = FakeNet(TreeConfig(join_timeout=1.0))
    net.kill("root")  # nothing answers
    node = net.add("n")
    net.tick(0.01)
    assert node.state == JOINING and node.transport.joins == 1
    if not reached:
        net.tick(0.9, step=0.05)
        assert node.transport.joins == 1
        net.tick(0.2, step=0.05)
        assert node.counters["join_timeouts"] == 1  # unreachable: one join_timeout, not the allowance
        return
    net.tick(0.5, step=0.05)
    node.reached()  # TCP is up; the handshake queues
    net.tick(HANDSHAKE_ALLOWANCE * 1.0 - 0.1, step=0.05)
    assert node.transport.joins == 1  # still waiting on the first JOIN
    node.connected()  # the handshake completes late: one join_timeout from now
    net.tick(0.9, step=0.05)
    assert node.transport.joins == 1
    net.tick(0.3, step=0.05)
    assert node.counters["join_timeouts"] == 1
