"""Broadcast down the tree and convergecast up: the operations half of a TreeNode.

A node forwards a ``COMMAND`` to its children, runs it locally if it is a
target, and sends one ``REPLY`` up once every child link answered or the
deadline passed.  Identical values are merged into groups at every level, and
every node that did not answer is named with a reason (``timed out``,
``dead``, ``unreachable``).  The fast path's ``Aggregator`` keeps which links
still owe a reply and the deadlines.  :class:`Convergecast` is a mixin of
``bus.tree.TreeNode`` and uses its state (children, routes, transport, clock).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass, field

from bus import policy
from bus import protocol as p

__all__ = ["Convergecast", "OpResult"]

log = logging.getLogger("bus.tree")


@dataclass
class OpResult:
    """Merged outcome of a convergecast: value groups and named gaps."""

    groups: dict = field(default_factory=dict)  # packed value -> [value, [ids]]
    missing: dict = field(default_factory=dict)  # id -> reason


@dataclass
class _Op:
    op_id: int
    result: OpResult
    local_done: bool
    reply_dst: int  # the parent for a broadcast, the originator for a unicast; 0 = nobody
    future: asyncio.Future | None = None
    task: asyncio.Task | None = None


class Convergecast:
    """Operations over the tree; mixed into ``TreeNode`` (see the module docstring)."""

    def _on_command(self, msg: p.Message, from_link: int, now: float) -> None:
        h = msg.header
        body = msg.body if isinstance(msg.body, dict) else {}
        op_id = h.msg_id
        broadcast = h.dst == p.BROADCAST_ID
        if broadcast and self.forwarder.seen(h.src, h.msg_id):
            return  # a duplicate (e.g. resent after a repair)
        remaining = float(body.get("rem", 1.0))
        links = []
        reply_dst = self.parent_id if broadcast else h.src
        if broadcast and self.children:
            child_body = dict(body, rem=policy.child_budget(remaining, self.config))
            frames = p.encode(
                p.MsgType.COMMAND, child_body, src=h.src, dst=p.BROADCAST_ID, msg_id=h.msg_id,
                ttl=max(h.ttl - 1, 0), hops=min(h.hops + 1, 255), using=self.codec,
            )
            links = self.send_down(frames, self.forwarder.broadcast_links(from_link))
        if not links and not self._gone and op_id not in self._ops and self._answer_now(op_id, body, remaining,
                                                                                          reply_dst):
            return
        self._open_op(op_id, links, remaining, body, reply_dst=reply_dst, now=now)

    def _answer_now(self, op_id: int, body: dict, remaining: float, reply_dst: int) -> bool:
        """A leaf with a synchronous handler answers at once, without opening an operation.

        Most nodes of a tree are leaves, so this is most of a broadcast's work.
        False (nothing sent) when the handler has to wait: the caller opens an op.
        """
        ids = body.get("ids")
        if ids is not None and self.node_id not in ids:
            value = None
        else:
            handler = self.handlers.get(body.get("op"))
            if handler is None:
                value = {"error": f"unknown operation {body.get('op')!r}"}
            elif inspect.iscoroutinefunction(handler):
                return False
            else:
                try:
                    value = handler(self, body.get("a") or {}, policy.child_budget(remaining, self.config))
                except Exception as e:  # a handler bug must not take the node down
                    log.exception("%s: handler failed", self.name)
                    value = {"error": f"{type(e).__name__}: {e}"}
                if inspect.isawaitable(value):
                    # Already started: let an operation wait for it (never call the handler twice).
                    self._open_op(op_id, [], remaining, body, reply_dst=reply_dst, now=self.clock(), pending=value)
                    return True
        self.counters["ops"] += 1
        if self.attached and reply_dst:
            groups = [] if ids is not None and self.node_id not in ids else [[p.packb(value), value, [self.node_id]]]
            self.transport.send_parent(
                p.encode(p.MsgType.REPLY, {"g": groups, "m": []}, src=self.node_id, dst=reply_dst, ref=op_id,
                         using=self.codec)
            )
        return True

    def send_down(self, frames: list, links: list) -> list:
        """Send to each child link; returns the links it went out on.

        A child whose connection is gone is dropped now, and its subtree is
        named in the next operation opened here instead of timing out.
        """
        sent = []
        for link in links:
            child = self.children.get(link)
            if child is None:
                continue
            if self.transport.send_child(child.identity, frames):
                sent.append(link)
            else:
                self._gone.update({i: "unreachable" for i in self.routes.ids_via(link)})
                self._gone[child.node_id] = "dead"
                self._drop_child(link, "dead", self.clock())
        return sent

    def _open_op(self, op_id: int, links: list, remaining: float, body: dict, *, reply_dst: int,
                 now: float, future: asyncio.Future | None = None, pending=None) -> _Op:
        if op_id in self._ops:
            return self._ops[op_id]
        ids = body.get("ids")
        wants_me = not self.is_root and (ids is None or self.node_id in ids)
        op = _Op(op_id, OpResult(missing=self._gone), not wants_me, reply_dst, future)
        self._gone = {}
        self._ops[op_id] = op
        self.counters["ops"] += 1
        # Wait for children a little less than we were given, to answer in time.
        self.aggregator.open(op_id, links, now + max(remaining - self.config.op_margin / 2, 0.0))
        if wants_me and pending is not None:
            op.task = self._spawn(self._run_local(op, pending))
        elif wants_me:
            handler = self.handlers.get(body.get("op"))
            if handler is None:
                self._add_local(op, {"error": f"unknown operation {body.get('op')!r}"})
            else:
                budget = policy.child_budget(remaining, self.config)
                try:
                    value = handler(self, body.get("a") or {}, budget)
                except Exception as e:  # a handler bug must not take the node down
                    log.exception("%s: handler failed", self.name)
                    value = {"error": f"{type(e).__name__}: {e}"}
                if inspect.isawaitable(value):
                    op.task = self._spawn(self._run_local(op, value))
                else:  # answered at once: no task, no extra loop turn
                    self._add_local(op, value)
        self._maybe_finish(op_id)
        return op

    async def _run_local(self, op: _Op, pending) -> None:
        try:
            value = await pending
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a handler bug must not take the node down
            log.exception("%s: handler failed", self.name)
            value = {"error": f"{type(e).__name__}: {e}"}
        if self._ops.get(op.op_id) is op:
            self._add_local(op, value)
            self._maybe_finish(op.op_id)

    def _add_local(self, op: _Op, value) -> None:
        policy.merge_groups(op.result.groups, [[p.packb(value), value, [self.node_id]]])
        op.local_done = True

    def _on_reply(self, link: int, msg: p.Message, now: float) -> None:
        op = self._ops.get(msg.header.ref)
        body = msg.body if isinstance(msg.body, dict) else {}
        if op is None:
            return
        groups = body.get("g", [])
        missing = body.get("m", [])
        if link not in self.aggregator.owing(op.op_id):
            return  # late or duplicate: the gap was already reported
        self.aggregator.reply(op.op_id, link, len(groups), len(missing))
        policy.merge_groups(op.result.groups, groups)
        for node_id, reason in missing:
            op.result.missing.setdefault(node_id, reason)
        self._maybe_finish(op.op_id)

    def _maybe_finish(self, op_id: int) -> None:
        op = self._ops.get(op_id)
        if op is None or not op.local_done or not self.aggregator.is_complete(op_id):
            return
        self._finish(op)

    def _expire(self, op_id: int) -> None:
        op = self._ops.get(op_id)
        if op is None:
            return
        self.counters["ops_expired"] += 1
        for link in self.aggregator.owing(op_id):
            child = self.children.get(link)
            if child is not None:
                op.result.missing.setdefault(child.node_id, "timed out")
            for i in self.routes.ids_via(link):
                op.result.missing.setdefault(i, "timed out")
        if not op.local_done:
            op.result.missing.setdefault(self.node_id, "timed out")
            if op.task is not None:
                op.task.cancel()
        self._finish(op)

    def _finish(self, op: _Op) -> None:
        self._ops.pop(op.op_id, None)
        if op.op_id in self.aggregator:
            self.aggregator.close(op.op_id)
        if op.result.missing:
            # Nodes that answered are not missing, whatever a slower path said.
            answered = set()
            for _, ids in op.result.groups.values():
                answered.update(ids)
            for i in answered.intersection(op.result.missing):
                del op.result.missing[i]
        if op.future is not None:
            if not op.future.done():
                op.future.set_result(op.result)
            return
        if op.reply_dst and self.attached:
            body = {
                "g": [[k, v, ids] for k, (v, ids) in op.result.groups.items()],
                "m": [[i, r] for i, r in op.result.missing.items()],
            }
            self.transport.send_parent(
                p.encode(p.MsgType.REPLY, body, src=self.node_id, dst=op.reply_dst, ref=op.op_id)
            )

