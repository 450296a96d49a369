"""Pure-Python twin of ``core._fastpath``: the reference the compiled twin must match.

Same names, signatures, results and exception types as ``_fastpath.pyx``; the
twin tests in ``tests/core`` run every behaviour against both.  Nothing here does
I/O except :func:`drain` and :func:`relay`, which receive/send on pyzmq sockets
(the compiled twin calls libzmq directly instead).

Node ids are unsigned 32-bit; links are small signed ints: ``>= 0`` is a child
link, and the negative ``LINK_*`` constants name the other outcomes.
"""

from __future__ import annotations

import heapq
import struct
from types import MappingProxyType

from core.errors import (
    BadVersion,
    FrameTooLarge,
    MalformedFrame,
    NoWorkers,
    TruncatedFrame,
    UnknownType,
)

__all__ = [
    "HEADER_SIZE",
    "BROADCAST_ID",
    "LINK_UP",
    "LINK_LOCAL",
    "LINK_DROP",
    "LINK_BROADCAST",
    "Header",
    "FrameCodec",
    "RoutingTable",
    "Forwarder",
    "Aggregator",
    "LoadTable",
    "Credits",
    "drain",
    "events",
    "send_nowait",
    "relay",
]

# version, type, flags, msg_id, ref, src, dst, ttl, hops, extra, body_len
_HEADER = struct.Struct("<BBHQQIIBBHI")
HEADER_SIZE = _HEADER.size  # 36
BROADCAST_ID = 0xFFFFFFFF

LINK_UP = -1  # send to the parent
LINK_LOCAL = -2  # addressed to this node
LINK_DROP = -3  # dropped (counted in statistics)
LINK_BROADCAST = -4  # deliver locally and forward to broadcast_links()

_U8 = 0xFF
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF
_I32 = 0x7FFFFFFF  # largest link id (links are C int32 in the compiled twin)
_GOLDEN = 0x9E3779B97F4A7C15  # multiplicative hash for dedup keys


def _check(value: int, limit: int, name: str) -> int:
    value = int(value)
    if value < 0 or value > limit:
        raise OverflowError(f"{name}={value} out of range 0..{limit}")
    return value


#: The header's fields in wire order, with their ranges (one table for every check).
_FIELDS = (
    ("version", _U8), ("type", _U8), ("flags", _U16), ("msg_id", _U64), ("ref", _U64), ("src", _U32),
    ("dst", _U32), ("ttl", _U8), ("hops", _U8), ("extra", _U16), ("body_len", _U32),
)


def _check_fields(fields, values) -> tuple:
    """``_check`` each value against its field's range, in order (first failure raises)."""
    return tuple(_check(v, limit, name) for (name, limit), v in zip(fields, values))


def _snapshot(counters: dict) -> MappingProxyType:
    return MappingProxyType(dict(counters))


def _nbytes(frame) -> int:
    if isinstance(frame, (bytes, bytearray)):
        return len(frame)
    return memoryview(frame).nbytes


class Header:
    """A parsed header; fields are read-only.

    Built by :meth:`FrameCodec.parse`; built by hand, every field is range-checked
    against its wire width (``OverflowError``), as the compiled twin stores them in C.
    """

    __slots__ = ("_t",)

    def __init__(self, version, type, flags, msg_id, ref, src, dst, ttl, hops, extra, body_len):
        t = _check_fields(_FIELDS, (version, type, flags, msg_id, ref, src, dst, ttl, hops, extra, body_len))
        object.__setattr__(self, "_t", t)

    def __setattr__(self, name, value):
        raise AttributeError("Header is read-only")

    version = property(lambda self: self._t[0])
    type = property(lambda self: self._t[1])
    flags = property(lambda self: self._t[2])
    msg_id = property(lambda self: self._t[3])
    ref = property(lambda self: self._t[4])
    src = property(lambda self: self._t[5])
    dst = property(lambda self: self._t[6])
    ttl = property(lambda self: self._t[7])
    hops = property(lambda self: self._t[8])
    extra = property(lambda self: self._t[9])
    body_len = property(lambda self: self._t[10])

    def as_tuple(self) -> tuple:
        """(version, type, flags, msg_id, ref, src, dst, ttl, hops, extra, body_len)."""
        return self._t

    def __eq__(self, other):
        if not isinstance(other, Header):
            return NotImplemented
        return self._t == other.as_tuple()

    def __hash__(self):
        return hash(self._t)

    def __repr__(self):
        return (
            f"Header(type={self._t[1]}, flags={self._t[2]:#x}, msg_id={self._t[3]}, "
            f"ref={self._t[4]}, src={self._t[5]}, dst={self._t[6]}, ttl={self._t[7]}, "
            f"hops={self._t[8]}, extra={self._t[9]}, body_len={self._t[10]})"
        )


def _header(t: tuple) -> Header:
    # Unpacked fields are in range by construction: skip Header.__init__'s checks.
    h = object.__new__(Header)
    object.__setattr__(h, "_t", t)
    return h


class FrameCodec:
    """Packs and validates the fixed binary header.

    ``valid_types`` and the limits come from ``bus.protocol`` (the wire-format
    owner); the codec only enforces them.
    """

    def __init__(self, version: int, valid_types, max_body: int, max_frame: int):
        self._version = _check(version, _U8, "version")
        self._valid = [False] * 256
        for t in valid_types:
            self._valid[_check(t, _U8, "type")] = True
        self._max_body = _check(max_body, _U32, "max_body")
        self._max_frame = _check(max_frame, _U32, "max_frame")
        self._c = {
            "packed": 0,
            "parsed": 0,
            "truncated": 0,
            "too_large": 0,
            "bad_version": 0,
            "unknown_type": 0,
            "malformed": 0,
        }

    @property
    def version(self) -> int:
        return self._version

    @property
    def max_body(self) -> int:
        return self._max_body

    @property
    def max_frame(self) -> int:
        return self._max_frame

    def is_valid_type(self, type: int) -> bool:
        return 0 <= type <= 255 and self._valid[type]

    def pack(self, type, flags=0, msg_id=0, ref=0, src=0, dst=0, ttl=32, hops=0, extra=0, body_len=0) -> bytes:
        """Build a header; raises ``UnknownType``, ``FrameTooLarge`` or ``OverflowError``."""
        type = _check(type, _U8, "type")
        if not self._valid[type]:
            raise UnknownType(f"unknown message type {type}")
        body_len = _check(body_len, _U32, "body_len")
        if body_len > self._max_body:
            raise FrameTooLarge(f"body of {body_len} bytes exceeds the limit of {self._max_body}")
        middle = _check_fields(_FIELDS[2:10], (flags, msg_id, ref, src, dst, ttl, hops, extra))
        out = _HEADER.pack(self._version, type, *middle, body_len)
        self._c["packed"] += 1
        return out

    def parse(self, frame) -> Header:
        """Validate and decode a header frame (any bytes-like object)."""
        n = _nbytes(frame)
        if n < HEADER_SIZE:
            self._c["truncated"] += 1
            raise TruncatedFrame(f"header frame of {n} bytes, expected {HEADER_SIZE}")
        if n > HEADER_SIZE:
            self._c["malformed"] += 1
            raise MalformedFrame(f"header frame of {n} bytes, expected {HEADER_SIZE}")
        t = _HEADER.unpack_from(frame)
        if t[0] != self._version:
            self._c["bad_version"] += 1
            raise BadVersion(f"protocol version {t[0]}, this build speaks {self._version}")
        if not self._valid[t[1]]:
            self._c["unknown_type"] += 1
            raise UnknownType(f"unknown message type {t[1]}")
        if t[10] > self._max_body:
            self._c["too_large"] += 1
            raise FrameTooLarge(f"body of {t[10]} bytes exceeds the limit of {self._max_body}")
        self._c["parsed"] += 1
        return _header(t)

    def check_frame_size(self, nbytes: int) -> None:
        """Raise ``FrameTooLarge`` for a frame over ``max_frame`` bytes."""
        if nbytes > self._max_frame:
            self._c["too_large"] += 1
            raise FrameTooLarge(f"frame of {nbytes} bytes exceeds the limit of {self._max_frame}")

    def advance(self, frame) -> bytes:
        """Copy of a (valid) header with ttl decremented and hops incremented.

        Saturates: ttl never goes below 0 and hops never above 255.
        """
        h = self.parse(frame)
        b = bytearray(frame)
        b[28] = h.ttl - 1 if h.ttl > 0 else 0
        b[29] = h.hops + 1 if h.hops < 255 else 255
        return bytes(b)

    def statistics(self):
        return _snapshot(self._c)


class RoutingTable:
    """Node id -> child link for every node of this node's subtree.

    Missing ids route ``LINK_UP``.  Subtrees are added and removed in one call.
    """

    def __init__(self):
        self._next = {}  # node id -> link
        self._by_link = {}  # link -> set of node ids

    def __len__(self) -> int:
        return len(self._next)

    def __contains__(self, node_id) -> bool:
        return node_id in self._next

    def lookup(self, node_id: int) -> int:
        """The child link that leads to ``node_id``, or ``LINK_UP``."""
        return self._next.get(node_id, LINK_UP)

    def add(self, node_id: int, link: int) -> None:
        node_id = _check(node_id, _U32, "node_id")
        if link < 0:
            raise ValueError(f"link must be >= 0, got {link}")
        link = _check(link, _I32, "link")
        old = self._next.get(node_id)
        if old is not None:
            if old == link:
                return
            self._by_link[old].discard(node_id)
            if not self._by_link[old]:
                del self._by_link[old]
        self._next[node_id] = link
        self._by_link.setdefault(link, set()).add(node_id)

    def add_subtree(self, link: int, node_ids) -> int:
        """Route every id in ``node_ids`` through ``link``; returns how many."""
        n = 0
        for node_id in node_ids:
            self.add(node_id, link)
            n += 1
        return n

    def remove(self, node_id: int) -> bool:
        link = self._next.pop(node_id, None)
        if link is None:
            return False
        ids = self._by_link[link]
        ids.discard(node_id)
        if not ids:
            del self._by_link[link]
        return True

    def remove_subtree(self, node_ids) -> int:
        """Remove every listed id that has a route; returns how many were removed."""
        n = 0
        for node_id in node_ids:
            if self.remove(node_id):
                n += 1
        return n

    def remove_link(self, link: int) -> list:
        """Drop every route through ``link``; returns the removed ids, sorted."""
        ids = self._by_link.pop(link, None)
        if not ids:
            return []
        for node_id in ids:
            del self._next[node_id]
        return sorted(ids)

    def ids_via(self, link: int) -> list:
        return sorted(self._by_link.get(link, ()))

    def links(self) -> list:
        return sorted(self._by_link)

    def clear(self) -> None:
        self._next.clear()
        self._by_link.clear()


class Forwarder:
    """Decides where each message goes: local, a child, up, broadcast, or drop.

    Broadcasts (``dst == BROADCAST_ID``) are suppressed when their (src, msg_id)
    was seen within the last ``window`` broadcasts; a message whose ttl is 0 is
    not forwarded.  Decisions never raise: bad frames are counted and dropped.
    """

    def __init__(self, node_id: int, codec: FrameCodec, routes: RoutingTable, window: int = 4096):
        self._node_id = _check(node_id, _U32, "node_id")
        self._codec = codec
        self._routes = routes
        if window < 1:
            raise ValueError("window must be >= 1")
        self._window = int(window)
        self._ring = [None] * self._window
        self._pos = 0
        self._seen = set()
        self._children = set()
        self._has_parent = False
        self._c = {
            "routed": 0,
            "delivered": 0,
            "forwarded_down": 0,
            "forwarded_up": 0,
            "broadcast": 0,
            "dropped_duplicate": 0,
            "dropped_ttl": 0,
            "dropped_malformed": 0,
            "dropped_unroutable": 0,
            "dropped_loop": 0,
        }

    @property
    def node_id(self) -> int:
        return self._node_id

    @node_id.setter
    def node_id(self, value: int) -> None:
        self._node_id = _check(value, _U32, "node_id")

    @property
    def has_parent(self) -> bool:
        return self._has_parent

    @has_parent.setter
    def has_parent(self, value: bool) -> None:
        self._has_parent = bool(value)

    @property
    def routes(self) -> RoutingTable:
        return self._routes

    def add_child(self, link: int) -> None:
        if link < 0:
            raise ValueError(f"link must be >= 0, got {link}")
        self._children.add(link)

    def remove_child(self, link: int) -> list:
        """Forget a child link and its whole subtree; returns the lost ids."""
        self._children.discard(link)
        return self._routes.remove_link(link)

    def children(self) -> list:
        return sorted(self._children)

    def broadcast_links(self, from_link: int) -> list:
        """Child links a broadcast that arrived on ``from_link`` goes on to."""
        return sorted(c for c in self._children if c != from_link)

    def seen(self, src: int, msg_id: int) -> bool:
        """Record (src, msg_id); True if it was already in the window."""
        return self._seen_key(_check(src, _U32, "src"), _check(msg_id, _U64, "msg_id"))

    def _seen_key(self, src: int, msg_id: int) -> bool:
        key = ((msg_id * _GOLDEN) & _U64) ^ src
        if key in self._seen:
            return True
        old = self._ring[self._pos]
        if old is not None:
            self._seen.discard(old)
        self._ring[self._pos] = key
        self._seen.add(key)
        self._pos = (self._pos + 1) % self._window
        return False

    def route(self, frame, from_link: int) -> int:
        """Decision for one header frame that arrived on ``from_link``."""
        c = self._c
        c["routed"] += 1
        try:
            h = self._codec.parse(frame)
        except ValueError:
            c["dropped_malformed"] += 1
            return LINK_DROP
        dst = h.dst
        if dst == BROADCAST_ID:
            if self._seen_key(h.src, h.msg_id):
                c["dropped_duplicate"] += 1
                return LINK_DROP
            c["broadcast"] += 1
            return LINK_BROADCAST
        if dst == self._node_id:
            c["delivered"] += 1
            return LINK_LOCAL
        if h.ttl == 0:
            c["dropped_ttl"] += 1
            return LINK_DROP
        link = self._routes.lookup(dst)
        if link >= 0:
            if link == from_link:
                c["dropped_loop"] += 1
                return LINK_DROP
            c["forwarded_down"] += 1
            return link
        if self._has_parent and from_link != LINK_UP:
            c["forwarded_up"] += 1
            return LINK_UP
        c["dropped_unroutable"] += 1
        return LINK_DROP

    def route_batch(self, frames, from_link: int) -> list:
        """``route`` for every header frame of a batch; one decision per frame."""
        return [self.route(f, from_link) for f in frames]

    def statistics(self):
        return _snapshot(self._c)


class Aggregator:
    """Convergecast bookkeeping: which links still owe a reply to each operation."""

    def __init__(self):
        self._ops = {}  # op id -> [owing set, ok, failed, deadline, state]
        self._heap = []
        self._c = {"opened": 0, "completed": 0, "expired": 0, "late_replies": 0, "duplicate_replies": 0}

    def __len__(self) -> int:
        return len(self._ops)

    def __contains__(self, op_id) -> bool:
        return op_id in self._ops

    def open(self, op_id: int, links, deadline: float) -> None:
        op_id = _check(op_id, _U64, "op_id")
        if op_id in self._ops:
            raise ValueError(f"operation {op_id} is already open")
        owing = set()
        for link in links:
            owing.add(int(link))
        self._ops[op_id] = [owing, 0, 0, float(deadline), 0]
        heapq.heappush(self._heap, (float(deadline), op_id))
        self._c["opened"] += 1
        if not owing:
            self._ops[op_id][4] = 1
            self._c["completed"] += 1

    def reply(self, op_id: int, link: int, ok: int = 0, failed: int = 0) -> bool:
        """Merge one child's partial counts; True when no link owes a reply any more."""
        op = self._ops.get(op_id)
        if op is None or op[4] == 2:
            self._c["late_replies"] += 1
            return False
        if link not in op[0]:
            self._c["duplicate_replies"] += 1
            return False
        op[0].discard(link)
        op[1] += ok
        op[2] += failed
        if not op[0] and op[4] == 0:
            op[4] = 1
            self._c["completed"] += 1
            return True
        return False

    def forget_link(self, link: int) -> list:
        """A link died: it owes nothing any more.  Returns op ids it completed."""
        done = []
        for op_id, op in self._ops.items():
            if link in op[0]:
                op[0].discard(link)
                if not op[0] and op[4] == 0:
                    op[4] = 1
                    self._c["completed"] += 1
                    done.append(op_id)
        return sorted(done)

    def owing(self, op_id: int) -> list:
        return sorted(self._ops[op_id][0])

    def counts(self, op_id: int) -> tuple:
        op = self._ops[op_id]
        return (op[1], op[2])

    def is_complete(self, op_id: int) -> bool:
        return self._ops[op_id][4] == 1

    def expired(self, now: float) -> list:
        """Open, incomplete operations whose deadline is <= now; each reported once."""
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, op_id = heapq.heappop(heap)
            op = self._ops.get(op_id)
            # op[3] <= now: skip a stale entry left by a closed op whose id was reopened.
            if op is not None and op[4] == 0 and op[3] <= now:
                op[4] = 2
                self._c["expired"] += 1
                out.append(op_id)
        return out

    def close(self, op_id: int) -> tuple:
        """Forget an operation; returns (ok, failed, owing links)."""
        op = self._ops.pop(op_id)
        return (op[1], op[2], sorted(op[0]))

    def statistics(self):
        return _snapshot(self._c)


class LoadTable:
    """Per-worker load (reported queue length + own in-flight count).

    ``pick`` returns the least-loaded worker in O(log n) from an indexed heap
    ordered by (load, stamp); the stamp is renewed on each pick, so equally
    loaded workers are served in turn.  ``pick_lottery`` draws a worker with
    probability proportional to its spare capacity (Fenwick tree, O(log n)).
    """

    def __init__(self):
        self._slot = {}  # worker id -> slot
        self._wid = []  # slot -> worker id (or -1)
        self._queue = []
        self._inflight = []
        self._cap = []
        self._stamp = []
        self._hpos = []  # slot -> heap index, -1 when free
        self._heap = []  # heap of slots
        self._fen = [0]  # 1-based Fenwick tree over spare capacity
        self._spare = []
        self._free = []
        self._clock = 0
        self._c = {"picks": 0, "lottery_picks": 0, "reports": 0, "dispatched": 0, "completed": 0}

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, worker_id) -> bool:
        return worker_id in self._slot

    def workers(self) -> list:
        return sorted(self._slot)

    # -- heap over (load, stamp) -------------------------------------------
    def _key(self, s):
        return (self._queue[s] + self._inflight[s], self._stamp[s])

    def _swap(self, i, j):
        h = self._heap
        h[i], h[j] = h[j], h[i]
        self._hpos[h[i]] = i
        self._hpos[h[j]] = j

    def _up(self, i):
        h = self._heap
        while i > 0:
            p = (i - 1) >> 1
            if self._key(h[i]) < self._key(h[p]):
                self._swap(i, p)
                i = p
            else:
                break

    def _down(self, i):
        h = self._heap
        n = len(h)
        while True:
            l = 2 * i + 1
            if l >= n:
                break
            m = l
            r = l + 1
            if r < n and self._key(h[r]) < self._key(h[l]):
                m = r
            if self._key(h[m]) < self._key(h[i]):
                self._swap(i, m)
                i = m
            else:
                break

    def _fix(self, s):
        i = self._hpos[s]
        self._up(i)
        self._down(self._hpos[s])
        self._set_spare(s)

    # -- Fenwick over spare capacity ---------------------------------------
    def _set_spare(self, s):
        load = self._queue[s] + self._inflight[s]
        spare = self._cap[s] - load if self._wid[s] >= 0 and self._cap[s] > load else 0
        delta = spare - self._spare[s]
        if delta:
            self._spare[s] = spare
            i = s + 1
            n = len(self._fen) - 1
            while i <= n:
                self._fen[i] += delta
                i += i & -i

    def _total_spare(self):
        total = 0
        i = len(self._fen) - 1
        while i > 0:
            total += self._fen[i]
            i -= i & -i
        return total

    # -- public API ----------------------------------------------------------
    def add(self, worker_id: int, capacity: int = 16) -> None:
        worker_id = _check(worker_id, _U32, "worker_id")
        capacity = _check(capacity, _U32, "capacity")
        if worker_id in self._slot:
            raise ValueError(f"worker {worker_id} is already in the table")
        if self._free:
            s = self._free.pop()
        else:
            s = len(self._wid)
            for lst in (self._wid, self._queue, self._inflight, self._cap, self._stamp, self._hpos, self._spare):
                lst.append(0)
            self._grow_fenwick()
        self._slot[worker_id] = s
        self._wid[s] = worker_id
        self._queue[s] = 0
        self._inflight[s] = 0
        self._cap[s] = capacity
        self._clock += 1
        self._stamp[s] = self._clock
        self._spare[s] = 0
        self._heap.append(s)
        self._hpos[s] = len(self._heap) - 1
        self._up(self._hpos[s])
        self._set_spare(s)

    def _grow_fenwick(self):
        # Rebuild: the new node n covers (n - lowbit(n), n], which may include old slots.
        n = len(self._wid)
        self._fen.append(0)
        lo = n - (n & -n)
        self._fen[n] = sum(self._spare[lo:n - 1]) if n > 1 else 0

    def remove(self, worker_id: int) -> None:
        s = self._slot.pop(worker_id)
        i = self._hpos[s]
        last = len(self._heap) - 1
        if i != last:
            self._swap(i, last)
        self._heap.pop()
        self._hpos[s] = -1
        if i < len(self._heap):
            self._up(i)
            self._down(i)
        self._wid[s] = -1
        self._set_spare(s)
        self._free.append(s)

    def report(self, worker_id: int, queue_len: int) -> None:
        s = self._slot[worker_id]
        self._queue[s] = _check(queue_len, _U32, "queue_len")
        self._c["reports"] += 1
        self._fix(s)

    def dispatched(self, worker_id: int, n: int = 1) -> None:
        s = self._slot[worker_id]
        self._inflight[s] += _check(n, _U32, "n")
        self._c["dispatched"] += n
        self._fix(s)

    def completed(self, worker_id: int, n: int = 1) -> None:
        s = self._slot[worker_id]
        n = _check(n, _U32, "n")
        self._inflight[s] = self._inflight[s] - n if self._inflight[s] > n else 0
        self._c["completed"] += n
        self._fix(s)

    def load(self, worker_id: int) -> int:
        s = self._slot[worker_id]
        return self._queue[s] + self._inflight[s]

    def inflight(self, worker_id: int) -> int:
        return self._inflight[self._slot[worker_id]]

    def queue(self, worker_id: int) -> int:
        return self._queue[self._slot[worker_id]]

    def pick(self) -> int:
        """Least-loaded worker; among equals, the one picked longest ago."""
        if not self._heap:
            raise NoWorkers("no workers in the load table")
        s = self._heap[0]
        self._clock += 1
        self._stamp[s] = self._clock
        self._down(0)
        self._c["picks"] += 1
        return self._wid[s]

    def acquire(self) -> int:
        """``pick`` and count one request in flight on the chosen worker."""
        wid = self.pick()
        self.dispatched(wid)
        return wid

    def pick_lottery(self, r: float) -> int:
        """Draw with probability proportional to spare capacity; ``r`` in [0, 1).

        Falls back to :meth:`pick` when no worker has spare capacity.
        """
        if not self._heap:
            raise NoWorkers("no workers in the load table")
        if not 0.0 <= r < 1.0:
            raise ValueError(f"r must be in [0, 1), got {r}")
        total = self._total_spare()
        if total <= 0:
            return self.pick()
        # r * total rounds in floating point; clamp so r close to 1 cannot overshoot.
        target = min(int(r * total), total - 1)
        # Smallest slot whose prefix sum exceeds target (Fenwick descent).
        n = len(self._fen) - 1
        pos = 0
        step = 1
        while step * 2 <= n:
            step *= 2
        while step:
            nxt = pos + step
            if nxt <= n and self._fen[nxt] <= target:
                pos = nxt
                target -= self._fen[nxt]
            step >>= 1
        self._c["lottery_picks"] += 1
        return self._wid[pos]

    def statistics(self):
        return _snapshot(self._c)


class Credits:
    """Credit-based flow control counters, one balance per peer."""

    def __init__(self, initial: int):
        self._initial = _check(initial, _U32, "initial")
        self._bal = {}
        self._c = {"granted": 0, "consumed": 0, "stalled": 0}

    def available(self, peer) -> int:
        return self._bal.get(peer, self._initial)

    def grant(self, peer, n: int) -> int:
        n = _check(n, _U32, "n")
        b = self._bal.get(peer, self._initial) + n
        self._bal[peer] = b
        self._c["granted"] += n
        return b

    def take(self, peer, n: int = 1) -> bool:
        """Consume ``n`` credits if available; False (and counted) if not."""
        n = _check(n, _U32, "n")
        b = self._bal.get(peer, self._initial)
        if b < n:
            self._c["stalled"] += 1
            return False
        self._bal[peer] = b - n
        self._c["consumed"] += n
        return True

    def forget(self, peer) -> None:
        self._bal.pop(peer, None)

    def statistics(self):
        return _snapshot(self._c)


# The I/O functions live in their own module (pyzmq here; libzmq directly in
# the compiled twin's _zmqdirect.pxi) and are part of this twin's API.
from core._zmqio_py import drain, events, relay, send_nowait  # noqa: E402
