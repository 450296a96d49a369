"""The tree's pure policies: placement, shortcut, silence, backoff, budgets, selectors, merging."""

import random
import statistics

import pytest

from bus import policy
from bus.policy import ACCEPT, TreeConfig


def test_place_accepts_until_full_then_redirects():
    rng = random.Random(1)
    assert policy.place({}, 2, "randtree", rng) == ACCEPT
    assert policy.place({0: 1}, 2, "randtree", rng) == ACCEPT
    assert policy.place({0: 1, 1: 5}, 2, "randtree", rng) in (0, 1)


def test_randtree_spreads_over_children_and_balanced_picks_the_smallest():
    rng = random.Random(2)
    sizes = {0: 9, 1: 3, 2: 3, 3: 7}
    picks = [policy.place(sizes, 4, "randtree", rng) for _ in range(400)]
    assert set(picks) == {0, 1, 2, 3}
    assert policy.place(sizes, 4, "balanced", rng) == 1  # smallest, lowest link on a tie


def test_star_always_accepts_and_exclusions_are_respected():
    rng = random.Random(3)
    assert policy.place({i: 1 for i in range(1000)}, 4, "star", rng) == ACCEPT
    assert policy.place({0: 1, 1: 1}, 2, "randtree", rng, exclude={0}) == 1
    assert policy.place({0: 1, 1: 1}, 2, "randtree", rng, exclude={0, 1}) == ACCEPT


def test_shortcut_picks_a_shallowest_member_with_room():
    rng = random.Random(4)
    open_nodes = {10: (1, 16), 11: (1, 3), 12: (1, 15), 20: (2, 0), 30: (3, 0)}
    assert policy.shortcut(open_nodes, 16, "balanced", rng) == 11
    assert {policy.shortcut(open_nodes, 16, "randtree", rng) for _ in range(100)} == {11, 12}
    assert policy.shortcut(open_nodes, 16, "randtree", rng, exclude={11, 12}) == 20
    assert policy.shortcut({10: (1, 16)}, 16, "randtree", rng) is None


def test_silence_after_misses_heartbeats():
    cfg = TreeConfig(heartbeat=0.5, misses=4)
    assert not policy.is_silent(10.0, 12.0, cfg)
    assert policy.is_silent(10.0, 12.01, cfg)


def test_backoff_grows_to_the_cap_with_full_jitter():
    cfg = TreeConfig(backoff_base=0.1, backoff_cap=5.0)
    rng = random.Random(5)
    for attempt in range(40):
        d = policy.backoff(attempt, cfg, rng)
        assert cfg.backoff_base / 2 <= d <= max(cfg.backoff_cap, cfg.backoff_base / 2)
    early = [policy.backoff(0, cfg, rng) for _ in range(500)]
    late = [policy.backoff(10, cfg, rng) for _ in range(500)]
    assert statistics.mean(late) > 10 * statistics.mean(early)
    assert statistics.pstdev(late) > 1.0, "jitter spreads a herd of reconnects"


def test_child_budget_leaves_a_margin_per_level():
    cfg = TreeConfig(op_margin=0.05)
    assert policy.child_budget(1.0, cfg) == pytest.approx(0.95)
    assert policy.child_budget(0.01, cfg) == 0.0


MEMBERS = [
    {"id": 1, "name": "web-1", "attrs": {"group": "web"}},
    {"id": 2, "name": "web-2", "attrs": {"group": "web"}},
    {"id": 3, "name": "db-1", "attrs": {"group": "db", "rack": "r1"}},
]


@pytest.mark.parametrize(
    "selector, ids",
    [(None, [1, 2, 3]), ("*", [1, 2, 3]), ("web-*", [1, 2]), ("db-1,web-2", [2, 3]), ("group=db", [3]),
     ("rack=r1", [3]), ("nomatch*", []), ("group=none", [])],
)
def test_selectors(selector, ids):
    assert sorted(policy.select(MEMBERS, selector)) == ids


def test_merge_groups_collapses_identical_values():
    into = {}
    policy.merge_groups(into, [[b"k1", "a", [1, 2]], [b"k2", "b", [3]]])
    policy.merge_groups(into, [[b"k1", "a", [4]]])
    assert into == {b"k1": ["a", [1, 2, 4]], b"k2": ["b", [3]]}


def test_config_rejects_nonsense():
    with pytest.raises(ValueError):
        TreeConfig(policy="ring")
    with pytest.raises(ValueError):
        TreeConfig(max_children=0)
    with pytest.raises(ValueError):
        TreeConfig(heartbeat=0)
