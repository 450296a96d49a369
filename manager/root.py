"""The root of the tree: the manager's TreeNode.

It never joins anyone; it assigns node ids, turns route changes and
registrations into membership, starts broadcasts and unicasts, and names every
node that did not answer.
"""

from __future__ import annotations

import asyncio
import os

from bus import policy
from bus import protocol as p
from bus.tree import ATTACHED, HANDSHAKE_ALLOWANCE, ROOT_ID, OpResult, TreeNode
from manager.membership import DEAD, LEFT, UNREACHABLE, Membership

__all__ = ["RootNode", "Outcome"]


class Outcome(dict):
    """Result of an operation at the root: ``groups`` (value, names) and ``missing``."""


class RootNode(TreeNode):
    def __init__(self, transport, *, membership: Membership | None = None, epoch: int | None = None, **kw):
        super().__init__("manager", transport, **kw)
        self.node_id = ROOT_ID
        self.forwarder.node_id = ROOT_ID
        self.state = ATTACHED
        self.epoch = epoch if epoch is not None else int.from_bytes(os.urandom(4), "little") or 1
        self.membership = membership or Membership(ROOT_ID, clock=self.clock)
        self._unicast: dict[int, asyncio.Future] = {}
        self._frontier: dict | None = None  # id -> (depth, children) of the shallowest members with room
        self._sent: dict[int, tuple[int, float]] = {}  # joiner id -> (member it was sent to, when): not registered yet
        self._controls: dict = {}
        self._open_at = 0.0
        self.on_load_report = None  # manager.services.ServiceManager.on_report
        self.on_register = None  # manager.keys.KeyService.on_register: a newcomer gets the keyring

    @property
    def is_root(self) -> bool:
        return True

    def start(self) -> None:
        """The root is attached from the start."""

    def placement_policy(self) -> str:
        return self.config.policy

    def redirect_target(self, link: int, jid: int, sub: set) -> str:
        # The root knows the membership, so it skips the walk down: the joiner
        # goes straight to one of the shallowest members with room (the
        # frontier).  The frontier is rebuilt every 50 ms and its counts bumped
        # per redirect, so a join costs O(frontier), not O(members); a target
        # that filled up meanwhile applies the policy itself and redirects further.
        # A rebuild counts the joiners already sent to a member and not registered
        # yet: in a join storm they arrive seconds later (a CURVE handshake each),
        # and forgetting them sent a third of all joiners to full members, one
        # more redirect and handshake each.
        now = self.clock()
        k = self.config.max_children
        if self._frontier is None or now - self._open_at > 0.05:
            self._frontier, self._controls = self._build_frontier(self._open_slots(k, now))
            self._open_at = now
        pick = policy.shortcut(self._frontier, k, self.config.policy, self.rng, exclude=sub | {jid})
        if pick is None:
            self._frontier = None  # full, or only excluded nodes: rebuild next time
            return super().redirect_target(link, jid, sub)
        depth, kids = self._frontier[pick]
        if kids + 1 >= k:
            del self._frontier[pick]
        else:
            self._frontier[pick] = (depth, kids + 1)
        if jid:
            self._sent[jid] = (pick, now)
        return self._controls[pick]

    def _open_slots(self, k: int, now: float) -> dict:
        """The membership's open slots, less those promised to joiners on their way."""
        slots = self.membership.open_slots(k)
        members = self.membership.members
        wait = self.config.join_timeout * HANDSHAKE_ALLOWANCE
        for jid, (target, at) in list(self._sent.items()):
            m = members.get(jid)
            if (m is not None and m.parent) or now - at > wait:
                del self._sent[jid]  # registered (wherever it ended up), or gone elsewhere
            elif target in slots:
                slot = slots[target]
                slot[1] += 1
                if slot[1] >= k:
                    del slots[target]
        return slots

    @staticmethod
    def _build_frontier(open_slots: dict) -> tuple[dict, dict]:
        """({id: (depth, children)} of the shallowest open members, {id: control endpoint})."""
        if not open_slots:
            return {}, {}
        top = min(d for d, _, _ in open_slots.values())
        frontier = {i: (d, kids) for i, (d, kids, _) in open_slots.items() if d == top}
        return frontier, {i: open_slots[i][2] for i in frontier}

    def assign_id(self, body: dict) -> int:
        while True:
            i = self.rng.randrange(2, 0xFFFFFFFF)
            if i not in self.membership.members and i not in self.routes:
                return i

    # -- membership from route changes -------------------------------------------
    def routes_added(self, ids: list, link: int, info: dict | None = None) -> None:
        self.membership.route_added(ids)

    def routes_lost(self, ids: list, reason: str, dead: int | None) -> None:
        self.membership.lost(ids, reason, dead)

    def on_child(self, identity: bytes, msg: p.Message) -> None:
        super().on_child(identity, msg)
        link = self._links.get(identity)
        if link is not None:
            self.membership.heard(self.children[link].node_id)

    def deliver(self, msg: p.Message, from_link: int) -> None:
        t = msg.header.type
        body = msg.body if isinstance(msg.body, dict) else {}
        if t == p.MsgType.REGISTER and body.get("id"):
            if self.routes.lookup(body["id"]) >= 0:
                self.membership.registered(body)
                self.unicast(body["id"], p.MsgType.REGISTER_ACK, {"ep": self.epoch})
                if self.on_register is not None:
                    self.on_register(body)
        elif t == p.MsgType.LOAD_REPORT:
            if self.on_load_report is not None:
                self.on_load_report(body)
        elif t == p.MsgType.REPLY:
            fut = self._unicast.pop(msg.header.ref, None)
            if fut is not None and not fut.done():
                fut.set_result(body)

    # -- operations ------------------------------------------------------------------
    async def broadcast(self, op: str, args: dict, *, ids: list | None = None, timeout: float = 10.0) -> OpResult:
        """Send ``op`` down the whole tree and wait for the merged answer (or the deadline)."""
        now = self.clock()
        op_id = p.next_msg_id()
        body = {"op": op, "a": args, "rem": timeout}
        if ids is not None:
            body["ids"] = list(ids)
        frames = p.encode(p.MsgType.COMMAND, dict(body, rem=max(timeout - self.config.op_margin, 0.0)),
                          src=self.node_id, dst=p.BROADCAST_ID, msg_id=op_id)
        self._gone = {}
        links = self.send_down(frames, list(self.children))
        fut = asyncio.get_running_loop().create_future()
        self._open_op(op_id, links, timeout, body, reply_dst=0, now=now, future=fut)
        return await fut

    async def request(self, node: int | str, op: str, args: dict, *, timeout: float = 10.0) -> dict:
        """Unicast ``op`` to one node (by id or name) through the routing tables; its reply body.

        Raises ``LookupError`` when no live node has that name or no route leads
        to it, ``asyncio.TimeoutError`` when it does not answer in time.
        """
        if isinstance(node, str):
            member = self.membership.by_name(node)
            if member is None:
                raise LookupError(f"no node named {node!r}")
            node = member.id
        node_id = node
        op_id = p.next_msg_id()
        if self.routes.lookup(node_id) < 0:
            raise LookupError(f"no route to node #{node_id}")
        fut = asyncio.get_running_loop().create_future()
        self._unicast[op_id] = fut
        frames = p.encode(p.MsgType.COMMAND, {"op": op, "a": args, "rem": timeout},
                          src=self.node_id, dst=node_id, msg_id=op_id)
        self.transport.send_child(self.children[self.routes.lookup(node_id)].identity, frames)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._unicast.pop(op_id, None)

    async def ask(self, node: int | str, op: str, args: dict, *, timeout: float = 10.0):
        """:meth:`request`, returning the node's value itself (``{"error"}`` if it answered nothing)."""
        body = await self.request(node, op, args, timeout=timeout)
        groups = body.get("g") if isinstance(body, dict) else None
        if not groups:
            return {"error": "the node answered without a value"}
        return groups[0][1]

    def outcome(self, result: OpResult, expected: set[int]) -> Outcome:
        """Name every expected node: in a group, or missing with a reason."""
        mem = self.membership
        groups = []
        answered = set()
        names = mem.names()
        for value, ids in result.groups.values():
            answered.update(ids)
            nodes = list(map(names.get, ids))  # C-speed: this is O(N) per command at the root
            if None in nodes:
                nodes = [n or f"#{i}" for n, i in zip(nodes, ids)]
            nodes.sort()
            groups.append({"value": value, "nodes": nodes})
        mem.heard_all(answered)
        missing = []
        for i in sorted(expected - answered, key=mem.name_of):
            reason = result.missing.get(i)
            if reason is None:
                m = mem.members.get(i)
                if m is not None and m.state in (DEAD, LEFT):
                    reason = "dead" if m.state == DEAD else "left"
                elif m is not None and m.state == UNREACHABLE:
                    reason = "unreachable"
                else:
                    reason = "unreachable" if self.routes.lookup(i) < 0 else "timed out"
            missing.append({"node": mem.name_of(i), "reason": reason})
        groups.sort(key=lambda g: (-len(g["nodes"]), g["nodes"]))
        return Outcome(groups=groups, missing=missing, expected=len(expected), answered=len(answered & expected))
