"""A join storm (issue 7, item 3): 200 logical nodes in 4 processes start at the same moment.

Real processes through ``tools.cluster`` on loopback, always reaped.  Every
node must join, the root's CPU for the whole storm stays bounded, no join
walks a redirect loop (each node needs a few redirects at most: the root
sends joiners straight to the shallowest members with room) and the result
is one tree with the configured fan-out.  Figures are printed (``-s``).
"""

from __future__ import annotations

import time

import psutil
import pytest

from tools import cluster

NODES, PER_PROCESS, FANOUT = 200, 50, 8


@pytest.fixture
def sdir(tmp_path):
    d = tmp_path / "state"
    try:
        yield d
    finally:
        cluster.down(d, grace=2.0)


def test_two_hundred_nodes_join_at_once(sdir):
    mgr = cluster.start_manager(sdir, port=0, max_children=FANOUT)
    proc = psutil.Process(mgr["pid"])
    cpu0 = sum(proc.cpu_times()[:2])
    t0 = time.monotonic()
    nodes = cluster.start_nodes(sdir, NODES, per_process=PER_PROCESS, join=mgr["control"])
    members = cluster.wait_members(mgr["control"], NODES, timeout=90, watch=[mgr, *nodes], state_dir=sdir)
    elapsed = time.monotonic() - t0
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    assert members == NODES
    with cluster.client(sdir, mgr["control"], timeout=30) as c:
        status = c.call("status")
        info = c.call("broadcast", op="info", timeout=20)
    alive = [m for m in status["members"] if m["state"] == "alive" and not m["name"].startswith("#")]
    assert len(alive) == NODES
    ids = {m["id"] for m in alive}
    assert all(m["parent"] == 1 or m["parent"] in ids for m in alive)
    assert all(m["children"] <= FANOUT for m in alive)
    assert info["missing"] == []
    snaps = [g["value"] for g in info["groups"]]
    assert len(snaps) == NODES and all(s["state"] == "attached" for s in snaps)
    redirects = [s["counters"]["redirects"] for s in snaps]
    loops = sum(s["counters"]["loops"] for s in snaps)
    rejoins = sum(s["counters"]["rejoins"] for s in snaps)
    print(f"\n{NODES} nodes joined in {elapsed:.2f}s; manager CPU {cpu:.2f}s "
          f"({1000 * cpu / NODES:.1f} ms per join); redirects per node max {max(redirects)}, "
          f"mean {sum(redirects) / NODES:.2f}; loops {loops}, rejoins {rejoins}; "
          f"depth {max(m['depth'] for m in alive)}")  # fmt: skip
    assert loops == 0 and rejoins == 0
    assert max(redirects) <= 6, f"a join walked {max(redirects)} redirects"
    assert cpu < 0.01 * NODES + 1.0, f"the root spent {cpu:.2f} CPU seconds on {NODES} joins"
