"""The cache worker's store: a least-recently-used map bounded in bytes.

A cache worker (one partition of the SNS cache, see
:mod:`frontends.hashring`) keeps originals and transformed results in memory.
:class:`CacheStore` bounds the bytes it holds and evicts the least recently
used entries to make room.  Every operation is O(1) (an ``OrderedDict`` in
recency order), apart from the evictions a put causes.

The bound counts the bytes of the value, the UTF-8 key and the metadata's
keys and values (as text): the payload the worker holds, not Python's object
overhead, which callers budget for when they choose ``max_bytes``.  An entry
larger than the whole bound is refused with :class:`EntryTooLarge` rather than
emptying the cache for an entry that could not stay.

Not thread-safe: the cache worker's event loop owns it.  No clock either:
freshness is the caller's business (put a time in the metadata).

Tested in tests/nodes/test_cachestore.py.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterator, Mapping

from core.errors import BusError

__all__ = ["CacheError", "EntryTooLarge", "Entry", "CacheStats", "CacheStore"]

_META_TYPES = (str, int, float, bool)


class CacheError(BusError):
    """A cache operation that cannot be done as asked."""


class EntryTooLarge(CacheError, ValueError):
    """An entry bigger than the store's whole byte bound; nothing was stored or evicted."""

    def __init__(self, key: str, size: int, max_bytes: int):
        super().__init__(
            f"cache entry {key!r} takes {size} bytes, more than the store's bound of "
            f"{max_bytes} bytes; it was not stored (raise max_bytes or do not cache it)"
        )
        self.key = key
        self.size = size
        self.max_bytes = max_bytes


@dataclass(frozen=True)
class Entry:
    """A cached value: ``data``, read-only ``meta`` (e.g. ``content_type``) and the bytes charged."""

    data: bytes
    meta: Mapping[str, object]
    size: int

    @property
    def content_type(self) -> str | None:
        """``meta["content_type"]``, or None."""
        return self.meta.get("content_type")  # type: ignore[return-value]


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of a store's counters (see :meth:`CacheStore.statistics`)."""

    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    puts: int
    evictions: int
    evicted_bytes: int
    deletes: int
    refused: int

    @property
    def hit_rate(self) -> float:
        """Hits over lookups; 0.0 before the first lookup."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


def _entry_size(key: str, data: bytes, meta: Mapping[str, object]) -> int:
    size = len(data) + len(key.encode("utf-8"))
    for k, v in meta.items():
        size += len(k) + len(str(v))
    return size


class CacheStore:
    """A bytes-bounded LRU of ``str`` keys to :class:`Entry` values.

    ``get`` counts a hit or a miss and makes the entry the most recent;
    ``peek`` and ``in`` do neither.  ``put`` replaces an existing entry and
    evicts least-recently-used entries until the new one fits.
    """

    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        self._max = max_bytes
        self._entries: OrderedDict[str, Entry] = OrderedDict()  # least recent first
        self._bytes = 0
        self._hits = self._misses = self._puts = 0
        self._evictions = self._evicted_bytes = self._deletes = self._refused = 0

    @property
    def max_bytes(self) -> int:
        """The bound on the bytes held."""
        return self._max

    @property
    def bytes(self) -> int:
        """Bytes held now (as charged: value, key and metadata)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def keys(self) -> Iterator[str]:
        """Keys from least to most recently used."""
        return iter(list(self._entries))

    def get(self, key: str) -> Entry | None:
        """The entry for ``key`` (now the most recent), or None; counts a hit or a miss."""
        entry = self._entries.get(key)
        if entry is None:
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return entry

    def peek(self, key: str) -> Entry | None:
        """The entry for ``key`` or None, without touching recency or counters."""
        return self._entries.get(key)

    def put(self, key: str, data: bytes | bytearray | memoryview, meta: Mapping[str, object] | None = None) -> list[str]:
        """Store ``data`` under ``key`` with ``meta``; returns the keys evicted to make room.

        ``meta`` is a small flat mapping of str keys to str/int/float/bool
        values (e.g. ``{"content_type": "image/jpeg"}``); it is copied.  Raises
        :class:`EntryTooLarge` (nothing changes, an older entry under ``key``
        stays) when the entry alone exceeds ``max_bytes``.
        """
        if not isinstance(key, str):
            raise TypeError(f"cache keys are str, got {type(key).__name__}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"cache values are bytes, got {type(data).__name__}")
        frozen = MappingProxyType(self._check_meta(meta))
        blob = bytes(data)
        size = _entry_size(key, blob, frozen)
        if size > self._max:
            self._refused += 1
            raise EntryTooLarge(key, size, self._max)
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old.size
        evicted = []
        while self._bytes + size > self._max:
            victim, gone = self._entries.popitem(last=False)
            self._bytes -= gone.size
            self._evictions += 1
            self._evicted_bytes += gone.size
            evicted.append(victim)
        self._entries[key] = Entry(blob, frozen, size)
        self._bytes += size
        self._puts += 1
        return evicted

    @staticmethod
    def _check_meta(meta) -> dict:
        if meta is None:
            return {}
        if not hasattr(meta, "items"):
            raise TypeError(f"cache metadata must be a map, got {type(meta).__name__}")
        out = {}
        for k, v in meta.items():
            if not isinstance(k, str) or not isinstance(v, _META_TYPES):
                raise TypeError(f"cache metadata must map str to str/int/float/bool, got {k!r}: {v!r}")
            out[k] = v
        return out

    def delete(self, key: str) -> bool:
        """Drop ``key``; False if it was not cached."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._bytes -= entry.size
        self._deletes += 1
        return True

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        self._entries.clear()
        self._bytes = 0

    def statistics(self) -> CacheStats:
        """A frozen snapshot of sizes and counters, for load reports and the monitor."""
        return CacheStats(
            entries=len(self._entries),
            bytes=self._bytes,
            max_bytes=self._max,
            hits=self._hits,
            misses=self._misses,
            puts=self._puts,
            evictions=self._evictions,
            evicted_bytes=self._evicted_bytes,
            deletes=self._deletes,
            refused=self._refused,
        )
