"""The manager process: the root of the tree plus the control API for bus-ctl.

It binds the well-known control endpoint (default port 7070) and a data
endpoint on its own port.  Tree members and bus-ctl clients share the control
ROUTER; a ``CTL_REQUEST`` from any peer is a control-API call, everything else
goes to the root's tree protocol.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

import zmq

from bus import protocol as p
from bus.link import NodeLink
from bus.planes import PlaneLoop, SocketFactory, new_context
from bus.policy import TreeConfig
from manager import commands
from manager.root import RootNode

__all__ = ["Manager", "DEFAULT_CONTROL_PORT"]

log = logging.getLogger(__name__)

DEFAULT_CONTROL_PORT = 7070


class Manager:
    """Lifecycle: ``await start()`` binds and writes ``manager.json``; ``await stop()``."""

    def __init__(self, *, control: str = f"tcp://127.0.0.1:{DEFAULT_CONTROL_PORT}",
                 data: str = "tcp://127.0.0.1:0", config: TreeConfig = TreeConfig(),
                 state_dir: str | os.PathLike | None = None, clock=time.monotonic, monitor: dict | None = None,
                 keys=None):
        self.control_bind = control
        self.data_bind = data
        self.config = config
        self.state_dir = Path(state_dir) if state_dir else None
        self.clock = clock
        self.context: zmq.Context | None = None
        self.factory: SocketFactory | None = None
        self.loop: PlaneLoop | None = None
        self.link: NodeLink | None = None
        self.root: RootNode | None = None
        self._started = 0.0
        self._stopping = asyncio.Event()
        self._ticker: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.apps = None  # manager.apps.AppController, with a state directory
        self.chunks = None  # bus.transfer.ChunkService: serves packages to the root's children
        self.services = None  # manager.services.ServiceManager: TACC load balancing and spawning
        self.monitor_options = monitor  # manager.monitor.start_monitor keywords; None: no monitor
        self.monitor = None  # manager.monitor.Monitor while it serves
        self.keys = keys  # manager.keys.KeyService: CURVE on every socket; None: plain TCP

    @property
    def membership(self):
        return self.root.membership

    def uptime(self) -> float:
        return self.clock() - self._started

    async def start(self) -> None:
        self.context = new_context()
        self.factory = SocketFactory(self.context, security=self.keys.load() if self.keys is not None else None)
        self.loop = PlaneLoop()
        await self.loop.start()
        self.link = NodeLink(self.factory, self.loop, control_bind=self.control_bind, data_bind=self.data_bind)
        self.link.open()
        self.root = RootNode(self.link, config=self.config, clock=self.clock)
        self.root.root_endpoint = self.link.control_endpoint
        self.link.on_child = self._on_control
        self.link.heard_child = self.root.heard_child
        self._started = self.clock()
        if self.keys is not None:  # the keyring goes down the tree: at each change, to newcomers, every 30 s
            self.keys.attach(self.root)
            self.root.on_register = self.keys.on_register
        from manager.services import ServiceManager

        self.services = ServiceManager(self)
        self.root.on_load_report = self.services.on_report
        self.services.start()
        if self.state_dir is not None:
            from bus.transfer import ChunkService
            from manager.apps import AppController

            self.apps = AppController(self, self.state_dir)
            self.chunks = ChunkService(self.factory, self.loop, self.apps.cache)
            self.chunks.serve(self.link)
            self.chunks.set_upstream(None)
            self.apps.resume()
            self.apps.start_watch(grace=max(2.0, 3 * self.config.heartbeat * self.config.misses))
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())
        self.restart_info = self._restart_info()
        if self.monitor_options is not None:
            from manager.monitor import start_monitor

            self.monitor = await start_monitor(self, **self.monitor_options)
        self._write_state()
        log.info("manager up: control %s, data %s, epoch %d, max_children %d, policy %s",
                 self.link.control_endpoint, self.link.data_endpoint, self.root.epoch,
                 self.config.max_children, self.config.policy)

    def _restart_info(self) -> dict | None:
        """How to start this manager again (front ends restart it: process peers), when it runs as
        ``python -m manager``; None when embedded in another program (tests)."""
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        if spec is None or spec.name not in ("manager.__main__", "manager"):
            return None
        log_file = None
        if self.state_dir is not None:
            log_file = str((self.state_dir / "logs" / "manager.log").resolve())
        return {"argv": list(sys.orig_argv), "cwd": os.getcwd(), "host": socket.gethostname(), "log": log_file}

    def _write_state(self) -> None:
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "control": self.link.control_endpoint, "data": self.link.data_endpoint,
                "epoch": self.root.epoch, "monitor": self.monitor.url if self.monitor is not None else None,
                "key": self.public_key()}
        tmp = self.state_dir / f"manager.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(info))
        tmp.replace(self.state_dir / "manager.json")
        self._wrote_state = True

    async def _tick_forever(self) -> None:
        while True:
            self.root.tick()
            await asyncio.sleep(self.config.heartbeat / 4)

    def _on_control(self, identity: bytes, msg: p.Message) -> None:
        if msg.header.type == p.MsgType.CTL_REQUEST:
            task = asyncio.get_running_loop().create_task(self._serve_ctl(identity, msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self.root.on_child(identity, msg)

    async def _serve_ctl(self, identity: bytes, msg: p.Message) -> None:
        try:
            body = msg.body if isinstance(msg.body, dict) else {}
            if body.get("cmd") == "svc_subscribe":  # needs the peer's identity: beacons are pushed to it
                args = body.get("args") if isinstance(body.get("args"), dict) else {}
                reply = {"ok": True, "result": self.services.subscribe(identity, str(args.get("svc", "")),
                                                                       args.get("http"))}
            else:
                reply = await commands.dispatch(self, msg.body)
        except Exception as e:  # a handler bug answers the client instead of killing the manager
            log.exception("control command failed")
            reply = {"ok": False, "code": commands.FAILED, "error": f"internal error: {type(e).__name__}: {e}"}
        frames = p.encode(p.MsgType.CTL_REPLY, reply, src=self.root.node_id, ref=msg.header.msg_id)
        self.link.send_child(identity, frames)

    def public_key(self) -> str | None:
        """The z85 key every client pins; None when running without CURVE."""
        if self.keys is None or self.keys.security is None:
            return None
        from bus.security import encode_key

        return encode_key(self.keys.security.public_key)

    def status(self) -> dict:
        r = self.root
        return {
            "root": {"id": r.node_id, "name": r.name, "control": self.link.control_endpoint,
                     "data": self.link.data_endpoint, "max_children": self.config.max_children,
                     "policy": self.config.policy, "epoch": r.epoch, "children": len(r.children)},
            "members": self.membership.snapshot(),
            "events": list(self.membership.events)[-50:],
            "counters": {**r.counters, **self.membership.counters},
            # bytes the controller uploaded: packages served from the root's data plane
            "transfer": self.chunks.statistics() if self.chunks is not None else {},
            "security": self.keys.security.statistics() if self.keys is not None and self.keys.security else None,
        }

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        if self.monitor is not None:  # first: it broadcasts through the root and reads every part
            await self.monitor.stop()
            self.monitor = None
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
            self._ticker = None
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.apps is not None:
            await self.apps.close()
        if self.services is not None:
            await self.services.close()
        if self.keys is not None:
            await self.keys.close()
        if self.chunks is not None:
            self.chunks.close()
        if self.root is not None:
            await self.root.stop()
        if self.loop is not None:
            await self.loop.stop()
        if self.link is not None:
            self.link.close(linger=100)
        if self.factory is not None:
            self.factory.close(linger=0)
        if self.context is not None:
            self.context.term()
        if self.state_dir is not None and getattr(self, "_wrote_state", False):
            # Only ours: a manager that failed to bind (another one runs) must not remove its file.
            path = self.state_dir / "manager.json"
            try:
                if json.loads(path.read_text()).get("pid") == os.getpid():
                    path.unlink()
            except (OSError, ValueError):
                pass

    async def __aenter__(self) -> "Manager":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()
