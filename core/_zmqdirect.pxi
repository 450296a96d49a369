# Included by _fastpath.pyx: the one place where the fast path talks to libzmq.
#
# drain() and relay() call libzmq's zmq_msg_* functions directly instead of
# pyzmq's Python methods (a Python call per frame is most of a relay's cost).
# They must use the libzmq instance pyzmq has already loaded, never a second
# copy: a socket handle only means something to the library that created it.
# So, once, on first use:
#
#   1. find the path of the mapped file whose basename starts with "libzmq" in
#      /proc/self/maps (pyzmq wheels ship it as pyzmq.libs/libzmq-<hash>.so);
#      without one (libzmq linked statically into pyzmq, or no /proc), use
#      pyzmq's own extension module, whose handle also resolves its libzmq;
#   2. dlopen(path, RTLD_NOW | RTLD_NOLOAD): NOLOAD fails instead of loading a
#      library that is not already in the process;
#   3. dlsym the functions below into C function pointers and check that this
#      library reports the version pyzmq reports.
#
# Sockets come from pyzmq (``socket.underlying`` is the address of the libzmq
# socket).  Errors other than EAGAIN become zmq.ZMQError (or the same subclass
# pyzmq raises) here, at the boundary.  The GIL is held around the
# non-blocking calls (each costs far less than releasing and re-taking it) and
# released only around a send that has to block.

cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flags)
    void *dlsym(void *handle, const char *symbol)
    char *dlerror()
    int RTLD_NOW
    int RTLD_NOLOAD

cdef extern from "<errno.h>":
    int EAGAIN
    int EINTR

cdef extern from "Python.h":
    int PyErr_CheckSignals() except -1

cdef extern from *:
    """
    /* Same size and alignment as zmq.h's zmq_msg_t (64 opaque bytes). */
    typedef union { unsigned char _[64]; void *_p; double _d; } snsbus_zmq_msg_t;
    """
    ctypedef struct zmq_msg_t "snsbus_zmq_msg_t":
        pass

ctypedef int (*_msg_fn)(zmq_msg_t *msg) noexcept nogil
ctypedef int (*_msg_init_size_fn)(zmq_msg_t *msg, size_t size) noexcept nogil
ctypedef int (*_msg_io_fn)(zmq_msg_t *msg, void *socket, int flags) noexcept nogil
ctypedef void *(*_msg_data_fn)(zmq_msg_t *msg) noexcept nogil
ctypedef size_t (*_msg_size_fn)(const zmq_msg_t *msg) noexcept nogil
ctypedef int (*_msg_more_fn)(const zmq_msg_t *msg) noexcept nogil
ctypedef int (*_msg_get_fn)(const zmq_msg_t *msg, int property) noexcept nogil
ctypedef int (*_errno_fn)() noexcept nogil
ctypedef const char *(*_strerror_fn)(int errnum) noexcept nogil
ctypedef void (*_version_fn)(int *major, int *minor, int *patch) noexcept nogil
ctypedef int (*_send_fn)(void *socket, const void *buf, size_t len, int flags) noexcept nogil
ctypedef int (*_getsockopt_fn)(void *socket, int option, void *value, size_t *len) noexcept nogil

cdef struct _ZmqApi:
    bint ready
    _msg_fn msg_init
    _msg_init_size_fn msg_init_size
    _msg_io_fn msg_recv
    _msg_io_fn msg_send
    _send_fn send
    _getsockopt_fn getsockopt
    _msg_fn msg_close
    _msg_data_fn msg_data
    _msg_size_fn msg_size
    _msg_more_fn msg_more
    _msg_get_fn msg_get
    _errno_fn zerrno
    _strerror_fn zstrerror
    # libzmq constants, read from pyzmq (same values on every platform)
    int DONTWAIT
    int SNDMORE
    int SHARED
    int ETERM
    int EVENTS

cdef _ZmqApi _zmq
cdef object _zmqmod = None


def _libzmq_path(zmq_module):
    """Path of the libzmq pyzmq loaded (see the comment at the top of _zmqdirect.pxi)."""
    import os

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split(None, 5)
                if len(fields) == 6:
                    path = fields[5].rstrip("\n")
                    if os.path.basename(path).startswith("libzmq"):
                        return path
    except OSError:
        pass
    from zmq.backend.cython import _zmq as ext

    return ext.__file__


cdef void *_sym(void *handle, const char *name, object path) except NULL:
    cdef void *f = dlsym(handle, name)
    if f == NULL:
        raise ImportError(f"{name.decode()} not found in {path}")
    return f


cdef int _zmq_load() except -1:
    global _zmqmod
    cdef void *h
    cdef int major = 0, minor = 0, patch = 0
    if _zmq.ready:
        return 0
    import os
    import zmq

    path = _libzmq_path(zmq)
    h = dlopen(os.fsencode(path), RTLD_NOW | RTLD_NOLOAD)
    if h == NULL:
        err = dlerror()
        raise ImportError(
            f"libzmq at {path} is not loaded by pyzmq in this process: "
            f"{err.decode(errors='replace') if err != NULL else 'dlopen failed'}"
        )
    _zmq.msg_init = <_msg_fn>_sym(h, b"zmq_msg_init", path)
    _zmq.msg_init_size = <_msg_init_size_fn>_sym(h, b"zmq_msg_init_size", path)
    _zmq.msg_recv = <_msg_io_fn>_sym(h, b"zmq_msg_recv", path)
    _zmq.msg_send = <_msg_io_fn>_sym(h, b"zmq_msg_send", path)
    _zmq.send = <_send_fn>_sym(h, b"zmq_send", path)
    _zmq.getsockopt = <_getsockopt_fn>_sym(h, b"zmq_getsockopt", path)
    _zmq.msg_close = <_msg_fn>_sym(h, b"zmq_msg_close", path)
    _zmq.msg_data = <_msg_data_fn>_sym(h, b"zmq_msg_data", path)
    _zmq.msg_size = <_msg_size_fn>_sym(h, b"zmq_msg_size", path)
    _zmq.msg_more = <_msg_more_fn>_sym(h, b"zmq_msg_more", path)
    _zmq.msg_get = <_msg_get_fn>_sym(h, b"zmq_msg_get", path)
    _zmq.zerrno = <_errno_fn>_sym(h, b"zmq_errno", path)
    _zmq.zstrerror = <_strerror_fn>_sym(h, b"zmq_strerror", path)
    (<_version_fn>_sym(h, b"zmq_version", path))(&major, &minor, &patch)
    if (major, minor, patch) != zmq.zmq_version_info():
        raise ImportError(
            f"{path} is libzmq {major}.{minor}.{patch} but pyzmq uses {zmq.zmq_version()}"
        )
    _zmq.DONTWAIT = zmq.DONTWAIT
    _zmq.SNDMORE = zmq.SNDMORE
    _zmq.SHARED = zmq.SHARED
    _zmq.ETERM = zmq.ETERM
    _zmq.EVENTS = zmq.EVENTS
    _zmqmod = zmq
    _zmq.ready = True
    return 0


cdef int _raise_zmq(int err) except -1:
    # The exception pyzmq itself raises for this errno.
    msg = _zmq.zstrerror(err).decode(errors="replace")
    if err == EAGAIN:
        raise _zmqmod.Again(err, msg)
    if err == _zmq.ETERM:
        raise _zmqmod.ContextTerminated(err, msg)
    raise _zmqmod.ZMQError(err, msg)


cdef void *_handle(object socket) except NULL:
    cdef size_t addr = socket.underlying
    if addr == 0:
        # pyzmq sets the handle to NULL on close and raises ENOTSOCK.
        raise _zmqmod.ZMQError(_zmqmod.ENOTSOCK)
    return <void *>addr


# A message's frames: a small array on the caller's stack, moved to the heap
# when a message has more frames than it holds.
cdef struct _Frames:
    zmq_msg_t *msgs
    Py_ssize_t cap
    bint on_heap


cdef int _frames_grow(_Frames *f) except -1:
    cdef Py_ssize_t cap = 2 * f.cap
    cdef zmq_msg_t *m = <zmq_msg_t *>PyMem_Malloc(cap * sizeof(zmq_msg_t))
    if m == NULL:
        raise MemoryError()
    # libzmq itself moves zmq_msg_t by plain copy (its pipes store them by value).
    memcpy(m, f.msgs, f.cap * sizeof(zmq_msg_t))
    if f.on_heap:
        PyMem_Free(f.msgs)
    f.msgs = m
    f.cap = cap
    f.on_heap = True
    return 0


cdef inline void _close_frames(_Frames *f, Py_ssize_t n) noexcept:
    # Closing a frame that zmq_msg_send already took is a harmless no-op.
    cdef Py_ssize_t i
    for i in range(n):
        _zmq.msg_close(&f.msgs[i])


cdef Py_ssize_t _recv_message(void *sock, _Frames *f) except -1:
    """Receive every frame of one message without blocking.

    Returns the number of frames, or 0 when no message is waiting (EAGAIN).
    On error, no frame is left open.
    """
    cdef Py_ssize_t n = 0
    cdef int rc, err
    while True:
        if n == f.cap:
            try:
                _frames_grow(f)
            except MemoryError:
                _close_frames(f, n)
                raise
        _zmq.msg_init(&f.msgs[n])
        rc = _zmq.msg_recv(&f.msgs[n], sock, _zmq.DONTWAIT)
        if rc < 0:
            err = _zmq.zerrno()
            _zmq.msg_close(&f.msgs[n])
            if err == EINTR:
                try:
                    PyErr_CheckSignals()
                except BaseException:
                    _close_frames(f, n)
                    raise
                continue
            if err == EAGAIN and n == 0:
                return 0
            _close_frames(f, n)
            _raise_zmq(err)
        n += 1
        if not _zmq.msg_more(&f.msgs[n - 1]):
            return n


cdef int _send_frame(zmq_msg_t *m, void *sock, int flags) except -1:
    """zmq_msg_send, moving the frame; a full peer (EAGAIN) makes it block.

    The first attempt does not block and keeps the GIL; only a send that has
    to wait for room releases it, retrying after signals like pyzmq does.
    """
    cdef int rc, err = 0
    if _zmq.msg_send(m, sock, flags | _zmq.DONTWAIT) >= 0:
        return 0
    err = _zmq.zerrno()
    while err == EAGAIN or err == EINTR:
        if err == EINTR:
            PyErr_CheckSignals()
        with nogil:
            rc = _zmq.msg_send(m, sock, flags)
            err = 0 if rc >= 0 else _zmq.zerrno()
        if rc >= 0:
            return 0
    _raise_zmq(err)
    return -1


def drain(socket, max_msgs):
    """Receive up to ``max_msgs`` whole multipart messages without blocking.

    Returns a list of frame lists (bytes); stops at the first EAGAIN.
    """
    cdef Py_ssize_t limit = _count_arg(max_msgs)
    cdef zmq_msg_t local[8]
    cdef _Frames f
    cdef Py_ssize_t n, i
    cdef void *sock
    cdef list out = []
    cdef list parts
    if limit == 0:
        return out
    _zmq_load()
    sock = _handle(socket)
    f.msgs = local
    f.cap = 8
    f.on_heap = False
    try:
        while len(out) < limit:
            n = _recv_message(sock, &f)
            if n == 0:
                break
            try:
                parts = []
                for i in range(n):
                    parts.append(PyBytes_FromStringAndSize(
                        <char *>_zmq.msg_data(&f.msgs[i]), <Py_ssize_t>_zmq.msg_size(&f.msgs[i])))
            finally:
                _close_frames(&f, n)
            out.append(parts)
    finally:
        if f.on_heap:
            PyMem_Free(f.msgs)
    return out


def events(socket):
    """The socket's ZMQ_EVENTS bits (POLLIN/POLLOUT) as an int, straight from libzmq."""
    cdef int value = 0, err
    cdef size_t size = sizeof(int)
    _zmq_load()
    while _zmq.getsockopt(_handle(socket), _zmq.EVENTS, &value, &size) < 0:
        err = _zmq.zerrno()
        if err != EINTR:
            _raise_zmq(err)
        PyErr_CheckSignals()
    return value


def send_nowait(socket, frames):
    """Send one multipart message without blocking; False (nothing sent) if the queue is full.

    Other libzmq errors (EHOSTUNREACH from a ROUTER_MANDATORY socket, ETERM,
    ...) raise the exception pyzmq would.  Once libzmq accepts the first
    frame it accepts the rest of the message (the pipe reserves room for it);
    a later frame that still meets EAGAIN is finished with a blocking send.
    """
    cdef Py_ssize_t n = len(frames), i
    cdef int err, flags, rc
    cdef void *sock
    cdef const char *data
    cdef size_t size
    cdef const unsigned char[::1] view
    if n == 0:
        raise ValueError("a message needs at least one frame")
    _zmq_load()
    sock = _handle(socket)
    for i in range(n):
        frame = frames[i]
        if PyBytes_Check(frame):
            data = PyBytes_AS_STRING(frame)
            size = <size_t>PyBytes_GET_SIZE(frame)
        else:  # bytearray, memoryview, zmq.Frame: any buffer
            view = memoryview(frame).cast("B")
            size = <size_t>view.shape[0]
            data = <const char *>&view[0] if size else NULL
        flags = _zmq.SNDMORE if i < n - 1 else 0
        while _zmq.send(sock, data, size, flags | _zmq.DONTWAIT) < 0:
            err = _zmq.zerrno()
            if err == EINTR:
                PyErr_CheckSignals()
            elif err == EAGAIN and i == 0:
                return False
            elif err == EAGAIN:
                # The rest of an accepted message: wait for room without the GIL.
                with nogil:
                    rc = _zmq.send(sock, data, size, flags)
                    err = 0 if rc >= 0 else _zmq.zerrno()
                if rc >= 0:
                    break
                if err != EINTR:
                    _raise_zmq(err)
            else:
                _raise_zmq(err)
    return True


def relay(in_socket, out_socket, Forwarder forwarder not None, max_msgs, header_index=0):
    """Forward up to ``max_msgs`` messages from ``in_socket`` to ``out_socket``.

    Each message's frame ``header_index`` is routed by ``forwarder``; messages
    routed to a child link or up are sent on with ttl/hops advanced, others
    dropped.  Non-blocking on receive: stops at the first EAGAIN.  A send that
    meets a full peer (EAGAIN, HWM reached) blocks until it fits: back-pressure
    propagates to ``in_socket`` instead of losing accepted messages.  Returns
    ``(received, forwarded)``.

    Frames are moved, not copied: the header is rewritten in the received
    buffer (copied first only if libzmq shares it with other receivers).
    """
    cdef Py_ssize_t hidx, limit, received = 0, forwarded = 0, n, i
    cdef zmq_msg_t local[8]
    cdef zmq_msg_t fresh
    cdef _Frames f
    cdef void *ins
    cdef void *outs = NULL
    cdef zmq_msg_t *hdr
    cdef unsigned char *p
    cdef size_t size
    cdef int64_t d
    cdef FrameCodec codec = forwarder._codec
    if header_index < 0:
        raise ValueError(f"header_index must be >= 0, got {header_index}")
    header_index = PyNumber_Index(header_index)  # the twin indexes a list with it
    hidx = PY_SSIZE_T_MAX if header_index > PY_SSIZE_T_MAX else header_index
    limit = _count_arg(max_msgs)
    if limit == 0:
        return (0, 0)
    _zmq_load()
    ins = _handle(in_socket)
    f.msgs = local
    f.cap = 8
    f.on_heap = False
    n = 0
    try:
        while received < limit:
            n = _recv_message(ins, &f)
            if n == 0:
                break
            received += 1
            if hidx >= n:
                forwarder.c_dropped_malformed += 1
            else:
                hdr = &f.msgs[hidx]
                p = <unsigned char *>_zmq.msg_data(hdr)
                size = _zmq.msg_size(hdr)
                d = forwarder._route(p, <Py_ssize_t>size, _LINK_UP)
                if d >= 0 or d == _LINK_BROADCAST:
                    # The twin's advance() parses the header a second time.
                    codec.c_parsed += 1
                    if _zmq.msg_get(hdr, _zmq.SHARED) == 1:
                        # Other receivers see the same bytes (e.g. inproc PUB fan-out):
                        # rewrite a private copy.
                        if _zmq.msg_init_size(&fresh, size) != 0:
                            _raise_zmq(_zmq.zerrno())
                        memcpy(_zmq.msg_data(&fresh), p, size)
                        _zmq.msg_close(hdr)
                        memcpy(hdr, &fresh, sizeof(zmq_msg_t))
                        p = <unsigned char *>_zmq.msg_data(hdr)
                    _advance(p)
                    if outs == NULL:
                        outs = _handle(out_socket)
                    for i in range(n):
                        _send_frame(&f.msgs[i], outs, _zmq.SNDMORE if i + 1 < n else 0)
                    forwarded += 1
            _close_frames(&f, n)
            n = 0
    finally:
        _close_frames(&f, n)
        if f.on_heap:
            PyMem_Free(f.msgs)
    return (received, forwarded)
