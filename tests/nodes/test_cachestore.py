"""The cache worker's bytes-bounded LRU store."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import BusError
from nodes.cachestore import CacheError, CacheStore, EntryTooLarge


def test_put_get_roundtrip_with_meta():
    c = CacheStore(1000)
    assert c.put("k", b"data", {"content_type": "image/jpeg", "w": 10}) == []
    e = c.get("k")
    assert e.data == b"data" and e.content_type == "image/jpeg" and e.meta["w"] == 10
    assert e.size == 4 + 1 + len("content_type") + len("image/jpeg") + 1 + 2
    assert c.bytes == e.size and len(c) == 1 and "k" in c
    with pytest.raises(TypeError):
        e.meta["w"] = 3  # read-only


def test_value_and_meta_are_copied():
    buf = bytearray(b"abc")
    meta = {"content_type": "text/plain"}
    c = CacheStore(100)
    c.put("k", buf, meta)
    buf[0] = ord("z")
    meta["content_type"] = "x"
    e = c.get("k")
    assert e.data == b"abc" and isinstance(e.data, bytes) and e.content_type == "text/plain"
    c.put("m", memoryview(b"xyz"))
    assert c.get("m").data == b"xyz" and c.get("m").content_type is None


def test_lru_eviction_order_and_recency_from_get():
    c = CacheStore(30)  # each entry: 1-byte key + 9 bytes = 10
    for k in "abc":
        c.put(k, b"123456789")
    assert c.get("a") is not None  # a is now the most recent
    evicted = c.put("d", b"123456789")
    assert evicted == ["b"]
    assert list(c.keys()) == ["c", "a", "d"]
    s = c.statistics()
    assert s.evictions == 1 and s.evicted_bytes == 10 and s.bytes == 30 and s.entries == 3


def test_peek_and_contains_do_not_touch_recency_or_counters():
    c = CacheStore(20)
    c.put("a", b"123456789")
    c.put("b", b"123456789")
    assert c.peek("a").data == b"123456789" and c.peek("zz") is None
    assert "a" in c
    assert c.put("c", b"123456789") == ["a"]
    s = c.statistics()
    assert s.hits == 0 and s.misses == 0


def test_replace_adjusts_bytes_and_recency():
    c = CacheStore(100)
    c.put("a", b"x" * 10)
    c.put("b", b"x" * 10)
    c.put("a", b"x" * 50)
    assert c.bytes == 51 + 11
    assert list(c.keys()) == ["b", "a"]
    assert c.statistics().puts == 3


def test_one_put_can_evict_several():
    c = CacheStore(40)
    for k in "abcd":
        c.put(k, b"123456789")
    assert c.put("e", b"x" * 29) == ["a", "b", "c"]
    assert c.bytes == 10 + 30


def test_too_large_is_refused_clearly_and_changes_nothing():
    c = CacheStore(50)
    c.put("k", b"small")
    with pytest.raises(EntryTooLarge) as exc:
        c.put("k", b"x" * 60)
    err = exc.value
    assert isinstance(err, CacheError) and isinstance(err, BusError) and isinstance(err, ValueError)
    assert err.key == "k" and err.size == 61 and err.max_bytes == 50
    assert "61 bytes" in str(err) and "bound of 50 bytes" in str(err)
    assert c.get("k").data == b"small"
    assert c.statistics().refused == 1 and c.statistics().evictions == 0
    # Exactly the bound fits.
    c.put("j", b"x" * 49)
    assert c.bytes == 50 and list(c.keys()) == ["j"]


def test_delete_clear_and_stats():
    c = CacheStore(100)
    c.put("a", b"1")
    assert c.get("a") and c.get("nope") is None
    assert c.delete("a") and not c.delete("a")
    c.put("b", b"2")
    c.clear()
    s = c.statistics()
    assert (s.entries, s.bytes, s.hits, s.misses, s.deletes, s.puts) == (0, 0, 1, 1, 1, 2)
    assert s.hit_rate == 0.5 and s.max_bytes == 100 == c.max_bytes
    assert CacheStore(1).statistics().hit_rate == 0.0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, None])
def test_bad_bound(bad):
    with pytest.raises(ValueError, match="max_bytes"):
        CacheStore(bad)


def test_bad_types():
    c = CacheStore(100)
    with pytest.raises(TypeError, match="keys"):
        c.put(b"k", b"v")
    with pytest.raises(TypeError, match="values"):
        c.put("k", "text")
    with pytest.raises(TypeError, match="metadata"):
        c.put("k", b"v", {"nested": {"a": 1}})
    assert len(c) == 0 and c.bytes == 0


ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.sampled_from("abcdefgh"), st.integers(0, 40)),
        st.tuples(st.just("get"), st.sampled_from("abcdefgh"), st.just(0)),
        st.tuples(st.just("del"), st.sampled_from("abcdefgh"), st.just(0)),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(ops=ops, bound=st.integers(1, 120))
def test_matches_a_reference_lru(ops, bound):
    """Against a slow model: same contents, same order, bytes within the bound."""
    c = CacheStore(bound)
    model: OrderedDict = OrderedDict()
    for op, key, n in ops:
        if op == "put":
            size = n + 1
            if size > bound:
                with pytest.raises(EntryTooLarge):
                    c.put(key, b"x" * n)
                continue
            model.pop(key, None)
            expect = []
            while sum(model.values()) + size > bound:
                expect.append(model.popitem(last=False)[0])
            model[key] = size
            assert c.put(key, b"x" * n) == expect
        elif op == "get":
            hit = c.get(key)
            assert (hit is not None) == (key in model)
            if hit is not None:
                model.move_to_end(key)
        else:
            assert c.delete(key) == (model.pop(key, None) is not None)
        assert list(c.keys()) == list(model)
        assert c.bytes == sum(model.values()) <= bound
