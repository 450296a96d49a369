"""Randomized failures on the in-memory network: whatever dies, the tree heals into one true tree."""

import random

import pytest

from bus.policy import TreeConfig
from tests.bus.fakenet import FakeNet


def settle(net: FakeNet) -> None:
    # Silence detection, then backoff up to the cap, then a little more.
    net.tick(net.config.dead_after + net.config.backoff_cap * 2 + 2.0, step=0.05)


def check_membership(net: FakeNet) -> None:
    live = {n.node_id for n in net.live()}
    alive = {m.id for m in net.root.membership.alive()}
    assert alive == live, f"alive at the root but gone: {alive - live}; live but not alive: {live - alive}"
    assert all(net.root.membership.members[i].name for i in live), "every live node registered"


# Seeds 8..60 each found a hole once: a ring of nodes cut off from the root (fixed by the
# path in JOIN_ACCEPT and heartbeats), and routes lost or stolen by stale claims (fixed by
# ROUTE_SYNC anti-entropy and direct children being authoritative for their own ids).
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5, 8, 9, 21, 26, 35, 49, 52, 60])
def test_random_process_crashes_and_restarts_heal_into_one_tree(seed):
    rng = random.Random(seed)
    net = FakeNet(TreeConfig(max_children=3, heartbeat=0.5, misses=3), seed=seed)
    procs = {f"p{i}": [net.add(f"p{i}-{j}").name for j in range(6)] for i in range(8)}
    net.tick(2.0, step=0.05)
    net.check_tree()
    restarts = 0
    for round_ in range(4):
        victims = rng.sample(sorted(procs), 2)
        for v in victims:
            net.crash(procs.pop(v))
            net.tick(rng.uniform(0.0, 0.3), step=0.05)  # the second crash lands mid-repair
        settle(net)
        net.check_tree()
        check_membership(net)
        for v in victims:  # the processes come back, as new nodes
            restarts += 1
            name = f"r{restarts}"
            procs[name] = [net.add(f"{name}-{j}").name for j in range(6)]
        settle(net)
        net.check_tree()
        check_membership(net)
