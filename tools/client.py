"""A small blocking client of the manager's control API (plain pyzmq, no asyncio).

One request is one ``CTL_REQUEST`` on a fresh DEALER socket; the answer is the
``CTL_REPLY`` whose header ``ref`` equals the request's ``msg_id``::

    request body: {"cmd": str, "args": {...}}
    reply body:   {"ok": True, "result": ...}
               |  {"ok": False, "error": "one sentence", "code": "NAME"}

The socket is opened with ``ZMQ_IMMEDIATE`` so it only becomes writable once a
TCP (or IPC) connection exists: a manager that is not running is reported after
``connect_timeout`` instead of after the full request timeout.

With ``security`` (a :class:`bus.security.Security`, see
:func:`bus.security.client_security`) the socket is a CURVE client pinned to
the manager's key; a refused handshake is reported as such (code ``AUTH``,
saying what to do), not as a manager that is not running.
"""

from __future__ import annotations

import time

import zmq

from bus import protocol
from bus.protocol import BusError, MsgType, ProtocolError

__all__ = [
    "NOT_RUNNING",
    "TIMEOUT",
    "BAD_REPLY",
    "BAD_SELECTOR",
    "AUTH",
    "CtlError",
    "ManagerNotRunning",
    "CtlTimeout",
    "CtlClient",
]

# Error codes this client raises itself (the manager's codes arrive as strings).
NOT_RUNNING = "NOT_RUNNING"
TIMEOUT = "TIMEOUT"
BAD_REPLY = "BAD_REPLY"
BAD_SELECTOR = "BAD_SELECTOR"  # the manager's code for a selector matching no node
AUTH = "AUTH"  # the CURVE handshake failed: key not admitted, wrong manager key, or CURVE on one side only


class CtlError(BusError):
    """The manager refused a command, or could not be reached; ``code`` names why."""

    def __init__(self, message: str, code: str = "ERROR", endpoint: str | None = None):
        super().__init__(message)
        self.code = code
        self.endpoint = endpoint


class ManagerNotRunning(CtlError, ConnectionError):
    """Nothing accepted a connection at the control endpoint."""

    def __init__(self, endpoint: str):
        super().__init__(
            f"manager not running at {endpoint} (start it with `bus-ctl up`)",
            NOT_RUNNING,
            endpoint,
        )


class CtlTimeout(CtlError, TimeoutError):
    """The manager accepted the connection but did not answer in time."""

    def __init__(self, endpoint: str, cmd: str, timeout: float):
        super().__init__(
            f"the manager at {endpoint} did not answer `{cmd}` within {timeout:g}s",
            TIMEOUT,
            endpoint,
        )
        self.cmd = cmd
        self.timeout = timeout


class CtlClient:
    """Blocking control-API client: ``CtlClient(endpoint, timeout).call(cmd, **args)``.

    No I/O happens until a request is made; every request uses its own socket,
    closed with ``LINGER 0`` whatever happens.  Use as a context manager (or call
    :meth:`close`) to release a context the client created itself.
    """

    def __init__(
        self,
        endpoint: str,
        timeout: float = 5.0,
        *,
        connect_timeout: float = 1.0,
        context: zmq.Context | None = None,
        security=None,
    ):
        self.endpoint = endpoint
        self.security = security
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._context = context
        self._own_context = context is None
        self.stale_replies = 0  # replies received that answered an earlier request

    def __enter__(self) -> CtlClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Terminate the context if this client created it."""
        if self._own_context and self._context is not None:
            self._context.term()
            self._context = None

    def call(self, cmd: str, /, **args):
        """Send ``cmd`` with ``args`` and return the manager's result (see :meth:`request`)."""
        return self.request(cmd, args)

    def request(self, cmd: str, args: dict | None = None, timeout: float | None = None):
        """Send one command and return its ``result``.

        Raises :class:`ManagerNotRunning` when no connection is made within
        ``connect_timeout``, :class:`CtlTimeout` when the manager does not answer
        within ``timeout`` (default: the client's), and :class:`CtlError` with the
        manager's code and sentence when it answers ``ok: False``.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if self._context is None:
            self._context = zmq.Context()
        sock = self._context.socket(zmq.DEALER)
        monitor = None
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            # Handshake failures are watched so that "refused" is not reported as "not running".
            from bus.security import HANDSHAKE_EVENTS, handshake_failure

            monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
            try:
                endpoint = self.endpoint
                if self.security is not None:
                    endpoint = self.security.secure_client(sock, endpoint)
                sock.connect(endpoint)
            except (zmq.ZMQError, BusError) as e:
                raise CtlError(
                    f"cannot use control endpoint {self.endpoint!r}: {e}", BAD_REPLY, self.endpoint
                ) from e
            # With IMMEDIATE the socket is writable only once a connection (and its handshake) is up.
            wait_ms = int(1000 * min(self.connect_timeout, timeout))
            if not sock.poll(wait_ms, zmq.POLLOUT):
                why = handshake_failure(monitor, self.security is not None)
                if why is not None:
                    raise CtlError(f"the manager at {self.endpoint} {why}", AUTH, self.endpoint)
                raise ManagerNotRunning(self.endpoint)
            msg_id = protocol.next_msg_id()
            frames = protocol.encode(
                MsgType.CTL_REQUEST, {"cmd": cmd, "args": args or {}}, msg_id=msg_id
            )
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again as e:
                raise ManagerNotRunning(self.endpoint) from e
            return self._await_reply(sock, cmd, msg_id, deadline, timeout)
        finally:
            if monitor is not None:
                sock.disable_monitor()
                monitor.close(linger=0)
            sock.close(linger=0)

    def _await_reply(self, sock, cmd: str, msg_id: int, deadline: float, timeout: float):
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                raise CtlTimeout(self.endpoint, cmd, timeout)
            raw = sock.recv_multipart(copy=True)
            try:
                msg = protocol.decode(raw)
            except ProtocolError as e:
                raise CtlError(
                    f"the manager at {self.endpoint} sent a malformed reply to `{cmd}`: {e}",
                    BAD_REPLY,
                    self.endpoint,
                ) from e
            if msg.header.type != MsgType.CTL_REPLY or msg.header.ref != msg_id:
                self.stale_replies += 1
                continue
            return self._result(cmd, msg.body)

    def _result(self, cmd: str, body):
        if not isinstance(body, dict) or "ok" not in body:
            raise CtlError(
                f"the manager at {self.endpoint} sent a reply to `{cmd}` without an `ok` field",
                BAD_REPLY,
                self.endpoint,
            )
        if body["ok"]:
            return body.get("result")
        raise CtlError(
            str(body.get("error") or f"`{cmd}` failed"),
            str(body.get("code") or "ERROR"),
            self.endpoint,
        )
