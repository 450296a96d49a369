"""The root's placement of joiners (``RootNode.redirect_target``), without sockets."""

from __future__ import annotations

import random
from collections import Counter

from bus.policy import TreeConfig
from bus.tree import HANDSHAKE_ALLOWANCE, ROOT_ID
from manager.root import RootNode
from tests.bus.fakenet import FakeNet, FakeTransport

K = 4


def _root(members: int) -> tuple[RootNode, list]:
    """A root whose ``members`` registered children have no children yet, and a settable clock."""
    now = [0.0]
    root = RootNode(FakeTransport(FakeNet(), "root"), config=TreeConfig(max_children=K),
                    rng=random.Random(3), clock=lambda: now[0])  # fmt: skip
    for i in range(2, 2 + members):
        root.membership.registered({"id": i, "name": f"n{i}", "parent": ROOT_ID, "ctl": f"tcp://n{i}"})
    return root, now


def _storm(root: RootNode, now: list, joiners: range, step: float) -> Counter:
    """Redirect each joiner in turn, ``step`` seconds apart, none of them registering yet."""
    sent = Counter()
    for jid in joiners:
        sent[root.redirect_target(0, jid, set())] += 1
        now[0] += step
    return sent


def test_a_join_storm_is_spread_over_the_free_slots_counting_joiners_still_on_their_way():
    """The frontier is rebuilt from the membership every 50 ms; joiners sent to a member and not
    registered yet still hold their slots, so no member is sent more joiners than it has room for
    (each one more would cost a second redirect, and with CURVE a second handshake)."""
    root, now = _root(3)
    sent = _storm(root, now, range(100, 112), step=0.03)  # 12 joiners over 0.36 s: seven rebuilds
    assert sent == {"tcp://n2": K, "tcp://n3": K, "tcp://n4": K}


def test_a_slot_comes_back_when_its_joiner_registers_elsewhere_or_never_comes():
    root, now = _root(1)
    assert _storm(root, now, range(100, 100 + K), step=0.0) == {"tcp://n2": K}
    now[0] += 0.1
    assert 2 not in root._open_slots(K, now[0])  # full: every joiner sent there is still on its way
    # One joiner registered elsewhere (under the root): its slot at n2 is free again.
    root.membership.registered({"id": 100, "name": "j100", "parent": ROOT_ID, "ctl": "tcp://j100"})
    assert root._open_slots(K, now[0])[2][1] == K - 1
    # The others never arrive: after the handshake allowance their slots are given again.
    now[0] += TreeConfig().join_timeout * HANDSHAKE_ALLOWANCE + 0.1
    assert root._open_slots(K, now[0])[2][1] == 0 and not root._sent
