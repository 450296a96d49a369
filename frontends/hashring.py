"""Consistent hashing with virtual nodes: which cache worker holds a key.

The SNS cache is partitioned across cache workers (TranSend ran Harvest cache
nodes, partitioned by URL hash).  With a plain ``hash(key) % n``, adding a
node moves almost every key; on a consistent-hash ring it moves only the keys
the new node takes over, about ``1/n`` of them, and removing a node moves only
that node's keys.  Each node is placed at ``replicas`` pseudo-random points
(virtual nodes) so that the arcs, and so the keys, are spread evenly: with
160 points per node the largest share stays within ~25% of the mean.

Positions come from BLAKE2b (64-bit digests) of the node's name and of the
key, never from Python's ``hash()``, which is salted per process: every front
end, in any process and on any machine, computes the same owner for a key as
long as it knows the same nodes.

The ring is a sorted list of points searched with :mod:`bisect`: lookups are
O(log V) for V virtual nodes; joins and leaves rebuild it, O(V log V), which
is fine for membership changes.  Not thread-safe; a front end owns its ring.

Tested in tests/frontends/test_hashring.py.
"""

from __future__ import annotations

import bisect
import hashlib
from typing import Iterable, Iterator

from core.errors import BusError

__all__ = ["DEFAULT_REPLICAS", "EmptyRing", "HashRing", "point"]

DEFAULT_REPLICAS = 160


class EmptyRing(BusError, LookupError):
    """A key was looked up on a ring that has no nodes."""


def point(data: str | bytes) -> int:
    """The ring position (an unsigned 64-bit integer) of a key or node label.

    Strings are hashed as UTF-8.  Stable across processes, machines and
    Python versions.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    """A consistent-hash ring over named nodes.

    ``nodes`` are the initial node names (strings: their text is what is
    hashed, so the same name means the same place everywhere).  ``replicas``
    is the number of virtual nodes per unit of weight; :meth:`add` can give a
    node a larger weight (a cache worker with more memory takes a larger
    share).
    """

    def __init__(self, nodes: Iterable[str] = (), *, replicas: int = DEFAULT_REPLICAS):
        if not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be a positive integer, got {replicas!r}")
        self._replicas = replicas
        self._weights: dict[str, int] = {}
        self._points: list[int] = []  # sorted positions
        self._owners: list[str] = []  # node at each position
        for node in nodes:
            self._weights[self._check(node)] = 1
        self._rebuild()

    @staticmethod
    def _check(node) -> str:
        if not isinstance(node, str) or not node:
            raise ValueError(f"node names must be non-empty strings, got {node!r}")
        return node

    def _rebuild(self) -> None:
        # (point, node) sorted: the node name breaks the (astronomically rare)
        # tie of two virtual nodes on one point, the same way in every process.
        vnodes = sorted(
            (point(f"{node}#{i}"), node)
            for node, weight in self._weights.items()
            for i in range(weight * self._replicas)
        )
        self._points = [p for p, _ in vnodes]
        self._owners = [n for _, n in vnodes]

    # -- membership ----------------------------------------------------------

    @property
    def replicas(self) -> int:
        """Virtual nodes per unit of weight."""
        return self._replicas

    @property
    def nodes(self) -> list[str]:
        """The node names, sorted."""
        return sorted(self._weights)

    def __len__(self) -> int:
        return len(self._weights)

    def __contains__(self, node) -> bool:
        return node in self._weights

    def __iter__(self) -> Iterator[str]:
        return iter(self.nodes)

    def __repr__(self) -> str:
        return f"HashRing({self.nodes!r}, replicas={self._replicas})"

    def weight(self, node: str) -> int:
        """The weight ``node`` was added with (KeyError if it is not on the ring)."""
        return self._weights[node]

    def add(self, node: str, weight: int = 1) -> bool:
        """Put ``node`` on the ring with ``weight`` (>= 1); False if it was already there
        with that weight.  Re-adding with another weight changes its share."""
        node = self._check(node)
        if not isinstance(weight, int) or weight < 1:
            raise ValueError(f"weight must be a positive integer, got {weight!r}")
        if self._weights.get(node) == weight:
            return False
        self._weights[node] = weight
        self._rebuild()
        return True

    def remove(self, node: str) -> bool:
        """Take ``node`` off the ring; False if it was not there."""
        if self._weights.pop(node, None) is None:
            return False
        self._rebuild()
        return True

    # -- lookups -------------------------------------------------------------

    def owner(self, key: str | bytes) -> str:
        """The node that holds ``key``: the first virtual node clockwise from its point."""
        if not self._points:
            raise EmptyRing("the hash ring has no nodes")
        i = bisect.bisect_right(self._points, point(key))
        return self._owners[i if i < len(self._owners) else 0]

    def owners(self, key: str | bytes, n: int) -> list[str]:
        """Up to ``n`` distinct nodes for ``key``, primary first, for replication.

        They are the distinct nodes met walking clockwise from the key's
        point, so when the primary leaves, the second one becomes the owner:
        a replica is already where the key will be looked up next.  Fewer than
        ``n`` when the ring has fewer nodes.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n!r}")
        if not self._points:
            raise EmptyRing("the hash ring has no nodes")
        want = min(n, len(self._weights))
        start = bisect.bisect_right(self._points, point(key))
        found: list[str] = []
        total = len(self._owners)
        for k in range(total):
            node = self._owners[(start + k) % total]
            if node not in found:
                found.append(node)
                if len(found) == want:
                    break
        return found

    def shares(self) -> dict[str, float]:
        """Each node's exact share of the ring (arc lengths, summing to 1).

        What the monitor shows for the cache partition; no sampling of keys.
        """
        if not self._points:
            return {}
        full = 1 << 64
        out = dict.fromkeys(self._weights, 0)
        prev = self._points[-1] - full  # the arc that wraps around zero
        for p, node in zip(self._points, self._owners):
            out[node] += p - prev
            prev = p
        return {node: arc / full for node, arc in out.items()}
