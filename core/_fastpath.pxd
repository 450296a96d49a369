# cython: language_level=3
"""Declarations of the compiled fast path (``core/_fastpath.pyx``).

Every class here mirrors the class of the same name in ``core/_fastpath_py.py``;
the C fields below are what the pure twin keeps in Python lists, dicts and sets.
"""

cimport cython
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t


# Open-addressing hash map uint64 -> int64 (linear probing, backward-shift
# deletion, so no tombstones).  ``used`` marks live slots because every uint64
# is a valid key (dedup keys cover the whole range).
cdef struct U64Map:
    uint64_t *keys
    int64_t *vals
    uint8_t *used
    size_t mask       # capacity - 1; capacity is a power of two
    size_t n          # live entries


# The fixed header, decoded.
cdef struct HeaderC:
    uint8_t version
    uint8_t type
    uint16_t flags
    uint64_t msg_id
    uint64_t ref
    uint32_t src
    uint32_t dst
    uint8_t ttl
    uint8_t hops
    uint16_t extra
    uint32_t body_len


# One entry of the Aggregator's deadline heap; ordered like the pure twin's
# ``(deadline, op_id)`` tuples.
cdef struct Deadline:
    double deadline
    uint64_t op_id


@cython.final
cdef class Header:
    cdef HeaderC h


@cython.final
cdef class FrameCodec:
    cdef uint8_t _version
    cdef bint _valid[256]
    cdef uint32_t _max_body
    cdef uint32_t _max_frame
    cdef uint64_t c_packed, c_parsed, c_truncated, c_too_large
    cdef uint64_t c_bad_version, c_unknown_type, c_malformed

    cdef int _parse(self, const unsigned char *p, Py_ssize_t n, HeaderC *out) noexcept
    cdef int _raise_parse_error(self, int code, Py_ssize_t n, HeaderC *h) except -1
    cdef int _parse_obj(self, object frame, HeaderC *h, unsigned char *copy) except -1


@cython.final
cdef class RoutingTable:
    cdef U64Map _next      # node id -> link
    cdef U64Map _count     # link -> number of ids routed through it

    cdef int _add(self, object node_id, object link) except -1
    cdef bint _remove(self, uint32_t node_id) noexcept
    cdef list _ids_via(self, int64_t link)


@cython.final
cdef class Forwarder:
    cdef uint32_t _node_id
    cdef FrameCodec _codec
    cdef RoutingTable _routes
    cdef Py_ssize_t _window
    cdef uint64_t *_ring   # dedup keys, oldest overwritten first
    cdef Py_ssize_t _pos
    cdef Py_ssize_t _filled
    cdef U64Map _seen      # dedup key -> ring position
    cdef set _children
    cdef bint _has_parent
    cdef uint64_t c_routed, c_delivered, c_forwarded_down, c_forwarded_up
    cdef uint64_t c_broadcast, c_dropped_duplicate, c_dropped_ttl
    cdef uint64_t c_dropped_malformed, c_dropped_unroutable, c_dropped_loop

    cdef bint _seen_key(self, uint32_t src, uint64_t msg_id) noexcept
    cdef int64_t _route(self, const unsigned char *p, Py_ssize_t n, int64_t from_link) noexcept
    cdef int64_t _route_obj(self, object frame, int64_t from_link) except? -9


@cython.final
cdef class _Op:
    cdef set owing
    cdef object ok
    cdef object failed
    cdef double deadline
    cdef int state            # 0 open, 1 complete, 2 expired


@cython.final
cdef class Aggregator:
    cdef dict _ops            # op id -> _Op
    cdef Deadline *_heap
    cdef Py_ssize_t _hlen
    cdef Py_ssize_t _hcap
    cdef uint64_t c_opened, c_completed, c_expired, c_late_replies, c_duplicate_replies

    cdef int _push(self, double deadline, uint64_t op_id) except -1
    cdef Deadline _pop(self) noexcept


@cython.final
cdef class LoadTable:
    cdef U64Map _slot         # worker id -> slot
    cdef Py_ssize_t _nslots   # slots ever created (Fenwick size)
    cdef Py_ssize_t _cap      # allocated slots
    cdef int64_t *_wid        # slot -> worker id, -1 when free
    cdef uint64_t *_queue
    cdef uint64_t *_inflight
    cdef uint64_t *_capacity
    cdef uint64_t *_stamp
    cdef Py_ssize_t *_hpos    # slot -> heap index, -1 when free
    cdef int64_t *_spare
    cdef int64_t *_fen        # 1-based Fenwick tree over spare capacity
    cdef Py_ssize_t *_heap    # heap of slots
    cdef Py_ssize_t _hlen
    cdef Py_ssize_t *_free    # LIFO stack of free slots
    cdef Py_ssize_t _nfree
    cdef uint64_t _clock
    cdef uint64_t c_picks, c_lottery_picks, c_reports, c_dispatched, c_completed

    cdef int _grow(self) except -1
    cdef Py_ssize_t _slot_of(self, object worker_id) except -1
    cdef bint _lt(self, Py_ssize_t a, Py_ssize_t b) noexcept
    cdef void _swap(self, Py_ssize_t i, Py_ssize_t j) noexcept
    cdef void _up(self, Py_ssize_t i) noexcept
    cdef void _down(self, Py_ssize_t i) noexcept
    cdef void _fix(self, Py_ssize_t s) noexcept
    cdef void _set_spare(self, Py_ssize_t s) noexcept
    cdef int64_t _total_spare(self) noexcept
    cdef Py_ssize_t _pick(self) except -1
    cdef int _dispatched(self, Py_ssize_t s, uint64_t n) noexcept


@cython.final
cdef class Credits:
    cdef object _initial
    cdef dict _bal
    cdef uint64_t c_granted, c_consumed, c_stalled
