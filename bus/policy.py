"""Tree policies as pure functions: placement, failure detection, backoff, merging.

Nothing here touches a socket, a clock or a global random generator; callers
pass ``now`` and a ``random.Random``.  Tested in tests/bus/test_policy.py.
"""

from __future__ import annotations

import fnmatch
import random
from dataclasses import dataclass

__all__ = [
    "ACCEPT",
    "RANDTREE",
    "BALANCED",
    "STAR",
    "POLICIES",
    "TreeConfig",
    "place",
    "shortcut",
    "is_silent",
    "backoff",
    "child_budget",
    "select",
    "merge_groups",
]

ACCEPT = -1
RANDTREE = "randtree"
BALANCED = "balanced"
STAR = "star"
POLICIES = (RANDTREE, BALANCED, STAR)


@dataclass(frozen=True)
class TreeConfig:
    """Timers and shape of the overlay tree (cluster-wide; the root's wins).

    ``max_children`` 16 keeps a 1000-node tree at depth 3 while the root handles
    16 messages per broadcast (see docs/architecture.md for the measurement).
    """

    max_children: int = 16
    policy: str = RANDTREE
    heartbeat: float = 1.0  # seconds between heartbeats on every tree link
    misses: int = 3  # silent heartbeats before a peer is declared dead (process deaths: at once)
    join_timeout: float = 1.0  # wait for an answer to JOIN before trying the next candidate
    backoff_base: float = 0.1
    backoff_cap: float = 5.0
    max_redirects: int = 32
    op_margin: float = 0.05  # each tree level answers this much before its parent's deadline
    route_sync: float = 5.0  # seconds between full subtree announcements to the parent

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if self.max_children < 1:
            raise ValueError("max_children must be >= 1")
        if self.heartbeat <= 0 or self.misses < 1:
            raise ValueError("heartbeat must be > 0 and misses >= 1")

    @property
    def dead_after(self) -> float:
        return self.heartbeat * self.misses


def place(subtree_sizes: dict, max_children: int, policy: str, rng: random.Random, exclude=()) -> int:
    """Where a joining node goes: ``ACCEPT`` or the child link to redirect to.

    ``subtree_sizes`` maps child link -> nodes in that child's subtree (itself
    included).  ``star`` accepts everyone at the root (callers only use it
    there).  ``exclude`` lists links that must not be chosen (e.g. the joiner's
    own descendants, which would make a cycle).
    """
    if policy == STAR or len(subtree_sizes) < max_children:
        return ACCEPT
    links = sorted(link for link in subtree_sizes if link not in exclude)
    if not links:
        return ACCEPT
    if policy == BALANCED:
        return min(links, key=lambda link: (subtree_sizes[link], link))
    return rng.choice(links)


def shortcut(open_nodes: dict, max_children: int, policy: str, rng: random.Random, exclude=()) -> int | None:
    """Where the root sends a joiner when its own children are full: a member with room.

    ``open_nodes`` maps node id -> (depth, children); the shallowest members with
    fewer than ``max_children`` children are the candidates, so most joins take
    one redirect instead of one per level.  RandTree picks one of them at
    random, ``balanced`` the one with the fewest children.  None if there is none.
    """
    cands = [i for i, (d, kids) in open_nodes.items() if kids < max_children and d >= 1 and i not in exclude]
    if not cands:
        return None
    top = min(open_nodes[i][0] for i in cands)
    best = [i for i in cands if open_nodes[i][0] == top]  # in the map's (deterministic) order
    if policy == BALANCED:
        return min(best, key=lambda i: (open_nodes[i][1], i))
    return rng.choice(best)


def is_silent(last_heard: float, now: float, config: TreeConfig) -> bool:
    """True when a peer has not been heard for ``misses`` heartbeats."""
    return now - last_heard > config.dead_after


def backoff(attempt: int, config: TreeConfig, rng: random.Random) -> float:
    """Delay before reconnect attempt ``attempt`` (0-based): exponential, full jitter.

    Full jitter (uniform in [0, min(cap, base * 2**attempt)]) spreads a herd of
    orphans over the whole window, so a restarted manager is not stormed.
    """
    ceiling = min(config.backoff_cap, config.backoff_base * (2 ** min(attempt, 30)))
    return rng.uniform(config.backoff_base / 2, max(ceiling, config.backoff_base / 2))


def child_budget(remaining: float, config: TreeConfig) -> float:
    """Time a child gets for an operation so its answer beats our own deadline."""
    return max(remaining - config.op_margin, 0.0)


def select(members: list, selector: str | None) -> list:
    """Ids of the members (dicts with ``id``, ``name``, ``attrs``) a selector picks.

    A selector is ``None`` (everyone), ``key=value`` (attribute match), or a
    comma-separated list of fnmatch globs on names.
    """
    if selector is None or selector.strip() in ("", "*"):
        return [m["id"] for m in members]
    selector = selector.strip()
    if "=" in selector and "," not in selector:
        key, _, value = selector.partition("=")
        key, value = key.strip(), value.strip()
        return [m["id"] for m in members if str(m.get("attrs", {}).get(key)) == value]
    globs = [g.strip() for g in selector.split(",") if g.strip()]
    return [m["id"] for m in members if any(fnmatch.fnmatchcase(m["name"], g) for g in globs)]


def merge_groups(into: dict, groups) -> dict:
    """Merge ``[[key, value, [ids]], ...]`` groups into ``{key: [value, ids]}``.

    Keys are the packed bytes of the value, so identical results from different
    nodes collapse into one group at every tree level (dshbak -c, in the tree).
    """
    for key, value, ids in groups:
        slot = into.get(key)
        if slot is None:
            into[key] = [value, list(ids)]
        else:
            slot[1].extend(ids)
    return into
