"""The pure twin's I/O functions: batch receive, send, EVENTS and one forwarding hop, on pyzmq.

Re-exported by ``core._fastpath_py`` (same names and signatures as the
compiled twin's ``_zmqdirect.pxi``, which calls libzmq directly instead).
"""

from __future__ import annotations

from core._fastpath_py import LINK_BROADCAST, LINK_UP, Forwarder

__all__ = ["drain", "events", "send_nowait", "relay"]


def drain(socket, max_msgs: int) -> list:
    """Receive up to ``max_msgs`` whole multipart messages without blocking.

    Returns a list of frame lists (bytes); stops at the first EAGAIN.
    """
    import zmq

    out = []
    recv = socket.recv_multipart
    try:
        while len(out) < max_msgs:
            out.append(recv(zmq.NOBLOCK))
    except zmq.Again:
        pass
    return out


def events(socket) -> int:
    """The socket's ZMQ_EVENTS bits (POLLIN/POLLOUT) as an int."""
    import zmq

    return int(socket.getsockopt(zmq.EVENTS))


def send_nowait(socket, frames) -> bool:
    """Send one multipart message without blocking; False (nothing sent) if the queue is full.

    Other libzmq errors (EHOSTUNREACH from a ROUTER_MANDATORY socket, ETERM,
    ...) raise as pyzmq raises them.
    """
    import zmq

    if len(frames) == 0:
        raise ValueError("a message needs at least one frame")
    try:
        socket.send_multipart(frames, zmq.NOBLOCK)
    except zmq.Again:
        return False
    return True


def relay(in_socket, out_socket, forwarder: Forwarder, max_msgs: int, header_index: int = 0) -> tuple:
    """Forward up to ``max_msgs`` messages from ``in_socket`` to ``out_socket``.

    Each message's frame ``header_index`` is routed by ``forwarder``; messages
    routed to a child link or up are sent on with ttl/hops advanced, others
    dropped.  Non-blocking on receive: stops at the first EAGAIN.  A send that
    meets a full peer (EAGAIN, HWM reached) blocks until it fits: back-pressure
    propagates to ``in_socket`` instead of losing accepted messages.  Returns
    ``(received, forwarded)``.
    """
    import zmq

    if header_index < 0:
        raise ValueError(f"header_index must be >= 0, got {header_index}")
    received = forwarded = 0
    codec = forwarder._codec
    try:
        while received < max_msgs:
            frames = in_socket.recv_multipart(zmq.NOBLOCK)
            received += 1
            if header_index >= len(frames):
                forwarder._c["dropped_malformed"] += 1
                continue
            decision = forwarder.route(frames[header_index], LINK_UP)
            if decision >= 0 or decision == LINK_BROADCAST:
                frames[header_index] = codec.advance(frames[header_index])
                out_socket.send_multipart(frames)
                forwarded += 1
    except zmq.Again:
        pass
    return (received, forwarded)
