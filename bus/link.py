"""A logical node's sockets on both planes, wired to its tree protocol.

:class:`NodeLink` implements ``bus.tree.Transport`` with the sockets of
``bus.planes.SocketFactory`` served by a shared ``bus.planes.PlaneLoop``: a
control ROUTER and a data ROUTER bound on their own ports (children connect
there), and a control DEALER to the current parent, replaced on every re-parent
with a fresh routing id so the new parent never confuses it with a stale peer.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable

import zmq

from bus import protocol as p
from bus.planes import PeerUnreachable, PlaneLoop, SocketFactory, endpoint_of

__all__ = ["NodeLink"]

log = logging.getLogger(__name__)


_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def _identity() -> bytes:
    # libzmq reserves routing ids starting with a zero byte.
    return b"\x01" + os.urandom(7)


def _advertised(endpoint: str, host: str | None) -> str:
    if not host:
        return endpoint
    proto, _, rest = endpoint.partition("://")
    port = rest.rsplit(":", 1)[-1]
    return f"{proto}://{host}:{port}"


class NodeLink:
    """Transport of one TreeNode; also usable by the root (which has no parent)."""

    def __init__(self, factory: SocketFactory, loop: PlaneLoop, *, control_bind: str, data_bind: str,
                 advertise_host: str | None = None):
        self.factory = factory
        self.loop = loop
        self._control_bind = control_bind
        self._data_bind = data_bind
        self._advertise = advertise_host
        self.router = None
        self.data = None
        self.dealer = None
        self.control_endpoint = ""
        self.data_endpoint = ""
        self.on_child: Callable[[bytes, p.Message], None] | None = None
        self.on_parent: Callable[[p.Message], None] | None = None
        self.on_data: Callable[[bytes, p.Message], None] | None = None
        self.heard_child: Callable[[bytes], bool] | None = None
        self.heard_parent: Callable[[], None] | None = None
        self.parent_lost: Callable[[], None] | None = None
        self.connect_refused: Callable[[], None] | None = None
        self.reached: Callable[[], None] | None = None  # the parent accepted the TCP connection (CURVE only)
        self.connected: Callable[[], None] | None = None  # the parent connection's handshake completed
        self._last_beat = b""
        self._monitor = None
        self._monitor_fd = -1
        self._mon_loop: asyncio.AbstractEventLoop | None = None
        self.counters = {"data_unhandled": 0, "parent_swaps": 0, "parent_disconnects": 0, "handler_errors": 0,
                         "handshake_failures": 0}
        self._codec = p.new_codec()  # parses headers the PlaneLoop already validated

    def open(self) -> None:
        """Bind both ROUTERs and start serving them (the PlaneLoop may run already)."""
        self.router = self.factory.control_router(self._control_bind)
        self.data = self.factory.data_router(self._data_bind)
        self.control_endpoint = _advertised(endpoint_of(self.router), self._advertise)
        self.data_endpoint = _advertised(endpoint_of(self.data), self._advertise)
        security = self.factory.security
        if security is not None:  # tcp://host:port#<key>: whoever connects pins this process's key
            self.control_endpoint = security.advertise(self.control_endpoint)
            self.data_endpoint = security.advertise(self.data_endpoint)
        self.loop.add(self.router, p.Plane.CONTROL, self._children_batch)
        self.loop.add(self.data, p.Plane.DATA, self._data_batch)

    def close(self, linger: int = 0) -> None:
        """Stop serving and close every socket (``linger`` ms to flush what is queued)."""
        self.disconnect_parent(linger)
        for sock in (self.router, self.data):
            if sock is not None and not sock.closed:
                self._forget(sock)
                sock.close(linger)
        self.router = self.data = None

    def _forget(self, sock) -> None:
        try:
            self.loop.remove(sock)
        except ValueError:
            pass  # not registered (any more)

    # -- Transport ------------------------------------------------------------
    def connect_parent(self, endpoint: str) -> None:
        self.disconnect_parent()
        self.dealer = self.factory.control_dealer(endpoint, _identity())
        self._last_beat = b""
        self.loop.add(self.dealer, p.Plane.CONTROL, self._parent_batch, name=endpoint)
        self._watch(self.dealer)
        self.counters["parent_swaps"] += 1

    def disconnect_parent(self, linger: int = 0) -> None:
        self._unwatch()
        if self.dealer is not None:
            self._forget(self.dealer)
            self.dealer.close(linger)
            self.dealer = None

    # -- connection loss -----------------------------------------------------------
    # A killed process's TCP connections close at once; libzmq reports that on
    # the DEALER's monitor socket (EVENT_DISCONNECTED), so an orphan rejoins in
    # milliseconds instead of waiting for heartbeat silence.  A refused connect
    # (EVENT_CONNECT_RETRIED) tells a joining node its candidate is gone too.  The monitor is a
    # PAIR socket whose messages are libzmq events, not bus messages, so it is
    # watched here with its own reader rather than through the PlaneLoop.
    def _watch(self, dealer) -> None:
        if self.parent_lost is None:
            return
        loop = self._mon_loop = asyncio.get_running_loop()
        events = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
        if self.factory.security is not None:  # a CURVE handshake is slow enough to time JOINs from
            events |= _HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_CONNECTED
        self._monitor = dealer.get_monitor_socket(events)
        self._monitor_fd = self._monitor.getsockopt(zmq.FD)
        loop.add_reader(self._monitor_fd, self._on_monitor)
        self._on_monitor()  # the FD is edge-triggered: look once now

    def _unwatch(self) -> None:
        mon, self._monitor = self._monitor, None
        if mon is None:
            return
        if not self._mon_loop.is_closed():
            self._mon_loop.remove_reader(self._monitor_fd)
        if self.dealer is not None and not self.dealer.closed:
            self.dealer.disable_monitor()
        mon.close(0)

    def _on_monitor(self) -> None:
        mon = self._monitor
        lost = refused = reached = joined = False
        while mon is not None and not mon.closed and mon.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                event = mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            kind = int.from_bytes(event[0][:2], "little")
            lost = lost or kind == zmq.EVENT_DISCONNECTED
            refused = refused or kind == zmq.EVENT_CONNECT_RETRIED
            reached = reached or kind == zmq.EVENT_CONNECTED
            joined = joined or kind == zmq.EVENT_HANDSHAKE_SUCCEEDED
            if kind & _HANDSHAKE_FAILED:  # the server refused our key (or we pinned the wrong one)
                refused = True
                self._handshake_failed(kind, event)
        if reached and self.reached is not None:
            self.reached()
        if joined and self.connected is not None:
            self.connected()
        if lost:
            self.counters["parent_disconnects"] += 1
            self.parent_lost()
        elif refused and self.connect_refused is not None:
            # Nothing listens there (that candidate parent died too): skip it now.
            self.connect_refused()

    def _handshake_failed(self, kind: int, event: list) -> None:
        self.counters["handshake_failures"] += 1
        n = self.counters["handshake_failures"]
        if n & (n - 1):
            return  # 1st, 2nd, 4th...: a node retrying for hours does not flood its log
        where = event[1].decode("utf-8", "replace") if len(event) > 1 else "?"
        sec = self.factory.security
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            log.warning("%s refused this process's key %s (%d times so far): if it is pending, admit it with "
                        "`bus-ctl keys accept %s --name NAME`", where, sec.keypair.fingerprint, n,
                        sec.keypair.fingerprint)
        else:
            log.warning("the CURVE handshake with %s failed (%d times so far): a wrong pinned key (check "
                        "manager.pub / --manager-key), or that side runs --insecure", where, n)

    def send_parent(self, frames: list) -> bool:
        if self.dealer is None:
            return False
        return self.loop.send(self.dealer, frames)

    def send_child(self, identity: bytes, frames: list) -> bool:
        if self.router is None:
            return False
        try:
            return self.loop.send(self.router, [identity, *frames])
        except PeerUnreachable:
            return False  # the child's connection is gone: the caller drops it

    # -- receiving ------------------------------------------------------------
    def _decode(self, socket, frames, start: int) -> p.Message | None:
        # The PlaneLoop checked the framing of everything it hands us: only the
        # body is left to decode; a bad one is counted and logged by the loop.
        try:
            return p.decode_checked(frames, start, self._codec)
        except p.MalformedBody:
            self.loop.decode(socket, frames)  # fails the same way, and the loop counts and logs it
            return None

    def _guarded(self, handler, *args) -> None:
        # One message's handler failing (a bug) must not cost the other peers' messages
        # of the same batch: count it, log it (rate-limited by the counter), go on.
        try:
            handler(*args)
        except Exception:
            self.counters["handler_errors"] += 1
            n = self.counters["handler_errors"]
            if n & (n - 1) == 0:  # 1st, 2nd, 4th, 8th...: a storm does not flood the log
                log.exception("a handler failed on one message (%d so far); the batch goes on", n)

    def _children_batch(self, batch: list) -> None:
        router = self.router
        heard = self.heard_child
        for frames in batch:
            # Heartbeats are most of the traffic: no body decode for them.
            if heard is not None and p.peek_type(frames[1]) == p.MsgType.HEARTBEAT and heard(frames[0]):
                continue
            msg = self._decode(router, frames, 1)
            if msg is not None and self.on_child is not None:
                self._guarded(self.on_child, bytes(frames[0]), msg)

    def _parent_batch(self, batch: list) -> None:
        dealer = self.dealer
        if dealer is None:
            return
        for frames in batch:
            if p.peek_type(frames[0]) == p.MsgType.HEARTBEAT:
                # A parent repeats the same heartbeat body until its position changes.
                if frames[1] == self._last_beat and self.heard_parent is not None:
                    self.heard_parent()
                    continue
                self._last_beat = frames[1]
            msg = self._decode(dealer, frames, 0)
            if msg is not None and self.on_parent is not None:
                self._guarded(self.on_parent, msg)
            if self.dealer is not dealer:
                return  # the handler re-parented us: the rest of the batch is stale

    def _data_batch(self, batch: list) -> None:
        if self.on_data is None:
            self.counters["data_unhandled"] += len(batch)
            return
        for frames in batch:
            msg = self._decode(self.data, frames, 1)
            if msg is not None:
                self._guarded(self.on_data, bytes(frames[0]), msg)
