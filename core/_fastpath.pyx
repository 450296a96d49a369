# cython: language_level=3, cdivision=True
"""Compiled twin of ``core._fastpath_py``: same names, signatures, results and
exception types, with the state in C structures.

* Header parsing reads the frame's buffer directly (a ``bytes`` fast path, the
  buffer protocol otherwise); the fields are little-endian.
* ``RoutingTable`` and the ``Forwarder``'s dedup window are open-addressing C
  hash maps (``_cmap.pxi``, ``_routing.pxi``); the window evicts in ring order
  like the twin, and ``route_batch`` makes no Python call per frame.
* ``LoadTable`` keeps an indexed binary heap ordered by (load, stamp) and a
  Fenwick tree over spare capacity, with the twin's tie-breaking and LIFO slot
  reuse, so both twins produce the same pick sequences (``_balance.pxi``).
* ``drain`` and ``relay`` call libzmq directly through the instance pyzmq has
  already loaded (``_zmqdirect.pxi``).

Import this module only through ``core.fastpath``.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_CheckExact, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.list cimport PyList_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong, PyLong_CheckExact
from cpython.number cimport PyNumber_Index
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from libc.stdint cimport INT64_MIN, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

import math
from types import MappingProxyType

from core.errors import (
    BadVersion,
    FrameTooLarge,
    MalformedFrame,
    NoWorkers,
    TruncatedFrame,
    UnknownType,
)

cdef extern from "Python.h":
    # Borrowed-reference variants used by route_batch's loop (no refcounting).
    bint _bytes_check_exact "PyBytes_CheckExact"(PyObject *o) noexcept
    char *_bytes_as_string "PyBytes_AS_STRING"(PyObject *o) noexcept
    Py_ssize_t _bytes_size "PyBytes_GET_SIZE"(PyObject *o) noexcept
    PyObject *_list_get_item "PyList_GET_ITEM"(object lst, Py_ssize_t i) noexcept
    PyObject *_tuple_get_item "PyTuple_GET_ITEM"(object tup, Py_ssize_t i) noexcept
    bint _list_check_exact "PyList_CheckExact"(object o) noexcept
    bint _tuple_check_exact "PyTuple_CheckExact"(object o) noexcept
    Py_ssize_t _tuple_size "PyTuple_GET_SIZE"(object o) noexcept
    object _list_new "PyList_New"(Py_ssize_t n)
    void _list_set_item "PyList_SET_ITEM"(object lst, Py_ssize_t i, PyObject *o) noexcept
    PyObject *_long_from_ll "PyLong_FromLongLong"(long long v) noexcept
    Py_ssize_t PY_SSIZE_T_MAX

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

cdef enum:
    _HEADER_SIZE = 36
    _LINK_UP = -1
    _LINK_LOCAL = -2
    _LINK_DROP = -3
    _LINK_BROADCAST = -4
    # FrameCodec._parse results (0 = valid)
    _E_TRUNCATED = 1
    _E_LONG = 2
    _E_VERSION = 3
    _E_TYPE = 4
    _E_BODY = 5

cdef uint32_t _BROADCAST = 0xFFFFFFFFU
cdef uint64_t _U8 = 0xFF
cdef uint64_t _U16 = 0xFFFF
cdef uint64_t _U32 = 0xFFFFFFFFU
cdef uint64_t _U64 = 0xFFFFFFFFFFFFFFFFULL
cdef uint64_t _I32 = 0x7FFFFFFF
cdef uint64_t _GOLDEN = 0x9E3779B97F4A7C15ULL  # multiplicative hash for dedup keys
# A from_link no link can equal: stands for ints outside int64 and non-ints.
cdef int64_t _NO_LINK = INT64_MIN

HEADER_SIZE = _HEADER_SIZE
BROADCAST_ID = 0xFFFFFFFF
LINK_UP = _LINK_UP
LINK_LOCAL = _LINK_LOCAL
LINK_DROP = _LINK_DROP
LINK_BROADCAST = _LINK_BROADCAST

include "_cmap.pxi"


# -- argument conversion: the pure twin's int semantics, in C -----------------

cdef object _check_py(object value, object limit, str name):
    value = int(value)
    if value < 0 or value > limit:
        raise OverflowError(f"{name}={value} out of range 0..{limit}")
    return value


cdef inline uint64_t _check(object value, uint64_t limit, str name) except? 0xFFFFFFFFFFFFFFFFULL:
    """``int(value)`` if it lies in 0..limit, else ``OverflowError`` (the twin's ``_check``)."""
    cdef int ovf = 0
    cdef long long v
    if PyLong_CheckExact(value):
        v = PyLong_AsLongLongAndOverflow(value, &ovf)
        if ovf == 0 and v >= 0 and <uint64_t>v <= limit:
            return <uint64_t>v
    return PyLong_AsUnsignedLongLong(_check_py(value, limit, name))


cdef int _key_of(object obj, uint64_t limit, uint64_t *out) except -1:
    """1 if ``obj`` finds an int key in 0..limit the way a dict lookup would, else 0.

    The pure twin keeps ids in dicts, so ``True`` or ``3.0`` find ids 1 and 3,
    other objects miss, and unhashable ones raise ``TypeError``.
    """
    cdef int ovf = 0
    cdef long long v
    if PyLong_CheckExact(obj):
        v = PyLong_AsLongLongAndOverflow(obj, &ovf)
        if ovf == 0 and v >= 0 and <uint64_t>v <= limit:
            out[0] = <uint64_t>v
            return 1
        return 0
    hash(obj)
    try:
        iv = int(obj)
    except (TypeError, ValueError, OverflowError):
        return 0
    if not (iv == obj) or iv < 0 or iv > limit:
        return 0
    out[0] = PyLong_AsUnsignedLongLong(iv)
    return 1


cdef int64_t _link_arg(object obj) except? -9:
    """``from_link`` as a C value that compares like the Python object would."""
    cdef int ovf = 0
    cdef long long v
    if not PyLong_CheckExact(obj):
        try:
            iv = int(obj)
        except (TypeError, ValueError, OverflowError):
            return _NO_LINK
        if not (iv == obj):
            return _NO_LINK
        obj = iv
    v = PyLong_AsLongLongAndOverflow(obj, &ovf)
    return _NO_LINK if ovf else v


cdef Py_ssize_t _count_arg(object n) except -1:
    """How many iterations ``while count < n`` makes (the twins' max_msgs loops)."""
    cdef int ovf = 0
    cdef long long v
    if PyLong_CheckExact(n):
        v = PyLong_AsLongLongAndOverflow(n, &ovf)
        if ovf:
            return 0 if n < 0 else PY_SSIZE_T_MAX
        return 0 if v < 0 else <Py_ssize_t>v
    if not (n > 0):
        return 0
    if n >= PY_SSIZE_T_MAX:
        return PY_SSIZE_T_MAX
    return <Py_ssize_t>math.ceil(n)


cdef inline object _snapshot(dict counters):
    return MappingProxyType(counters)


# -- frames -------------------------------------------------------------------

cdef inline uint16_t _ld16(const unsigned char *p) noexcept nogil:
    return <uint16_t>(<uint16_t>p[0] | (<uint16_t>p[1] << 8))


cdef inline uint32_t _ld32(const unsigned char *p) noexcept nogil:
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16)
            | (<uint32_t>p[3] << 24))


cdef inline uint64_t _ld64(const unsigned char *p) noexcept nogil:
    return <uint64_t>_ld32(p) | (<uint64_t>_ld32(p + 4) << 32)


cdef inline void _st16(unsigned char *p, uint16_t v) noexcept nogil:
    p[0] = <unsigned char>v
    p[1] = <unsigned char>(v >> 8)


cdef inline void _st32(unsigned char *p, uint32_t v) noexcept nogil:
    _st16(p, <uint16_t>v)
    _st16(p + 2, <uint16_t>(v >> 16))


cdef inline void _st64(unsigned char *p, uint64_t v) noexcept nogil:
    _st32(p, <uint32_t>v)
    _st32(p + 4, <uint32_t>(v >> 32))


cdef inline void _decode(const unsigned char *p, HeaderC *h) noexcept nogil:
    # Layout: <BBHQQIIBBHI (bus/protocol.py documents the fields).
    h.version = p[0]
    h.type = p[1]
    h.flags = _ld16(p + 2)
    h.msg_id = _ld64(p + 4)
    h.ref = _ld64(p + 12)
    h.src = _ld32(p + 20)
    h.dst = _ld32(p + 24)
    h.ttl = p[28]
    h.hops = p[29]
    h.extra = _ld16(p + 30)
    h.body_len = _ld32(p + 32)


cdef inline void _encode(unsigned char *p, const HeaderC *h) noexcept nogil:
    p[0] = h.version
    p[1] = h.type
    _st16(p + 2, h.flags)
    _st64(p + 4, h.msg_id)
    _st64(p + 12, h.ref)
    _st32(p + 20, h.src)
    _st32(p + 24, h.dst)
    p[28] = h.ttl
    p[29] = h.hops
    _st16(p + 30, h.extra)
    _st32(p + 32, h.body_len)


cdef inline void _advance(unsigned char *p) noexcept nogil:
    # ttl - 1 and hops + 1, saturating (FrameCodec.advance).
    if p[28] > 0:
        p[28] -= 1
    if p[29] < 255:
        p[29] += 1


cdef int _get_frame(object frame, const unsigned char **p, Py_ssize_t *n, Py_buffer *view) except -1:
    """Point ``p``/``n`` at a frame's bytes.

    Returns 0 when the pointer is borrowed from a bytes/bytearray, 1 when
    ``view`` holds a buffer to release, 2 when the object is a buffer that is
    not C-contiguous: ``n`` is its size and ``p`` is NULL (the pure twin can
    measure such a frame but fails to unpack it).
    """
    if PyBytes_Check(frame):
        p[0] = <const unsigned char *>PyBytes_AS_STRING(frame)
        n[0] = PyBytes_GET_SIZE(frame)
        return 0
    if PyByteArray_CheckExact(frame):
        p[0] = <const unsigned char *>PyByteArray_AS_STRING(frame)
        n[0] = PyByteArray_GET_SIZE(frame)
        return 0
    try:
        PyObject_GetBuffer(frame, view, PyBUF_SIMPLE)
    except BufferError:
        n[0] = memoryview(frame).nbytes
        p[0] = NULL
        return 2
    except TypeError:
        memoryview(frame)  # not a buffer: raise the twin's TypeError (its message)
        raise
    p[0] = <const unsigned char *>view.buf
    n[0] = view.len
    return 1


cdef Header _new_header(const HeaderC *h):
    cdef Header o = Header.__new__(Header)
    o.h = h[0]
    return o


cdef class Header:
    """A parsed header; fields are read-only.

    Built by :meth:`FrameCodec.parse`; built by hand, every field is range-checked
    against its wire width (``OverflowError``), as the compiled twin stores them in C.
    """

    def __init__(self, version, type, flags, msg_id, ref, src, dst, ttl, hops, extra, body_len):
        self.h.version = <uint8_t>_check(version, _U8, "version")
        self.h.type = <uint8_t>_check(type, _U8, "type")
        self.h.flags = <uint16_t>_check(flags, _U16, "flags")
        self.h.msg_id = _check(msg_id, _U64, "msg_id")
        self.h.ref = _check(ref, _U64, "ref")
        self.h.src = <uint32_t>_check(src, _U32, "src")
        self.h.dst = <uint32_t>_check(dst, _U32, "dst")
        self.h.ttl = <uint8_t>_check(ttl, _U8, "ttl")
        self.h.hops = <uint8_t>_check(hops, _U8, "hops")
        self.h.extra = <uint16_t>_check(extra, _U16, "extra")
        self.h.body_len = <uint32_t>_check(body_len, _U32, "body_len")

    def __setattr__(self, name, value):
        raise AttributeError("Header is read-only")

    @property
    def version(self):
        return self.h.version

    @property
    def type(self):
        return self.h.type

    @property
    def flags(self):
        return self.h.flags

    @property
    def msg_id(self):
        return self.h.msg_id

    @property
    def ref(self):
        return self.h.ref

    @property
    def src(self):
        return self.h.src

    @property
    def dst(self):
        return self.h.dst

    @property
    def ttl(self):
        return self.h.ttl

    @property
    def hops(self):
        return self.h.hops

    @property
    def extra(self):
        return self.h.extra

    @property
    def body_len(self):
        return self.h.body_len

    def as_tuple(self):
        """(version, type, flags, msg_id, ref, src, dst, ttl, hops, extra, body_len)."""
        h = &self.h
        return (h.version, h.type, h.flags, h.msg_id, h.ref, h.src, h.dst, h.ttl, h.hops,
                h.extra, h.body_len)

    def __eq__(self, other):
        if not isinstance(other, Header):
            return NotImplemented
        return self.as_tuple() == (<Header>other).as_tuple()

    def __ne__(self, other):
        if not isinstance(other, Header):
            return NotImplemented
        return self.as_tuple() != (<Header>other).as_tuple()

    def __hash__(self):
        return hash(self.as_tuple())

    def __repr__(self):
        h = &self.h
        return (
            f"Header(type={h.type}, flags={h.flags:#x}, msg_id={h.msg_id}, "
            f"ref={h.ref}, src={h.src}, dst={h.dst}, ttl={h.ttl}, "
            f"hops={h.hops}, extra={h.extra}, body_len={h.body_len})"
        )


cdef class FrameCodec:
    """Packs and validates the fixed binary header.

    ``valid_types`` and the limits come from ``bus.protocol`` (the wire-format
    owner); the codec only enforces them.
    """

    def __init__(self, version, valid_types, max_body, max_frame):
        self._version = <uint8_t>_check(version, _U8, "version")
        memset(self._valid, 0, sizeof(self._valid))
        for t in valid_types:
            self._valid[_check(t, _U8, "type")] = True
        self._max_body = <uint32_t>_check(max_body, _U32, "max_body")
        self._max_frame = <uint32_t>_check(max_frame, _U32, "max_frame")
        self.c_packed = self.c_parsed = self.c_truncated = self.c_too_large = 0
        self.c_bad_version = self.c_unknown_type = self.c_malformed = 0

    @property
    def version(self):
        return self._version

    @property
    def max_body(self):
        return self._max_body

    @property
    def max_frame(self):
        return self._max_frame

    def is_valid_type(self, type):
        # The twin indexes a list: only true integers (__index__) are accepted.
        return 0 <= type <= 255 and self._valid[<int>PyNumber_Index(type)]

    def pack(self, type, flags=0, msg_id=0, ref=0, src=0, dst=0, ttl=32, hops=0, extra=0, body_len=0):
        """Build a header; raises ``UnknownType``, ``FrameTooLarge`` or ``OverflowError``."""
        cdef HeaderC h
        cdef unsigned char buf[_HEADER_SIZE]
        h.type = <uint8_t>_check(type, _U8, "type")
        if not self._valid[h.type]:
            raise UnknownType(f"unknown message type {h.type}")
        h.body_len = <uint32_t>_check(body_len, _U32, "body_len")
        if h.body_len > self._max_body:
            raise FrameTooLarge(f"body of {h.body_len} bytes exceeds the limit of {self._max_body}")
        h.version = self._version
        h.flags = <uint16_t>_check(flags, _U16, "flags")
        h.msg_id = _check(msg_id, _U64, "msg_id")
        h.ref = _check(ref, _U64, "ref")
        h.src = <uint32_t>_check(src, _U32, "src")
        h.dst = <uint32_t>_check(dst, _U32, "dst")
        h.ttl = <uint8_t>_check(ttl, _U8, "ttl")
        h.hops = <uint8_t>_check(hops, _U8, "hops")
        h.extra = <uint16_t>_check(extra, _U16, "extra")
        _encode(buf, &h)
        self.c_packed += 1
        return PyBytes_FromStringAndSize(<char *>buf, _HEADER_SIZE)

    cdef int _parse(self, const unsigned char *p, Py_ssize_t n, HeaderC *out) noexcept:
        # Counts like the twin's parse(); returns 0 or an _E_* code instead of raising.
        if n < _HEADER_SIZE:
            self.c_truncated += 1
            return _E_TRUNCATED
        if n > _HEADER_SIZE:
            self.c_malformed += 1
            return _E_LONG
        _decode(p, out)
        if out.version != self._version:
            self.c_bad_version += 1
            return _E_VERSION
        if not self._valid[out.type]:
            self.c_unknown_type += 1
            return _E_TYPE
        if out.body_len > self._max_body:
            self.c_too_large += 1
            return _E_BODY
        self.c_parsed += 1
        return 0

    cdef int _raise_parse_error(self, int code, Py_ssize_t n, HeaderC *h) except -1:
        if code == _E_TRUNCATED:
            raise TruncatedFrame(f"header frame of {n} bytes, expected {_HEADER_SIZE}")
        if code == _E_LONG:
            raise MalformedFrame(f"header frame of {n} bytes, expected {_HEADER_SIZE}")
        if code == _E_VERSION:
            raise BadVersion(f"protocol version {h.version}, this build speaks {self._version}")
        if code == _E_TYPE:
            raise UnknownType(f"unknown message type {h.type}")
        raise FrameTooLarge(f"body of {h.body_len} bytes exceeds the limit of {self._max_body}")

    cdef int _parse_obj(self, object frame, HeaderC *h, unsigned char *copy) except -1:
        # parse() for any bytes-like object; ``copy`` (if not NULL) receives the 36 bytes.
        cdef const unsigned char *p
        cdef Py_ssize_t n
        cdef Py_buffer view
        cdef int kind = _get_frame(frame, &p, &n, &view)
        cdef int code
        if kind == 2:
            if n == _HEADER_SIZE:
                PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)  # raises BufferError
            code = self._parse(NULL, n, h)  # n != 36: never dereferences
        else:
            try:
                code = self._parse(p, n, h)
                if code == 0 and copy != NULL:
                    memcpy(copy, p, _HEADER_SIZE)
            finally:
                if kind == 1:
                    PyBuffer_Release(&view)
        if code:
            self._raise_parse_error(code, n, h)
        return 0

    def parse(self, frame):
        """Validate and decode a header frame (any bytes-like object)."""
        cdef HeaderC h
        self._parse_obj(frame, &h, NULL)
        return _new_header(&h)

    def check_frame_size(self, nbytes):
        """Raise ``FrameTooLarge`` for a frame over ``max_frame`` bytes."""
        if nbytes > self._max_frame:
            self.c_too_large += 1
            raise FrameTooLarge(f"frame of {nbytes} bytes exceeds the limit of {self._max_frame}")

    def advance(self, frame):
        """Copy of a (valid) header with ttl decremented and hops incremented.

        Saturates: ttl never goes below 0 and hops never above 255.
        """
        cdef HeaderC h
        cdef unsigned char buf[_HEADER_SIZE]
        self._parse_obj(frame, &h, buf)
        _advance(buf)
        return PyBytes_FromStringAndSize(<char *>buf, _HEADER_SIZE)

    def statistics(self):
        return _snapshot({
            "packed": self.c_packed,
            "parsed": self.c_parsed,
            "truncated": self.c_truncated,
            "too_large": self.c_too_large,
            "bad_version": self.c_bad_version,
            "unknown_type": self.c_unknown_type,
            "malformed": self.c_malformed,
        })


include "_routing.pxi"
include "_balance.pxi"
include "_zmqdirect.pxi"
