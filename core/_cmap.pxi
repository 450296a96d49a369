# Included by _fastpath.pyx: the C hash map behind RoutingTable, the dedup window
# and LoadTable (U64Map is declared in _fastpath.pxd).
#
# Open addressing with linear probing, load factor <= 1/2, capacity a power of
# two, and backward-shift deletion (no tombstones, so lookups never slow down
# after many removals).


cdef inline size_t _mix64(uint64_t k) noexcept nogil:
    # murmur3 fmix64: spreads ids that differ only in high or low bits.
    k ^= k >> 33
    k *= 0xFF51AFD7ED558CCDULL
    k ^= k >> 33
    k *= 0xC4CEB9FE1A85EC53ULL
    k ^= k >> 33
    return <size_t>k


cdef int map_init(U64Map *m, size_t min_entries) except -1:
    cdef size_t cap = 16
    while cap < 2 * min_entries:
        cap <<= 1
    m.keys = <uint64_t *>PyMem_Malloc(cap * sizeof(uint64_t))
    m.vals = <int64_t *>PyMem_Malloc(cap * sizeof(int64_t))
    m.used = <uint8_t *>PyMem_Calloc(cap, sizeof(uint8_t))
    if m.keys == NULL or m.vals == NULL or m.used == NULL:
        map_free(m)
        raise MemoryError()
    m.mask = cap - 1
    m.n = 0
    return 0


cdef void map_free(U64Map *m) noexcept:
    PyMem_Free(m.keys)
    PyMem_Free(m.vals)
    PyMem_Free(m.used)
    m.keys = NULL
    m.vals = NULL
    m.used = NULL
    m.mask = 0
    m.n = 0


cdef inline Py_ssize_t map_find(const U64Map *m, uint64_t key) noexcept nogil:
    """Slot index of ``key``, or -1."""
    cdef size_t i = _mix64(key) & m.mask
    while m.used[i]:
        if m.keys[i] == key:
            return <Py_ssize_t>i
        i = (i + 1) & m.mask
    return -1


cdef inline int64_t map_get(const U64Map *m, uint64_t key, int64_t default) noexcept nogil:
    cdef Py_ssize_t i = map_find(m, key)
    return m.vals[i] if i >= 0 else default


cdef int _map_resize(U64Map *m, size_t cap) except -1:
    cdef U64Map old = m[0]
    cdef size_t i, j
    m.keys = <uint64_t *>PyMem_Malloc(cap * sizeof(uint64_t))
    m.vals = <int64_t *>PyMem_Malloc(cap * sizeof(int64_t))
    m.used = <uint8_t *>PyMem_Calloc(cap, sizeof(uint8_t))
    if m.keys == NULL or m.vals == NULL or m.used == NULL:
        map_free(m)
        m[0] = old
        raise MemoryError()
    m.mask = cap - 1
    for i in range(old.mask + 1):
        if old.used[i]:
            j = _mix64(old.keys[i]) & m.mask
            while m.used[j]:
                j = (j + 1) & m.mask
            m.used[j] = 1
            m.keys[j] = old.keys[i]
            m.vals[j] = old.vals[i]
    map_free(&old)
    return 0


cdef int map_put(U64Map *m, uint64_t key, int64_t val) except -1:
    """Insert or overwrite; returns 1 if the key is new, 0 if it was updated."""
    cdef size_t i
    if 2 * (m.n + 1) > m.mask + 1:
        _map_resize(m, 2 * (m.mask + 1))
    i = _mix64(key) & m.mask
    while m.used[i]:
        if m.keys[i] == key:
            m.vals[i] = val
            return 0
        i = (i + 1) & m.mask
    m.used[i] = 1
    m.keys[i] = key
    m.vals[i] = val
    m.n += 1
    return 1


cdef void map_del_at(U64Map *m, size_t i) noexcept nogil:
    """Remove the entry at slot ``i`` and shift its probe chain back."""
    cdef size_t j = i
    cdef size_t home
    while True:
        j = (j + 1) & m.mask
        if not m.used[j]:
            break
        home = _mix64(m.keys[j]) & m.mask
        # The entry at j may fill the hole at i only if its home slot is not
        # cyclically inside (i, j]; otherwise a lookup would no longer reach it.
        if i <= j:
            if i < home <= j:
                continue
        elif home > i or home <= j:
            continue
        m.keys[i] = m.keys[j]
        m.vals[i] = m.vals[j]
        i = j
    m.used[i] = 0
    m.n -= 1


cdef inline bint map_del(U64Map *m, uint64_t key) noexcept nogil:
    cdef Py_ssize_t i = map_find(m, key)
    if i < 0:
        return False
    map_del_at(m, <size_t>i)
    return True


cdef void map_clear(U64Map *m) noexcept:
    memset(m.used, 0, (m.mask + 1) * sizeof(uint8_t))
    m.n = 0
