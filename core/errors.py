"""Exceptions shared by both fast-path twins and the bus.

They live in ``core`` (not ``bus``) because the compiled twin raises them and
``core`` must not import ``bus``: ``bus.protocol`` imports ``core.fastpath``.
``bus.protocol`` re-exports every name here, so users import them from there.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "ErrorCode",
    "BusError",
    "ProtocolError",
    "TruncatedFrame",
    "FrameTooLarge",
    "BadVersion",
    "UnknownType",
    "MalformedFrame",
    "MalformedBody",
    "NoWorkers",
]


class ErrorCode(IntEnum):
    """Named codes carried by every :class:`ProtocolError` (``exc.code``)."""

    TRUNCATED = 1
    TOO_LARGE = 2
    BAD_VERSION = 3
    UNKNOWN_TYPE = 4
    MALFORMED_FRAME = 5
    MALFORMED_BODY = 6


class BusError(Exception):
    """Base class of every error snsbus raises on purpose."""


class ProtocolError(BusError, ValueError):
    """A frame or message that does not follow the wire protocol."""

    code: ErrorCode = ErrorCode.MALFORMED_FRAME


class TruncatedFrame(ProtocolError):
    """The header frame is shorter than the fixed header size."""

    code = ErrorCode.TRUNCATED


class FrameTooLarge(ProtocolError):
    """A frame or body exceeds the configured limits."""

    code = ErrorCode.TOO_LARGE


class BadVersion(ProtocolError):
    """The header carries a protocol version this build does not speak."""

    code = ErrorCode.BAD_VERSION


class UnknownType(ProtocolError):
    """The header carries a message type that is not in ``MsgType``."""

    code = ErrorCode.UNKNOWN_TYPE


class MalformedFrame(ProtocolError):
    """Wrong frame count, wrong header length or a body length mismatch."""

    code = ErrorCode.MALFORMED_FRAME


class MalformedBody(ProtocolError):
    """The msgpack body cannot be decoded or is not of the expected shape."""

    code = ErrorCode.MALFORMED_BODY


class NoWorkers(BusError, LookupError):
    """A load table was asked to pick a worker but holds none."""
