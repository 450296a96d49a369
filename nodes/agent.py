"""The bus-node agent: hosts one or many logical nodes in one process.

All logical nodes of a process share one ZeroMQ context, one PlaneLoop and one
ticker; each has its own sockets, identity and place in the tree
(``--virtual N``), so 1000 nodes fit on one machine.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import random
from pathlib import Path

import zmq

from bus import protocol as p
from bus.link import NodeLink
from bus.planes import PlaneLoop, SocketFactory, new_context
from bus.policy import TreeConfig
from bus.tree import ATTACHED, TreeNode
from nodes.apps import APP_HANDLERS, AppHost
from nodes.ops import HANDLERS

__all__ = ["NodeHost"]

def _svc_op(name: str):
    """A ``svc.*`` operation that imports the worker stub on first use (most nodes never host workers)."""
    async def op(node, args, budget):
        from nodes.stub import SVC_HANDLERS

        value = SVC_HANDLERS[name](node, args, budget)
        return await value if inspect.isawaitable(value) else value
    op.__name__ = name.replace(".", "_")
    return op


def _keys_sync(node, args, budget):
    """``keys.sync``: adopt the manager's keyring (:func:`bus.security.op_keys_sync`); ``{"v": -1}`` from a
    node without CURVE, which never imports bus.security."""
    if getattr(node, "security", None) is None:
        return {"v": -1}
    from bus.security import op_keys_sync

    return op_keys_sync(node, args, budget)


_SVC_OPS = ("svc.spawn", "svc.reap", "svc.cache", "svc.list", "svc.stop")
_HANDLERS = {**HANDLERS, **APP_HANDLERS, **{name: _svc_op(name) for name in _SVC_OPS}, "keys.sync": _keys_sync}


def _new_stub(node, link):
    """The node's TACC worker stub, made on first use (svc.* operations or a TASK)."""
    from nodes.stub import WorkerStub

    node.stub = WorkerStub(node, link)
    return node.stub

log = logging.getLogger(__name__)


class NodeHost:
    """Runs ``names`` as logical nodes joining the tree at ``join``.

    Lifecycle: ``await start()`` binds and starts joining; ``await stop()``
    leaves cleanly and closes every socket; ``async with`` does both.
    """

    def __init__(self, join: str, names: list[str], *, bind_host: str = "127.0.0.1",
                 advertise_host: str | None = None, attrs: dict | None = None,
                 config: TreeConfig = TreeConfig(), seed: int | None = None,
                 state_dir: str | os.PathLike | None = None, security=None):
        if not names:
            raise ValueError("a NodeHost needs at least one node name")
        self.join = join
        self.names = list(names)
        self.bind_host = bind_host
        self.advertise_host = advertise_host
        self.attrs = dict(attrs or {})
        self.config = config
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.security = security  # bus.security.Security: CURVE on every socket; None: plain TCP
        self.revoked = False  # set when the manager revoked this process's own key
        self.on_revoked = None  # called (no arguments) after that
        self.rng = random.Random(seed)
        self.nodes: list[TreeNode] = []
        self.links: list[NodeLink] = []
        self.context: zmq.Context | None = None
        self.factory: SocketFactory | None = None
        self.loop: PlaneLoop | None = None
        self._ticker: asyncio.Task | None = None
        self._recovering: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.context = new_context()
        self.factory = SocketFactory(self.context, security=self.security)
        if self.security is not None:
            self.security.on_server_revoked = self._server_revoked
            self.security.on_self_revoked = self._self_revoked
        self.loop = PlaneLoop()
        await self.loop.start()
        bind = f"tcp://{self.bind_host}:0"
        for name in self.names:
            link = NodeLink(self.factory, self.loop, control_bind=bind, data_bind=bind,
                            advertise_host=self.advertise_host)
            link.open()
            node = TreeNode(name, link, config=self.config, root_endpoint=self.join, attrs=self.attrs,
                            handlers=_HANDLERS, rng=random.Random(self.rng.random()))
            node.security = self.security
            if self.state_dir is not None:
                # Applications: packages pulled from the parent's data plane, processes supervised.
                node.apps = AppHost(node, self.state_dir / name, self.factory, self.loop, link)
                node.on_reparent = node.apps.set_upstream
                # Take back what an earlier run of this node supervised now, not only once it joins
                # (a node that never ran an application has nothing to take back: no task).
                if node.apps.list_apps():
                    task = asyncio.get_running_loop().create_task(node.apps.recover())
                    self._recovering.add(task)
                    task.add_done_callback(self._recovering.discard)
            link.on_data = self._data_handler(node, link)
            link.on_child = node.on_child
            link.on_parent = node.on_parent
            link.heard_child = node.heard_child
            link.heard_parent = node.heard_parent
            link.parent_lost = node.parent_lost
            link.connect_refused = node.connect_refused
            link.reached = node.reached
            link.connected = node.connected
            self.links.append(link)
            self.nodes.append(node)
            node.start()
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())

    def _server_revoked(self, sock, endpoint: str) -> None:
        """A server this process connects to lost its key: leave a revoked parent (rejoin elsewhere);
        any other connection to it (a package fetch, a cache write) is dropped."""
        for link, node in zip(self.links, self.nodes):
            if link.dealer is sock:
                log.warning("%s: the parent at %s was revoked; rejoining", node.name, endpoint)
                node.parent_lost()
                return
        try:
            sock.disconnect(endpoint)
        except zmq.ZMQError:
            pass  # not connected (any more)

    def _self_revoked(self) -> None:
        self.revoked = True
        if self.on_revoked is not None:
            self.on_revoked()

    @staticmethod
    def _data_handler(node, link):
        """Route one logical node's data-plane requests: package chunks, TASKs for its worker stub."""
        chunk_request, task = p.MsgType.CHUNK_REQUEST, p.MsgType.TASK

        def on_data(identity: bytes, msg) -> None:
            t = msg.header.type
            if t == task:
                stub = node.stub if getattr(node, "stub", None) is not None else _new_stub(node, link)
                stub.on_task(identity, msg)
            elif t == chunk_request and getattr(node, "apps", None) is not None:
                node.apps.on_data(identity, msg)
            else:
                link.counters["data_unhandled"] += 1
        return on_data

    async def _tick_forever(self) -> None:
        # One timer for every logical node of the process; a quarter heartbeat
        # keeps detection within ~heartbeat/4 of the configured deadline.
        while True:
            for node in self.nodes:
                node.tick()
            await asyncio.sleep(self.nodes[0].config.heartbeat / 4 if self.nodes else 0.1)

    def joined(self) -> int:
        return sum(1 for n in self.nodes if n.state == ATTACHED)

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
            self._ticker = None
        # Deepest first: a node leaves before its parent does, so nobody is left an orphan
        # that the root would report as unreachable while the process shuts down.
        for node in sorted(self.nodes, key=lambda n: -n.depth):
            await node.stop()
            if getattr(node, "stub", None) is not None:
                await node.stub.close()
            if getattr(node, "apps", None) is not None:
                await node.apps.close()
        if self.loop is not None:
            await self.loop.stop()
        for link in self.links:
            link.close(linger=100)  # a short linger lets the goodbyes leave
        if self.factory is not None:
            self.factory.close(linger=0)
        if self.context is not None:
            self.context.term()
        self.nodes, self.links = [], []

    async def __aenter__(self) -> "NodeHost":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
