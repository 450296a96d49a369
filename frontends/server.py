"""The HTTP front end of a TACC service (the TranSend image distiller), on aiohttp.

Endpoints::

    GET /distill?url=U[&w=&h=&q=&fmt=][&user=]   one image, distilled for the user (X-User header or ?user=)
    GET /sheet?url=U1&url=U2...[&cols=&thumb=&q=&fmt=]  a contact sheet of several images (aggregation)
    GET /health                                     liveness + what the front end knows of the service
    GET /stats                                      every counter, as JSON

What one ``/distill`` does, in order:

1. **Checks**: the request URL is at most ``max_url`` characters (else 414);
   ``url`` is http(s) on an allowed origin (``scheme://host:port`` in
   ``--origin``, else 403 naming the allowed ones); no credentials in it.
   An origin given by host name is fetched only from the public addresses
   it resolves to: a name that resolves to a private, loopback, link-local
   or otherwise non-global address (DNS rebinding, a cloud metadata address)
   is refused with 403, unless the name is ``localhost`` or
   ``private_origins`` is set.  An origin given as an IP address is fetched
   as listed (its operator named that address).
2. **Customization**: the user's profile (SQLite, through a thread), overlaid
   by the query's ``w``/``h``/``q``/``fmt``, validated into the effective
   parameters (bad values: 400).
3. **Cache**: the result key is ``sha256(url + effective parameters)``; a hit
   is answered at once (``X-Cache: hit``).
4. **Original**: from this process's own LRU of originals (``local_originals``
   bytes), else from the cache, else fetched from the origin (no redirects
   followed, ``fetch_timeout``, at most ``max_original`` bytes) and cached.
   Identical concurrent fetches and dispatches are coalesced into one.
5. **Dispatch** to a worker (:class:`frontends.dispatch.TaskClient`: choice
   by beaconed queue + own in-flight, re-dispatch on timeout and worker
   death) within ``timeout`` seconds; the result is cached (by the worker's
   node itself when the key's cache instance is there: the TASK's ``put``),
   with an alias from the URL to it (renewed at most every ``ALIAS_REFRESH``
   seconds per URL), and returned (``X-Cache: miss``, ``X-SNS-Worker``).
6. **BASE**: when no worker is known, all are over ``max_queue``, or none
   answered in time, the answer is approximate instead of an error: the last
   distilled version of that URL cached for any parameters
   (``X-SNS-Approximate: cached``) or else the original bytes
   (``X-SNS-Approximate: original``), with ``X-SNS-Reason`` saying why.  A
   worker that *failed* on the input (not an image) is a 422.

``/sheet`` works the same way with every original as one input of the
aggregation worker; an original that cannot be fetched becomes a crossed-out
tile (the worker's placeholder), and under overload only a cached sheet of the
same URLs can stand in (else 503).

:class:`FrontEnd` has an explicit lifecycle (``start``/``stop``, ``async with``;
``make_app`` gives the aiohttp application); ``python -m frontends`` is the
CLI (frontends/__main__.py).  Tested in tests/frontends/test_server.py.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable

import aiohttp
import yarl
import zmq
from aiohttp import web

from bus.planes import PlaneLoop, SocketFactory, new_context
from bus.protocol import MAX_EXTRA, MAX_FRAME
from examples.transend.distill import MAX_ITEMS, DistillError, DistillParams, SheetParams
from nodes.cachestore import CacheError, CacheStore
from nodes.worker import tune_allocator
from frontends.beacon import AGGREGATION, TRANSFORMATION, BeaconClient
from frontends.cacheclient import CacheClient
from frontends.dataplane import DataPlane, DispatchError
from frontends.dispatch import TaskClient, TaskFailed, TaskResult
from frontends import origins
from frontends.origins import Original, OriginError, origin_of
from frontends.profiles import DEFAULTS, MAX_USER_LEN, InvalidProfile, ProfileError, SQLiteProfileStore

__all__ = [
    "X_CACHE",
    "X_APPROXIMATE",
    "X_REASON",
    "X_WORKER",
    "FrontEndConfig",
    "FrontEnd",
    "origin_of",
    "result_key",
    "serve",
]

log = logging.getLogger(__name__)

X_CACHE = "X-Cache"
X_APPROXIMATE = "X-SNS-Approximate"
X_REASON = "X-SNS-Reason"
X_WORKER = "X-SNS-Worker"

_DISTILL_QUERY = {"w": "max_width", "h": "max_height", "q": "quality", "fmt": "format", "max_width": "max_width",
                  "max_height": "max_height", "quality": "quality", "format": "format"}  # fmt: skip
_SHEET_QUERY = {"cols": "columns", "columns": "columns", "thumb": "thumb", "q": "quality", "quality": "quality",
                "fmt": "format", "format": "format"}  # fmt: skip
_SERVICE_PATHS = ("/distill", "/sheet")
#: upper bounds (seconds) of the request latency histogram buckets (one more bucket above the last)
LATENCY_BOUNDS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def result_key(kind: str, urls: list[str], params: dict) -> str:
    """Cache key of a result: sha256 of the kind, the URL(s) and the effective parameters."""
    return "r:" + _digest(kind, *urls, json.dumps(params, sort_keys=True))


def _alias_key(kind: str, urls: list[str]) -> str:
    # The URL(s) -> the key of the last result made from them, whatever the parameters (BASE).
    return "a:" + _digest(kind, *urls)


def _original_key(url: str) -> str:
    return "o:" + _digest(url)


#: Seconds between two writes of a URL's alias by one front end: BASE wants *a* version made with other
#: parameters, and a popular URL would otherwise cost one more cache put per request.
ALIAS_REFRESH = 5.0
_ALIAS_MEMORY = 4096  # URLs whose last alias write this front end remembers


_WORKER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class FrontEndConfig:
    """Everything a front end is told; checked on creation (``ValueError`` with a sentence).

    ``timeout`` is the time one request may wait for workers (all attempts)
    before the answer turns approximate; ``attempt_timeout`` (default half of
    it) the wait for one worker before re-dispatching.  ``max_original`` is
    capped by the bus's largest frame (``bus.protocol.MAX_FRAME``), since an
    original travels to its worker as one frame.
    """

    manager: str
    service: str = "transend"
    origins: tuple[str, ...] = ()
    profiles: str | None = None
    timeout: float = 3.0
    attempt_timeout: float | None = None
    attempts: int = 3
    max_queue: int | None = 32
    fetch_timeout: float = 10.0
    max_original: int = MAX_FRAME
    max_url: int = 4096
    max_sheet: int = 16
    cache_timeout: float = 0.05
    local_originals: int = 64 << 20  # bytes of originals kept in this process too (LRU); 0: none
    renew: float = 2.0
    stale_after: float = 3.0
    distill_worker: str | None = None  # a worker name; None: any transformation worker
    sheet_worker: str | None = None  # a worker name; None: any aggregation worker
    restart_manager: bool = True  # process peers: restart the manager when it is dead (same host only)
    private_origins: bool = False  # origin host names may resolve to private/loopback/link-local addresses
    manager_grace: float = 5.0  # seconds without a beacon before the manager counts as dead
    security: object = None  # bus.security.Security: CURVE to the manager and the workers; None: plain TCP

    def __post_init__(self):
        try:
            origins = tuple(sorted({origin_of(o) for o in self.origins}))
        except ValueError as e:
            raise ValueError(f"bad --origin: {e}; give origins as http://HOST:PORT") from None
        object.__setattr__(self, "origins", origins)
        for name in ("timeout", "fetch_timeout", "cache_timeout", "renew", "stale_after"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.attempt_timeout is not None and not self.attempt_timeout > 0:
            raise ValueError(f"attempt_timeout must be > 0 seconds, got {self.attempt_timeout}")
        if not 1 <= self.max_original <= MAX_FRAME:
            raise ValueError(f"max_original must be 1..{MAX_FRAME} bytes (the bus's largest frame), "
                             f"got {self.max_original}")  # fmt: skip
        if not 1 <= self.max_sheet <= min(MAX_ITEMS, MAX_EXTRA):
            raise ValueError(f"max_sheet must be 1..{min(MAX_ITEMS, MAX_EXTRA)}, got {self.max_sheet}")
        if self.attempts < 1 or self.max_url < 64 or (self.max_queue is not None and self.max_queue < 1):
            raise ValueError("attempts and max_queue must be >= 1 and max_url >= 64")
        if self.local_originals < 0:
            raise ValueError(f"local_originals must be >= 0 bytes, got {self.local_originals}")

    @property
    def per_attempt(self) -> float:
        return self.attempt_timeout if self.attempt_timeout is not None else self.timeout / 2


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


def _http_error(status: int, text: str) -> web.HTTPException:
    cls = {400: web.HTTPBadRequest, 403: web.HTTPForbidden, 404: web.HTTPNotFound, 413: web.HTTPRequestEntityTooLarge,
           414: web.HTTPRequestURITooLong, 422: web.HTTPUnprocessableEntity, 502: web.HTTPBadGateway,
           503: web.HTTPServiceUnavailable, 504: web.HTTPGatewayTimeout}[status]  # fmt: skip
    if cls is web.HTTPRequestEntityTooLarge:
        return web.HTTPRequestEntityTooLarge(max_size=0, actual_size=0, text=text)
    return cls(text=text)


class FrontEnd:
    """One front end process: bus clients, profile store, origin client and the HTTP handlers."""

    def __init__(self, config: FrontEndConfig, *, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        self._context: zmq.Context | None = None
        self._factory: SocketFactory | None = None
        self._loop: PlaneLoop | None = None
        self.beacons: BeaconClient | None = None
        self.watch = None  # frontends.peers.ManagerWatch: restarts a dead manager (process peers)
        self._lat = [0] * (len(LATENCY_BOUNDS) + 1)
        self._lat_sum = 0.0
        self.plane: DataPlane | None = None
        self.tasks: TaskClient | None = None
        self.cache: CacheClient | None = None
        self._profiles: SQLiteProfileStore | None = None
        self._session: aiohttp.ClientSession | None = None
        self._resolver: origins.PublicResolver | None = None
        self._background: set[asyncio.Task] = set()
        self._flights: dict[tuple, asyncio.Task] = {}
        # Originals this process fetched or read from the cache: a request for a popular image skips the
        # cache partition's round trip (and the image's copy through it).
        self._originals = CacheStore(config.local_originals) if config.local_originals else None
        self._aliased: dict[str, float] = {}  # alias key -> when this front end last wrote it
        self._started = 0.0
        self._c = dict.fromkeys((
            "requests", "distill", "sheet", "hits", "misses", "approximate_cached", "approximate_original",
            "unavailable", "forbidden", "bad_requests", "failed", "origin_fetches", "origin_bytes", "origin_errors",
            "original_hits", "original_local_hits", "alias_writes", "profile_lookups", "profile_errors", "coalesced",
            "status_2xx", "status_3xx", "status_4xx", "status_5xx"), 0)  # fmt: skip

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Subscribe to the manager's beacons, open the profile store and the origin client."""
        cfg = self.config
        self._context = new_context()
        self._factory = SocketFactory(self._context, linger=0, security=cfg.security)
        self._loop = PlaneLoop()
        await self._loop.start()
        self.beacons = BeaconClient(self._factory, self._loop, cfg.manager, cfg.service, renew=cfg.renew,
                                    stale_after=cfg.stale_after, clock=self._clock)  # fmt: skip
        self.plane = DataPlane(self._factory, self._loop, connect_timeout=min(0.5, cfg.per_attempt), clock=self._clock)
        self.tasks = TaskClient(self.plane, self.beacons, timeout=cfg.per_attempt, deadline=cfg.timeout,
                                attempts=cfg.attempts, max_queue=cfg.max_queue, clock=self._clock)  # fmt: skip
        self.cache = CacheClient(self.plane, self.beacons, timeout=cfg.cache_timeout)
        await self.plane.start()
        await self.beacons.start()
        if cfg.restart_manager:
            from frontends.peers import ManagerWatch

            self.watch = ManagerWatch(self.beacons, grace=cfg.manager_grace)
            self.watch.start()
        if cfg.profiles:
            self._profiles = await asyncio.to_thread(SQLiteProfileStore, cfg.profiles)
        self._resolver = resolver = origins.PublicResolver(origins.default_resolver(), cfg.private_origins)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=cfg.fetch_timeout),
                                              connector=aiohttp.TCPConnector(limit=256, resolver=resolver))  # fmt: skip
        self._started = self._clock()
        log.info("front end for %s: manager %s, origins %s, profiles %s", cfg.service, cfg.manager,
                 ", ".join(cfg.origins) or "(none)", cfg.profiles or "(defaults only)")  # fmt: skip

    async def stop(self) -> None:
        """Cancel background work and close every socket, session and file (idempotent)."""
        if self.watch is not None:
            await self.watch.stop()
            self.watch = None
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.beacons is not None:
            await self.beacons.stop()
        if self.plane is not None:
            await self.plane.stop()
        if self._loop is not None:
            await self._loop.stop()
        if self._session is not None:
            await self._session.close()
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None
        if self._profiles is not None:
            await asyncio.to_thread(self._profiles.close)
        if self._factory is not None:
            self._factory.close(linger=0)
        if self._context is not None:
            self._context.term()
        self._context = self._factory = self._loop = self._session = self._profiles = None
        self.beacons = self.plane = self.tasks = self.cache = None

    async def __aenter__(self) -> FrontEnd:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def make_app(self) -> web.Application:
        """The aiohttp application serving this front end (start the front end first)."""
        app = web.Application(middlewares=[self._count_middleware])
        app.router.add_get("/distill", self.handle_distill)
        app.router.add_get("/sheet", self.handle_sheet)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/stats", self.handle_stats)
        app.on_response_prepare.append(self._always_x_cache)
        return app

    # -- background work ---------------------------------------------------------
    def _spawn(self, coro: Awaitable) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()  # retrieved here; waiters re-raise it themselves
            if not isinstance(exc, (OriginError, DispatchError)):
                log.error("background task failed", exc_info=exc)

    async def _shared(self, key: tuple, make: Callable[[], Awaitable]):
        """Run ``make()`` once for concurrent callers with the same key (single flight).

        The first caller runs the work itself (no task of its own: a request
        costs fewer event-loop turns); the others wait on its flight, a
        future.  aiohttp does not cancel a handler whose client hung up, so
        the work goes on for the others; if the first caller is cancelled all
        the same (the front end stops), a waiter that is not takes the work
        over.
        """
        while True:
            flight = self._flights.get(key)
            if flight is None:
                break
            self._c["coalesced"] += 1
            try:
                return await asyncio.shield(flight)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not flight.cancelled() or (task is not None and task.cancelling()):
                    raise  # we are the ones being cancelled
        flight = self._flights[key] = asyncio.get_running_loop().create_future()
        flight.add_done_callback(_retrieve)  # no "exception never retrieved" for a flight nobody waited on
        try:
            result = await make()
        except asyncio.CancelledError:
            flight.cancel()
            raise
        except BaseException as e:
            flight.set_exception(e)
            raise
        else:
            flight.set_result(result)
            return result
        finally:
            if self._flights.get(key) is flight:
                del self._flights[key]

    # -- middleware and signals ------------------------------------------------------
    @web.middleware
    async def _count_middleware(self, request: web.Request, handler):
        self._c["requests"] += 1
        timed = request.path in _SERVICE_PATHS
        t0 = time.perf_counter() if timed else 0.0
        try:
            response = await handler(request)
        except web.HTTPException as e:
            self._c[f"status_{e.status // 100}xx"] += 1
            if timed:
                self._observe(time.perf_counter() - t0)
            raise
        self._c[f"status_{response.status // 100}xx"] += 1
        if timed:
            self._observe(time.perf_counter() - t0)
        return response

    def _observe(self, seconds: float) -> None:
        """Service request latency into a histogram (``/stats`` "latency"; the monitor's percentiles)."""
        self._lat[bisect.bisect_left(LATENCY_BOUNDS, seconds)] += 1
        self._lat_sum += seconds

    @staticmethod
    async def _always_x_cache(request: web.Request, response: web.StreamResponse) -> None:
        if request.path in _SERVICE_PATHS and X_CACHE not in response.headers:
            response.headers[X_CACHE] = "miss"

    # -- request parts -----------------------------------------------------------------
    def _check_request(self, request: web.Request) -> None:
        if len(request.raw_path) > self.config.max_url:
            self._c["bad_requests"] += 1
            raise _http_error(414, f"request URL of {len(request.raw_path)} characters; "
                                   f"the limit is {self.config.max_url}\n")  # fmt: skip

    def _allowed(self, url: str) -> str:
        """The URL, checked: absolute http(s), no credentials, on an allowed origin."""
        try:
            u = yarl.URL(url)
            origin = origin_of(u)
        except ValueError as e:
            self._c["bad_requests"] += 1
            raise _http_error(400, f"bad url parameter: {e}\n") from None
        if u.user is not None or u.password is not None:
            self._c["bad_requests"] += 1
            raise _http_error(400, "bad url parameter: credentials in URLs are not accepted\n")
        if origin not in self.config.origins:
            self._c["forbidden"] += 1
            allowed = ", ".join(self.config.origins) or "none (start the front end with --origin)"
            raise _http_error(403, f"origin {origin} is not allowed: this front end fetches images only from "
                                   f"{allowed}\n")  # fmt: skip
        return str(u.with_fragment(None))

    def _user(self, request: web.Request) -> str | None:
        user = request.headers.get("X-User") or request.query.get("user")
        if user is not None and not 0 < len(user) <= MAX_USER_LEN:
            self._c["bad_requests"] += 1
            raise _http_error(400, f"user names are 1 to {MAX_USER_LEN} characters\n")
        return user

    async def _profile(self, user: str | None) -> dict:
        if user is None or self._profiles is None:
            return dict(DEFAULTS)
        self._c["profile_lookups"] += 1
        try:
            return await asyncio.to_thread(self._profiles.get, user)
        except InvalidProfile as e:
            self._c["bad_requests"] += 1
            raise _http_error(400, f"{e}\n") from None
        except ProfileError as e:
            # The ACID store is down: serve with the defaults rather than fail.
            self._c["profile_errors"] += 1
            log.warning("profile of %r unavailable, using the defaults: %s", user, e)
            return dict(DEFAULTS)

    def _params(self, cls, names: dict, profile: dict, request: web.Request) -> dict:
        query = {names[k]: v for k, v in request.query.items() if k in names}
        try:
            return asdict(cls.from_layers(profile, query))
        except DistillError as e:
            self._c["bad_requests"] += 1
            raise _http_error(400, f"{e}\n") from None

    def _local_original(self, key: str) -> Original | None:
        """The original of cache key ``key`` if this process holds it (no I/O)."""
        local = self._originals.get(key) if self._originals is not None else None
        if local is None:
            return None
        self._c["original_hits"] += 1
        self._c["original_local_hits"] += 1
        return Original(local.data, local.content_type or "application/octet-stream")

    async def _original(self, url: str) -> Original:
        """The original bytes of ``url``: local LRU, cache, else one shared fetch; raises OriginError."""
        key = _original_key(url)
        local = self._local_original(key)
        if local is not None:
            return local
        hit = await self.cache.get(key)
        if hit is not None:
            self._c["original_hits"] += 1
            self._keep_original(key, hit.data, hit.content_type)
            return Original(hit.data, hit.content_type)
        return await self._shared(("o", url), lambda: self._fetch(url))

    def _keep_original(self, key: str, data: bytes, ctype: str) -> None:
        if self._originals is not None:
            try:
                self._originals.put(key, data, {"content_type": ctype})
            except CacheError:
                pass  # larger than the whole local store: the cache partition keeps it

    async def _fetch(self, url: str) -> Original:
        self._c["origin_fetches"] += 1
        try:
            original = await origins.fetch(self._session, url, limit=self.config.max_original,
                                           timeout=self.config.fetch_timeout)  # fmt: skip
        except OriginError as e:
            self._c["origin_errors"] += 1
            if e.status == 403:  # a host name that resolves only to private addresses
                self._c["forbidden"] += 1
            raise
        self._c["origin_bytes"] += len(original.data)
        self._spawn(self.cache.put(_original_key(url), original.data, {"ct": original.content_type}))
        self._keep_original(_original_key(url), original.data, original.content_type)
        return original

    def _answer(self, data: bytes, ctype: str, *, cache: str, approx: str | None = None,
                worker: str | None = None, reason: str | None = None) -> web.Response:  # fmt: skip
        headers = {"Content-Type": ctype, X_CACHE: cache}
        if approx:
            headers[X_APPROXIMATE] = approx
            self._c[f"approximate_{approx}"] += 1
        if reason:
            headers[X_REASON] = reason
        if worker:
            headers[X_WORKER] = worker
        self._c["hits" if cache == "hit" else "misses"] += 1
        return web.Response(body=data, headers=headers)

    async def _store(self, key: str, alias: str, data: bytes | None, ctype: str) -> None:
        """Put the result (unless ``data`` is None: the worker's node stored it) and, when due, its alias."""
        if data is not None and not await self.cache.put(key, data, {"ct": ctype}):
            return
        if self._alias_due(alias):
            self._c["alias_writes"] += 1
            await self.cache.put(alias, key.encode(), {})

    async def _run(self, key: str, alias: str, inputs: list[bytes], params: dict, kind: str, name: str | None,
                   source: tuple[str, str] | None, probe: bool) -> TaskResult:  # fmt: skip
        """Dispatch (once for every request that waits on ``key``), then cache the result.

        ``source``: (cache key, content type) of the single input, an original the cache holds: a worker on
        its node reads it there instead of receiving it.  ``probe``: the cache was not asked for the
        result; the worker's stub answers it from there if it is cached (``res.hit``).
        """
        ref = self.cache.locate(source[0]) if source is not None else None
        res = await self.tasks.call(inputs, params, kind=kind, name=name, put=self.cache.locate(key), ref=ref,
                                    probe=probe)  # fmt: skip
        if res.hit is not None:
            self.cache.probed(res.hit)
            if res.hit:
                return res  # the cached result: nothing ran, nothing to store
        if res.ref_missed:
            # Evicted from its instance, or the ring moved it: put it back for the next requests.
            self._spawn(self.cache.put(source[0], inputs[0], {"ct": source[1]}))
        if res.stored:
            self.cache.stored_by_worker()  # the worker's node wrote it into the cache before answering
            if alias in self._aliased and self._clock() - self._aliased[alias] < ALIAS_REFRESH:
                return res  # nothing else to write: no task for it
        self._spawn(self._store(key, alias, None if res.stored else res.data, res.content_type))
        return res

    def _alias_due(self, alias: str) -> bool:
        """Whether to (re)write ``alias`` now: not written by this front end in the last ALIAS_REFRESH s."""
        now = self._clock()
        last = self._aliased.pop(alias, None)
        if last is not None and now - last < ALIAS_REFRESH:
            self._aliased[alias] = last  # most recently used last
            return False
        self._aliased[alias] = now
        if len(self._aliased) > _ALIAS_MEMORY:
            del self._aliased[next(iter(self._aliased))]
        return True

    async def _approximate(self, alias: str, original: Original | None, err: DispatchError) -> web.Response:
        """BASE: a cached version made with other parameters, else the original, else 503."""
        pointer = await self.cache.get(alias)
        if pointer is not None:
            hit = await self.cache.get(pointer.data.decode(errors="replace"))
            if hit is not None:
                return self._answer(hit.data, hit.content_type, cache="miss", approx="cached", reason=err.code)
        if original is not None:
            return self._answer(original.data, original.content_type, cache="miss", approx="original", reason=err.code)
        self._c["unavailable"] += 1
        raise _http_error(503, f"no worker could answer ({err.code}) and no approximate version is cached: {err}\n")

    async def _dispatch(self, key: str, alias: str, inputs: list[bytes], params: dict, kind: str,
                        name: str | None, original: Original | None, source: str | None = None,
                        probe: bool = False) -> web.Response:  # fmt: skip
        where = (source, original.content_type) if source is not None and original is not None else None
        try:
            res = await self._shared(("r", key), lambda: self._run(key, alias, inputs, params, kind, name, where,
                                                                   probe))  # fmt: skip
        except TaskFailed as e:
            self._c["failed"] += 1
            raise _http_error(422, f"the worker could not process the input: {e.err}\n") from None
        except DispatchError as e:
            if probe:
                # No worker took it (saturated, say): a cached result is still a hit.
                hit = await self.cache.get(key)
                if hit is not None:
                    return self._answer(hit.data, hit.content_type, cache="hit")
            log.debug("approximate answer for %s: %s", key, e)
            return await self._approximate(alias, original, e)
        if res.hit:
            return self._answer(res.data, res.content_type, cache="hit")
        return self._answer(res.data, res.content_type, cache="miss", worker=res.worker)

    # -- handlers ----------------------------------------------------------------------
    async def handle_distill(self, request: web.Request) -> web.Response:
        """``GET /distill?url=...``: one image, customized, cached, BASE under overload."""
        self._c["distill"] += 1
        self._check_request(request)
        urls = request.query.getall("url", [])
        if len(urls) != 1:
            self._c["bad_requests"] += 1
            raise _http_error(400, "give exactly one url parameter: /distill?url=http://ORIGIN/PATH\n")
        url = self._allowed(urls[0])
        params = self._params(DistillParams, _DISTILL_QUERY, await self._profile(self._user(request)), request)
        # ?worker=NAME picks another transformation class of the service, e.g. a pipeline
        # "grey | distill" declared as its own <worker> in the spec.
        worker = request.query.get("worker") or self.config.distill_worker
        if worker is not None and not _WORKER_NAME.fullmatch(worker):
            self._c["bad_requests"] += 1
            raise _http_error(400, "worker must be a worker class name of the service (letters, digits, _ . -)\n")
        key = result_key("distill" if worker == self.config.distill_worker else f"distill:{worker}", [url], params)
        alias, source = _alias_key("distill", [url]), _original_key(url)
        where = self.cache.locate(key)
        if where is not None and self.tasks.local_to(where["data"], TRANSFORMATION, worker):
            original = self._local_original(source)
            if original is not None:
                # The workers and the result's cache instance share a node: the worker's stub looks the
                # result up there (probe) instead of a lookup of our own first.
                return await self._dispatch(key, alias, [original.data], params, TRANSFORMATION, worker, original,
                                            source, probe=True)  # fmt: skip
        hit = await self.cache.get(key)
        if hit is not None:
            return self._answer(hit.data, hit.content_type, cache="hit")
        try:
            original = await self._original(url)
        except OriginError as e:
            raise _http_error(e.status, e.text) from None
        return await self._dispatch(key, alias, [original.data], params, TRANSFORMATION, worker, original, source)

    async def handle_sheet(self, request: web.Request) -> web.Response:
        """``GET /sheet?url=..&url=..``: a contact sheet (aggregation) of several images."""
        self._c["sheet"] += 1
        self._check_request(request)
        urls = request.query.getall("url", [])
        if not 1 <= len(urls) <= self.config.max_sheet:
            self._c["bad_requests"] += 1
            raise _http_error(400, f"give 1 to {self.config.max_sheet} url parameters: /sheet?url=..&url=..\n")
        urls = [self._allowed(u) for u in urls]
        params = self._params(SheetParams, _SHEET_QUERY, await self._profile(self._user(request)), request)
        key = result_key("sheet", urls, params)
        hit = await self.cache.get(key)
        if hit is not None:
            return self._answer(hit.data, hit.content_type, cache="hit")
        fetched = await asyncio.gather(*(self._original(u) for u in urls), return_exceptions=True)
        for item in fetched:
            if isinstance(item, BaseException) and not isinstance(item, OriginError):
                raise item
        if all(isinstance(item, OriginError) for item in fetched):
            first = fetched[0]
            raise _http_error(first.status, first.text)
        # BASE: an image that cannot be fetched becomes an empty input, which
        # the aggregator draws as a crossed-out tile.
        inputs = [b"" if isinstance(item, OriginError) else item.data for item in fetched]
        return await self._dispatch(key, _alias_key("sheet", urls), inputs, params, AGGREGATION,
                                    self.config.sheet_worker, None)  # fmt: skip

    async def handle_health(self, request: web.Request) -> web.Response:
        """``GET /health``: 200 while the process serves; says what it knows of the service."""
        b = self.beacons.latest
        return web.json_response({
            "status": "ok", "service": self.config.service, "manager": self.config.manager,
            "workers": len(b.workers) if b else 0, "caches": len(b.caches) if b else 0,
            "beacon_age": self.beacons.age(), "stale": self.beacons.stale,
        })  # fmt: skip

    async def handle_stats(self, request: web.Request) -> web.Response:
        """``GET /stats``: every counter of the front end and its bus clients, as JSON."""
        return web.json_response(self.statistics())

    def statistics(self) -> dict:
        """Counters of the front end, its task, cache and beacon clients and its data plane (plain dicts)."""
        return {
            "uptime": self._clock() - self._started,
            "frontend": dict(self._c),
            "latency": {"bounds": list(LATENCY_BOUNDS), "counts": list(self._lat), "sum": self._lat_sum},
            "peers": {"manager_restarts": self.watch.restarts, "reason": self.watch.last_reason}
            if self.watch is not None else {},
            "tasks": dict(self.tasks.statistics()),
            "cache": dict(self.cache.statistics()),
            "beacons": dict(self.beacons.statistics()),
            "plane": dict(self.plane.statistics()),
        }


async def serve(config: FrontEndConfig, host: str = "127.0.0.1", port: int = 8080, *,
                stop: asyncio.Event | None = None, access_log: bool = False,
                ready: Callable[[int], Any] | None = None) -> None:  # fmt: skip
    """Run a front end on ``host:port`` until ``stop`` is set, then shut down cleanly.

    ``ready(port)`` is called once the socket listens (with the real port when ``port`` is 0).
    """
    stop = stop or asyncio.Event()
    tune_allocator()  # originals and results by the hundred kilobytes: keep large buffers for reuse
    async with FrontEnd(config) as fe:
        runner = web.AppRunner(fe.make_app(), access_log=logging.getLogger("aiohttp.access") if access_log else None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound = runner.addresses[0][1] if runner.addresses else port
            log.info("serving %s on http://%s:%d", config.service, host, bound)
            # Told to the manager with every subscription, so the monitor finds this front end.
            fe.beacons.http_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{bound}"
            if ready is not None:
                ready(bound)
            await stop.wait()
            log.info("stopping")
        finally:
            await runner.cleanup()
