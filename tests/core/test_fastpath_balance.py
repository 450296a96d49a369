"""Aggregator, LoadTable and Credits, against each twin (fixture ``fp``)."""

from __future__ import annotations

from collections import Counter

import pytest

from core.errors import BusError, NoWorkers

# -- Aggregator -----------------------------------------------------------------------


def test_convergecast_completes_when_every_link_replied(fp):
    ag = fp.Aggregator()
    ag.open(1, [3, 4], deadline=10.0)
    assert 1 in ag and len(ag) == 1 and ag.owing(1) == [3, 4]
    assert ag.reply(1, 3, ok=5) is False
    assert ag.reply(1, 3, ok=5) is False  # duplicate
    assert ag.reply(1, 9) is False  # a link that owes nothing
    assert ag.reply(1, 4, ok=2, failed=1) is True
    assert ag.is_complete(1) and ag.counts(1) == (7, 1) and ag.owing(1) == []
    assert ag.expired(100.0) == []  # complete ops never expire
    assert ag.close(1) == (7, 1, [])
    assert 1 not in ag
    assert ag.reply(1, 3) is False  # late: the op is gone
    assert dict(ag.statistics()) == {"opened": 1, "completed": 1, "expired": 0, "late_replies": 1, "duplicate_replies": 2}


def test_open_with_no_links_is_complete(fp):
    ag = fp.Aggregator()
    ag.open(5, [], 1.0)
    assert ag.is_complete(5) and ag.statistics()["completed"] == 1


def test_expiry_reports_each_op_once_in_deadline_order(fp):
    ag = fp.Aggregator()
    ag.open(1, [1], 5.0)
    ag.open(2, [1, 2], 3.0)
    ag.open(3, [2], 3.0)
    ag.open(4, [2], 9.0)
    assert ag.expired(2.9) == []
    assert ag.expired(5) == [2, 3, 1]
    assert ag.expired(5.0) == [] and ag.expired(8.0) == []
    assert ag.reply(2, 1) is False  # late after expiry
    assert ag.owing(2) == [1, 2] and not ag.is_complete(2)
    assert ag.expired(9.0) == [4]
    stats = ag.statistics()
    assert (stats["expired"], stats["late_replies"]) == (4, 1)


def test_reopened_op_keeps_its_new_deadline(fp):
    ag = fp.Aggregator()
    ag.open(1, [1], 1.0)
    ag.close(1)
    ag.open(1, [1], 50.0)
    assert ag.expired(10.0) == []  # the stale heap entry of the first op is skipped
    assert ag.expired(50.0) == [1]


def test_forget_link(fp):
    ag = fp.Aggregator()
    ag.open(1, [1, 2], 10.0)
    ag.open(2, [2], 10.0)
    ag.open(3, [1], 10.0)
    assert ag.forget_link(2) == [2]
    assert ag.forget_link(1) == [1, 3]
    assert ag.forget_link(1) == []
    assert ag.statistics()["completed"] == 3


def test_aggregator_errors(fp):
    ag = fp.Aggregator()
    ag.open(2**64 - 1, [1], 1.0)
    with pytest.raises(ValueError):
        ag.open(2**64 - 1, [1], 1.0)
    with pytest.raises(OverflowError):
        ag.open(2**64, [1], 1.0)
    with pytest.raises(OverflowError):
        ag.open(-1, [1], 1.0)
    for method in (ag.owing, ag.counts, ag.is_complete, ag.close):
        with pytest.raises(KeyError):
            method(7)


# -- LoadTable ------------------------------------------------------------------------


def test_pick_serves_equal_loads_in_turn(fp):
    lt = fp.LoadTable()
    for w in (30, 10, 20):
        lt.add(w)
    assert [lt.pick() for _ in range(7)] == [30, 10, 20, 30, 10, 20, 30]
    assert lt.statistics()["picks"] == 7


def test_pick_prefers_least_loaded(fp):
    lt = fp.LoadTable()
    for w in range(4):
        lt.add(w)
    lt.report(0, 5)
    lt.report(1, 1)
    lt.report(2, 3)
    lt.report(3, 1)
    assert lt.pick() in (1, 3)
    lt.dispatched(1, 4)
    assert (lt.load(1), lt.inflight(1), lt.queue(1)) == (5, 4, 1)
    assert lt.pick() == 3


def test_acquire_spreads_and_completed_releases(fp):
    lt = fp.LoadTable()
    for w in range(8):
        lt.add(w)
    got = [lt.acquire() for _ in range(24)]
    assert Counter(got) == {w: 3 for w in range(8)}
    assert all(lt.inflight(w) == 3 for w in range(8))
    lt.completed(5, 3)
    assert lt.acquire() == 5
    lt.completed(5, 100)  # saturates at 0
    assert lt.inflight(5) == 0
    assert dict(lt.statistics()) == {"picks": 25, "lottery_picks": 0, "reports": 0, "dispatched": 25, "completed": 103}


def test_no_workers(fp):
    lt = fp.LoadTable()
    with pytest.raises(NoWorkers) as info:
        lt.pick()
    assert isinstance(info.value, BusError) and isinstance(info.value, LookupError)
    with pytest.raises(NoWorkers):
        lt.acquire()
    with pytest.raises(NoWorkers):
        lt.pick_lottery(0.5)
    lt.add(1)
    lt.remove(1)
    with pytest.raises(NoWorkers):
        lt.pick()


def test_lottery_is_proportional_to_spare_capacity(fp):
    lt = fp.LoadTable()
    lt.add(1, capacity=10)
    lt.add(2, capacity=30)
    lt.add(3, capacity=60)
    lt.report(3, 20)  # spare: 10, 30, 40
    n = 800
    counts = Counter(lt.pick_lottery(i / n) for i in range(n))
    assert counts == {1: 100, 2: 300, 3: 400}
    assert lt.statistics()["lottery_picks"] == n


def test_lottery_skips_full_and_removed_workers(fp):
    lt = fp.LoadTable()
    for w in range(5):
        lt.add(w, capacity=4)
    lt.report(1, 4)
    lt.report(2, 9)
    lt.remove(3)
    assert {lt.pick_lottery(i / 300) for i in range(300)} == {0, 4}
    assert lt.pick_lottery(0.999999999999) == 4


def test_lottery_falls_back_to_pick_without_spare(fp):
    lt = fp.LoadTable()
    lt.add(1, capacity=0)
    lt.add(2, capacity=0)
    assert [lt.pick_lottery(0.5) for _ in range(3)] == [1, 2, 1]
    assert lt.statistics()["lottery_picks"] == 0 and lt.statistics()["picks"] == 3
    with pytest.raises(ValueError):
        lt.pick_lottery(1.0)
    with pytest.raises(ValueError):
        lt.pick_lottery(-0.1)
    with pytest.raises(ValueError):
        lt.pick_lottery(float("nan"))


def test_slots_are_reused_last_freed_first(fp):
    lt = fp.LoadTable()
    for w in range(6):
        lt.add(w, capacity=w + 1)
    lt.remove(1)
    lt.remove(4)
    lt.add(40, capacity=5)  # takes worker 4's slot
    lt.add(10, capacity=2)  # then worker 1's
    assert lt.workers() == [0, 2, 3, 5, 10, 40] and len(lt) == 6
    # The lottery walks slots in order: slot 1 now holds worker 10, slot 4 worker 40.
    draws = [lt.pick_lottery((i + 0.5) / 21) for i in range(21)]
    assert draws == [0] + [10] * 2 + [2] * 3 + [3] * 4 + [40] * 5 + [5] * 6


def test_worker_errors(fp):
    lt = fp.LoadTable()
    lt.add(2**32 - 1, capacity=2**32 - 1)
    with pytest.raises(ValueError):
        lt.add(2**32 - 1)
    with pytest.raises(OverflowError):
        lt.add(2**32)
    with pytest.raises(OverflowError):
        lt.add(1, capacity=-1)
    for call in (lambda: lt.remove(7), lambda: lt.report(7, 1), lambda: lt.dispatched(7),
                 lambda: lt.completed(7), lambda: lt.load(7), lambda: lt.inflight(7), lambda: lt.queue(7)):
        with pytest.raises(KeyError):
            call()
    with pytest.raises(KeyError):  # the worker is looked up before the value is checked
        lt.report(7, -1)
    with pytest.raises(OverflowError):
        lt.report(2**32 - 1, 2**32)
    with pytest.raises(OverflowError):
        lt.dispatched(2**32 - 1, -1)
    assert 2**32 - 1 in lt and 7 not in lt and "x" not in lt


def test_many_workers(fp):
    lt = fp.LoadTable()
    for w in range(300):
        lt.add(w, capacity=3)
    got = [lt.acquire() for _ in range(900)]
    assert Counter(got) == {w: 3 for w in range(300)}
    # Nobody has spare capacity left: the lottery falls back to pick().
    assert [lt.pick_lottery(0.5), lt.pick_lottery(0.1), lt.pick()] == [0, 1, 2]


# -- Credits --------------------------------------------------------------------------


def test_credits(fp):
    cr = fp.Credits(2)
    assert cr.available(b"peer") == 2
    assert cr.take(b"peer") is True and cr.take(b"peer", 2) is False
    assert cr.grant(b"peer", 5) == 6
    assert cr.take(b"peer", 6) is True and cr.available(b"peer") == 0
    cr.forget(b"peer")
    cr.forget(b"never")
    assert cr.available(b"peer") == 2
    assert dict(cr.statistics()) == {"granted": 5, "consumed": 7, "stalled": 1}


def test_credits_ranges(fp):
    with pytest.raises(OverflowError):
        fp.Credits(-1)
    cr = fp.Credits(2**32 - 1)
    assert cr.grant("a", 2**32 - 1) == 2**33 - 2
    with pytest.raises(OverflowError):
        cr.grant("a", 2**32)
    with pytest.raises(OverflowError):
        cr.take("a", -1)
