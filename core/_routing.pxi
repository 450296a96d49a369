# Included by _fastpath.pyx: RoutingTable (node id -> child link, a C hash
# map) and Forwarder (the per-message decision and the broadcast dedup window),
# the compiled twins of the classes of the same names in _fastpath_py.py.

cdef class RoutingTable:
    """Node id -> child link for every node of this node's subtree.

    Missing ids route ``LINK_UP``.  Subtrees are added and removed in one call.
    """

    def __cinit__(self):
        map_init(&self._next, 0)
        map_init(&self._count, 0)

    def __dealloc__(self):
        map_free(&self._next)
        map_free(&self._count)

    def __init__(self):
        map_clear(&self._next)
        map_clear(&self._count)

    def __len__(self):
        return self._next.n

    def __contains__(self, node_id):
        cdef uint64_t k
        return bool(_key_of(node_id, _U32, &k)) and map_find(&self._next, k) >= 0

    def lookup(self, node_id):
        """The child link that leads to ``node_id``, or ``LINK_UP``."""
        cdef uint64_t k
        if not _key_of(node_id, _U32, &k):
            return LINK_UP
        return map_get(&self._next, k, _LINK_UP)

    cdef int _add(self, object node_id, object link) except -1:
        cdef uint32_t nid = <uint32_t>_check(node_id, _U32, "node_id")
        cdef int64_t lk, old
        cdef Py_ssize_t i, c
        if link < 0:
            raise ValueError(f"link must be >= 0, got {link}")
        lk = <int64_t>_check(link, _I32, "link")
        i = map_find(&self._next, nid)
        if i >= 0:
            old = self._next.vals[i]
            if old == lk:
                return 0
            self._next.vals[i] = lk
            c = map_find(&self._count, <uint64_t>old)
            self._count.vals[c] -= 1
            if self._count.vals[c] == 0:
                map_del_at(&self._count, <size_t>c)
        else:
            map_put(&self._next, nid, lk)
        map_put(&self._count, <uint64_t>lk, map_get(&self._count, <uint64_t>lk, 0) + 1)
        return 0

    def add(self, node_id, link):
        self._add(node_id, link)

    def add_subtree(self, link, node_ids):
        """Route every id in ``node_ids`` through ``link``; returns how many."""
        cdef Py_ssize_t n = 0
        for node_id in node_ids:
            self._add(node_id, link)
            n += 1
        return n

    cdef bint _remove(self, uint32_t node_id) noexcept:
        cdef Py_ssize_t i = map_find(&self._next, node_id)
        cdef Py_ssize_t c
        cdef int64_t link
        if i < 0:
            return False
        link = self._next.vals[i]
        map_del_at(&self._next, <size_t>i)
        c = map_find(&self._count, <uint64_t>link)
        self._count.vals[c] -= 1
        if self._count.vals[c] == 0:
            map_del_at(&self._count, <size_t>c)
        return True

    def remove(self, node_id):
        cdef uint64_t k
        if not _key_of(node_id, _U32, &k):
            return False
        return self._remove(<uint32_t>k)

    def remove_subtree(self, node_ids):
        """Remove every listed id that has a route; returns how many were removed."""
        cdef Py_ssize_t n = 0
        cdef uint64_t k
        for node_id in node_ids:
            if _key_of(node_id, _U32, &k) and self._remove(<uint32_t>k):
                n += 1
        return n

    cdef list _ids_via(self, int64_t link):
        cdef list out = []
        cdef size_t i
        if map_find(&self._count, <uint64_t>link) < 0:
            return out
        for i in range(self._next.mask + 1):
            if self._next.used[i] and self._next.vals[i] == link:
                out.append(<uint32_t>self._next.keys[i])
        out.sort()
        return out

    def remove_link(self, link):
        """Drop every route through ``link``; returns the removed ids, sorted."""
        cdef uint64_t k
        cdef list ids
        if not _key_of(link, _I32, &k):
            return []
        ids = self._ids_via(<int64_t>k)
        for node_id in ids:
            map_del(&self._next, <uint32_t>node_id)
        map_del(&self._count, k)
        return ids

    def ids_via(self, link):
        cdef uint64_t k
        if not _key_of(link, _I32, &k):
            return []
        return self._ids_via(<int64_t>k)

    def links(self):
        cdef list out = []
        cdef size_t i
        for i in range(self._count.mask + 1):
            if self._count.used[i]:
                out.append(<int64_t>self._count.keys[i])
        out.sort()
        return out

    def clear(self):
        map_clear(&self._next)
        map_clear(&self._count)


cdef class Forwarder:
    """Decides where each message goes: local, a child, up, broadcast, or drop.

    Broadcasts (``dst == BROADCAST_ID``) are suppressed when their (src, msg_id)
    was seen within the last ``window`` broadcasts; a message whose ttl is 0 is
    not forwarded.  Decisions never raise: bad frames are counted and dropped.
    """

    def __cinit__(self, *args, **kwargs):
        self._ring = NULL
        memset(&self._seen, 0, sizeof(U64Map))

    def __dealloc__(self):
        PyMem_Free(self._ring)
        map_free(&self._seen)

    def __init__(self, node_id, FrameCodec codec not None, RoutingTable routes not None, window=4096):
        cdef Py_ssize_t w
        self._node_id = <uint32_t>_check(node_id, _U32, "node_id")
        self._codec = codec
        self._routes = routes
        if window < 1:
            raise ValueError("window must be >= 1")
        w = int(window)
        PyMem_Free(self._ring)
        map_free(&self._seen)
        self._ring = <uint64_t *>PyMem_Malloc(w * sizeof(uint64_t))
        if self._ring == NULL:
            raise MemoryError()
        map_init(&self._seen, <size_t>w)
        self._window = w
        self._pos = 0
        self._filled = 0
        self._children = set()
        self._has_parent = False
        self.c_routed = self.c_delivered = self.c_forwarded_down = self.c_forwarded_up = 0
        self.c_broadcast = self.c_dropped_duplicate = self.c_dropped_ttl = 0
        self.c_dropped_malformed = self.c_dropped_unroutable = self.c_dropped_loop = 0

    @property
    def node_id(self):
        return self._node_id

    @node_id.setter
    def node_id(self, value):
        self._node_id = <uint32_t>_check(value, _U32, "node_id")

    @property
    def has_parent(self):
        return self._has_parent

    @has_parent.setter
    def has_parent(self, value):
        self._has_parent = bool(value)

    @property
    def routes(self):
        return self._routes

    def add_child(self, link):
        if link < 0:
            raise ValueError(f"link must be >= 0, got {link}")
        self._children.add(link)

    def remove_child(self, link):
        """Forget a child link and its whole subtree; returns the lost ids."""
        self._children.discard(link)
        return self._routes.remove_link(link)

    def children(self):
        return sorted(self._children)

    def broadcast_links(self, from_link):
        """Child links a broadcast that arrived on ``from_link`` goes on to."""
        return sorted([c for c in self._children if c != from_link])

    cdef bint _seen_key(self, uint32_t src, uint64_t msg_id) noexcept:
        cdef uint64_t key = (msg_id * _GOLDEN) ^ src
        cdef U64Map *m = &self._seen
        cdef size_t i
        if map_find(m, key) >= 0:
            return True
        # The window is full: evict the oldest key, which this slot of the ring holds.
        if self._filled == self._window:
            map_del(m, self._ring[self._pos])
        else:
            self._filled += 1
        self._ring[self._pos] = key
        # The map was sized for `window` keys at load <= 1/2: insert without growing.
        i = _mix64(key) & m.mask
        while m.used[i]:
            i = (i + 1) & m.mask
        m.used[i] = 1
        m.keys[i] = key
        m.vals[i] = self._pos
        m.n += 1
        self._pos += 1
        if self._pos == self._window:
            self._pos = 0
        return False

    def seen(self, src, msg_id):
        """Record (src, msg_id); True if it was already in the window."""
        return self._seen_key(<uint32_t>_check(src, _U32, "src"), _check(msg_id, _U64, "msg_id"))

    cdef int64_t _route(self, const unsigned char *p, Py_ssize_t n, int64_t from_link) noexcept:
        # The decision of route() for one header already in memory.
        cdef HeaderC h
        cdef int64_t link
        self.c_routed += 1
        if self._codec._parse(p, n, &h) != 0:
            self.c_dropped_malformed += 1
            return _LINK_DROP
        if h.dst == _BROADCAST:
            if self._seen_key(h.src, h.msg_id):
                self.c_dropped_duplicate += 1
                return _LINK_DROP
            self.c_broadcast += 1
            return _LINK_BROADCAST
        if h.dst == self._node_id:
            self.c_delivered += 1
            return _LINK_LOCAL
        if h.ttl == 0:
            self.c_dropped_ttl += 1
            return _LINK_DROP
        link = map_get(&self._routes._next, h.dst, _LINK_UP)
        if link >= 0:
            if link == from_link:
                self.c_dropped_loop += 1
                return _LINK_DROP
            self.c_forwarded_down += 1
            return link
        if self._has_parent and from_link != _LINK_UP:
            self.c_forwarded_up += 1
            return _LINK_UP
        self.c_dropped_unroutable += 1
        return _LINK_DROP

    cdef int64_t _route_obj(self, object frame, int64_t from_link) except? -9:
        # route() for any object: bytes-likes are routed, others raise like the twin.
        cdef const unsigned char *p
        cdef Py_ssize_t n
        cdef Py_buffer view
        cdef int kind
        try:
            kind = _get_frame(frame, &p, &n, &view)
            if kind == 2 and n == _HEADER_SIZE:
                PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)  # raises BufferError
        except BaseException:
            self.c_routed += 1  # the twin counts the frame before parsing it
            raise
        try:
            return self._route(p, n, from_link)
        finally:
            if kind == 1:
                PyBuffer_Release(&view)

    def route(self, frame, from_link):
        """Decision for one header frame that arrived on ``from_link``."""
        return self._route_obj(frame, _link_arg(from_link))

    def route_batch(self, frames, from_link):
        """``route`` for every header frame of a batch; one decision per frame."""
        cdef int64_t fl = _link_arg(from_link)
        cdef int64_t d
        cdef Py_ssize_t i, n
        cdef PyObject *item
        cdef PyObject *res
        cdef bint is_list
        cdef object seq = frames
        if _list_check_exact(seq):
            is_list = True
        elif _tuple_check_exact(seq):
            is_list = False
        else:
            seq = list(seq)
            is_list = True
        n = PyList_GET_SIZE(seq) if is_list else _tuple_size(seq)
        out = _list_new(n)
        for i in range(n):
            # A list may only change under us if a frame's buffer hook mutates it.
            if is_list and PyList_GET_SIZE(seq) != n:
                raise RuntimeError("frames changed size during route_batch")
            item = _list_get_item(seq, i) if is_list else _tuple_get_item(seq, i)
            if _bytes_check_exact(item):
                d = self._route(<const unsigned char *>_bytes_as_string(item), _bytes_size(item), fl)
            else:
                d = self._route_obj(<object>item, fl)
            res = _long_from_ll(d)
            if res == NULL:
                raise MemoryError()
            _list_set_item(out, i, res)
        return out

    def statistics(self):
        return _snapshot({
            "routed": self.c_routed,
            "delivered": self.c_delivered,
            "forwarded_down": self.c_forwarded_down,
            "forwarded_up": self.c_forwarded_up,
            "broadcast": self.c_broadcast,
            "dropped_duplicate": self.c_dropped_duplicate,
            "dropped_ttl": self.c_dropped_ttl,
            "dropped_malformed": self.c_dropped_malformed,
            "dropped_unroutable": self.c_dropped_unroutable,
            "dropped_loop": self.c_dropped_loop,
        })
