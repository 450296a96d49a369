"""The overlay tree protocol of one logical node (RandTree, then better).

Sans-socket: a :class:`TreeNode` is fed decoded control messages
(:meth:`on_parent`, :meth:`on_child`) and clock ticks (:meth:`tick`), and acts
through a :class:`Transport` (``bus.link`` implements it on ZeroMQ; tests use a
fake).  The fast path keeps the routing table, the broadcast dedup window and
the convergecast bookkeeping; policies (placement, failure detection, backoff)
are the pure functions of ``bus.policy``.  Messages and timers are described in
docs/architecture.md ("The overlay tree").

States: ``detached`` -> ``joining`` -> ``attached``; a silent parent makes the
node ``joining`` again (grandparent first, then the root) *with its subtree*;
``stopped`` is final.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass, replace
from typing import Callable, Protocol

from bus import policy
from bus import protocol as p
from bus.bodies import check_body
from bus.convergecast import Convergecast, OpResult
from bus.policy import TreeConfig
from core import fastpath as fp

__all__ = ["Transport", "TreeNode", "Child", "OpResult", "ROOT_ID"]

log = logging.getLogger(__name__)

ROOT_ID = 1  # the manager is always node 1
MAX_LEVELS = 64  # no real tree is deeper: a route change that climbed further is circling a loop
HANDSHAKE_ALLOWANCE = 4  # join timeouts a JOIN may wait for its connection's handshake (see reached())

DETACHED, JOINING, ATTACHED, STOPPED = "detached", "joining", "attached", "stopped"

#: ``handler(node, args, budget)`` returns a value, or an awaitable of one.
Handler = Callable[["TreeNode", dict, float], object]


class Transport(Protocol):
    """What a tree node needs from the sockets below it."""

    control_endpoint: str
    data_endpoint: str

    def connect_parent(self, endpoint: str) -> None: ...

    def disconnect_parent(self) -> None: ...

    def send_parent(self, frames: list) -> bool: ...

    def send_child(self, identity: bytes, frames: list) -> bool: ...


@dataclass
class Child:
    identity: bytes
    node_id: int
    name: str
    control: str
    data: str
    last_heard: float


class TreeNode(Convergecast):
    """One logical node's view of the tree: parent, children, routes, operations."""

    def __init__(
        self,
        name: str,
        transport: Transport,
        *,
        config: TreeConfig = TreeConfig(),
        root_endpoint: str | None = None,
        attrs: dict | None = None,
        handlers: dict[str, Handler] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.name = name
        self.transport = transport
        self.config = config
        self.attrs = dict(attrs or {})
        self.handlers = dict(handlers or {})
        self.rng = rng or random.Random()
        self.clock = clock
        self.codec = p.new_codec()
        self.routes = fp.RoutingTable()
        self.forwarder = fp.Forwarder(0, self.codec, self.routes)
        self.aggregator = fp.Aggregator()
        self.node_id = 0
        self.state = DETACHED
        self.depth = 0
        self.path: list[int] = []  # ids from the root down to our parent (loop detection)
        self.parent_id = 0
        self.parent_endpoint: str | None = None
        self.parent_data: str | None = None  # the parent's data-plane ROUTER (packages are pulled from it)
        #: called with the parent's data endpoint (None when orphaned) on every change of parent
        self.on_reparent: Callable[[str | None], None] | None = None
        self.grandparent_endpoint: str | None = None
        self.root_endpoint = root_endpoint
        self.root_id = ROOT_ID
        self.epoch = 0  # root incarnation we last heard of
        self.registered_epoch = -1
        self.children: dict[int, Child] = {}
        self._links: dict[bytes, int] = {}
        self._next_link = 0
        self._parent_heard = 0.0
        self._last_beat = 0.0
        self._ops: dict = {}  # op id -> bus.convergecast._Op
        self._tasks: set[asyncio.Task] = set()
        self._gone: dict[int, str] = {}  # ids lost by send_down, for the op being opened
        self._beat: tuple | None = None  # (node id, frames) of our heartbeat to the parent
        self._announced: list[int] = []  # the subtree our last JOIN announced
        self._unsent_lost: list[tuple] = []  # losses below us while we were not attached
        self._next_sync = 0.0  # next full ROUTE_SYNC to the parent
        self._hops = 0  # levels the route change being handled has climbed
        self._started = 0.0
        self.join_time: float | None = None  # seconds from start() to the first accept
        self._registration: dict = {}
        self._register_due: float | None = None  # re-send REGISTER then, unless acknowledged
        # join state
        self._candidates: list[str] = []
        self._join_deadline: float | None = None  # answer to the JOIN in flight due by
        self._join_at: float | None = None  # next join attempt scheduled at
        self._attempt = 0
        self._redirects = 0
        self._orphaned_at: float | None = None
        self.counters = {
            "joins": 0,
            "rejoins": 0,
            "redirects": 0,
            "loops": 0,
            "join_timeouts": 0,
            "join_rejects": 0,
            "children_lost": 0,
            "parent_lost": 0,
            "heartbeats_sent": 0,
            "ops": 0,
            "ops_expired": 0,
            "unknown_peer": 0,
            "bad_bodies": 0,  # control messages dropped by bus.bodies.check_body
        }

    # -- lifecycle -------------------------------------------------------------
    @property
    def is_root(self) -> bool:
        return False

    @property
    def attached(self) -> bool:
        return self.state == ATTACHED

    def start(self) -> None:
        """Begin joining through the root endpoint (no-op for the root)."""
        if not self.root_endpoint:
            raise ValueError("a node needs the root's control endpoint to join")
        self._started = self.clock()
        self._begin_join([self.root_endpoint], self._started)

    async def stop(self) -> None:
        """Leave cleanly: tell the parent and children, cancel every task."""
        if self.state == STOPPED:
            return
        if self.state == ATTACHED and not self.is_root:
            self.transport.send_parent(p.encode(p.MsgType.LEAVE, {"id": self.node_id}, src=self.node_id))
        bye = p.encode(p.MsgType.JOIN_REJECT, {"reason": "parent leaving"}, src=self.node_id)
        for child in list(self.children.values()):
            self.transport.send_child(child.identity, bye)
        self.state = STOPPED
        for op in self._ops.values():
            if op.future is not None and not op.future.done():
                op.future.cancel()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.transport.disconnect_parent()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- joining (as a child) -------------------------------------------------------
    def _begin_join(self, candidates: list[str], now: float) -> None:
        seen = set()
        own = self.transport.control_endpoint
        self._candidates = [c for c in candidates if c and c != own and not (c in seen or seen.add(c))]
        self.state = JOINING
        self._redirects = 0
        self._join_at = now
        self._join_deadline = None

    def _try_next_candidate(self, now: float) -> None:
        if not self._candidates:
            # Every candidate failed: back off (with jitter) and start over at the root.
            delay = policy.backoff(self._attempt, self.config, self.rng)
            self._attempt += 1
            self._candidates = [self.root_endpoint]
            self._join_at = now + delay
            self._join_deadline = None
            self.transport.disconnect_parent()
            return
        self._send_join(self._candidates.pop(0), now)

    def _send_join(self, endpoint: str, now: float) -> None:
        self.transport.connect_parent(endpoint)
        self.parent_endpoint = endpoint
        self._announced = self.routes_ids()
        body = {
            "id": self.node_id,
            "name": self.name,
            "ctl": self.transport.control_endpoint,
            "data": self.transport.data_endpoint,
            "sub": self._announced,
            "attrs": self.attrs,
            "pid": os.getpid(),
        }
        self.transport.send_parent(p.encode(p.MsgType.JOIN, body, src=self.node_id))
        # A candidate that cannot even be reached (dead, or cut off) is given up after
        # join_timeout; one that answered the TCP connect gets longer (see reached()).
        self._join_deadline = now + self.config.join_timeout
        self._join_at = None

    def routes_ids(self) -> list:
        out = []
        for link in self.children:
            out.extend(self.routes.ids_via(link))
        return out

    def _on_accept(self, body: dict, now: float) -> None:
        path = list(body.get("path") or [])
        if self.node_id in path:
            # The candidate sits below us (our view of our subtree was stale): joining
            # there would close a loop cut off from the root.  Leave it, try the next one.
            self.counters["loops"] += 1
            log.info("%s: refused a parent inside its own subtree (path %s)", self.name, path)
            self.transport.send_parent(p.encode(p.MsgType.LEAVE, {"id": body.get("id", 0)}, src=body.get("id", 0)))
            self._join_deadline = now
            return
        rejoin = self._orphaned_at is not None
        self.path = path
        cfg = body.get("cfg")
        if cfg:  # the root's timers and shape win, so the whole tree agrees
            self.config = replace(self.config, max_children=cfg["k"], policy=cfg["pol"], heartbeat=cfg["hb"],
                                  misses=cfg["mi"])
        self.node_id = body["id"]
        self.forwarder.node_id = self.node_id
        self.forwarder.has_parent = True
        self.parent_id = body["parent"]
        self.depth = body["depth"]
        self.grandparent_endpoint = body.get("gp")
        self.parent_data = body.get("pdata")
        if self.on_reparent is not None:
            self.on_reparent(self.parent_data)
        self.root_endpoint = body.get("rep") or self.root_endpoint
        self.root_id = body.get("rid", ROOT_ID)
        self.state = ATTACHED
        self._parent_heard = now
        self._attempt = 0
        self._join_deadline = None
        self.counters["rejoins" if rejoin else "joins"] += 1
        if not rejoin and self.join_time is None:
            self.join_time = round(now - self._started, 4)
        orphaned_for = now - self._orphaned_at if rejoin else 0.0
        self._orphaned_at = None
        # Route changes below us while we were joining could not travel up:
        # correct the subtree the JOIN announced, or a dead node would live on.
        announced, current = set(self._announced), set(self.routes_ids())
        gone = announced - current
        for ids, reason, dead in self._unsent_lost:  # with the reason we knew then
            ids = [i for i in ids if i in gone]
            if ids:
                gone.difference_update(ids)
                self.send_up(p.MsgType.ROUTE_LOST, {"ids": ids, "reason": reason, "dead": dead}, to_parent=True)
        self._unsent_lost = []
        if gone:
            self.send_up(p.MsgType.ROUTE_LOST, {"ids": sorted(gone), "reason": "dead", "dead": None},
                         to_parent=True)
        if current - announced:
            self.send_up(p.MsgType.ROUTE_ADD, {"ids": sorted(current - announced)}, to_parent=True)
        self._set_epoch(body.get("ep", 0), "rejoined" if rejoin else "joined", orphaned_for)
        self._beat_children()  # children learn the new depth/grandparent at once

    def _set_epoch(self, epoch: int, reason: str, orphaned_for: float = 0.0) -> None:
        changed = epoch != self.epoch
        self.epoch = epoch
        if reason in ("joined", "rejoined") or self.registered_epoch != epoch:
            self.registered_epoch = epoch
            self._registration = self.registration(reason, orphaned_for)
            self._send_registration()
        if changed:
            self._beat_children()

    def _send_registration(self) -> None:
        # REGISTER crosses several hops, and a hop whose own parent is gone at
        # that moment drops it: re-send until the root acknowledges it.
        self._register_due = self.clock() + self.config.join_timeout * (1.5 + self.rng.random())
        self.send_up(p.MsgType.REGISTER, self._registration)

    def registration(self, reason: str, orphaned_for: float = 0.0) -> dict:
        return {
            "id": self.node_id,
            "name": self.name,
            "parent": self.parent_id,
            "ctl": self.transport.control_endpoint,
            "data": self.transport.data_endpoint,
            "attrs": self.attrs,
            "pid": os.getpid(),
            "reason": reason,
            "orphaned_for": round(orphaned_for, 4),
        }

    def _orphan(self, now: float, why: str, via_root: bool = False) -> None:
        log.info("%s: parent %s %s; rejoining", self.name, self.parent_endpoint, why)
        self.counters["parent_lost"] += 1
        self.transport.disconnect_parent()
        self.parent_data = None
        if self.on_reparent is not None:
            self.on_reparent(None)
        self.forwarder.has_parent = False
        self._orphaned_at = now
        self._attempt = 0
        self.path = []
        first = [] if via_root else [self.grandparent_endpoint]
        self._begin_join([*first, self.root_endpoint], now)

    # -- messages from the parent ----------------------------------------------------
    def _bad_body(self, t: int, why: str) -> None:
        self.counters["bad_bodies"] += 1
        log.debug("%s: dropped a message: %s", self.name, why)

    def on_parent(self, msg: p.Message) -> None:
        now = self.clock()
        t = msg.header.type
        why = check_body(t, msg.body)
        if why is not None:
            return self._bad_body(t, why)
        body = msg.body if isinstance(msg.body, dict) else {}
        if self.state == JOINING:
            if t == p.MsgType.JOIN_ACCEPT:
                self._on_accept(body, now)
            elif t == p.MsgType.JOIN_REDIRECT:
                self.counters["redirects"] += 1
                self._redirects += 1
                if body.get("id"):
                    self.node_id = body["id"]
                if self._redirects > self.config.max_redirects or not body.get("to"):
                    self._candidates = []
                    self._try_next_candidate(now)
                else:
                    self._send_join(body["to"], now)
            elif t == p.MsgType.JOIN_REJECT:
                log.info("%s: join refused by %s: %s", self.name, self.parent_endpoint, body.get("reason"))
                self.counters["join_rejects"] += 1
                self._join_deadline = now  # next tick tries the next candidate
            return
        if self.state != ATTACHED:
            return
        self._parent_heard = now
        if t == p.MsgType.HEARTBEAT:
            path = body.get("path")
            if path is not None:
                if self.node_id in path:
                    # Our chain of parents loops back to us: heartbeats keep such a ring
                    # alive, cut off from the root, so break it and rejoin at the root.
                    # (A path not starting at the root is fine: an ancestor may be rejoining.)
                    self.counters["loops"] += 1
                    self._orphan(now, "is in a loop cut off from the root", via_root=True)
                    return
                self.path = list(path)
            self.depth = body.get("d", self.depth - 1) + 1
            self.grandparent_endpoint = body.get("gp")
            self.root_endpoint = body.get("rep") or self.root_endpoint
            if body.get("ep", self.epoch) != self.epoch:
                self._set_epoch(body["ep"], "root restarted")
        elif t == p.MsgType.COMMAND and msg.header.dst in (p.BROADCAST_ID, self.node_id):
            self._on_command(msg, fp.LINK_UP, now)
        elif t == p.MsgType.JOIN_REJECT:
            # Our parent no longer knows us (it restarted, or dropped us): rejoin now.
            self._orphan(now, f"dropped us ({body.get('reason')})")
        elif t == p.MsgType.JOIN_ACCEPT:
            pass  # a duplicate answer to a retransmitted JOIN
        else:
            self._route(msg, fp.LINK_UP)

    # -- messages from children --------------------------------------------------------
    def heard_child(self, identity: bytes) -> bool:
        """A heartbeat from ``identity`` (body not decoded); False if it is not our child."""
        link = self._links.get(identity)
        if link is None:
            return False
        self.children[link].last_heard = self.clock()
        return True

    def parent_lost(self) -> None:
        """The connection to the parent closed (its process died): rejoin now.

        Heartbeat silence still catches a parent that hangs or is cut off.
        """
        if self.state == ATTACHED and not self.is_root:
            self._orphan(self.clock(), "closed the connection")

    def reached(self) -> None:
        """The candidate parent accepted the TCP connection; its CURVE handshake is under way.

        The JOIN leaves once the handshake is done, and connected() then gives the answer
        join_timeout.  A handshake in a join storm can queue behind a thousand others: timing
        it out would only add one more to the queue, so it may take HANDSHAKE_ALLOWANCE
        join timeouts.  A candidate that never answers the TCP connect (dead or cut off) is
        not waited for beyond the first join_timeout.
        """
        if self.state == JOINING and self._join_deadline is not None:
            self._join_deadline = self.clock() + self.config.join_timeout * HANDSHAKE_ALLOWANCE

    def connected(self) -> None:
        """The candidate parent's connection finished its handshake: the JOIN is on its way,
        and its answer is due within ``join_timeout`` from now."""
        if self.state == JOINING and self._join_deadline is not None:
            self._join_deadline = self.clock() + self.config.join_timeout

    def connect_refused(self) -> None:
        """The candidate parent's endpoint refused the connection: try the next one now."""
        if self.state == JOINING and self._join_deadline is not None:
            self._join_deadline = self.clock()

    def heard_parent(self) -> None:
        """A heartbeat from the parent identical to the previous one (body not decoded)."""
        if self.state == ATTACHED:
            self._parent_heard = self.clock()

    def on_child(self, identity: bytes, msg: p.Message) -> None:
        now = self.clock()
        t = msg.header.type
        why = check_body(t, msg.body)
        if why is not None:
            return self._bad_body(t, why)
        body = msg.body if isinstance(msg.body, dict) else {}
        if t == p.MsgType.JOIN:
            self._on_join(identity, body, now)
            return
        link = self._links.get(identity)
        if link is None:
            self.counters["unknown_peer"] += 1
            if t != p.MsgType.LEAVE:
                self.transport.send_child(identity, p.encode(p.MsgType.JOIN_REJECT, {"reason": "unknown child"}))
            return
        self.children[link].last_heard = now
        if t == p.MsgType.HEARTBEAT:
            return
        if t in (p.MsgType.ROUTE_ADD, p.MsgType.ROUTE_SYNC, p.MsgType.ROUTE_LOST):
            self._on_route_change(t, body, link)
        elif t == p.MsgType.LEAVE:
            self._drop_child(link, "left", now)
        elif t == p.MsgType.REPLY and msg.header.dst == self.node_id and msg.header.ref in self._ops:
            self._on_reply(link, msg, now)
        else:
            self._route(msg, link)

    def _on_route_change(self, t: int, body: dict, link: int) -> None:
        """ROUTE_ADD / ROUTE_SYNC / ROUTE_LOST from the child on ``link``."""
        hops = body.get("h", 0)
        if hops >= MAX_LEVELS:
            # Climbed more levels than any tree has: it is circling a loop (which the
            # heartbeat path is about to break).  Without this it would circle until then.
            self.counters["loops"] += 1
            return
        # Route changes this message causes go on up carrying the count.
        self._hops = 1 if t == p.MsgType.ROUTE_SYNC else hops + 1
        try:
            if t == p.MsgType.ROUTE_ADD:
                if self.node_id in body.get("ids", ()):
                    return  # our own id coming up from below: a loop, which the heartbeat path breaks
                ids = self._not_stealing(body.get("ids", []), link)
                self.routes.add_subtree(link, ids)
                self.routes_added(ids, link)
            elif t == p.MsgType.ROUTE_SYNC:
                self._sync_routes(link, body.get("ids", []))
            else:
                # Only ids still routed through this link: an orphan may already be back elsewhere.
                gone = [i for i in body.get("ids", []) if self.routes.lookup(i) == link]
                self.routes.remove_subtree(gone)
                self.routes_lost(gone, body.get("reason", "dead"), body.get("dead"))
        finally:
            self._hops = 0

    def _not_stealing(self, ids, link: int) -> list:
        """``ids`` minus our direct children on other links: a child's own link is authoritative
        for its id, whatever a stale claim from elsewhere in the subtree says."""
        direct = {c.node_id: l for l, c in self.children.items()}
        return [i for i in ids if direct.get(i, link) == link]

    def _sync_routes(self, link: int, ids: list) -> None:
        """A child's full subtree: make our routes through ``link`` exactly that.

        Incremental ROUTE_ADD/ROUTE_LOST can be lost (sent to a parent that had
        just died) or garbled by a transient loop; this periodic full state
        repairs whatever they missed, and the difference travels up as usual.
        """
        if self.node_id in ids:
            return  # a loop: the heartbeat path check breaks it
        child = self.children.get(link)
        if child is None:
            return
        if self.routes.lookup(child.node_id) != link:
            self.routes.add(child.node_id, link)  # a direct child is always reached through its own link
            self.routes_added([child.node_id], link)
        claimed = set(self._not_stealing(ids, link))
        claimed.discard(child.node_id)
        current = set(self.routes.ids_via(link))
        current.discard(child.node_id)
        added = sorted(claimed - current)
        gone = sorted(current - claimed)
        if added:
            self.routes.add_subtree(link, added)
            self.routes_added(added, link)
        if gone:
            self.routes.remove_subtree(gone)
            self.routes_lost(gone, "unreachable", None)

    def _on_join(self, identity: bytes, body: dict, now: float) -> None:
        reject = None
        sub = set(body.get("sub", []))
        jid = body.get("id", 0)
        if self.state != ATTACHED:
            reject = "not attached to the tree"
        elif self.node_id in sub or (jid and jid == self.node_id):
            reject = "joining there would make a cycle"
        elif not jid and not self.is_root:
            reject = "new nodes join through the manager"
        if reject:
            self.transport.send_child(identity, p.encode(p.MsgType.JOIN_REJECT, {"reason": reject}))
            return
        known = self._links.get(identity)
        if known is not None:
            self._accept(identity, known, body, now)  # retransmitted JOIN
            return
        if not jid:
            jid = self.assign_id(body)
            body = dict(body, id=jid)
        if self.placement_policy() == policy.BALANCED:
            sizes = {link: 1 + len(self.routes.ids_via(link)) for link in self.children}
        else:  # sizes only matter to the balanced policy; skip the O(subtree) count
            sizes = dict.fromkeys(self.children, 1)
        exclude = {link for link, c in self.children.items() if c.node_id in sub or c.node_id == jid}
        choice = policy.place(sizes, self.config.max_children, self.placement_policy(), self.rng, exclude)
        if choice == policy.ACCEPT:
            self._accept(identity, None, body, now)
        else:
            to = self.redirect_target(choice, jid, sub)
            self.transport.send_child(
                identity, p.encode(p.MsgType.JOIN_REDIRECT, {"to": to, "id": jid}, src=self.node_id)
            )

    def redirect_target(self, link: int, jid: int, sub: set) -> str:
        """Control endpoint a full node sends a joiner to: the chosen child (the root may skip levels)."""
        return self.children[link].control

    def placement_policy(self) -> str:
        return policy.RANDTREE if self.config.policy == policy.STAR else self.config.policy

    def assign_id(self, body: dict) -> int:
        raise NotImplementedError("only the root assigns node ids")

    def _accept(self, identity: bytes, link: int | None, body: dict, now: float) -> None:
        jid = body["id"]
        if link is None:
            # A node rejoining with a new identity replaces any stale link to it.
            for old_link, c in list(self.children.items()):
                if c.node_id == jid:
                    self._drop_child(old_link, "replaced", now)
            link = self._next_link
            self._next_link += 1
            self._links[identity] = link
            self.forwarder.add_child(link)
        self.children[link] = Child(identity, jid, body.get("name", ""), body.get("ctl", ""), body.get("data", ""), now)
        sub = [i for i in body.get("sub", []) if i not in (jid, self.node_id)]
        self.routes.add(jid, link)
        self.routes.add_subtree(link, sub)
        accept = {
            "id": jid,
            "parent": self.node_id,
            "depth": self.depth + 1,
            "gp": self.parent_endpoint if not self.is_root else None,
            "pdata": self.transport.data_endpoint,
            "rep": self.root_endpoint,
            "rid": self.root_id,
            "ep": self.epoch,
            "path": [*self.path, self.node_id],
            "cfg": {"k": self.config.max_children, "pol": self.config.policy, "hb": self.config.heartbeat,
                    "mi": self.config.misses},
        }
        self.transport.send_child(identity, p.encode(p.MsgType.JOIN_ACCEPT, accept, src=self.node_id))
        self.routes_added([jid, *sub], link, info=body)

    def _drop_child(self, link: int, reason: str, now: float) -> None:
        child = self.children.pop(link, None)
        if child is None:
            return
        self._links.pop(child.identity, None)
        self.counters["children_lost"] += 1
        waiting = [op for op in self._ops.values() if link in self.aggregator.owing(op.op_id)]
        done = self.aggregator.forget_link(link)
        lost = self.forwarder.remove_child(link)
        if child.node_id not in lost:
            lost.append(child.node_id)
        for op in waiting:
            for i in lost:
                op.result.missing.setdefault(i, reason if i == child.node_id else "unreachable")
        log.info("%s: child %s %s (%d nodes behind it)", self.name, child.name, reason, len(lost))
        self.routes_lost(lost, reason, child.node_id)
        for op_id in done:
            self._maybe_finish(op_id)

    # -- route changes travel up (the root overrides these) ---------------------------
    def routes_added(self, ids: list, link: int, info: dict | None = None) -> None:
        if ids:
            self.send_up(p.MsgType.ROUTE_ADD, {"ids": ids, "h": self._hops}, to_parent=True)

    def routes_lost(self, ids: list, reason: str, dead: int | None) -> None:
        if not ids:
            return
        if self.state != ATTACHED:
            self._unsent_lost.append((list(ids), reason, dead))  # reported once we are accepted
            return
        self.send_up(p.MsgType.ROUTE_LOST, {"ids": ids, "reason": reason, "dead": dead, "h": self._hops},
                     to_parent=True)

    def send_up(self, msg_type, body: dict, to_parent: bool = False) -> None:
        """Send toward the root (to the parent for hop-by-hop messages)."""
        if self.state != ATTACHED:
            return
        dst = self.parent_id if to_parent else self.root_id
        self.transport.send_parent(p.encode(msg_type, body, src=self.node_id, dst=dst))

    # -- unicast forwarding ------------------------------------------------------------
    def _route(self, msg: p.Message, from_link: int) -> None:
        h = msg.header
        frames = p.encode(
            h.type, msg.body, src=h.src, dst=h.dst, msg_id=h.msg_id, ref=h.ref, flags=h.flags,
            ttl=h.ttl, hops=h.hops, extra=msg.extra, using=self.codec,
        )
        decision = self.forwarder.route(frames[0], from_link)
        if decision == fp.LINK_LOCAL:
            self.deliver(msg, from_link)
            return
        if decision == fp.LINK_DROP or decision == fp.LINK_BROADCAST:
            return
        frames[0] = self.codec.advance(frames[0])
        if decision == fp.LINK_UP:
            self.transport.send_parent(frames)
        else:
            child = self.children.get(decision)
            if child is not None:
                self.transport.send_child(child.identity, frames)

    def deliver(self, msg: p.Message, from_link: int) -> None:
        """A unicast message addressed to this node (the root overrides it)."""
        t = msg.header.type
        if t == p.MsgType.COMMAND:
            self._on_command(msg, from_link, self.clock())
        elif t == p.MsgType.REGISTER_ACK:
            body = msg.body if isinstance(msg.body, dict) else {}
            if body.get("ep") == self.epoch:
                self._register_due = None

    def unicast(self, node_id: int, msg_type, body: dict) -> bool:
        """Send to one node: down through the routing table, else up toward the root."""
        frames = p.encode(msg_type, body, src=self.node_id, dst=node_id, using=self.codec)
        child = self.children.get(self.routes.lookup(node_id))
        if child is not None:
            return self.transport.send_child(child.identity, frames)
        if self.state == ATTACHED and not self.is_root:
            return self.transport.send_parent(frames)
        return False

    # -- heartbeats and failure detection ------------------------------------------------
    def _beat_children(self) -> None:
        if not self.children:
            return
        beat = p.encode(
            p.MsgType.HEARTBEAT,
            {"d": self.depth, "gp": None if self.is_root else self.parent_endpoint, "ep": self.epoch,
             "rep": self.root_endpoint, "path": [*self.path, self.node_id]},
            src=self.node_id,
        )
        for link, child in list(self.children.items()):
            if not self.transport.send_child(child.identity, beat):
                # ROUTER_MANDATORY: the connection is gone; no need to wait for silence.
                self._drop_child(link, "dead", self.clock())
        self.counters["heartbeats_sent"] += len(self.children)

    def tick(self, now: float | None = None) -> None:
        """Timers: joins, heartbeats, silent peers, operation deadlines.

        Called often (a quarter heartbeat) for many nodes per process, so it
        does real work only when a heartbeat is due or a deadline may have passed.
        """
        now = self.clock() if now is None else now
        state = self.state
        if state == STOPPED:
            return
        if state == JOINING:
            if self._join_at is not None and now >= self._join_at:
                self._try_next_candidate(now)
            elif self._join_deadline is not None and now >= self._join_deadline:
                self.counters["join_timeouts"] += 1
                log.info("%s: no answer to JOIN from %s within %.1fs", self.name, self.parent_endpoint,
                         self.config.join_timeout)
                self._try_next_candidate(now)
        if self._ops:
            for op_id in self.aggregator.expired(now):
                self._expire(op_id)
        if now - self._last_beat < self.config.heartbeat:
            return
        self._last_beat = now
        if self._register_due is not None and now >= self._register_due and self.state == ATTACHED:
            self._registration["retry"] = True
            self._send_registration()
        if self.state == ATTACHED and not self.is_root:
            if policy.is_silent(self._parent_heard, now, self.config):
                self._orphan(now, "went silent")
            else:
                if self._beat is None or self._beat[0] != self.node_id:
                    self._beat = (self.node_id, p.encode(p.MsgType.HEARTBEAT, None, src=self.node_id))
                self.transport.send_parent(list(self._beat[1]))
                self.counters["heartbeats_sent"] += 1
                if now >= self._next_sync:
                    self._next_sync = now + self.config.route_sync * (0.75 + 0.5 * self.rng.random())
                    self.send_up(p.MsgType.ROUTE_SYNC, {"ids": self.routes_ids()}, to_parent=True)
        for link, child in list(self.children.items()):
            if policy.is_silent(child.last_heard, now, self.config):
                self._drop_child(link, "dead", now)
        self._beat_children()

    # -- introspection -------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {
            "id": self.node_id,
            "name": self.name,
            "state": self.state,
            "depth": self.depth,
            "parent": self.parent_id,
            "children": len(self.children),
            "subtree": len(self.routes),
            "join_time": self.join_time,
            "counters": dict(self.counters),
        }
