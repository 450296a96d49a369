"""The sockets of both planes and the loop that serves them.

Control and data never share a socket (DESIGN.md, "Two planes").  This
module owns the two pieces every node uses:

* :class:`SocketFactory` builds a node's four sockets: a control ROUTER bound for
  children, a control DEALER connected to the parent, and a data ROUTER/DEALER
  pair on separate ports.  Every socket option (and later CURVE) is set here
  and nowhere else.
* :class:`PlaneLoop` serves plain (non-asyncio) zmq sockets from an asyncio
  loop.  It watches each socket's ``FD`` with ``loop.add_reader`` and, when it
  fires, drains whole batches with :func:`core.fastpath.drain`, so there is no
  per-message ``await``.  Control sockets are always served before data
  sockets: every wakeup drains the control sockets first, data is served one
  bounded batch at a time, and control sockets are checked again between data
  batches, so a data flood cannot delay a heartbeat.

ZeroMQ's ``FD`` is edge-triggered: it signals that ``EVENTS`` *may* have
changed, and any call that processes the socket's commands (``EVENTS``, a
receive, a send) can consume the signal while messages remain queued.  The
loop therefore re-reads ``EVENTS`` after every drain and every send it makes
and keeps a socket on its ready list while ``POLLIN`` is set.  Sending on a
registered socket must go through :meth:`PlaneLoop.send` for the same reason.

Every message a handler receives has passed the fast-path checks of
``bus.protocol``'s codec (header, frame count, body length, frame sizes, and
the type belongs to the socket's plane); the msgpack body is decoded only by
whoever consumes the message (:meth:`PlaneLoop.decode`), so a forwarding node
never unpacks bodies.  A message that fails a check is counted per plane and
per :class:`~core.errors.ErrorCode` and dropped, with at most one log line per
peer per ``log_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import selectors
import time
from typing import TYPE_CHECKING, Any, Callable

import zmq
import zmq.asyncio

from bus import protocol
from bus.protocol import (DATA_PLANE_MIN, HEADER_SIZE, MAX_EXTRA, BusError, FrameTooLarge, MalformedFrame,
                          Message, Plane, ProtocolError, UnknownType)
from bus.plane_stats import LoopStatistics, PlaneStatistics, _Counters, _LogLimiter
if TYPE_CHECKING:
    from bus.security import Security
from core.fastpath import drain, events, send_nowait

__all__ = [
    "PlaneError", "SocketSetupError", "PeerUnreachable", "SocketFactory", "PlaneLoop",
    "PlaneStatistics", "LoopStatistics", "Handler", "endpoint_of", "split_routed",
]

logger = logging.getLogger(__name__)

#: A batch handler: receives ``list[list[bytes]]`` (whole messages, routing ids
#: included for ROUTER sockets).  A plain function; it may schedule coroutines
#: through :meth:`PlaneLoop.spawn`.
Handler = Callable[[list], Any]

_POLLIN = int(zmq.POLLIN)  # plain ints: IntFlag arithmetic costs microseconds per send
_POLLOUT = int(zmq.POLLOUT)


class PlaneError(BusError):
    """A socket of either plane could not be set up or used."""


class SocketSetupError(PlaneError, OSError):
    """A socket could not be created, configured, bound or connected."""


class PeerUnreachable(PlaneError, ConnectionError):
    """A ROUTER has no connected peer with this routing id (it left or never came)."""

    def __init__(self, peer: bytes):
        super().__init__(f"no connected peer {peer.hex()} on this ROUTER")
        self.peer = peer


def _positive(**values) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def endpoint_of(socket: zmq.Socket) -> str:
    """The endpoint a socket last bound or connected to (the real port after ``:0``)."""
    ep = socket.getsockopt(zmq.LAST_ENDPOINT)
    return ep.decode() if isinstance(ep, bytes) else str(ep)


# -- socket factory ----------------------------------------------------------


class SocketFactory:
    """Builds every socket of both planes; the one place socket options are set.

    ``context`` is a plain ``zmq.Context`` (not ``zmq.asyncio``).  Create the
    factory before the context's first socket: libzmq ignores ``MAX_SOCKETS``
    once a socket exists, and a process hosts ~100 logical nodes of 4 sockets.

    Options, per plane:

    * HWMs: ``control_hwm`` (control is small and must not be starved, so its
      queue is separate) and ``data_hwm`` (bulk traffic is bounded here and by
      credits above it).
    * ROUTERs: ``ROUTER_MANDATORY`` (a send to a vanished peer raises
      :class:`PeerUnreachable`, and a full peer gives EAGAIN instead of a
      silent drop), ``ROUTER_HANDOVER`` (a restarted child reusing its
      identity takes over the old connection) and a listen ``BACKLOG`` of
      ``backlog`` (libzmq's 100 drops SYNs of a join storm for a second).
    * DEALERs: ``IMMEDIATE`` (no queueing to a parent that is not connected),
      ``RECONNECT_IVL``/``RECONNECT_IVL_MAX`` (exponential reconnect backoff).
    * All: ``LINGER``, TCP keepalive, ``MAXMSGSIZE`` (a peer sending a frame
      over ``protocol.MAX_FRAME`` is disconnected by libzmq).
    * Security (``security``, a :class:`bus.security.Security`): every ROUTER
      is a CURVE server whose ZAP handler admits only authorized keys, every
      DEALER a CURVE client pinned to its server's key (an endpoint may carry
      it: ``tcp://host:port#<z85>``; a plain one means the manager's pinned
      key).  None: plain TCP (tests, benchmarks' baselines); the daemons turn
      CURVE on unless started with ``--insecure``.

    Sockets are plain ``zmq.Socket`` objects owned by the caller; :meth:`close`
    closes every socket this factory built that is still open (and, with
    security, releases the context's ZAP handler: call it before ``term()``).
    """

    def __init__(self, context: zmq.Context, *, control_hwm: int = 1000, data_hwm: int = 10_000,
                 linger: int = 1000, reconnect_ivl: int = 100, reconnect_ivl_max: int = 5000,
                 tcp_keepalive_idle: int = 60, max_sockets: int = 4096,
                 max_msgsize: int = protocol.MAX_FRAME, backlog: int = 4096,
                 security: Security | None = None):  # fmt: skip
        if isinstance(context, zmq.asyncio.Context):
            raise TypeError("SocketFactory needs a plain zmq.Context; PlaneLoop drives the sockets")
        _positive(control_hwm=control_hwm, data_hwm=data_hwm, reconnect_ivl=reconnect_ivl,
                  reconnect_ivl_max=reconnect_ivl_max, tcp_keepalive_idle=tcp_keepalive_idle,
                  max_sockets=max_sockets, max_msgsize=max_msgsize, backlog=backlog)  # fmt: skip
        if linger < 0:
            raise ValueError(f"linger must be >= 0 (milliseconds), got {linger}")
        self._context = context
        self._hwm = {Plane.CONTROL: int(control_hwm), Plane.DATA: int(data_hwm)}
        self._linger = int(linger)
        self._reconnect = (int(reconnect_ivl), max(int(reconnect_ivl), int(reconnect_ivl_max)))
        self._keepalive_idle = int(tcp_keepalive_idle)
        self._max_msgsize = int(max_msgsize)
        self._backlog = int(backlog)  # the kernel caps it at net.core.somaxconn
        self._built: list[zmq.Socket] = []
        # Only ever raise the limit: another component may have set it higher.
        if context.get(zmq.MAX_SOCKETS) < max_sockets:
            context.set(zmq.MAX_SOCKETS, int(max_sockets))
        #: CURVE settings (None: plain TCP); read by NodeLink to advertise keyed endpoints.
        self.security = security
        self._attached = False  # counted once in security's per-context ZAP users

    @property
    def context(self) -> zmq.Context:
        return self._context

    def hwm(self, plane: Plane) -> int:
        """The send/receive high-water mark used for ``plane``."""
        return self._hwm[Plane(plane)]

    def control_router(self, bind_endpoint: str) -> zmq.Socket:
        """A control-plane ROUTER bound at ``bind_endpoint`` (children connect here)."""
        return self._router(Plane.CONTROL, bind_endpoint)

    def control_dealer(self, endpoint: str, identity: bytes) -> zmq.Socket:
        """A control-plane DEALER with routing id ``identity`` connected to the parent."""
        return self._dealer(Plane.CONTROL, endpoint, identity)

    def data_router(self, bind_endpoint: str) -> zmq.Socket:
        """A data-plane ROUTER bound at ``bind_endpoint`` (its own port)."""
        return self._router(Plane.DATA, bind_endpoint)

    def data_dealer(self, endpoint: str, identity: bytes) -> zmq.Socket:
        """A data-plane DEALER with routing id ``identity`` connected to a data ROUTER."""
        return self._dealer(Plane.DATA, endpoint, identity)

    def close(self, linger: int | None = None) -> None:
        """Close every socket this factory built (``linger`` overrides the default)."""
        built, self._built = self._built, []
        for sock in built:
            if not sock.closed:
                sock.close(self._linger if linger is None else linger)
        if self._attached:
            self._attached = False
            self.security.detach(self._context)  # the last factory of the context stops its ZAP thread

    # -- internals ---------------------------------------------------------
    def _router(self, plane: Plane, bind_endpoint: str) -> zmq.Socket:
        sock = self._socket(zmq.ROUTER, plane)
        try:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            # libzmq listens with a backlog of 100: when a thousand nodes join
            # (or rejoin after a manager restart) at once, the extra SYNs are
            # dropped and TCP retries them only after its 1 s initial timeout.
            sock.setsockopt(zmq.BACKLOG, self._backlog)
            if plane is Plane.DATA:
                # Replies to one peer (package chunks, task results) wait here at most
                # DATA_ROUTER_SNDHWM deep: a peer that asks and never reads costs a bounded
                # amount of memory; past it, sends fail and the chunk is asked for again.
                sock.setsockopt(zmq.SNDHWM, min(self._hwm[plane], DATA_ROUTER_SNDHWM))
            self._secure(sock, server=True)
            sock.bind(bind_endpoint)
        except (zmq.ZMQError, BusError) as e:  # BusError: bus.security.SecurityError
            self._discard(sock)
            raise SocketSetupError(
                f"cannot bind the {plane.name.lower()}-plane ROUTER to {bind_endpoint}: {e}"
            ) from e
        return sock

    def _dealer(self, plane: Plane, endpoint: str, identity: bytes) -> zmq.Socket:
        if not isinstance(identity, bytes) or not 1 <= len(identity) <= 255 or identity[0] == 0:
            # libzmq reserves ids that start with a zero byte for generated ones.
            raise ValueError(f"identity must be 1..255 bytes not starting with 0x00, got {identity!r}")
        sock = self._socket(zmq.DEALER, plane)
        try:
            sock.setsockopt(zmq.ROUTING_ID, identity)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.RECONNECT_IVL, self._reconnect[0])
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, self._reconnect[1])
            sock.connect(self._secure(sock, server=False, endpoint=endpoint))
        except (zmq.ZMQError, BusError) as e:  # BusError: bus.security.SecurityError
            self._discard(sock)
            raise SocketSetupError(
                f"cannot connect the {plane.name.lower()}-plane DEALER to {endpoint}: {e}"
            ) from e
        return sock

    def _socket(self, kind: int, plane: Plane) -> zmq.Socket:
        try:
            sock = self._context.socket(kind)
        except zmq.ZMQError as e:
            raise SocketSetupError(
                f"cannot create a socket ({e}); raise max_sockets or the open-file limit"
            ) from e
        try:
            hwm = self._hwm[plane]
            sock.setsockopt(zmq.SNDHWM, hwm)
            sock.setsockopt(zmq.RCVHWM, hwm)
            sock.setsockopt(zmq.LINGER, self._linger)
            sock.setsockopt(zmq.MAXMSGSIZE, self._max_msgsize)
            sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
            sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, self._keepalive_idle)
            sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, max(1, self._keepalive_idle // 4))
            sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 4)
        except zmq.ZMQError as e:
            sock.close(0)
            raise SocketSetupError(f"cannot configure a {plane.name.lower()}-plane socket: {e}") from e
        self._built.append(sock)
        return sock

    def _secure(self, sock: zmq.Socket, *, server: bool, endpoint: str = "") -> str:
        """Apply security options; the only place they are set.  Returns the endpoint to connect.

        Called for every socket after its other options and before bind or
        connect (libzmq reads CURVE options at that point).  A server gets
        ``CURVE_SERVER``, its key pair and a ZAP domain, with the context's ZAP
        handler running first (libzmq admits any key when none is bound); a
        client gets its key pair and the server key, from the endpoint's tag
        or the pinned manager key, and the tag is stripped for libzmq.
        """
        if self.security is None:
            return endpoint
        if server:
            if not self._attached:
                self.security.attach(self._context)  # no I/O: the ZAP thread starts in secure_server
                self._attached = True
            self.security.secure_server(sock)
            return endpoint
        return self.security.secure_client(sock, endpoint)

    def _discard(self, sock: zmq.Socket) -> None:
        sock.close(0)
        self._built = [s for s in self._built if s is not sock]


# -- message helpers ---------------------------------------------------------


def split_routed(frames, id_frames: int | None = 1, *, using=None) -> tuple[list, Message]:
    """Split ``[routing ids..., header, body, *extra]`` into ``(ids, Message)``.

    ``id_frames`` is how many routing-id frames precede the header: 1 for a
    ROUTER whose peers are DEALERs, 0 for a DEALER.  ``None`` scans for the
    first frame after the first one whose length is ``HEADER_SIZE`` (for
    messages that crossed a chain of ROUTERs).  Raises a ``ProtocolError``.
    """
    if id_frames is None:
        for i in range(1, len(frames)):
            if len(frames[i]) == HEADER_SIZE:
                id_frames = i
                break
        else:
            raise MalformedFrame(f"no {HEADER_SIZE}-byte header frame after the routing id")
    elif len(frames) < id_frames + 2:
        raise MalformedFrame(f"message of {len(frames)} frames, expected {id_frames} id frame(s), header and body")
    return list(frames[:id_frames]), protocol.decode(frames[id_frames:], using)


# -- the loop ----------------------------------------------------------------


class _Reg:
    """One registered socket."""

    __slots__ = ("socket", "plane", "handler", "name", "fd", "n_ids", "batch", "is_data",
                 "counters", "pending", "pending_peers", "waiters", "events")  # fmt: skip

    def __init__(self, socket, plane, handler, name, batch, counters):
        self.socket = socket
        self.plane = plane
        self.handler = handler
        self.name = name
        self.fd = socket.getsockopt(zmq.FD)
        # A ROUTER whose peers are DEALERs prefixes exactly one routing id.
        self.n_ids = 1 if socket.type == zmq.ROUTER else 0
        self.batch = batch
        self.is_data = plane is Plane.DATA
        self.counters = counters
        self.pending: collections.deque = collections.deque()  # (peer key, frames)
        self.pending_peers: collections.Counter = collections.Counter()
        self.waiters: list[asyncio.Future] = []


DATA_ROUTER_SNDHWM = 64  # messages queued per peer on a data ROUTER (x MAX_CHUNK_REQUEST bytes)


def new_context() -> zmq.Context:
    """A ZeroMQ context for a bus process, its I/O thread scheduled as ``SCHED_BATCH``.

    Every send wakes libzmq's I/O thread. With the default policy the woken
    thread often preempts the Python thread at once, so a burst of N sends
    (a convergecast's replies) costs N context switches on a busy machine;
    as a batch thread it waits for the Python thread to block and then sends
    the whole burst in one turn. On this 2-core machine that took the
    1000-node broadcast p50 from ~110 ms to ~75 ms (docs/benchmarks.md).
    """
    ctx = zmq.Context()
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is not None and hasattr(zmq, "THREAD_SCHED_POLICY"):
        try:
            ctx.set(zmq.THREAD_SCHED_POLICY, policy)
        except zmq.ZMQError:
            pass  # a libzmq built without it: default scheduling
    return ctx


class PlaneLoop:
    """Serves plain zmq sockets of both planes from the running asyncio loop.

    Lifecycle: ``__init__`` does no I/O; :meth:`start` attaches to the running
    loop, :meth:`stop` detaches every reader and cancels every timer and task
    it started (``async with`` does both).  Sockets may be added before or
    after ``start``; the caller owns them and closes them after ``stop`` (or
    after :meth:`remove`).

    Scheduling: each wakeup first drains the ready control sockets until
    EAGAIN (up to ``control_rounds`` batches of ``control_batch``), then serves
    up to ``data_rounds`` data batches of ``data_batch`` messages round-robin,
    checking the control sockets again after every data batch, and at most for
    ``data_slice`` seconds of wall time, then yields to the event loop if
    anything is still readable.
    """

    def __init__(self, *, control_batch: int = 256, data_batch: int = 128, control_rounds: int = 64,
                 data_rounds: int = 8, data_slice: float = 0.01, pending_limit: int = 64,
                 retry_interval: float = 0.05,
                 log_interval: float = 10.0, clock: Callable[[], float] = time.monotonic, codec=None):  # fmt: skip
        _positive(control_batch=control_batch, data_batch=data_batch, control_rounds=control_rounds,
                  data_rounds=data_rounds, pending_limit=pending_limit)  # fmt: skip
        if retry_interval <= 0:
            raise ValueError(f"retry_interval must be > 0, got {retry_interval}")
        self._batch = {Plane.CONTROL: int(control_batch), Plane.DATA: int(data_batch)}
        self._control_rounds = int(control_rounds)
        self._data_rounds = int(data_rounds)
        # Wall-clock cap of one turn's data work: bulk traffic (package chunks)
        # must not hold back timers such as heartbeats on a busy machine.
        self._data_slice = float(data_slice)
        self._pending_limit = int(pending_limit)
        self._retry_interval = float(retry_interval)
        self._codec = codec if codec is not None else protocol.new_codec()
        self._logs = _LogLimiter(float(log_interval), clock)
        self._counters = {Plane.CONTROL: _Counters(), Plane.DATA: _Counters()}
        self._regs: dict[zmq.Socket, _Reg] = {}
        # Ready lists are dicts used as ordered sets (insertion order = service order).
        self._ctl_ready: dict[_Reg, None] = {}
        self._data_ready: dict[_Reg, None] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ctl_sel: selectors.BaseSelector | None = None
        self._pump_handle: asyncio.Handle | None = None
        self._retry_handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self._wakeups = 0

    # -- lifecycle ---------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._loop is not None

    async def start(self) -> None:
        """Attach to the running event loop and start serving registered sockets."""
        if self._loop is not None:
            raise RuntimeError("PlaneLoop is already running")
        self._loop = asyncio.get_running_loop()
        self._ctl_sel = selectors.DefaultSelector()
        for reg in self._regs.values():
            self._attach(reg)

    async def stop(self) -> None:
        """Stop serving: remove readers, cancel timers, waiters and spawned tasks."""
        if self._loop is None:
            return
        for reg in self._regs.values():
            self._detach(reg)
            self._release(reg, False)
        for handle in (self._pump_handle, self._retry_handle):
            if handle is not None:
                handle.cancel()
        self._pump_handle = self._retry_handle = None
        self._ctl_ready.clear()
        self._data_ready.clear()
        self._ctl_sel.close()
        self._ctl_sel = None
        self._loop = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> PlaneLoop:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    def spawn(self, coro, *, name: str | None = None) -> asyncio.Task:
        """Run ``coro`` as a task owned by this loop (cancelled by :meth:`stop`)."""
        if self._loop is None:
            coro.close()
            raise RuntimeError("PlaneLoop is not running")
        task = self._loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("task %s failed", task.get_name(), exc_info=task.exception())

    # -- registration ------------------------------------------------------
    def add(self, socket: zmq.Socket, plane: Plane, handler: Handler, *, name: str | None = None) -> None:
        """Serve ``socket`` on ``plane``: ``handler(batch)`` gets each batch of valid messages.

        ``name`` labels log lines for messages from a DEALER's peer (a ROUTER's
        peers are named by routing id); it defaults to the socket's endpoint.
        """
        if not isinstance(socket, zmq.Socket) or isinstance(socket, zmq.asyncio.Socket):
            raise TypeError("PlaneLoop serves plain zmq.Socket objects, not zmq.asyncio sockets")
        if socket.closed:
            raise ValueError("socket is closed")
        if socket in self._regs:
            raise ValueError("socket is already registered")
        if not callable(handler):
            raise TypeError("handler must be callable")
        plane = Plane(plane)
        if name is None:
            name = endpoint_of(socket) or f"{plane.name.lower()}-socket"
        reg = _Reg(socket, plane, handler, name, self._batch[plane], self._counters[plane])
        self._regs[socket] = reg
        if self._loop is not None:
            self._attach(reg)

    def remove(self, socket: zmq.Socket) -> None:
        """Stop serving ``socket`` (before closing it); its pending control sends are dropped."""
        reg = self._regs.pop(socket, None)
        if reg is None:
            raise ValueError("socket is not registered")
        if self._loop is not None:
            self._detach(reg)
        self._ctl_ready.pop(reg, None)
        self._data_ready.pop(reg, None)
        if reg.pending:
            reg.counters.send_dropped += len(reg.pending)
            reg.pending.clear()
            reg.pending_peers.clear()
        self._release(reg, False)

    @staticmethod
    def _release(reg: _Reg, result: bool) -> None:
        """Resolve every :meth:`writable` waiter of ``reg`` with ``result``."""
        waiters, reg.waiters = reg.waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(result)

    def _attach(self, reg: _Reg) -> None:
        self._loop.add_reader(reg.fd, self._on_readable, reg)
        if not reg.is_data:
            self._ctl_sel.register(reg.fd, selectors.EVENT_READ, reg)
        # Messages may already be queued and their FD signal already consumed.
        self._mark(reg)

    def _detach(self, reg: _Reg) -> None:
        self._loop.remove_reader(reg.fd)
        if not reg.is_data:
            try:
                self._ctl_sel.unregister(reg.fd)
            except (KeyError, ValueError):
                pass

    # -- scheduling --------------------------------------------------------
    def _on_readable(self, reg: _Reg) -> None:
        if reg.is_data:
            self._mark(reg)  # deferred: control sockets whose FDs fired too get marked first
            return
        # A control socket: serve it in this loop turn instead of the next one
        # (one event-loop turn less per message).  The pump serves control
        # before data, so this can never put data ahead of control.
        self._ctl_ready[reg] = None
        if self._pump_handle is not None:
            self._pump_handle.cancel()
            self._pump_handle = None
        self._pump()

    def _mark(self, reg: _Reg) -> None:
        """Queue ``reg`` for a visit (its EVENTS must be re-read) and wake the pump."""
        if reg.is_data:
            self._data_ready[reg] = None
        else:
            self._ctl_ready[reg] = None
        if self._pump_handle is None and self._loop is not None:
            self._pump_handle = self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._pump_handle = None
        self._wakeups += 1
        try:
            if self._serve_control():
                self._serve_data()
        finally:
            # Whatever is still readable is served on the next turn, after the
            # event loop has run timers and other callbacks.
            if (self._ctl_ready or self._data_ready) and self._pump_handle is None and self._loop is not None:
                self._pump_handle = self._loop.call_soon(self._pump)

    def _serve_control(self) -> bool:
        """Drain ready control sockets until EAGAIN; False if the round cap was hit."""
        ready = self._ctl_ready
        rounds = self._control_rounds
        while ready and rounds > 0:
            for reg in list(ready):
                rounds -= 1
                if not self._visit(reg):
                    ready.pop(reg, None)
        return not ready

    def _serve_data(self) -> None:
        ready = self._data_ready
        ctl_ready = self._ctl_ready
        sel = self._ctl_sel
        rounds = self._data_rounds
        end = time.perf_counter() + self._data_slice
        while ready and rounds > 0 and self._loop is not None:
            if rounds < self._data_rounds and time.perf_counter() > end:
                return  # the rest on the next turn, after timers and other callbacks
            rounds -= 1
            reg = next(iter(ready))
            del ready[reg]
            if self._visit(reg):
                ready[reg] = None  # back of the line: round robin across data sockets
            # Between data batches: has any control socket become readable?
            # One epoll_wait(0) over the control FDs, not an EVENTS read per socket.
            if sel is not None and sel.get_map():
                for key, _ in sel.select(0):
                    ctl_ready[key.data] = None
            if ctl_ready and not self._serve_control():
                return

    def _visit(self, reg: _Reg) -> bool:
        """Serve one batch of ``reg``; True while it still has input queued."""
        if self._regs.get(reg.socket) is not reg:
            return False  # removed (and maybe closed) by a handler earlier in this round
        try:
            ev = events(reg.socket)
            if reg.pending or reg.waiters:
                self._flush(reg, ev)
            if not ev & _POLLIN:
                return False
            batch = drain(reg.socket, reg.batch)
            if batch:
                self._dispatch(reg, batch)
                if self._regs.get(reg.socket) is not reg:
                    return False  # the handler removed its own socket
            ev = events(reg.socket)
            if reg.pending or reg.waiters:
                self._flush(reg, ev)
            return bool(ev & _POLLIN)
        except zmq.ZMQError as e:
            # Closed under us (ENOTSOCK/ETERM): stop watching it rather than spin.
            logger.warning("%s-plane socket %s failed (%s); no longer served", reg.plane.name.lower(), reg.name, e)
            if reg.socket in self._regs:
                self.remove(reg.socket)
            return False

    def _dispatch(self, reg: _Reg, batch: list) -> None:
        c = reg.counters
        n = len(batch)
        c.batches += 1
        if n > c.max_batch:
            c.max_batch = n
        n_ids = reg.n_ids
        is_data = reg.is_data
        parse = self._codec.parse
        good = None  # stays None while every message is valid: no copy of the batch
        for i in range(n):
            frames = batch[i]
            try:
                nf = len(frames)
                if nf < n_ids + 2:
                    raise MalformedFrame(f"message of {nf} frames, expected routing id, header and body")
                h = parse(frames[n_ids])
                if len(frames[n_ids + 1]) != h.body_len:
                    raise MalformedFrame(f"body of {len(frames[n_ids + 1])} bytes, header says {h.body_len}")
                if nf - n_ids - 2 != h.extra:
                    raise MalformedFrame(f"{nf - n_ids - 2} extra frames, header says {h.extra}")
                if h.extra > MAX_EXTRA:  # senders refuse more (protocol.encode); so do receivers
                    raise FrameTooLarge(f"{h.extra} extra frames exceed the limit of {MAX_EXTRA}")
                if nf > n_ids + 2:
                    for j in range(n_ids + 2, nf):
                        self._codec.check_frame_size(len(frames[j]))
                if (h.type >= DATA_PLANE_MIN) is not is_data:
                    raise UnknownType(f"type {h.type} does not travel on the {reg.plane.name.lower()} plane")
            except ProtocolError as e:
                self._reject(reg, frames, e)
                if good is None:
                    good = batch[:i]
                continue
            if good is not None:
                good.append(frames)
        if good is not None:
            batch = good
        if not batch:
            return
        c.messages += len(batch)
        try:
            reg.handler(batch)
        except Exception:
            c.handler_errors += 1
            suppressed = self._logs.allow(("handler", reg.fd))
            if suppressed is not None:
                logger.exception("%s-plane handler for %s failed on a batch of %d (%d similar lines suppressed)",
                                 reg.plane.name.lower(), reg.name, len(batch), suppressed)  # fmt: skip

    def _reject(self, reg: _Reg, frames, exc: ProtocolError) -> None:
        reg.counters.dropped[exc.code] += 1
        peer = frames[0].hex() if reg.n_ids and len(frames) > reg.n_ids else reg.name
        suppressed = self._logs.allow(peer)
        if suppressed is not None:
            logger.warning("dropped a bad %s-plane message from peer %s: %s: %s (%d more from this peer suppressed)",
                           reg.plane.name.lower(), peer, exc.code.name, exc, suppressed)  # fmt: skip

    # -- sending -----------------------------------------------------------
    def send(self, socket: zmq.Socket, frames) -> bool:
        """Send one message without blocking; ``frames`` include the routing id on a ROUTER.

        Data plane: False when the queue is full (HWM) or no peer is
        connected; the caller backs off (credits, :meth:`writable`).
        Control plane: a message that meets a full queue waits in a small
        pending queue (``pending_limit`` per socket, order kept per peer) and
        is retried when the socket becomes writable; False only when that
        queue is full and the message was dropped.
        Raises :class:`PeerUnreachable` when a ROUTER has no such peer.
        """
        reg = self._regs.get(socket)
        if reg is None:
            raise ValueError("socket is not registered with this PlaneLoop")
        c = reg.counters
        key = frames[0] if reg.n_ids else None
        if reg.pending and (not reg.n_ids or key in reg.pending_peers):
            # Keep per-peer order: nothing may overtake a parked control message.
            return self._park(reg, key, frames)
        try:
            sent = send_nowait(socket, frames)  # straight to libzmq in the compiled twin
        except zmq.ZMQError as e:
            self._mark(reg)
            if e.errno == zmq.EHOSTUNREACH:
                c.unreachable += 1
                raise PeerUnreachable(bytes(key)) from e
            raise PlaneError(f"send on {reg.plane.name.lower()}-plane socket {reg.name} failed: {e}") from e
        if not sent:
            c.send_eagain += 1
            self._mark(reg)
            if reg.is_data:
                return False
            return self._park(reg, key, frames)
        c.sent += 1
        # The send processed the socket's commands and may have eaten the FD
        # signal of newly arrived input: have the pump re-read EVENTS.
        self._mark(reg)
        return True

    def _park(self, reg: _Reg, key, frames) -> bool:
        c = reg.counters
        if len(reg.pending) >= self._pending_limit:
            c.send_dropped += 1
            suppressed = self._logs.allow(("pending", reg.fd))
            if suppressed is not None:
                logger.warning("control queue of %s is full (%d); dropped a message (%d similar lines suppressed)",
                               reg.name, self._pending_limit, suppressed)  # fmt: skip
            return False
        reg.pending.append((key, frames))
        reg.pending_peers[key] += 1
        c.send_queued += 1
        self._arm_retry()
        return True

    def _arm_retry(self) -> None:
        # Writability normally arrives as an FD signal; the timer is the
        # fallback for a signal consumed elsewhere or a peer that went away.
        if self._retry_handle is None and self._loop is not None:
            self._retry_handle = self._loop.call_later(self._retry_interval, self._retry)

    def _retry(self) -> None:
        self._retry_handle = None
        waiting = False
        for reg in self._regs.values():
            if reg.pending:
                waiting = True
                self._mark(reg)
        if waiting:
            self._arm_retry()

    def _flush(self, reg: _Reg, ev: int) -> None:
        c = reg.counters
        if reg.pending:
            blocked = set()
            keep: collections.deque = collections.deque()
            sock = reg.socket
            while reg.pending:
                key, frames = item = reg.pending.popleft()
                if key in blocked:
                    keep.append(item)
                    continue
                try:
                    if not send_nowait(sock, frames):
                        blocked.add(key)  # this peer is still full; others may not be
                        keep.append(item)
                        continue
                except zmq.ZMQError as e:
                    # The peer left while its message waited: drop, count, go on.
                    c.send_dropped += 1
                    if e.errno == zmq.EHOSTUNREACH:
                        c.unreachable += 1
                else:
                    c.sent += 1
                reg.pending_peers[key] -= 1
                if reg.pending_peers[key] <= 0:
                    del reg.pending_peers[key]
            reg.pending = keep
        if reg.waiters and ev & _POLLOUT:
            self._release(reg, True)

    async def writable(self, socket: zmq.Socket, timeout: float | None = None) -> bool:
        """Wait until ``socket`` reports POLLOUT; False on timeout or removal.

        Precise for a DEALER.  A ROUTER is writable when *any* peer has room,
        so data senders on a ROUTER should pace with credits instead.
        """
        reg = self._regs.get(socket)
        if reg is None:
            raise ValueError("socket is not registered with this PlaneLoop")
        if self._loop is None:
            raise RuntimeError("PlaneLoop is not running")
        fut = self._loop.create_future()
        reg.waiters.append(fut)
        self._mark(reg)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            if fut in reg.waiters:
                reg.waiters.remove(fut)

    # -- receiving helpers ---------------------------------------------------
    def decode(self, socket: zmq.Socket, frames) -> tuple[list, Message] | None:
        """``(routing ids, Message)`` of a message received on ``socket``.

        A body that fails to decode is counted and logged like any bad frame
        and gives None; the handler just skips it.
        """
        reg = self._regs.get(socket)
        if reg is None:
            raise ValueError("socket is not registered with this PlaneLoop")
        try:
            return split_routed(frames, reg.n_ids, using=self._codec)
        except ProtocolError as e:
            self._reject(reg, frames, e)
            return None

    def statistics(self) -> LoopStatistics:
        """A frozen snapshot of every counter."""
        return LoopStatistics(
            control=self._counters[Plane.CONTROL].snapshot(),
            data=self._counters[Plane.DATA].snapshot(),
            sockets=len(self._regs),
            pending=sum(len(r.pending) for r in self._regs.values()),
            wakeups=self._wakeups,
        )
