"""An in-memory network of TreeNodes with a manual clock: the tree protocol without sockets.

Messages are encoded to real frames and decoded again on delivery (so the wire
format is exercised), queued, and delivered by :meth:`FakeNet.run`.  A node can
be killed (its messages vanish, sends to it fail like a ROUTER_MANDATORY send to
a closed connection).
"""

from __future__ import annotations

import itertools
import random

from bus import protocol as p
from bus.policy import TreeConfig
from bus.tree import TreeNode
from manager.root import RootNode


class FakeTransport:
    def __init__(self, net: "FakeNet", endpoint: str):
        self.net = net
        self.control_endpoint = endpoint
        self.data_endpoint = endpoint + "/data"
        self.parent: str | None = None
        self.identity: bytes | None = None
        self.sent = 0
        self.joins = 0
        self.to_children: list = []  # every send_child attempt: (identity, frames)

    def connect_parent(self, endpoint: str) -> None:
        self.parent = endpoint
        self.identity = b"id%d" % next(self.net.ids)
        self.net.identities[self.identity] = self.control_endpoint

    def disconnect_parent(self) -> None:
        self.parent = None
        self.identity = None

    def send_parent(self, frames: list) -> bool:
        if self.parent is None:
            return False
        self.sent += 1
        if p.codec.parse(frames[0]).type == p.MsgType.JOIN:
            self.joins += 1
        self.net.queue.append(("child", self.parent, self.identity, list(frames)))
        return True

    def send_child(self, identity: bytes, frames: list) -> bool:
        self.to_children.append((identity, list(frames)))
        ep = self.net.identities.get(identity)
        if ep is None or ep in self.net.dead:
            return False
        if ep in self.net.hung:
            return True  # a hung process: its connection is up, nothing answers
        child = self.net.transports[ep]
        if child.identity != identity or child.parent != self.control_endpoint:
            return False  # that connection is gone
        self.sent += 1
        self.net.queue.append(("parent", ep, identity, list(frames)))
        return True


class FakeNet:
    def __init__(self, config: TreeConfig = TreeConfig(), seed: int = 1):
        self.config = config
        self.now = 0.0
        self.rng = random.Random(seed)
        self.ids = itertools.count(1)
        self.identities: dict[bytes, str] = {}
        self.transports: dict[str, FakeTransport] = {}
        self.nodes: dict[str, TreeNode] = {}
        self.dead: set[str] = set()
        self.hung: set[str] = set()
        self.queue: list = []
        self.delivered = 0
        self.root = self._add_root()

    def clock(self) -> float:
        return self.now

    def _add_root(self, epoch: int = 7) -> RootNode:
        t = FakeTransport(self, "root")
        root = RootNode(t, config=self.config, rng=random.Random(self.rng.random()), clock=self.clock, epoch=epoch)
        root.root_endpoint = "root"
        self.transports["root"], self.nodes["root"] = t, root
        return root

    def restart_root(self, epoch: int) -> RootNode:
        self.dead.discard("root")
        self.root = self._add_root(epoch)
        return self.root

    def add(self, name: str, handlers=None) -> TreeNode:
        t = FakeTransport(self, name)
        node = TreeNode(name, t, config=self.config, root_endpoint="root", handlers=handlers,
                        rng=random.Random(self.rng.random()), clock=self.clock)
        self.transports[name], self.nodes[name] = t, node
        node.start()
        return node

    def kill(self, name: str) -> None:
        """The process died: its connections close (sends to it fail)."""
        self.dead.add(name)

    def crash(self, names) -> None:
        """Several nodes of one process die at once, and their children see the closed connections."""
        names = set(names)
        self.dead.update(names)
        for ep, t in self.transports.items():
            if ep not in self.dead and t.parent in names:
                self.nodes[ep].parent_lost()

    def hang(self, name: str) -> None:
        """The process hangs: connections stay up, nothing is processed or sent."""
        self.hung.add(name)

    def run(self, limit: int = 100000) -> int:
        """Deliver queued messages until none are left; returns how many."""
        n = 0
        while self.queue and n < limit:
            kind, ep, identity, frames = self.queue.pop(0)
            if ep in self.dead or ep in self.hung or ep not in self.nodes:
                continue
            src_ep = self.identities.get(identity)
            if src_ep in self.dead or src_ep in self.hung:
                continue
            msg = p.decode(frames)
            node = self.nodes[ep]
            if kind == "child":
                node.on_child(identity, msg)
            else:
                if self.transports[ep].identity != identity:
                    continue  # for an old connection
                node.on_parent(msg)
            n += 1
        self.delivered += n
        return n

    def tick(self, seconds: float = 0.0, step: float | None = None) -> None:
        """Advance the clock in steps, ticking every live node and delivering."""
        step = step or self.config.heartbeat / 4
        end = self.now + seconds
        while True:
            for name, node in list(self.nodes.items()):
                if name not in self.dead and name not in self.hung:
                    node.tick()
            self.run()
            if self.now >= end:
                break
            self.now = min(self.now + step, end)

    def live(self) -> list[TreeNode]:
        return [n for name, n in self.nodes.items() if name not in self.dead and name != "root"]

    def parent_of(self, node: TreeNode) -> TreeNode | None:
        ep = self.transports[node.name].parent
        return self.nodes.get(ep) if ep else None

    def check_tree(self) -> None:
        """Every live node attached; the parent pointers form one tree; the root routes to all."""
        from bus.tree import ATTACHED

        for node in self.live():
            assert node.state == ATTACHED, f"{node.name} is {node.state}"
            seen = set()
            cur = node
            while cur is not self.root:
                assert cur.name not in seen, f"cycle through {cur.name}"
                seen.add(cur.name)
                cur = self.parent_of(cur)
                assert cur is not None and cur.name not in self.dead, f"{node.name} hangs off a dead node"
            assert self.root.routes.lookup(node.node_id) >= 0, f"root has no route to {node.name}"
        live_ids = {n.node_id for n in self.live()}
        assert set(self.root.routes_ids()) == live_ids, "root routes to dead or unknown nodes"
