"""Turn fuzzer bytes into structured inputs: the one decoder every engine shares.

atheris, hypothesis (``st.binary()``) and the saved regression inputs all hand
the targets plain ``bytes``; :class:`Source` reads them as a stream of choices,
so a saved input replays exactly and a mutation of one byte changes one
decision.  Past the end of the data every read returns its smallest value, so
short inputs are valid and cheap.
"""

from __future__ import annotations

import struct

__all__ = ["Source", "KEYS", "INTS"]

#: Map keys the wire bodies use (docs/architecture.md, bus/transfer.py, nodes/stub.py), so that
#: generated maps hit the handlers' branches instead of missing every ``body.get``.
KEYS = (
    "id", "name", "ctl", "data", "sub", "attrs", "pid", "parent", "depth", "path", "gp", "pdata", "rep", "rid",
    "ep", "cfg", "k", "pol", "hb", "mi", "to", "reason", "d", "ids", "h", "dead", "retry", "op", "a", "rem",
    "g", "m", "cmd", "args", "selector", "timeout", "app", "o", "n", "s", "t", "w", "p", "dl", "put", "meta",
    "svc", "code", "error", "orphaned_for", "rows", "node", "force", "spec", "resources",
)  # fmt: skip

#: Integers at the edges of every wire width and of the tree's ids.
INTS = (
    0, 1, 2, 3, -1, 7, 16, 63, 64, 65, 127, 128, 255, 256, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF,
    0x100000000, 2**63 - 1, 2**64 - 1, -(2**63), 1 << 20, (1 << 20) + 1, 8 << 20, 1 << 48,
)  # fmt: skip

_STRINGS = (
    "", "x", "ping", "info", "exec", "*", "web-*", "group=web", "root", "tcp://127.0.0.1:1", "randtree",
    "balanced", "star", "dead", "unreachable", "a" * 300, "\x00", "é", "\u2028", "0" * 64, "f" * 64,
)  # fmt: skip


class Source:
    """A cursor over fuzzer bytes with typed reads (see the module docstring)."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def u8(self) -> int:
        if self.pos >= len(self.data):
            return 0
        b = self.data[self.pos]
        self.pos += 1
        return b

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out.ljust(n, b"\0")

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes), "little")

    def below(self, n: int) -> int:
        """An int in ``range(n)`` (n <= 65536)."""
        if n <= 1:
            return 0
        return (self.u8() if n <= 256 else self.uint(2)) % n

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def blob(self, limit: int = 64) -> bytes:
        return self.take(self.below(limit + 1))

    def text(self, limit: int = 32) -> str:
        if self.flag():
            return self.choice(_STRINGS)
        return self.blob(limit).decode("utf-8", "replace")

    def integer(self) -> int:
        kind = self.u8() % 4
        if kind == 0:
            return self.choice(INTS)
        if kind == 1:
            return self.u8()
        if kind == 2:
            return self.uint(4)
        return struct.unpack("<q", self.take(8))[0]

    def number(self):
        kind = self.u8() % 4
        if kind == 0:
            return self.choice((0.0, -0.0, 1e-9, 0.5, 3.0, 1e300, float("inf"), -float("inf"), float("nan")))
        if kind == 1:
            return struct.unpack("<d", self.take(8))[0]
        return self.integer()

    def value(self, depth: int = 3):
        """Any msgpack-able value (what a hostile peer can put in a body)."""
        kind = self.u8() % (10 if depth > 0 else 7)
        if kind == 0:
            return None
        if kind == 1:
            return self.flag()
        if kind == 2:
            return self.integer()
        if kind == 3:
            return self.number()
        if kind == 4:
            return self.text()
        if kind == 5:
            return self.blob(16)
        if kind == 6:
            return self.id_list()
        if kind == 7:
            return [self.value(depth - 1) for _ in range(self.below(5))]
        return self.mapping(depth - 1)

    def id_list(self) -> list:
        return [self.choice(INTS) if self.flag() else self.u8() for _ in range(self.below(6))]

    def mapping(self, depth: int = 2, keys=KEYS) -> dict:
        out = {}
        for _ in range(self.below(7)):
            key = self.choice(keys) if self.u8() % 8 else self.value(0)
            try:
                hash(key)
            except TypeError:
                key = repr(key)
            out[key] = self.value(depth)
        return out
