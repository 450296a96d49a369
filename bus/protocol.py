"""The snsbus wire protocol: the one owner of the message format.

Frame layout (ZeroMQ multipart)::

    [routing ids..., header, body, *extra]

* ``routing ids``: added and consumed by ROUTER sockets, never by this module.
* ``header``: exactly ``HEADER_SIZE`` (36) bytes, little-endian, struct
  ``<BBHQQIIBBHI``::

      offset size field
      0      1    version    protocol version (``VERSION``)
      1      1    type       ``MsgType``
      2      2    flags      ``Flag`` bits
      4      8    msg_id     sender-unique 64-bit id (dedup key with src)
      12     8    ref        msg_id this message answers (0 = none)
      20     4    src        source node id
      24     4    dst        destination node id (``BROADCAST_ID`` = everyone below)
      28     1    ttl        hops left; a message with ttl 0 is not forwarded
      29     1    hops       hops taken so far
      30     2    extra      number of extra frames after the body
      32     4    body_len   length of the body frame in bytes

  The fast path (``core.fastpath.FrameCodec``) reads it without touching the body.
* ``body``: one msgpack map (packed and unpacked only here: ``packb``/``unpackb``).
* ``extra``: raw bytes frames (package chunks, task payloads), never msgpack.

Limits: a body is at most ``MAX_BODY`` bytes and any frame at most ``MAX_FRAME``.
A frame that breaks a rule raises a :class:`ProtocolError` subclass with a named
``code``; receivers count and drop it (see ``bus.planes``), senders refuse to
build it.  Types below 64 travel on the control plane, 64 and up on the data plane.
"""

from __future__ import annotations

import itertools
import os
from enum import IntEnum, IntFlag
from typing import Any, NamedTuple

import msgpack

from core.errors import (
    BadVersion,
    BusError,
    ErrorCode,
    FrameTooLarge,
    MalformedBody,
    MalformedFrame,
    ProtocolError,
    TruncatedFrame,
    UnknownType,
)
from core.fastpath import BROADCAST_ID, HEADER_SIZE, FrameCodec, Header

__all__ = [
    "VERSION",
    "HEADER_SIZE",
    "BROADCAST_ID",
    "MAX_BODY",
    "MAX_FRAME",
    "MAX_EXTRA",
    "DEFAULT_TTL",
    "DATA_PLANE_MIN",
    "MsgType",
    "NO_SUCH_WORKER",
    "OVERLOADED",
    "DEADLINE",
    "WORKER_CRASHED",
    "FAILED",
    "NO_INPUT",
    "TASK_CODES",
    "Flag",
    "Plane",
    "Message",
    "Header",
    "codec",
    "new_codec",
    "plane_of",
    "peek_type",
    "next_msg_id",
    "packb",
    "unpackb",
    "encode",
    "decode",
    "decode_checked",
    "ErrorCode",
    "BusError",
    "ProtocolError",
    "TruncatedFrame",
    "FrameTooLarge",
    "BadVersion",
    "UnknownType",
    "MalformedFrame",
    "MalformedBody",
]

VERSION = 1
MAX_BODY = 1 << 20  # 1 MiB of msgpack per message
MAX_FRAME = 8 << 20  # 8 MiB for any single frame (extra frames carry bulk)
MAX_EXTRA = 64  # extra frames per message
DEFAULT_TTL = 64
DATA_PLANE_MIN = 64


class MsgType(IntEnum):
    """Every message type on the bus.  < 64: control plane; >= 64: data plane."""

    # overlay tree membership
    JOIN = 1  # node -> candidate parent: {name, node_id?, subtree: [ids], attrs}
    JOIN_ACCEPT = 2  # parent -> node: {node_id, parent, root, depth, ...}
    JOIN_REDIRECT = 3  # parent -> node: {endpoint} try this child instead
    JOIN_REJECT = 4  # parent -> node: {reason}
    LEAVE = 5  # node -> parent: clean departure
    HEARTBEAT = 6  # both directions
    HEARTBEAT_ACK = 7
    ROUTE_ADD = 8  # child -> parent: ids now reachable through me
    ROUTE_LOST = 9  # child -> parent: ids no longer reachable
    REGISTER = 10  # node -> root: who I am and what I host (after a join or a root restart)
    REGISTER_ACK = 11  # root -> node (unicast): registration recorded; the node stops re-sending
    ROUTE_SYNC = 12  # child -> parent, periodically: my whole subtree (anti-entropy for ROUTE_ADD/LOST)
    # commands and convergecast
    COMMAND = 16  # down the tree (broadcast or unicast)
    REPLY = 17  # up the tree, merged per level
    PING = 18
    PONG = 19
    # control API of the manager (bus-ctl <-> manager)
    CTL_REQUEST = 24
    CTL_REPLY = 25
    # services (later issues)
    LOAD_REPORT = 32
    BEACON = 33
    BARRIER = 34
    # data plane
    DATA = 64
    TASK = 65
    TASK_REPLY = 66
    CHUNK_REQUEST = 67
    CHUNK = 68
    CREDIT = 69


# The ``code`` of a failed TASK_REPLY (docs/services.md): what the worker stub answers
# instead of a result.  Owned here; the stub (nodes.instance) answers them and the front
# ends (frontends.dispatch) act on them.
NO_SUCH_WORKER = "no_such_worker"
OVERLOADED = "overloaded"
DEADLINE = "deadline"
WORKER_CRASHED = "worker_crashed"
FAILED = "failed"
NO_INPUT = "no_input"  # an input named by reference ("in") is not in that cache instance of the node
TASK_CODES = (NO_SUCH_WORKER, OVERLOADED, DEADLINE, WORKER_CRASHED, FAILED, NO_INPUT)


class Flag(IntFlag):
    NONE = 0
    UPWARD = 1  # travels toward the root
    AGGREGATE = 2  # replies are merged on the way up
    ERROR = 4  # body describes an error


class Plane(IntEnum):
    CONTROL = 0
    DATA = 1


class Message(NamedTuple):
    """A decoded message (routing ids excluded)."""

    header: Header
    body: Any
    extra: list

    @property
    def type(self) -> MsgType:
        return MsgType(self.header.type)


def plane_of(msg_type: int) -> Plane:
    return Plane.DATA if msg_type >= DATA_PLANE_MIN else Plane.CONTROL


def peek_type(header_frame) -> int:
    """Message type of an already validated header frame, without parsing the rest."""
    return header_frame[1]


def new_codec() -> FrameCodec:
    """A fresh codec (own counters) enforcing this module's version, types and limits."""
    return FrameCodec(VERSION, [int(t) for t in MsgType], MAX_BODY, MAX_FRAME)


#: Shared codec for code that does not keep its own counters.
codec = new_codec()

_ids = itertools.count(int.from_bytes(os.urandom(4), "little") << 24)


def next_msg_id() -> int:
    """A process-unique 64-bit message id (random base, then counting)."""
    return next(_ids) & 0xFFFFFFFFFFFFFFFF


# The only msgpack configuration in snsbus.
_PACKER_OPTS = {"use_bin_type": True}
_UNPACKER_OPTS = {
    "raw": False,
    "strict_map_key": False,
    "max_str_len": MAX_BODY,
    "max_bin_len": MAX_BODY,
    "max_array_len": 1 << 18,
    "max_map_len": 1 << 18,
    "max_ext_len": 0,
}


def packb(obj: Any) -> bytes:
    try:
        return msgpack.packb(obj, **_PACKER_OPTS)
    except (TypeError, ValueError, OverflowError) as e:
        raise MalformedBody(f"body cannot be encoded: {e}") from e


def unpackb(data) -> Any:
    try:
        return msgpack.unpackb(data, **_UNPACKER_OPTS)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise MalformedBody(f"body is not valid msgpack: {e}") from e


def encode(
    msg_type: int,
    body: Any = None,
    *,
    src: int = 0,
    dst: int = 0,
    msg_id: int | None = None,
    ref: int = 0,
    flags: int = 0,
    ttl: int = DEFAULT_TTL,
    hops: int = 0,
    extra: list | tuple = (),
    using: FrameCodec | None = None,
) -> list:
    """Frames ``[header, body, *extra]`` of one message; refuses oversized ones.

    Raises ``FrameTooLarge`` for a body or extra frame over the limits.
    """
    raw = packb({} if body is None else body)
    if len(extra) > MAX_EXTRA:
        raise FrameTooLarge(f"{len(extra)} extra frames exceed the limit of {MAX_EXTRA}")
    c = using or codec
    for frame in extra:
        c.check_frame_size(len(frame))
    header = c.pack(
        int(msg_type),
        int(flags),
        next_msg_id() if msg_id is None else msg_id,
        ref,
        src,
        dst,
        ttl,
        hops,
        len(extra),
        len(raw),
    )
    return [header, raw, *extra]


def decode(frames, using: FrameCodec | None = None) -> Message:
    """Decode ``[header, body, *extra]``; raises a ``ProtocolError`` subclass."""
    if len(frames) < 2:
        raise MalformedFrame(f"message of {len(frames)} frames, expected header and body")
    c = using or codec
    h = c.parse(frames[0])
    body = frames[1]
    nbody = len(body) if isinstance(body, (bytes, bytearray)) else memoryview(body).nbytes
    if nbody != h.body_len:
        raise MalformedFrame(f"body of {nbody} bytes, header says {h.body_len}")
    if h.extra > MAX_EXTRA:  # senders refuse more (encode): a receiver must not accept them either
        raise FrameTooLarge(f"{h.extra} extra frames exceed the limit of {MAX_EXTRA}")
    extra = list(frames[2:])
    if len(extra) != h.extra:
        raise MalformedFrame(f"{len(extra)} extra frames, header says {h.extra}")
    for frame in extra:
        c.check_frame_size(len(frame))
    return Message(h, unpackb(body), extra)


def decode_checked(frames, start: int, using: FrameCodec) -> Message:
    """Decode ``frames[start:]`` whose framing a ``bus.planes.PlaneLoop`` already checked.

    The loop has validated the header, the frame count, the body length and
    the extra frames; only the msgpack body is left to decode (and may still
    raise ``MalformedBody``).  Anything else must use :func:`decode`.
    """
    return Message(using.parse(frames[start]), unpackb(frames[start + 1]), list(frames[start + 2:]))
