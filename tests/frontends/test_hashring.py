"""Consistent hashing: few keys move on joins and leaves, balance, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import BusError
from frontends.hashring import DEFAULT_REPLICAS, EmptyRing, HashRing, point

ROOT = Path(__file__).resolve().parents[2]
KEYS = [f"http://origin.test/img/{i}.jpg" for i in range(20_000)]


def owners_of(ring: HashRing) -> dict:
    return {k: ring.owner(k) for k in KEYS}


def test_point_is_blake2b_and_stable():
    # Pinned values: a change here would re-partition every deployed cache.
    assert point("a") == point(b"a")
    assert point("") == 0xE4A6A0577479B2B4
    assert 0 <= point("x") < 1 << 64
    assert point("x") != point("y")


def test_owner_is_the_same_in_another_process():
    ring = HashRing([f"cache-{i}" for i in range(5)])
    mine = [ring.owner(k) for k in KEYS[:200]]
    code = (
        "import json, sys\n"
        "from frontends.hashring import HashRing\n"
        "ring = HashRing([f'cache-{i}' for i in range(5)])\n"
        "print(json.dumps([ring.owner(f'http://origin.test/img/{i}.jpg') for i in range(200)]))\n"
    )
    # A different hash seed in the child: Python's hash() would disagree.
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=60, check=True)
    assert json.loads(out.stdout) == mine


def test_order_of_adds_does_not_matter():
    a = HashRing(["n1", "n2", "n3"])
    b = HashRing()
    for n in ("n3", "n1", "n2"):
        b.add(n)
    assert owners_of(a) == owners_of(b)


@pytest.mark.parametrize("n", [4, 10])
def test_join_moves_about_one_nth_and_only_to_the_new_node(n):
    ring = HashRing([f"cache-{i}" for i in range(n)])
    before = owners_of(ring)
    ring.add("cache-new")
    after = owners_of(ring)
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "cache-new" for k in moved)
    expected = 1 / (n + 1)
    assert len(moved) / len(KEYS) == pytest.approx(expected, rel=0.3)


@pytest.mark.parametrize("n", [4, 10])
def test_leave_moves_only_the_leavers_keys(n):
    ring = HashRing([f"cache-{i}" for i in range(n)])
    before = owners_of(ring)
    assert ring.remove("cache-1")
    after = owners_of(ring)
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == "cache-1"}
    assert len(moved) / len(KEYS) == pytest.approx(1 / n, rel=0.3)


def test_balance_within_bound():
    ring = HashRing([f"cache-{i}" for i in range(10)])
    counts = Counter(owners_of(ring).values())
    mean = len(KEYS) / 10
    assert len(counts) == 10
    assert max(counts.values()) < 1.3 * mean
    assert min(counts.values()) > 0.7 * mean
    shares = ring.shares()
    assert sum(shares.values()) == pytest.approx(1.0)
    assert max(shares.values()) < 1.3 / 10


def test_weight_gives_a_larger_share_and_can_change():
    ring = HashRing(["small", "other"])
    ring.add("big", weight=3)
    shares = ring.shares()
    assert shares["big"] == pytest.approx(0.6, abs=0.08)
    assert ring.weight("big") == 3
    assert not ring.add("big", weight=3)
    assert ring.add("big", weight=1)
    assert ring.shares()["big"] == pytest.approx(1 / 3, abs=0.08)


def test_owners_for_replication():
    ring = HashRing(["a", "b", "c", "d"])
    for k in KEYS[:500]:
        reps = ring.owners(k, 3)
        assert len(reps) == 3 == len(set(reps))
        assert reps[0] == ring.owner(k)
    assert sorted(ring.owners("k", 10)) == ["a", "b", "c", "d"]
    # When the primary leaves, the second replica becomes the owner.
    k = KEYS[7]
    first, second = ring.owners(k, 2)
    ring.remove(first)
    assert ring.owner(k) == second
    with pytest.raises(ValueError):
        ring.owners(k, 0)


def test_empty_ring_and_membership_api():
    ring = HashRing(replicas=8)
    with pytest.raises(EmptyRing) as exc:
        ring.owner("k")
    assert isinstance(exc.value, BusError) and isinstance(exc.value, LookupError)
    with pytest.raises(EmptyRing):
        ring.owners("k", 2)
    assert ring.shares() == {}
    assert not ring.remove("nope")
    assert ring.add("n1") and not ring.add("n1")
    assert "n1" in ring and len(ring) == 1 and list(ring) == ["n1"] and ring.nodes == ["n1"]
    assert ring.owner(b"bytes-key") == "n1"
    assert ring.replicas == 8 and "n1" in repr(ring)
    assert DEFAULT_REPLICAS == HashRing().replicas


@pytest.mark.parametrize("bad", ["", 3, None])
def test_bad_node_names_are_refused(bad):
    with pytest.raises(ValueError, match="node names"):
        HashRing().add(bad)


@pytest.mark.parametrize("kw", [{"replicas": 0}, {"replicas": 1.5}])
def test_bad_replicas_are_refused(kw):
    with pytest.raises(ValueError, match="replicas"):
        HashRing(**kw)


def test_bad_weight_is_refused():
    with pytest.raises(ValueError, match="weight"):
        HashRing().add("a", weight=0)


@settings(max_examples=60, deadline=None)
@given(
    nodes=st.sets(st.text(min_size=1, max_size=8), min_size=1, max_size=6),
    extra=st.text(min_size=1, max_size=8),
    keys=st.lists(st.text(max_size=16), min_size=1, max_size=50),
)
def test_join_moves_keys_only_to_the_joiner(nodes, extra, keys):
    ring = HashRing(nodes, replicas=16)
    before = {k: ring.owner(k) for k in keys}
    ring.add(extra)
    for k in keys:
        assert ring.owner(k) in (before[k], extra)
