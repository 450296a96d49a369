# Included by _fastpath.pyx: Aggregator (convergecast bookkeeping), LoadTable
# (least-loaded and lottery picks) and Credits (flow control), the compiled
# twins of the classes of the same names in _fastpath_py.py.


# -- convergecast ----------------------------------------------------------------

cdef inline bint _deadline_lt(const Deadline *a, const Deadline *b) noexcept nogil:
    # The twin's heap holds (deadline, op_id) tuples: compare like tuples do.
    if a.deadline == b.deadline:
        return a.op_id < b.op_id
    return a.deadline < b.deadline


cdef class _Op:
    """One open operation of an Aggregator (the twin keeps a 5-item list)."""


cdef class Aggregator:
    """Convergecast bookkeeping: which links still owe a reply to each operation."""

    def __cinit__(self):
        self._heap = NULL
        self._hlen = 0
        self._hcap = 0

    def __dealloc__(self):
        PyMem_Free(self._heap)

    def __init__(self):
        self._ops = {}
        self._hlen = 0
        self.c_opened = self.c_completed = self.c_expired = 0
        self.c_late_replies = self.c_duplicate_replies = 0

    def __len__(self):
        return len(self._ops)

    def __contains__(self, op_id):
        return op_id in self._ops

    cdef int _push(self, double deadline, uint64_t op_id) except -1:
        # heapq.heappush: append, then sift the new item towards the root.
        cdef Py_ssize_t pos, parent, cap
        cdef Deadline item
        cdef Deadline *grown
        if self._hlen == self._hcap:
            cap = 2 * self._hcap if self._hcap else 16
            grown = <Deadline *>PyMem_Realloc(self._heap, cap * sizeof(Deadline))
            if grown == NULL:
                raise MemoryError()
            self._heap = grown
            self._hcap = cap
        item.deadline = deadline
        item.op_id = op_id
        pos = self._hlen
        self._hlen += 1
        while pos > 0:
            parent = (pos - 1) >> 1
            if _deadline_lt(&item, &self._heap[parent]):
                self._heap[pos] = self._heap[parent]
                pos = parent
                continue
            break
        self._heap[pos] = item

    cdef Deadline _pop(self) noexcept:
        # heapq.heappop: move the last item to the root, sift it down to a leaf
        # along the smaller children, then back up (CPython's _siftup).
        cdef Deadline last, top, item
        cdef Py_ssize_t pos, child, right, end, parent
        self._hlen -= 1
        last = self._heap[self._hlen]
        if self._hlen == 0:
            return last
        top = self._heap[0]
        end = self._hlen
        pos = 0
        item = last
        child = 1
        while child < end:
            right = child + 1
            if right < end and not _deadline_lt(&self._heap[child], &self._heap[right]):
                child = right
            self._heap[pos] = self._heap[child]
            pos = child
            child = 2 * pos + 1
        while pos > 0:
            parent = (pos - 1) >> 1
            if _deadline_lt(&item, &self._heap[parent]):
                self._heap[pos] = self._heap[parent]
                pos = parent
                continue
            break
        self._heap[pos] = item
        return top

    def open(self, op_id, links, deadline):
        cdef uint64_t oid = _check(op_id, _U64, "op_id")
        cdef _Op op
        key = oid
        if key in self._ops:
            raise ValueError(f"operation {key} is already open")
        owing = set()
        for link in links:
            owing.add(int(link))
        op = _Op.__new__(_Op)
        op.owing = owing
        op.ok = 0
        op.failed = 0
        op.deadline = float(deadline)
        op.state = 0
        self._ops[key] = op
        self._push(op.deadline, oid)
        self.c_opened += 1
        if not owing:
            op.state = 1
            self.c_completed += 1

    def reply(self, op_id, link, ok=0, failed=0):
        """Merge one child's partial counts; True when no link owes a reply any more."""
        cdef _Op op = self._ops.get(op_id)
        if op is None or op.state == 2:
            self.c_late_replies += 1
            return False
        if link not in op.owing:
            self.c_duplicate_replies += 1
            return False
        op.owing.discard(link)
        op.ok += ok
        op.failed += failed
        if not op.owing and op.state == 0:
            op.state = 1
            self.c_completed += 1
            return True
        return False

    def forget_link(self, link):
        """A link died: it owes nothing any more.  Returns op ids it completed."""
        cdef list done = []
        cdef _Op op
        for op_id, o in self._ops.items():
            op = <_Op>o
            if link in op.owing:
                op.owing.discard(link)
                if not op.owing and op.state == 0:
                    op.state = 1
                    self.c_completed += 1
                    done.append(op_id)
        done.sort()
        return done

    def owing(self, op_id):
        return sorted((<_Op>self._ops[op_id]).owing)

    def counts(self, op_id):
        cdef _Op op = <_Op>self._ops[op_id]
        return (op.ok, op.failed)

    def is_complete(self, op_id):
        return (<_Op>self._ops[op_id]).state == 1

    def expired(self, now):
        """Open, incomplete operations whose deadline is <= now; each reported once."""
        cdef list out = []
        cdef Deadline top
        cdef _Op op
        # Python comparisons against `now`, as the twin makes them (now may be any number).
        while self._hlen and self._heap[0].deadline <= now:
            top = self._pop()
            key = top.op_id
            op = self._ops.get(key)
            # op.deadline <= now: skip a stale entry left by a closed op whose id was reopened.
            if op is not None and op.state == 0 and op.deadline <= now:
                op.state = 2
                self.c_expired += 1
                out.append(key)
        return out

    def close(self, op_id):
        """Forget an operation; returns (ok, failed, owing links)."""
        cdef _Op op = <_Op>self._ops.pop(op_id)
        return (op.ok, op.failed, sorted(op.owing))

    def statistics(self):
        return _snapshot({
            "opened": self.c_opened,
            "completed": self.c_completed,
            "expired": self.c_expired,
            "late_replies": self.c_late_replies,
            "duplicate_replies": self.c_duplicate_replies,
        })


# -- load balancing -------------------------------------------------------------

cdef class LoadTable:
    """Per-worker load (reported queue length + own in-flight count).

    ``pick`` returns the least-loaded worker in O(log n) from an indexed heap
    ordered by (load, stamp); the stamp is renewed on each pick, so equally
    loaded workers are served in turn.  ``pick_lottery`` draws a worker with
    probability proportional to its spare capacity (Fenwick tree, O(log n)).
    """

    def __cinit__(self):
        map_init(&self._slot, 0)
        self._nslots = self._cap = self._hlen = self._nfree = 0
        self._wid = NULL
        self._queue = self._inflight = self._capacity = self._stamp = NULL
        self._hpos = self._heap = self._free = NULL
        self._spare = self._fen = NULL

    def __dealloc__(self):
        map_free(&self._slot)
        PyMem_Free(self._wid)
        PyMem_Free(self._queue)
        PyMem_Free(self._inflight)
        PyMem_Free(self._capacity)
        PyMem_Free(self._stamp)
        PyMem_Free(self._hpos)
        PyMem_Free(self._spare)
        PyMem_Free(self._fen)
        PyMem_Free(self._heap)
        PyMem_Free(self._free)

    def __init__(self):
        map_clear(&self._slot)
        self._nslots = self._hlen = self._nfree = 0
        self._clock = 0
        self.c_picks = self.c_lottery_picks = self.c_reports = self.c_dispatched = 0
        self.c_completed = 0

    cdef int _grow(self) except -1:
        cdef Py_ssize_t cap = 2 * self._cap if self._cap else 16
        cdef void *p
        # Each array is replaced only once its realloc succeeded: a failure
        # leaves the table as it was.
        p = PyMem_Realloc(self._wid, cap * sizeof(int64_t))
        if p == NULL:
            raise MemoryError()
        self._wid = <int64_t *>p
        p = PyMem_Realloc(self._queue, cap * sizeof(uint64_t))
        if p == NULL:
            raise MemoryError()
        self._queue = <uint64_t *>p
        p = PyMem_Realloc(self._inflight, cap * sizeof(uint64_t))
        if p == NULL:
            raise MemoryError()
        self._inflight = <uint64_t *>p
        p = PyMem_Realloc(self._capacity, cap * sizeof(uint64_t))
        if p == NULL:
            raise MemoryError()
        self._capacity = <uint64_t *>p
        p = PyMem_Realloc(self._stamp, cap * sizeof(uint64_t))
        if p == NULL:
            raise MemoryError()
        self._stamp = <uint64_t *>p
        p = PyMem_Realloc(self._hpos, cap * sizeof(Py_ssize_t))
        if p == NULL:
            raise MemoryError()
        self._hpos = <Py_ssize_t *>p
        p = PyMem_Realloc(self._spare, cap * sizeof(int64_t))
        if p == NULL:
            raise MemoryError()
        self._spare = <int64_t *>p
        p = PyMem_Realloc(self._fen, (cap + 1) * sizeof(int64_t))
        if p == NULL:
            raise MemoryError()
        self._fen = <int64_t *>p
        p = PyMem_Realloc(self._heap, cap * sizeof(Py_ssize_t))
        if p == NULL:
            raise MemoryError()
        self._heap = <Py_ssize_t *>p
        p = PyMem_Realloc(self._free, cap * sizeof(Py_ssize_t))
        if p == NULL:
            raise MemoryError()
        self._free = <Py_ssize_t *>p
        self._cap = cap
        return 0

    def __len__(self):
        return self._slot.n

    def __contains__(self, worker_id):
        cdef uint64_t k
        return bool(_key_of(worker_id, _U32, &k)) and map_find(&self._slot, k) >= 0

    def workers(self):
        cdef list out = []
        cdef Py_ssize_t s
        for s in range(self._nslots):
            if self._wid[s] >= 0:
                out.append(self._wid[s])
        out.sort()
        return out

    cdef Py_ssize_t _slot_of(self, object worker_id) except -1:
        cdef uint64_t k
        cdef Py_ssize_t i
        if _key_of(worker_id, _U32, &k):
            i = map_find(&self._slot, k)
            if i >= 0:
                return <Py_ssize_t>self._slot.vals[i]
        raise KeyError(worker_id)

    # -- heap over (load, stamp) -------------------------------------------
    cdef bint _lt(self, Py_ssize_t a, Py_ssize_t b) noexcept:
        cdef uint64_t la = self._queue[a] + self._inflight[a]
        cdef uint64_t lb = self._queue[b] + self._inflight[b]
        if la != lb:
            return la < lb
        return self._stamp[a] < self._stamp[b]

    cdef void _swap(self, Py_ssize_t i, Py_ssize_t j) noexcept:
        cdef Py_ssize_t *h = self._heap
        h[i], h[j] = h[j], h[i]
        self._hpos[h[i]] = i
        self._hpos[h[j]] = j

    cdef void _up(self, Py_ssize_t i) noexcept:
        cdef Py_ssize_t p
        while i > 0:
            p = (i - 1) >> 1
            if self._lt(self._heap[i], self._heap[p]):
                self._swap(i, p)
                i = p
            else:
                break

    cdef void _down(self, Py_ssize_t i) noexcept:
        cdef Py_ssize_t l, r, m
        cdef Py_ssize_t n = self._hlen
        cdef Py_ssize_t *h = self._heap
        while True:
            l = 2 * i + 1
            if l >= n:
                break
            m = l
            r = l + 1
            if r < n and self._lt(h[r], h[l]):
                m = r
            if self._lt(h[m], h[i]):
                self._swap(i, m)
                i = m
            else:
                break

    cdef void _fix(self, Py_ssize_t s) noexcept:
        self._up(self._hpos[s])
        self._down(self._hpos[s])
        self._set_spare(s)

    # -- Fenwick over spare capacity ---------------------------------------
    cdef void _set_spare(self, Py_ssize_t s) noexcept:
        cdef uint64_t load = self._queue[s] + self._inflight[s]
        cdef int64_t spare = 0
        cdef int64_t delta
        cdef Py_ssize_t i
        if self._wid[s] >= 0 and self._capacity[s] > load:
            spare = <int64_t>(self._capacity[s] - load)
        delta = spare - self._spare[s]
        if delta:
            self._spare[s] = spare
            i = s + 1
            while i <= self._nslots:
                self._fen[i] += delta
                i += i & -i

    cdef int64_t _total_spare(self) noexcept:
        cdef int64_t total = 0
        cdef Py_ssize_t i = self._nslots
        while i > 0:
            total += self._fen[i]
            i -= i & -i
        return total

    # -- public API ----------------------------------------------------------
    def add(self, worker_id, capacity=16):
        cdef uint64_t wid = _check(worker_id, _U32, "worker_id")
        cdef uint64_t cap = _check(capacity, _U32, "capacity")
        cdef Py_ssize_t s, n, lo, j
        cdef int64_t acc
        if map_find(&self._slot, wid) >= 0:
            raise ValueError(f"worker {wid} is already in the table")
        if self._nfree == 0 and self._nslots == self._cap:
            self._grow()
        map_put(&self._slot, wid, 0)
        if self._nfree:
            # Reuse the most recently freed slot, as the twin's list.pop() does.
            self._nfree -= 1
            s = self._free[self._nfree]
        else:
            s = self._nslots
            self._nslots += 1
            self._spare[s] = 0
            # The new Fenwick node n covers slots (n - lowbit(n), n], which may
            # include old slots: sum them (the new slot's own spare is still 0).
            n = self._nslots
            lo = n - (n & -n)
            acc = 0
            for j in range(lo, n - 1):
                acc += self._spare[j]
            self._fen[n] = acc
        self._slot.vals[map_find(&self._slot, wid)] = s
        self._wid[s] = <int64_t>wid
        self._queue[s] = 0
        self._inflight[s] = 0
        self._capacity[s] = cap
        self._clock += 1
        self._stamp[s] = self._clock
        self._spare[s] = 0
        self._heap[self._hlen] = s
        self._hpos[s] = self._hlen
        self._hlen += 1
        self._up(self._hpos[s])
        self._set_spare(s)

    def remove(self, worker_id):
        cdef Py_ssize_t s = self._slot_of(worker_id)
        cdef Py_ssize_t i = self._hpos[s]
        cdef Py_ssize_t last = self._hlen - 1
        map_del(&self._slot, <uint64_t>self._wid[s])
        if i != last:
            self._swap(i, last)
        self._hlen -= 1
        self._hpos[s] = -1
        if i < self._hlen:
            self._up(i)
            self._down(i)
        self._wid[s] = -1
        self._set_spare(s)
        self._free[self._nfree] = s
        self._nfree += 1

    def report(self, worker_id, queue_len):
        cdef Py_ssize_t s = self._slot_of(worker_id)
        self._queue[s] = _check(queue_len, _U32, "queue_len")
        self.c_reports += 1
        self._fix(s)

    cdef int _dispatched(self, Py_ssize_t s, uint64_t n) noexcept:
        self._inflight[s] += n
        self.c_dispatched += n
        self._fix(s)
        return 0

    def dispatched(self, worker_id, n=1):
        cdef Py_ssize_t s = self._slot_of(worker_id)
        self._dispatched(s, _check(n, _U32, "n"))

    def completed(self, worker_id, n=1):
        cdef Py_ssize_t s = self._slot_of(worker_id)
        cdef uint64_t k = _check(n, _U32, "n")
        self._inflight[s] = self._inflight[s] - k if self._inflight[s] > k else 0
        self.c_completed += k
        self._fix(s)

    def load(self, worker_id):
        cdef Py_ssize_t s = self._slot_of(worker_id)
        return self._queue[s] + self._inflight[s]

    def inflight(self, worker_id):
        return self._inflight[self._slot_of(worker_id)]

    def queue(self, worker_id):
        return self._queue[self._slot_of(worker_id)]

    cdef Py_ssize_t _pick(self) except -1:
        cdef Py_ssize_t s
        if self._hlen == 0:
            raise NoWorkers("no workers in the load table")
        s = self._heap[0]
        self._clock += 1
        self._stamp[s] = self._clock
        self._down(0)
        self.c_picks += 1
        return s

    def pick(self):
        """Least-loaded worker; among equals, the one picked longest ago."""
        return self._wid[self._pick()]

    def acquire(self):
        """``pick`` and count one request in flight on the chosen worker."""
        cdef Py_ssize_t s = self._pick()
        self._dispatched(s, 1)
        return self._wid[s]

    def pick_lottery(self, r):
        """Draw with probability proportional to spare capacity; ``r`` in [0, 1).

        Falls back to :meth:`pick` when no worker has spare capacity.
        """
        cdef double rd
        cdef int64_t total, target
        cdef Py_ssize_t n, pos, step, nxt
        if self._hlen == 0:
            raise NoWorkers("no workers in the load table")
        if PyFloat_CheckExact(r):
            rd = PyFloat_AS_DOUBLE(r)
            if not (0.0 <= rd < 1.0):
                raise ValueError(f"r must be in [0, 1), got {r}")
        else:
            if not 0.0 <= r < 1.0:
                raise ValueError(f"r must be in [0, 1), got {r}")
            rd = r
        total = self._total_spare()
        if total <= 0:
            return self.pick()
        # r * total rounds in floating point; clamp so r close to 1 cannot overshoot.
        target = <int64_t>(rd * <double>total)
        if target > total - 1:
            target = total - 1
        # Smallest slot whose prefix sum exceeds target (Fenwick descent).
        n = self._nslots
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
        self.c_lottery_picks += 1
        return self._wid[pos]

    def statistics(self):
        return _snapshot({
            "picks": self.c_picks,
            "lottery_picks": self.c_lottery_picks,
            "reports": self.c_reports,
            "dispatched": self.c_dispatched,
            "completed": self.c_completed,
        })


# -- flow control -----------------------------------------------------------------

cdef class Credits:
    """Credit-based flow control counters, one balance per peer."""

    def __init__(self, initial):
        self._initial = _check_py(initial, _U32, "initial")
        self._bal = {}
        self.c_granted = self.c_consumed = self.c_stalled = 0

    def available(self, peer):
        return self._bal.get(peer, self._initial)

    def grant(self, peer, n):
        cdef uint64_t k = _check(n, _U32, "n")
        b = self._bal.get(peer, self._initial) + k
        self._bal[peer] = b
        self.c_granted += k
        return b

    def take(self, peer, n=1):
        """Consume ``n`` credits if available; False (and counted) if not."""
        cdef uint64_t k = _check(n, _U32, "n")
        b = self._bal.get(peer, self._initial)
        if b < k:
            self.c_stalled += 1
            return False
        self._bal[peer] = b - k
        self.c_consumed += k
        return True

    def forget(self, peer):
        self._bal.pop(peer, None)

    def statistics(self):
        return _snapshot({
            "granted": self.c_granted,
            "consumed": self.c_consumed,
            "stalled": self.c_stalled,
        })
