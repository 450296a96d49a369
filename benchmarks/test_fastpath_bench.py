"""Compiled twin vs pure twin on the fast path's hot loops (pytest-benchmark).

Run by ``make bench`` (``-m "slow or not slow" --benchmark-enable``).  Each
group runs both twins on the same input, checks that they give the same result,
and the ``test_speedup`` tests assert the compiled twin is at least ``TARGET``
times faster, from the medians measured in this run.
"""

from __future__ import annotations

import random

import pytest

from core import fastpath

pytestmark = pytest.mark.slow

TWINS = sorted(fastpath.twins())
TARGET = 10.0
TYPES = (1, 16, 64, 65)
NODE = 7
BCAST = 0xFFFFFFFF
ROUNDS = {"python": 15, "cython": 300}


def _codec(mod):
    return mod.FrameCodec(1, TYPES, 1 << 20, 8 << 20)


# -- (a) route_batch: parse + route lookup + decision for 10k header frames ----------------

def _route_frames(n=10_000):
    """Mixed traffic: 50% unicast to the subtree, 25% broadcast (some repeated), 20% unknown, 5% local."""
    rnd = random.Random(42)
    codec = _codec(fastpath.twins()["python"])
    frames = []
    for _ in range(n):
        k = rnd.random()
        if k < 0.5:
            dst = rnd.randrange(1000, 2000)
        elif k < 0.75:
            dst = BCAST
        elif k < 0.95:
            dst = rnd.randrange(5000, 9000)
        else:
            dst = NODE
        frames.append(codec.pack(rnd.choice(TYPES), msg_id=rnd.randrange(2000), src=rnd.randrange(8), dst=dst,
                                 ttl=rnd.randrange(4), body_len=rnd.randrange(500)))
    return frames


FRAMES = _route_frames()


def _forwarder(mod):
    routes = mod.RoutingTable()
    for link in range(8):
        routes.add_subtree(link, range(1000 + link * 125, 1000 + (link + 1) * 125))
    fwd = mod.Forwarder(NODE, _codec(mod), routes, window=4096)
    fwd.has_parent = True
    return fwd


def _route_once(mod):
    fwd = _forwarder(mod)
    return fwd.route_batch(FRAMES, 3), dict(fwd.statistics())


@pytest.mark.parametrize("twin", TWINS)
def test_route_batch(benchmark, medians, twin):
    mod = fastpath.twins()[twin]
    expected = _route_once(fastpath.twins()["python"])
    assert _route_once(mod) == expected
    benchmark.group = "route_batch: 10k header frames"
    # A fresh forwarder per round: every round sees the broadcasts for the first time.
    result = benchmark.pedantic(
        lambda fwd: fwd.route_batch(FRAMES, 3),
        setup=lambda: ((_forwarder(mod),), {}),
        rounds=ROUNDS[twin],
        warmup_rounds=1,
    )
    assert result == expected[0]
    if benchmark.enabled:
        medians[("route_batch", twin)] = benchmark.stats.stats.median


# -- (b) LoadTable: pick + update over 64 workers -------------------------------------------

def _table(mod):
    t = mod.LoadTable()
    for w in range(64):
        t.add(1000 + w, capacity=8 + w % 5)
    return t


def _balance(t, n=2000):
    """Front-end pattern: acquire a worker, complete a request, sometimes a load report."""
    picks = []
    acquire, completed, report = t.acquire, t.completed, t.report
    for i in range(n):
        w = acquire()
        picks.append(w)
        if i % 3:
            completed(w)
        if i % 16 == 0:
            report(w, i % 7)
    return picks


@pytest.mark.parametrize("twin", TWINS)
def test_load_table(benchmark, medians, twin):
    mod = fastpath.twins()[twin]
    ref = _table(fastpath.twins()["python"])
    expected = (_balance(ref), dict(ref.statistics()))
    t = _table(mod)
    assert (_balance(t), dict(t.statistics())) == expected
    benchmark.group = "LoadTable: 2000 x (acquire + completed, report every 16th), 64 workers"
    result = benchmark.pedantic(_balance, setup=lambda: ((_table(mod),), {}), rounds=ROUNDS[twin], warmup_rounds=1)
    assert result == expected[0]
    if benchmark.enabled:
        medians[("load_table", twin)] = benchmark.stats.stats.median


# -- ratios from this run ----------------------------------------------------------------------

@pytest.mark.parametrize("group", ["route_batch", "load_table"])
def test_speedup(medians, report_ratio, group):
    pure, compiled = medians.get((group, "python")), medians.get((group, "cython"))
    if pure is None or compiled is None:
        pytest.skip("needs both twins and --benchmark-enable")
    ratio = pure / compiled
    line = (f"{group}: pure {pure * 1e3:.3f} ms, compiled {compiled * 1e3:.3f} ms per round "
            f"-> compiled is {ratio:.1f}x faster (target >= {TARGET:.0f}x)")
    report_ratio(line)
    print(line)
    assert ratio >= TARGET, line
