"""Soft-state membership kept by the root: who is in the tree, where, since when.

Rebuilt from the nodes themselves after a manager restart (they re-register),
so nothing here is persisted.  Liveness follows the root's routing table: a
node is ``alive`` while a route to it exists, ``dead`` when its parent reported
it silent, ``unreachable`` while it is an orphan behind a dead node, ``left``
after a clean goodbye.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

__all__ = ["Member", "Membership", "ALIVE", "DEAD", "UNREACHABLE", "LEFT"]

ALIVE, DEAD, UNREACHABLE, LEFT = "alive", "dead", "unreachable", "left"


@dataclass
class Member:
    id: int
    name: str = ""
    parent: int = 0
    control: str = ""
    data: str = ""
    attrs: dict = field(default_factory=dict)
    pid: int = 0
    state: str = ALIVE
    last_heard: float = 0.0
    since: float = 0.0  # when the state last changed


class Membership:
    """Members by id, parent pointers for depth, and a bounded feed of events."""

    def __init__(self, root_id: int, root_name: str = "manager", clock=time.monotonic, wall=time.time,
                 max_events: int = 500, forget_after: float = 600.0):
        self.root_id = root_id
        self.root_name = root_name
        self.clock = clock
        self.wall = wall
        self.members: dict[int, Member] = {}
        self.events: deque = deque(maxlen=max_events)
        self.forget_after = forget_after
        self.counters = {"joined": 0, "rejoined": 0, "lost": 0, "left": 0, "replaced": 0}
        self.version = 0  # bumped on every change that can rename or add a member
        self._heard: dict[int, float] = {}  # id -> when it last answered an operation
        self._by_name: dict[str, int] = {}  # name -> id of the member that registered it last
        self._names: dict[int, str] | None = None
        self._names_version = -1

    # -- updates ------------------------------------------------------------------
    def _event(self, kind: str, node: str, detail: str) -> None:
        self.events.append({"t": self.wall(), "kind": kind, "node": node, "detail": detail})
        if kind in self.counters:
            self.counters[kind] += 1

    def names(self) -> dict[int, str]:
        """{id: display name} of every member (and the root); cached until membership changes."""
        if self._names is None or self._names_version != self.version:
            out = {i: (m.name or f"#{i}") for i, m in self.members.items()}
            out[self.root_id] = self.root_name
            self._names, self._names_version = out, self.version
        return self._names

    def name_of(self, node_id: int) -> str:
        if node_id == self.root_id:
            return self.root_name
        m = self.members.get(node_id)
        return m.name if m and m.name else f"#{node_id}"

    def by_name(self, name: str) -> Member | None:
        m = self.members.get(self._by_name.get(name, -1))
        return m if m is not None and m.name == name else None

    def route_added(self, ids) -> None:
        """Routes to ``ids`` exist again: they are alive (details come with REGISTER)."""
        now = self.clock()
        for i in ids:
            m = self.members.get(i)
            if m is None:
                self.members[i] = Member(i, last_heard=now, since=now)
                self.version += 1
            elif m.state != ALIVE:
                m.state = ALIVE
                m.since = now
                m.last_heard = now

    def registered(self, info: dict) -> Member:
        now = self.clock()
        i = info["id"]
        name = info.get("name", "")
        other = self.by_name(name) if name else None
        if other is not None and other.id != i and other.state == ALIVE:
            other.state = DEAD
            other.since = now
            self._event("replaced", name, f"a new instance (#{i}) took the name of #{other.id}")
        m = self.members.get(i)
        if m is None:
            m = self.members[i] = Member(i, since=now)
        # A retried REGISTER whose first copy arrived changes nothing worth an event.
        quiet = bool(info.get("retry")) and m.name == name and m.parent == info.get("parent", 0)
        if m.name != name:
            self.version += 1
        m.name = name
        if name:
            self._by_name[name] = i
        m.parent = info.get("parent", 0)
        m.control = info.get("ctl", "")
        m.data = info.get("data", "")
        m.attrs = dict(info.get("attrs") or {})
        m.pid = info.get("pid", 0)
        m.last_heard = now
        if m.state != ALIVE:
            m.state = ALIVE
            m.since = now
        reason = info.get("reason", "joined")
        parent = self.name_of(m.parent)
        if quiet:
            pass
        elif reason == "rejoined":
            self._event("rejoined", name, f"under {parent} after {info.get('orphaned_for', 0):.2f}s as an orphan")
        elif reason == "joined":
            self._event("joined", name, f"under {parent}")
        return m

    def heard(self, node_id: int) -> None:
        m = self.members.get(node_id)
        if m is not None:
            m.last_heard = self.clock()

    def heard_all(self, ids) -> None:
        """Every node in ``ids`` answered just now (one dict update, not one per member)."""
        self._heard.update(dict.fromkeys(ids, self.clock()))

    def last_heard(self, m: Member) -> float:
        return max(m.last_heard, self._heard.get(m.id, 0.0))

    def lost(self, ids, reason: str, dead: int | None) -> None:
        """The parent of ``dead`` reported it gone; the rest of ``ids`` sat behind it."""
        now = self.clock()
        for i in ids:
            m = self.members.get(i)
            if m is None or m.state != ALIVE:
                continue
            if reason == "left" and i == dead:
                m.state = LEFT
            else:
                m.state = DEAD if i == dead else UNREACHABLE
            m.since = now
        if dead is not None:
            kind = "left" if reason == "left" else "lost"
            behind = len([i for i in ids if i != dead])
            detail = f"{reason}; {behind} node(s) behind it orphaned" if behind else reason
            self._event(kind, self.name_of(dead), detail)

    def expire(self) -> None:
        """Forget members that have been gone for longer than ``forget_after``."""
        now = self.clock()
        for i in [i for i, m in self.members.items() if m.state != ALIVE and now - m.since > self.forget_after]:
            m = self.members.pop(i)
            self._heard.pop(i, None)
            if self._by_name.get(m.name) == i:
                del self._by_name[m.name]
            self.version += 1

    # -- queries --------------------------------------------------------------------
    def alive(self) -> list[Member]:
        return [m for m in self.members.values() if m.state == ALIVE]

    def depths(self) -> dict[int, int]:
        """Depth of every member from the parent pointers (root = 0)."""
        out = {self.root_id: 0}

        def depth(i: int, guard: int = 0) -> int:
            if i in out:
                return out[i]
            m = self.members.get(i)
            if m is None or guard > 64 or m.parent == 0:
                return -1
            d = depth(m.parent, guard + 1)
            out[i] = d + 1 if d >= 0 else -1
            return out[i]

        for i in self.members:
            depth(i)
        return out

    def open_slots(self, max_children: int) -> dict:
        """{id: [depth, children, control]} of registered live members with fewer than ``max_children``."""
        depths = self.depths()
        kids: dict[int, int] = {}
        for m in self.members.values():
            if m.state == ALIVE:
                kids[m.parent] = kids.get(m.parent, 0) + 1
        return {
            m.id: [depths.get(m.id, -1), kids.get(m.id, 0), m.control]
            for m in self.members.values()
            if m.state == ALIVE and m.control and kids.get(m.id, 0) < max_children and depths.get(m.id, -1) >= 1
        }

    def snapshot(self) -> list[dict]:
        now = self.clock()
        depths = self.depths()
        kids: dict[int, int] = {}
        for m in self.members.values():
            if m.state == ALIVE:
                kids[m.parent] = kids.get(m.parent, 0) + 1
        sizes: dict[int, int] = {}
        for m in self.members.values():
            if m.state != ALIVE:
                continue
            seen = 0
            j = m.parent
            while j and j != self.root_id and seen < 64:
                sizes[j] = sizes.get(j, 0) + 1
                j = self.members[j].parent if j in self.members else 0
                seen += 1
        out = []
        for m in sorted(self.members.values(), key=lambda m: (m.name, m.id)):
            out.append(
                {
                    "id": m.id,
                    "name": m.name or f"#{m.id}",
                    "parent": m.parent,
                    "depth": depths.get(m.id, -1),
                    "children": kids.get(m.id, 0),
                    "subtree": sizes.get(m.id, 0) + 1,
                    "control": m.control,
                    "data": m.data,
                    "pid": m.pid,
                    "attrs": m.attrs,
                    "last_heard": round(now - self.last_heard(m), 3),
                    "state": m.state,
                }
            )
        return out
