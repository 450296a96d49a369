"""Content-addressed package transfer over the data plane, pulled hop by hop down the tree.

Each logical node runs one :class:`ChunkService`.  It *serves* the packages in
its :class:`~nodes.packages.PackageCache` to its children on its data ROUTER,
and *fetches* missing ones from its parent's data ROUTER with its own data
DEALER.  A child asking for a package its parent lacks makes the parent fetch
it first (store and forward), so every package crosses each tree link once:
the controller uploads it once per child, not once per node.

Wire bodies (types from ``bus.protocol``; msgpack maps, chunk bytes in an extra frame)::

    CHUNK_REQUEST  fetcher -> upstream    {"d": digest, "o": offset, "n": length,
                                           "s": size of the whole object,
                                           "t": seconds the fetcher still waits}
    CHUNK          upstream -> fetcher    {"d": digest, "o": offset}, extra: [bytes o..o+n)
    CHUNK + ERROR  upstream -> fetcher    {"d": digest, "o": offset, "code": CODE, "error": sentence}

Every CHUNK answers one request: its header ``ref`` is the request's
``msg_id``.  A request re-sent after ``request_timeout`` keeps its
``msg_id``, so a late duplicate answer is recognised and ignored.  ``CODE`` is
one of :data:`ERR_MISSING` (nobody up the tree has the package),
:data:`ERR_BAD_REQUEST` (the request broke a rule) and :data:`ERR_FAILED`
(the upstream's own fetch failed, e.g. a hash mismatch further up).

Flow control is driven by the receiver: a transfer keeps at most ``window``
requests outstanding and each chunk received grants the next request, so the
sender never queues more than ``window`` chunks for one transfer.  Requests
that get no answer within ``request_timeout`` are re-sent; :meth:`ChunkService.set_upstream`
re-sends every outstanding request to the new parent at once.  Data lands in a
:class:`~nodes.packages.ChunkWriter`, which survives restarts, so a fetch
resumes from what it has, and the sha256 is verified before the object appears
in the cache.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import time
from pathlib import Path

from bus import protocol as p
from bus.planes import PlaneError, PlaneLoop, SocketFactory
from nodes.packages import PackageCache, PackageError

__all__ = ["ChunkService", "ERR_MISSING", "ERR_BAD_REQUEST", "ERR_FAILED", "MAX_CHUNK"]

logger = logging.getLogger(__name__)

#: Error codes of a ``CHUNK`` with ``Flag.ERROR``.
ERR_MISSING = "missing"
ERR_BAD_REQUEST = "bad_request"
ERR_FAILED = "failed"

#: Largest chunk a request may ask for (one extra frame).
MAX_CHUNK = 1 << 20  # bytes one request may ask for: with the data ROUTER's HWM, a bound per peer
_MAX_SIZE = 1 << 48  # a size field beyond this is nonsense, not a package
_MAX_WAIT = 3600.0
_PARK_LIMIT = 4096  # requests parked per package while this node fetches it
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_STAT_KEYS = (
    "bytes_served", "chunks_served", "bytes_fetched", "chunks_fetched", "fetches", "fetches_joined",
    "cache_hits", "resumed", "hash_failures", "fetch_failures", "fetch_timeouts", "requests",
    "requests_bad", "requests_missing", "requests_parked", "requests_dropped", "requests_ignored",
    "errors_sent", "replies_dropped", "requests_sent", "retransmits", "replies_bad", "replies_stale",
    "max_outstanding", "upstream_switches", "served_partial",
)  # fmt: skip


class _BadRequest(Exception):
    """Internal: a CHUNK_REQUEST body that breaks a rule (the reason is the message)."""


class _Transfer:
    """One package being fetched: its writer, what is left to ask for, who waits."""

    __slots__ = ("digest", "size", "writer", "future", "todo", "outstanding", "got", "waiters",
                 "committing", "deadline")  # fmt: skip

    def __init__(self, digest: str, size: int, writer, future: asyncio.Future):
        self.digest = digest
        self.size = size
        self.writer = writer
        self.future = future
        self.todo: collections.deque = collections.deque()  # (offset, length) not yet requested
        self.outstanding: set[int] = set()  # msg_ids of requests in flight
        self.got = 0
        self.waiters = 0
        self.committing = False
        self.deadline = 0.0


class _Request:
    """One outstanding CHUNK_REQUEST (``sent_at`` None: not sent yet)."""

    __slots__ = ("transfer", "offset", "length", "sent_at")

    def __init__(self, transfer: _Transfer, offset: int, length: int):
        self.transfer = transfer
        self.offset = offset
        self.length = length
        self.sent_at: float | None = None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_request(body) -> tuple[str, int, int, int | None, float | None]:
    """``(digest, offset, length, size, wait)`` of a CHUNK_REQUEST body; raises ``_BadRequest``."""
    if not isinstance(body, dict):
        raise _BadRequest(f"body is a {type(body).__name__}, not a map")
    digest, offset, length = body.get("d"), body.get("o"), body.get("n")
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise _BadRequest(f"'d' is not a sha256 hex digest: {digest!r:.80}")
    if not _is_int(offset) or offset < 0:
        raise _BadRequest(f"'o' must be an integer >= 0, got {offset!r:.40}")
    if not _is_int(length) or not 1 <= length <= MAX_CHUNK:
        raise _BadRequest(f"'n' must be an integer in [1, {MAX_CHUNK}], got {length!r:.40}")
    size = body.get("s")
    if size is not None and (not _is_int(size) or not 0 <= size <= _MAX_SIZE):
        raise _BadRequest(f"'s' must be an integer >= 0, got {size!r:.40}")
    if size is not None and offset + length > size:
        raise _BadRequest(f"range [{offset}, {offset + length}) is outside the {size} bytes of the package")
    wait = body.get("t")
    if wait is not None and (not isinstance(wait, (int, float)) or isinstance(wait, bool) or not wait > 0):
        raise _BadRequest(f"'t' must be a number of seconds > 0, got {wait!r:.40}")
    return digest, offset, length, size, None if wait is None else min(float(wait), _MAX_WAIT)


class ChunkService:
    """Serves and fetches content-addressed packages over the data plane for one logical node.

    ``factory`` builds the fetch-side DEALER, ``loop`` serves it (and the
    node's data ROUTER, see :meth:`serve`), ``cache`` is this node's package
    store; a cache directory must belong to one service only.  ``chunk_size``
    bytes per request, at most ``window`` requests in flight per package, and
    a request unanswered for ``request_timeout`` seconds is sent again.
    ``serve_timeout`` bounds a fetch a child's request starts here when the
    request does not say how long the child waits.  ``open_files`` objects
    stay open for serving.  No I/O happens before :meth:`serve`,
    :meth:`set_upstream` or :meth:`fetch`; :meth:`close` ends everything.
    """

    def __init__(self, factory: SocketFactory, loop: PlaneLoop, cache: PackageCache, *,
                 chunk_size: int = 256 * 1024, window: int = 8, request_timeout: float = 2.0,
                 serve_timeout: float = 30.0, open_files: int = 64, root: bool = True):  # fmt: skip
        if not _is_int(chunk_size) or not 1 <= chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be in [1, {MAX_CHUNK}], got {chunk_size!r}")
        if not _is_int(window) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        if not request_timeout > 0 or not serve_timeout > 0:
            raise ValueError("request_timeout and serve_timeout must be > 0 seconds")
        if not _is_int(open_files) or open_files < 1:
            raise ValueError(f"open_files must be an integer >= 1, got {open_files!r}")
        self._factory = factory
        self._loop = loop
        self._cache = cache
        self._chunk = chunk_size
        self._window = window
        self._request_timeout = float(request_timeout)
        self._serve_timeout = float(serve_timeout)
        self._open_limit = open_files
        self._codec = p.new_codec()
        self._link = None
        self._upstream: str | None = None
        # Without an upstream the root has nothing more to ask; a node between
        # parents parks its children's requests until its next parent arrives.
        self._root = root
        self._dealer = None
        self._transfers: dict[str, _Transfer] = {}
        self._requests: dict[int, _Request] = {}  # msg_id -> request in flight (all transfers)
        self._parked: dict[str, dict[tuple[bytes, int], tuple[int, int]]] = {}
        self._forwarding: set[str] = set()  # digests this node fetches on its children's behalf
        self._fds: collections.OrderedDict[str, tuple[int, int]] = collections.OrderedDict()
        self._tasks: set[asyncio.Task] = set()
        self._writable_task: asyncio.Task | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._closed = False
        self._buf = bytearray()  # serving: chunks are read into this
        self._c = dict.fromkeys(_STAT_KEYS, 0)

    # -- lifecycle -------------------------------------------------------------
    def serve(self, link, *, hook: bool = True) -> None:
        """Answer the CHUNK_REQUESTs that arrive on ``link``'s data ROUTER.

        With ``hook`` it takes ``link.on_data``; without, the owner of
        ``on_data`` passes CHUNK_REQUESTs to :meth:`handle` (other data-plane
        services share the socket).
        """
        self._link = link
        if hook:
            link.on_data = self._on_request

    def handle(self, identity: bytes, msg: p.Message) -> None:
        """One decoded CHUNK_REQUEST from a child (see :meth:`serve`)."""
        self._on_request(identity, msg)

    def set_upstream(self, data_endpoint: str | None) -> None:
        """Fetch from the data ROUTER at ``data_endpoint`` from now on (None: no parent).

        Requests in flight are sent again to the new upstream at once; what
        already arrived is kept.
        """
        if self._closed:
            raise PackageError("the chunk service is closed")
        if data_endpoint == self._upstream:
            return
        self._drop_dealer()
        self._upstream = data_endpoint
        self._c["upstream_switches"] += 1
        if data_endpoint is None:
            for req in self._requests.values():
                req.sent_at = None
            return
        self._dealer = self._factory.data_dealer(data_endpoint, b"\x02" + os.urandom(7))
        self._loop.add(self._dealer, p.Plane.DATA, self._on_reply, name=f"chunks<-{data_endpoint}")
        for req in self._requests.values():
            req.sent_at = None
        self._send_unsent()

    def close(self) -> None:
        """Stop serving and fetching: close the DEALER and files, cancel tasks (partial data stays)."""
        if self._closed:
            return
        self._closed = True
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        for task in list(self._tasks):
            task.cancel()
        for t in list(self._transfers.values()):
            self._end(t, None)
        self._parked.clear()
        self._drop_dealer()
        self._upstream = None
        while self._fds:
            fd, _ = self._fds.popitem()[1]
            os.close(fd)
        if self._link is not None and self._link.on_data == self._on_request:
            self._link.on_data = None
        self._link = None

    def statistics(self) -> dict:
        """A snapshot of the counters, plus what is in flight right now."""
        snap = dict(self._c)
        snap.update(
            transfers=len(self._transfers),
            outstanding=len(self._requests),
            parked=sum(len(v) for v in self._parked.values()),
            open_files=len(self._fds),
            upstream=self._upstream,
        )
        return snap

    # -- fetching --------------------------------------------------------------
    async def fetch(self, digest: str, size: int, *, timeout: float) -> Path:
        """Make sure object ``digest`` of ``size`` bytes is in the cache; returns its path.

        Concurrent fetches of one digest share one transfer, and a fetch
        resumes from partial data.  Raises ``PackageError`` when the hash does
        not match (nothing is cached) or the upstream does not have the
        package, and ``TimeoutError`` when it cannot finish in ``timeout``
        seconds (what arrived is kept for the next fetch).
        """
        if self._closed:
            raise PackageError("the chunk service is closed")
        path = self._cache.path(digest)  # a PackageError for anything but a sha256 hex digest
        if not _is_int(size) or not 0 <= size <= _MAX_SIZE:
            raise PackageError(f"package size must be an integer >= 0, got {size!r}")
        if path.is_file():
            self._c["cache_hits"] += 1
            return path
        deadline = time.monotonic() + timeout
        t = self._transfers.get(digest)
        if t is None:
            t = self._start(digest, size, deadline)
        elif t.size != size:
            raise PackageError(
                f"package {digest[:12]} requested with size {size} while a transfer of {t.size} bytes runs"
            )
        else:
            self._c["fetches_joined"] += 1
        t.waiters += 1
        t.deadline = max(t.deadline, deadline)
        try:
            return await asyncio.wait_for(asyncio.shield(t.future), timeout)
        except TimeoutError:
            self._c["fetch_timeouts"] += 1
            where = f"from {self._upstream}" if self._upstream else "with no upstream to fetch from"
            raise TimeoutError(
                f"package {digest[:12]}: got {t.got} of {size} bytes {where} in {timeout:g}s; "
                f"fetching it again resumes from there"
            ) from None
        finally:
            t.waiters -= 1
            if t.waiters == 0 and not t.future.done() and not t.committing:
                self._end(t, None)  # nobody waits any more: stop asking, keep the partial data

    def _start(self, digest: str, size: int, deadline: float) -> _Transfer:
        try:
            writer = self._cache.open_writer(digest, size)
        except OSError as e:
            raise PackageError(f"package {digest[:12]} cannot be stored here: {e}") from e
        future = asyncio.get_running_loop().create_future()
        # Mark every outcome retrieved: a failure nobody awaits any more is not an error.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        t = _Transfer(digest, size, writer, future)
        t.deadline = deadline  # before the first request: it tells the upstream how long we wait
        missing = writer.missing_ranges()
        chunk = self._chunk
        for start, end in missing:
            for off in range(start, end, chunk):
                t.todo.append((off, min(chunk, end - off)))
        if sum(end - start for start, end in missing) < size:
            self._c["resumed"] += 1
        self._transfers[digest] = t
        self._c["fetches"] += 1
        if t.todo:
            self._arm_tick()
            self._pump(t)
        else:
            self._finish(t)
        return t

    def _pump(self, t: _Transfer) -> None:
        """Grant requests up to the window (the receiver's credit)."""
        window = self._window
        while t.todo and len(t.outstanding) < window:
            offset, length = t.todo.popleft()
            mid = p.next_msg_id()
            req = _Request(t, offset, length)
            self._requests[mid] = req
            t.outstanding.add(mid)
            self._send_request(mid, req)
        if len(t.outstanding) > self._c["max_outstanding"]:
            self._c["max_outstanding"] = len(t.outstanding)

    def _send_request(self, mid: int, req: _Request) -> bool:
        dealer = self._dealer
        if dealer is None:
            return False
        t = req.transfer
        body = {"d": t.digest, "o": req.offset, "n": req.length, "s": t.size,
                "t": round(max(0.001, t.deadline - time.monotonic()), 3)}  # fmt: skip
        frames = p.encode(p.MsgType.CHUNK_REQUEST, body, msg_id=mid, using=self._codec)
        try:
            sent = self._loop.send(dealer, frames)
        except PlaneError:
            sent = False
        if not sent:
            # IMMEDIATE: not connected yet (or the upstream went away); wait for POLLOUT.
            self._await_writable()
            return False
        if req.sent_at is not None:
            self._c["retransmits"] += 1
        req.sent_at = time.monotonic()
        self._c["requests_sent"] += 1
        return True

    def _send_unsent(self) -> None:
        for mid, req in list(self._requests.items()):
            if req.sent_at is None and self._requests.get(mid) is req:
                if not self._send_request(mid, req):
                    return  # the socket is full or not connected: the rest waits too

    def _await_writable(self) -> None:
        if self._writable_task is None and self._loop.running and not self._closed:
            self._writable_task = self._spawn(self._writable_then_send(), "chunks-writable")

    async def _writable_then_send(self) -> None:
        try:
            while not self._closed and self._dealer is not None:
                if not any(r.sent_at is None for r in self._requests.values()):
                    return
                dealer = self._dealer
                if await self._loop.writable(dealer, timeout=self._request_timeout) and dealer is self._dealer:
                    self._writable_task = None  # a failed send below may start the next wait
                    self._send_unsent()
                    return
        finally:
            if self._writable_task is asyncio.current_task():
                self._writable_task = None

    def _on_reply(self, batch: list) -> None:
        """Handler of the DEALER: CHUNKs (or errors) answering our requests."""
        requests = self._requests
        for frames in batch:
            try:
                msg = p.decode_checked(frames, 0, self._codec)
            except p.ProtocolError:
                self._c["replies_bad"] += 1
                continue
            h = msg.header
            if h.type != p.MsgType.CHUNK:
                self._c["replies_bad"] += 1
                continue
            req = requests.get(h.ref)
            if req is None:
                self._c["replies_stale"] += 1  # answered already (a re-sent request) or abandoned
                continue
            t = req.transfer
            if h.flags & p.Flag.ERROR:
                del requests[h.ref]
                t.outstanding.discard(h.ref)
                self._end(t, self._upstream_error(t, msg.body))
                continue
            body = msg.body
            if (not isinstance(body, dict) or body.get("d") != t.digest or body.get("o") != req.offset
                    or len(msg.extra) != 1 or len(msg.extra[0]) != req.length):  # fmt: skip
                self._c["replies_bad"] += 1  # leave it outstanding: re-sent after request_timeout
                continue
            del requests[h.ref]
            t.outstanding.discard(h.ref)
            try:
                t.writer.write(req.offset, msg.extra[0])
            except (OSError, PackageError) as e:
                self._end(t, PackageError(f"package {t.digest[:12]} cannot be stored here: {e}"))
                continue
            t.got += req.length
            self._c["bytes_fetched"] += req.length
            self._c["chunks_fetched"] += 1
            parked = self._parked.get(t.digest)
            if parked:
                self._serve_arrived(t, parked)
            if t.todo:
                self._pump(t)  # this chunk's credit goes to the next request
            elif not t.outstanding:
                self._finish(t)

    def _serve_arrived(self, t: _Transfer, parked: dict) -> None:
        """Serve the parked children's requests that the chunks received so far cover."""
        entry = None
        for key, (offset, length) in list(parked.items()):
            if t.writer.covers(offset, offset + length):
                if entry is None:
                    entry = (t.writer.fileno(), t.size)
                del parked[key]
                self._c["served_partial"] += 1
                self._serve_chunk(key[0], key[1], t.digest, offset, length, entry)

    def _upstream_error(self, t: _Transfer, body) -> PackageError:
        code = body.get("code") if isinstance(body, dict) else None
        text = body.get("error") if isinstance(body, dict) else None
        text = str(text)[:500] if text else "no reason given"
        if code == ERR_MISSING:
            return PackageError(f"upstream has no package {t.digest[:12]}: {text}")
        if code == ERR_BAD_REQUEST:
            return PackageError(f"upstream refused the request for package {t.digest[:12]}: {text}")
        return PackageError(f"upstream could not get package {t.digest[:12]}: {text}")

    def _finish(self, t: _Transfer) -> None:
        """Everything arrived: verify and publish off the event loop."""
        t.committing = True
        self._spawn(self._commit(t), f"chunks-commit-{t.digest[:12]}")

    async def _commit(self, t: _Transfer) -> None:
        try:
            # Hashing the rest and fdatasync: tens of ms for big objects, so in a thread.
            path = await asyncio.get_running_loop().run_in_executor(None, t.writer.commit)
        except PackageError as e:
            # Every byte was there, so the only refusal left is a hash mismatch.
            self._c["hash_failures"] += 1
            logger.warning("%s", e)
            self._end(t, e)
        except OSError as e:
            self._end(t, PackageError(f"package {t.digest[:12]} cannot be stored here: {e}"))
        else:
            self._end(t, path)

    def _end(self, t: _Transfer, outcome) -> None:
        """Finish ``t`` with a path, an exception, or None (abandoned: partial data stays)."""
        if self._transfers.get(t.digest) is t:
            del self._transfers[t.digest]
        for mid in t.outstanding:
            self._requests.pop(mid, None)
        t.outstanding.clear()
        t.todo.clear()
        # A commit still running in its thread owns the writer; any other end releases it.
        if not isinstance(outcome, Path) and not (t.committing and outcome is None):
            try:
                t.writer.close()  # persist the ranges: the next fetch resumes
            except OSError as e:
                logger.warning("cannot save the partial state of package %s: %s", t.digest[:12], e)
        if t.future.done():
            return
        if isinstance(outcome, Path):
            t.future.set_result(outcome)
        elif isinstance(outcome, BaseException):
            self._c["fetch_failures"] += 1
            t.future.set_exception(outcome)
        elif t.waiters:
            t.future.set_exception(PackageError(f"package {t.digest[:12]}: the chunk service was closed"))
        else:
            t.future.cancel()

    def _arm_tick(self) -> None:
        if self._tick_handle is None and not self._closed:
            interval = max(0.01, self._request_timeout / 4)
            self._tick_handle = asyncio.get_running_loop().call_later(interval, self._tick)

    def _tick(self) -> None:
        """Re-send requests unanswered for ``request_timeout`` (or never sent)."""
        self._tick_handle = None
        if self._closed:
            return
        if self._dealer is not None:
            now = time.monotonic()
            limit = self._request_timeout
            for mid, req in list(self._requests.items()):
                if self._requests.get(mid) is not req:
                    continue
                if req.sent_at is None or now - req.sent_at >= limit:
                    if not self._send_request(mid, req):
                        break
        if self._transfers:
            self._arm_tick()

    def _drop_dealer(self) -> None:
        dealer, self._dealer = self._dealer, None
        if dealer is None:
            return
        try:
            self._loop.remove(dealer)
        except ValueError:
            pass  # the loop dropped it already (socket failure)
        dealer.close(0)

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = self._loop.spawn(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- serving ---------------------------------------------------------------
    def _on_request(self, identity: bytes, msg: p.Message) -> None:
        """``link.on_data``: one decoded data-plane message from a child."""
        h = msg.header
        if h.type != p.MsgType.CHUNK_REQUEST:
            self._c["requests_ignored"] += 1  # another data-plane service's message
            return
        self._c["requests"] += 1
        try:
            digest, offset, length, size, wait = _parse_request(msg.body)
        except _BadRequest as e:
            self._c["requests_bad"] += 1
            body = msg.body if isinstance(msg.body, dict) else {}
            d = body.get("d")
            d = d if isinstance(d, str) and _DIGEST_RE.match(d) else None  # echo only a well-formed digest
            self._send_error(identity, h.msg_id, d, body.get("o"), ERR_BAD_REQUEST, str(e))
            return
        entry = self._object(digest)
        if entry is not None:
            self._serve_chunk(identity, h.msg_id, digest, offset, length, entry)
            return
        t = self._transfers.get(digest)
        if t is not None and not t.committing and t.size == size and t.writer.covers(offset, offset + length):
            # Cut-through: this range already arrived here, so pass it on before the
            # whole package is in (the child checks the sha256 of the whole anyway).
            self._c["served_partial"] += 1
            self._serve_chunk(identity, h.msg_id, digest, offset, length, (t.writer.fileno(), t.size))
            return
        if self._upstream is None and self._root and digest not in self._transfers:
            self._c["requests_missing"] += 1
            self._send_error(identity, h.msg_id, digest, offset, ERR_MISSING,
                             f"no node up the tree has package {digest[:12]}")  # fmt: skip
            return
        if size is None:
            self._c["requests_bad"] += 1
            self._send_error(identity, h.msg_id, digest, offset, ERR_BAD_REQUEST,
                             "'s' (the package size) is needed to fetch it upstream")  # fmt: skip
            return
        # Not here yet: park the request and fetch the package first (store and forward).
        parked = self._parked.setdefault(digest, {})
        if len(parked) >= _PARK_LIMIT and (identity, h.msg_id) not in parked:
            self._c["requests_dropped"] += 1  # the child re-sends it later
            return
        parked[(identity, h.msg_id)] = (offset, length)  # a re-sent request keeps its msg_id
        self._c["requests_parked"] += 1
        if digest not in self._forwarding and not self._closed:
            self._forwarding.add(digest)
            # A child's nearly spent wait must not make this node give up at once:
            # its re-sent requests would only start the fetch again.
            wait = max(wait, self._request_timeout) if wait is not None else self._serve_timeout
            self._spawn(self._fetch_for_children(digest, size, wait),
                        f"chunks-forward-{digest[:12]}")  # fmt: skip

    async def _fetch_for_children(self, digest: str, size: int, wait: float) -> None:
        outcome: BaseException | None = None
        try:
            await self.fetch(digest, size, timeout=wait)
        except PackageError as e:
            outcome = e
        except TimeoutError as e:
            outcome = e
        finally:
            self._forwarding.discard(digest)
        parked = self._parked.pop(digest, {})
        if isinstance(outcome, TimeoutError):
            self._c["requests_dropped"] += len(parked)  # the children re-send and start another try
            return
        entry = None if outcome is not None else self._object(digest)
        for (identity, mid), (offset, length) in parked.items():
            if entry is not None:
                self._serve_chunk(identity, mid, digest, offset, length, entry)
            else:
                why = str(outcome) if outcome is not None else "it vanished from the cache"
                self._send_error(identity, mid, digest, offset, ERR_FAILED, why)

    def _object(self, digest: str) -> tuple[int, int] | None:
        """``(fd, size)`` of a cached object, opened once and kept (LRU); None if absent."""
        entry = self._fds.get(digest)
        if entry is not None:
            self._fds.move_to_end(digest)
            return entry
        try:
            fd = os.open(self._cache.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        entry = (fd, os.fstat(fd).st_size)
        self._fds[digest] = entry
        while len(self._fds) > self._open_limit:
            os.close(self._fds.popitem(last=False)[1][0])
        return entry

    def _serve_chunk(self, identity, mid: int, digest: str, offset: int, length: int,
                     entry: tuple[int, int]) -> None:  # fmt: skip
        fd, fsize = entry
        if offset + length > fsize:
            self._c["requests_bad"] += 1
            why = f"range [{offset}, {offset + length}) is outside the {fsize} bytes of the package"
            self._send_error(identity, mid, digest, offset, ERR_BAD_REQUEST, why)
            return
        # Read into one reusable buffer: libzmq copies the frame when it is
        # queued, so the buffer is free again as soon as the send returns.
        if len(self._buf) < length:
            self._buf = bytearray(length)
        view = memoryview(self._buf)[:length]
        got = os.preadv(fd, [view], offset)
        if got < length:  # the file is shorter than it was when opened: never send stale bytes
            self._c["requests_bad"] += 1
            self._send_error(identity, mid, digest, offset, ERR_FAILED, f"package {digest[:12]} is truncated here")
            return
        frames = p.encode(p.MsgType.CHUNK, {"d": digest, "o": offset}, ref=mid, extra=(view,), using=self._codec)
        if self._reply(identity, frames):
            self._c["bytes_served"] += length
            self._c["chunks_served"] += 1

    def _send_error(self, identity, mid: int, digest, offset, code: str, text: str) -> None:
        body = {"d": digest, "o": offset if _is_int(offset) else None, "code": code, "error": text}
        frames = p.encode(p.MsgType.CHUNK, body, ref=mid, flags=p.Flag.ERROR, using=self._codec)
        if self._reply(identity, frames):
            self._c["errors_sent"] += 1

    def _reply(self, identity, frames: list) -> bool:
        link = self._link
        sock = getattr(link, "data", None)
        if sock is None:
            self._c["replies_dropped"] += 1
            return False
        try:
            sent = self._loop.send(sock, [identity, *frames])
        except PlaneError:  # PeerUnreachable: the child left
            sent = False
        if not sent:
            self._c["replies_dropped"] += 1  # the child re-sends after its request_timeout
        return sent
