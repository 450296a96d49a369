"""The front end's client of the partitioned cache: originals and results by key.

The cache instances of a service are listed in its beacon (``caches``: id,
node, data endpoint).  A key belongs to one instance, chosen on a
consistent-hash ring (:class:`frontends.hashring.HashRing`) of the instance
ids, so when an instance joins or leaves only its share of keys moves.  Each
operation is one ``TASK`` to the instance over the shared
:class:`~frontends.dataplane.DataPlane` (docs/services.md)::

    TASK       {svc, w: cache id, rid, op: "get"|"put"|"del", k: key, meta?}  (+ value frame for put)
    TASK_REPLY {rid, ok, hit: bool, meta}                                     (+ value frame on a hit)

The cache is an accelerator, never a dependency: a missing, slow (past
``timeout``, 50 ms by default) or failing instance is a miss, and a put that
does not land is only counted.  Nothing here raises on a cache problem.

Nor need a result travel back for its put, or a cached original travel to
its worker: :meth:`CacheClient.locate` names the key's instance and node for
the TASK's ``put`` and ``in``, and a worker on that node stores its result
there before it answers (counted with :meth:`CacheClient.stored_by_worker`)
or takes its input from there.

Tested in tests/frontends/test_server.py (through the front end) against the
in-memory cache instance of tests/frontends/taskpeer.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

from bus.protocol import MAX_FRAME
from frontends.beacon import Beacon, BeaconClient
from frontends.dataplane import DataPlane, DispatchError
from frontends.hashring import HashRing

__all__ = ["CachedEntry", "CacheClient"]

log = logging.getLogger(__name__)

_META_TYPES = (str, int, float, bool)


@dataclass(frozen=True)
class CachedEntry:
    """A value found in the cache, its metadata and the instance that held it."""

    data: bytes
    meta: Mapping[str, Any]
    instance: str

    @property
    def content_type(self) -> str:
        # "ct" from a front end's put, "content_type" from a worker stub's (a TASK's ``put``).
        ct = self.meta.get("ct") or self.meta.get("content_type")
        return ct if isinstance(ct, str) and ct else "application/octet-stream"


class CacheClient:
    """Get/put/delete on the cache instances of ``beacons``' service; every failure is a miss."""

    def __init__(self, plane: DataPlane, beacons: BeaconClient, *, timeout: float = 0.05,
                 max_value: int = MAX_FRAME, on_error: Callable[[str, Exception], Any] | None = None):  # fmt: skip
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.svc = beacons.svc
        self._plane = plane
        self._timeout = float(timeout)
        self._max_value = int(max_value)
        self._ring = HashRing()
        self._data: dict[str, str] = {}  # cache id -> data endpoint
        self._c = dict.fromkeys(("gets", "hits", "misses", "no_cache", "timeouts", "errors", "puts", "stored",
                                 "stored_by_workers", "probes", "put_failed", "too_large", "deletes",
                                 "ring_changes"), 0)  # fmt: skip
        beacons.add_listener(self._on_beacon)

    def _on_beacon(self, beacon: Beacon) -> None:
        data = {c.id: c.data for c in beacon.caches}
        if data.keys() != self._data.keys():
            for gone in self._data.keys() - data.keys():
                self._ring.remove(gone)
            for new in data.keys() - self._data.keys():
                self._ring.add(new)
            self._c["ring_changes"] += 1
            log.info("%s cache ring: %d instance(s)", self.svc, len(data))
        self._data = data

    @property
    def instances(self) -> list[str]:
        """Cache instance ids on the ring."""
        return self._ring.nodes

    def owner(self, key: str) -> str | None:
        """The cache instance holding ``key`` (None without caches)."""
        return self._ring.owner(key) if len(self._ring) else None

    def locate(self, key: str) -> dict | None:
        """``{w: owner instance, k: key, data: its node's data endpoint}`` (None without caches): the
        ``put`` and ``ref`` of :meth:`TaskClient.call <frontends.dispatch.TaskClient.call>`, with which a
        worker on that node stores its result there, or takes its input from there."""
        owner = self.owner(key)
        return None if owner is None else {"w": owner, "k": key, "data": self._data[owner]}

    def probed(self, hit: bool) -> None:
        """Count a lookup a worker's stub made for us (a TASK's ``probe``) like a get."""
        self._c["gets"] += 1
        self._c["hits" if hit else "misses"] += 1
        self._c["probes"] += 1

    def stored_by_worker(self) -> None:
        """Count a result a worker's node wrote into its cache instance (a put this client did not send)."""
        self._c["puts"] += 1
        self._c["stored"] += 1
        self._c["stored_by_workers"] += 1

    async def _ask(self, key: str, body: dict, extra=()) -> tuple[dict, list] | None:
        owner = self.owner(key)
        if owner is None:
            self._c["no_cache"] += 1
            return None
        try:
            request = {"svc": self.svc, "w": owner, "k": key, **body}
            reply, frames = await self._plane.request(self._data[owner], request, extra, timeout=self._timeout)
        except TimeoutError:
            self._c["timeouts"] += 1
            return None
        except (DispatchError, ValueError) as e:  # unreachable, or a value the wire refuses
            self._c["errors"] += 1
            log.debug("cache %s %s %s: %s", owner, body.get("op"), key, e)
            return None
        if not isinstance(reply, dict) or reply.get("ok") is not True:
            self._c["errors"] += 1
            return None
        return reply, frames

    async def get(self, key: str) -> CachedEntry | None:
        """The cached value of ``key``, or None (miss, no cache, slow or failing cache)."""
        self._c["gets"] += 1
        answer = await self._ask(key, {"op": "get"})
        if answer is not None:
            reply, frames = answer
            if reply.get("hit") and len(frames) == 1:
                self._c["hits"] += 1
                meta = reply.get("meta")
                return CachedEntry(bytes(frames[0]), MappingProxyType(dict(meta) if isinstance(meta, dict) else {}),
                                   self.owner(key) or "")  # fmt: skip
        self._c["misses"] += 1
        return None

    async def put(self, key: str, data: bytes, meta: Mapping[str, Any] | None = None) -> bool:
        """Store ``data`` under ``key`` with scalar ``meta``; False if it did not land (never raises)."""
        self._c["puts"] += 1
        if len(data) > self._max_value:
            self._c["too_large"] += 1
            return False
        clean = {k: v for k, v in (meta or {}).items() if isinstance(k, str) and isinstance(v, _META_TYPES)}
        answer = await self._ask(key, {"op": "put", "meta": clean}, (data,))
        if answer is None:
            self._c["put_failed"] += 1
            return False
        self._c["stored"] += 1
        return True

    async def delete(self, key: str) -> bool:
        """Forget ``key``; False if it was not there or the cache did not answer."""
        self._c["deletes"] += 1
        answer = await self._ask(key, {"op": "del"})
        return bool(answer and answer[0].get("hit"))

    def statistics(self) -> Mapping[str, Any]:
        """Frozen counters, the hit rate of gets and the instances on the ring."""
        gets = self._c["gets"]
        return MappingProxyType({**self._c, "hit_rate": self._c["hits"] / gets if gets else 0.0,
                                 "instances": len(self._ring)})  # fmt: skip
