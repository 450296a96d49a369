"""SNS load balancing and scaling policies: pure functions, no sockets, no clock."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import BusError, NoWorkers
from manager.lbpolicy import (
    LOTTERY,
    MAIN,
    OVERFLOW,
    P2C,
    Ewma,
    GiveBack,
    PoolState,
    ScalingConfig,
    WorkerIdle,
    WorkerLoad,
    calm_since,
    choose,
    give_back_overflow,
    score,
    should_reap,
    should_spawn,
    smooth,
)

# -- smoothing -----------------------------------------------------------------


def test_smooth_first_sample_counts_in_full_then_moves_by_alpha():
    assert smooth(None, 8, 0.25) == 8
    assert smooth(8.0, 0, 0.25) == 6.0
    assert smooth(8.0, 0, 1.0) == 0.0


@pytest.mark.parametrize("alpha", [0, -0.1, 1.5, math.nan])
def test_smooth_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        smooth(1.0, 2.0, alpha)


@pytest.mark.parametrize("sample", [-1, math.nan, math.inf])
def test_smooth_rejects_bad_samples(sample):
    with pytest.raises(ValueError, match="sample"):
        smooth(1.0, sample, 0.5)


@given(
    prev=st.floats(0, 1e6),
    sample=st.floats(0, 1e6),
    alpha=st.floats(1e-6, 1.0),
)
def test_smooth_stays_between_previous_and_sample(prev, sample, alpha):
    out = smooth(prev, sample, alpha)
    lo, hi = min(prev, sample), max(prev, sample)
    assert lo - 1e-9 * hi <= out <= hi + 1e-9 * hi


def test_smooth_converges_to_a_constant_load():
    v = None
    for _ in range(60):
        v = smooth(v if v is not None else 0.0, 5.0, 0.2)
    assert v == pytest.approx(5.0, abs=1e-4)


def test_ewma_weights_by_elapsed_time():
    e = Ewma.first(0.0, now=10.0)
    one_tau = e.update(10.0, now=11.0, tau=1.0)
    assert one_tau.value == pytest.approx(10.0 * (1 - math.exp(-1)))
    assert one_tau.at == 11.0
    # A burst of reports at almost the same instant barely moves the estimate.
    quick = e.update(10.0, now=10.001, tau=1.0)
    assert quick.value < 0.011
    # After a long pause the new sample dominates.
    assert e.update(10.0, now=30.0, tau=1.0).value == pytest.approx(10.0)


def test_ewma_ignores_reordered_reports_and_is_immutable():
    e = Ewma.first(3.0, now=5.0)
    assert e.update(100.0, now=4.0, tau=1.0) is e
    assert e.update(7.0, now=6.0, tau=0.0) == Ewma(7.0, 6.0)
    with pytest.raises(AttributeError):
        e.value = 1.0  # type: ignore[misc]


# -- choosing ------------------------------------------------------------------


def test_score_counts_queue_inflight_and_cost():
    assert score(WorkerLoad("a", queue=2, cost=0.5), inflight=1) == 2.0
    # An idle slow worker scores worse than an idle fast one.
    assert score(WorkerLoad("slow", cost=4.0)) > score(WorkerLoad("fast", cost=1.0))


def test_worker_load_validates():
    with pytest.raises(ValueError, match="cost"):
        WorkerLoad("a", cost=0)
    with pytest.raises(ValueError, match="queue"):
        WorkerLoad("a", queue=-1)


def test_choose_with_no_workers_raises_no_workers():
    with pytest.raises(NoWorkers) as exc:
        choose([], {}, random.Random(1))
    assert isinstance(exc.value, BusError) and isinstance(exc.value, LookupError)
    with pytest.raises(NoWorkers, match="excluded"):
        choose([WorkerLoad("a")], {}, random.Random(1), exclude=["a"])


def test_choose_single_worker_and_mapping_input():
    c = choose({"a": WorkerLoad("a", queue=3)}, {"a": 1}, random.Random(1))
    assert c.worker == "a" and c.score == 5.0 and c.reason == "only candidate"


def test_choose_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        choose([WorkerLoad("a"), WorkerLoad("b")], {}, random.Random(1), method="round-robin")


@pytest.mark.parametrize("method", [P2C, LOTTERY])
def test_choose_is_deterministic_for_a_seed(method):
    rows = [WorkerLoad(i, queue=i % 3) for i in range(8)]

    def run():
        rng = random.Random(7)
        return [choose(rows, {}, rng, method=method).worker for _ in range(50)]

    assert run() == run()


def test_p2c_with_two_workers_is_least_loaded():
    rows = [WorkerLoad("a", queue=5), WorkerLoad("b", queue=1)]
    rng = random.Random(3)
    assert {choose(rows, {}, rng).worker for _ in range(50)} == {"b"}


def test_own_inflight_counts_move_traffic_away():
    rows = [WorkerLoad("a"), WorkerLoad("b")]
    rng = random.Random(3)
    assert choose(rows, {"a": 4}, rng).worker == "b"
    assert choose(rows, {"b": 4}, rng).worker == "a"


def test_p2c_never_picks_the_most_loaded_and_excludes():
    rows = [WorkerLoad(i) for i in range(5)] + [WorkerLoad("hot", queue=50)]
    rng = random.Random(11)
    picks = Counter(choose(rows, {}, rng).worker for _ in range(2000))
    assert "hot" not in picks
    assert len(picks) == 5
    picks = Counter(choose(rows, {}, rng, exclude=[0, 1, 2, 3]).worker for _ in range(50))
    assert set(picks) == {4}


def test_lottery_gives_inverse_score_shares():
    rows = [WorkerLoad("idle"), WorkerLoad("busy", queue=3)]  # scores 1 and 4
    rng = random.Random(5)
    picks = Counter(choose(rows, {}, rng, method=LOTTERY).worker for _ in range(20000))
    assert picks["busy"] / 20000 == pytest.approx(0.2, abs=0.02)
    assert all(c.reason.startswith("lottery") for c in [choose(rows, {}, rng, method=LOTTERY)])


def test_slow_worker_gets_less_work_under_simulated_load():
    """One worker 4x slower, 70% utilisation: p2c keeps every queue short, random does not."""

    def simulate(method):
        rng = random.Random(42)
        cost = {i: 1.0 for i in range(4)}
        cost[0] = 4.0
        queue = {i: 0 for i in cost}
        progress = {i: 0.0 for i in cost}
        sent, peak = Counter(), Counter()
        for _ in range(4000):
            for w in cost:  # each worker does 0.9 units of work per tick
                progress[w] += 0.9
                while queue[w] and progress[w] >= cost[w]:
                    progress[w] -= cost[w]
                    queue[w] -= 1
                if not queue[w]:
                    progress[w] = 0.0
            for _ in range(2):  # 2 arrivals per tick; capacity is 3 * 0.9 + 0.9 / 4 = 2.9
                if method == "random":
                    w = rng.randrange(4)
                else:
                    rows = [WorkerLoad(i, queue=queue[i], cost=cost[i]) for i in cost]
                    w = choose(rows, {}, rng, method=method).worker
                queue[w] += 1
                sent[w] += 1
                peak[w] = max(peak[w], queue[w])
        return sent, peak

    sent, peak = simulate(P2C)
    assert sent[0] < sent[1] / 10
    assert max(peak.values()) <= 6
    _, lottery_peak = simulate(LOTTERY)
    assert max(lottery_peak.values()) <= 8
    _, random_peak = simulate("random")
    assert random_peak[0] > 100  # the slow worker falls behind for good


# -- scaling config ------------------------------------------------------------


def test_scaling_config_validates():
    ScalingConfig()
    with pytest.raises(ValueError, match="low_water"):
        ScalingConfig(high_water=1, low_water=2)
    with pytest.raises(ValueError, match="maximum"):
        ScalingConfig(minimum=3, maximum=2)
    with pytest.raises(ValueError, match="delay"):
        ScalingConfig(delay=-1)
    with pytest.raises(ValueError, match="minimum"):
        ScalingConfig(minimum=-1)


def test_pool_state_validates():
    with pytest.raises(ValueError, match="main_free"):
        PoolState(workers=1, main_free=-1)
    with pytest.raises(ValueError, match="maximum"):
        PoolState(workers=1, main_free=1, minimum=3, maximum=2)
    assert PoolState(workers=2, main_free=0, pending=1).total == 3


# -- should_spawn --------------------------------------------------------------


def test_spawn_when_queue_exceeds_h_on_main():
    d = should_spawn(5.0, 4.0, None, 100.0, 1.0, PoolState(workers=2, main_free=3, overflow_free=2))
    assert d.spawn and d.pool == MAIN
    assert "> H" in d.reason


def test_no_spawn_at_or_below_h():
    d = should_spawn(4.0, 4.0, None, 100.0, 1.0, PoolState(workers=2, main_free=3))
    assert not d.spawn and d.pool is None and "<= H" in d.reason


def test_waits_d_after_a_spawn():
    pool = PoolState(workers=2, main_free=3)
    d = should_spawn(50.0, 4.0, 99.5, 100.0, 1.0, pool)
    assert not d.spawn and "waiting D" in d.reason
    assert should_spawn(50.0, 4.0, 99.0, 100.0, 1.0, pool).spawn


def test_waits_for_pending_spawns():
    d = should_spawn(50.0, 4.0, 90.0, 100.0, 1.0, PoolState(workers=2, main_free=3, pending=1))
    assert not d.spawn and "still starting" in d.reason


def test_overflow_only_when_main_full():
    d = should_spawn(9.0, 4.0, None, 0.0, 1.0, PoolState(workers=4, main_free=0, overflow_free=2))
    assert d.spawn and d.pool == OVERFLOW and "main pool full" in d.reason
    d = should_spawn(9.0, 4.0, None, 0.0, 1.0, PoolState(workers=4, main_free=0, overflow_free=0))
    assert not d.spawn and "no free slot" in d.reason


def test_respects_maximum():
    d = should_spawn(9.0, 4.0, None, 0.0, 1.0, PoolState(workers=4, main_free=5, maximum=4))
    assert not d.spawn and "maximum" in d.reason


def test_spawns_up_to_minimum_regardless_of_load_and_d():
    d = should_spawn(0.0, 4.0, 99.9, 100.0, 1.0, PoolState(workers=0, main_free=1, minimum=2))
    assert d.spawn and d.pool == MAIN and "below the minimum" in d.reason
    d = should_spawn(0.0, 4.0, 99.9, 100.0, 1.0, PoolState(workers=1, main_free=0, overflow_free=1, minimum=2))
    assert d.spawn and d.pool == OVERFLOW
    # Pending spawns count toward the minimum.
    d = should_spawn(0.0, 4.0, 99.9, 100.0, 1.0, PoolState(workers=1, pending=1, main_free=3, minimum=2))
    assert not d.spawn


def test_step_load_spawns_at_most_once_per_d():
    """A step load, replayed tick by tick: spawns are spaced by D and stop at the pool's size."""
    h, delay, tick = 2.0, 1.0, 0.1
    workers, main_free, last, q, spawns = 1, 3, None, 0.0, []
    for k in range(80):
        now = k * tick
        offered = 0.0 if now < 1.0 else 12.0  # the step
        q = smooth(q, offered / workers, 0.5)
        d = should_spawn(q, h, last, now, delay, PoolState(workers=workers, main_free=main_free))
        if d.spawn:
            spawns.append(now)
            last, workers, main_free = now, workers + 1, main_free - 1
    assert len(spawns) == 3  # main pool exhausted; no overflow configured
    assert all(b - a >= delay - 1e-9 for a, b in zip(spawns, spawns[1:]))
    assert spawns[0] >= 1.0


pools = st.builds(
    PoolState,
    workers=st.integers(0, 20),
    main_free=st.integers(0, 5),
    overflow_free=st.integers(0, 5),
    pending=st.integers(0, 3),
    minimum=st.integers(0, 4),
    maximum=st.none() | st.integers(4, 30),
)


@settings(max_examples=300, deadline=None)
@given(
    q=st.floats(0, 100),
    h=st.floats(0, 50),
    last=st.none() | st.floats(0, 100),
    now=st.floats(0, 200),
    d=st.floats(0, 10),
    pool=pools,
)
def test_spawn_properties(q, h, last, now, d, pool):
    dec = should_spawn(q, h, last, now, d, pool)
    assert isinstance(dec.reason, str) and dec.reason
    if not dec.spawn:
        assert dec.pool is None
        return
    # Overflow only when the main pool is full; never without a free slot.
    assert dec.pool in (MAIN, OVERFLOW)
    assert (dec.pool == OVERFLOW) == (pool.main_free == 0)
    assert (pool.main_free if dec.pool == MAIN else pool.overflow_free) > 0
    if pool.total >= pool.minimum:
        # Load-driven: never within D of the last spawn, never past the maximum,
        # never with a spawn still pending, and only above H.
        assert last is None or now - last >= d
        assert pool.maximum is None or pool.total < pool.maximum
        assert pool.pending == 0
        assert q > h


# -- should_reap ---------------------------------------------------------------


def test_reaps_longest_idle_overflow_first():
    ws = [
        WorkerIdle("m1", idle_since=0.0),
        WorkerIdle("o1", idle_since=50.0, overflow=True),
        WorkerIdle("m2", idle_since=None),
    ]
    d = should_reap(ws, 100.0, minimum=1, idle_after=30.0)
    assert d.worker == "o1" and "overflow" in d.reason
    d = should_reap(ws[:1] + ws[2:], 100.0, minimum=1, idle_after=30.0)
    assert d.worker == "m1"


def test_does_not_reap_busy_or_briefly_idle_workers():
    ws = [WorkerIdle("a", idle_since=90.0), WorkerIdle("b")]
    d = should_reap(ws, 100.0, minimum=1, idle_after=30.0)
    assert d.worker is None and "no worker idle" in d.reason


def test_never_reaps_at_minimum():
    ws = [WorkerIdle("a", idle_since=0.0), WorkerIdle("b", idle_since=0.0)]
    d = should_reap(ws, 100.0, minimum=2, idle_after=1.0)
    assert d.worker is None and "minimum" in d.reason


@given(
    idle=st.lists(st.tuples(st.none() | st.floats(0, 100), st.booleans()), max_size=12),
    now=st.floats(0, 200),
    minimum=st.integers(0, 6),
    idle_after=st.floats(0, 60),
)
def test_reap_properties(idle, now, minimum, idle_after):
    ws = [WorkerIdle(i, since, ovf) for i, (since, ovf) in enumerate(idle)]
    d = should_reap(ws, now, minimum, idle_after)
    if d.worker is None:
        return
    assert len(ws) - 1 >= minimum
    victim = ws[d.worker]
    assert victim.idle_since is not None and now - victim.idle_since >= idle_after
    if not victim.overflow:
        # A reapable overflow worker would have gone first.
        assert not any(w.overflow and w.idle_since is not None and now - w.idle_since >= idle_after for w in ws)


def test_reap_down_to_minimum_after_a_burst():
    ws = [WorkerIdle(i, idle_since=0.0) for i in range(6)]
    reaped = []
    while True:
        d = should_reap(ws, 100.0, minimum=2, idle_after=30.0)
        if d.worker is None:
            break
        reaped.append(d.worker)
        ws = [w for w in ws if w.worker != d.worker]
    assert len(ws) == 2 and len(reaped) == 4


# -- giving overflow back ------------------------------------------------------


def test_calm_since_tracks_the_end_of_a_burst():
    c = calm_since(None, 3.0, 0.5, now=1.0)
    assert c is None
    c = calm_since(c, 0.2, 0.5, now=2.0)
    assert c == 2.0
    assert calm_since(c, 0.4, 0.5, now=3.0) == 2.0
    assert calm_since(c, 0.6, 0.5, now=4.0) is None


def test_give_back_waits_for_calm():
    ws = [WorkerIdle("m"), WorkerIdle("o", overflow=True)]
    assert give_back_overflow(ws, None, 10.0, 5.0, 1, 0).release == ()
    d = give_back_overflow(ws, 8.0, 10.0, 5.0, 1, 0)
    assert d.release == () and "calm for 2.0s of 5s" in d.reason
    d = give_back_overflow(ws, 4.0, 10.0, 5.0, 1, 0)
    assert d == GiveBack(("o",), 0, d.reason) and "giving back 1" in d.reason
    assert give_back_overflow([WorkerIdle("m")], 0.0, 10.0, 5.0, 1, 0).reason == "no overflow workers"


def test_give_back_keeps_the_minimum_moving_it_to_main_when_possible():
    ws = [WorkerIdle("o1", idle_since=1.0, overflow=True), WorkerIdle("o2", overflow=True)]
    d = give_back_overflow(ws, 0.0, 100.0, 5.0, minimum=2, main_free=1)
    # One replacement fits on the main pool; the busy one stays on overflow.
    assert d.release == ("o1",) and d.respawn_main == 1 and "keeping 1" in d.reason
    d = give_back_overflow(ws, 0.0, 100.0, 5.0, minimum=2, main_free=0)
    assert d.release == () and "no room" in d.reason
    d = give_back_overflow(ws, 0.0, 100.0, 5.0, minimum=1, main_free=4)
    assert set(d.release) == {"o1", "o2"} and d.respawn_main == 1


@given(
    kinds=st.lists(st.booleans(), max_size=10),
    minimum=st.integers(0, 6),
    main_free=st.integers(0, 6),
)
def test_give_back_never_drops_below_minimum_when_it_can_help_it(kinds, minimum, main_free):
    ws = [WorkerIdle(i, overflow=ovf) for i, ovf in enumerate(kinds)]
    d = give_back_overflow(ws, 0.0, 100.0, 5.0, minimum, main_free)
    assert all(ws[i].overflow for i in d.release)
    assert d.respawn_main <= main_free
    after = len(ws) - len(d.release) + d.respawn_main
    assert after >= min(minimum, len(ws))
