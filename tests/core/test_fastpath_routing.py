"""RoutingTable and Forwarder, against each twin (fixture ``fp``)."""

from __future__ import annotations

import pytest

BCAST = 0xFFFFFFFF


@pytest.fixture
def routes(fp):
    return fp.RoutingTable()


@pytest.fixture
def fwd(fp, codec, routes):
    f = fp.Forwarder(10, codec, routes, window=4)
    f.has_parent = True
    return f


# -- RoutingTable -----------------------------------------------------------------

def test_empty_table_routes_up(fp, routes):
    assert len(routes) == 0 and routes.lookup(5) == fp.LINK_UP and 5 not in routes
    assert routes.links() == [] and routes.ids_via(0) == [] and routes.remove_link(0) == []


def test_add_and_remove_subtree(fp, routes):
    assert routes.add_subtree(2, [5, 6, 7]) == 3
    assert routes.add_subtree(3, iter([8, 9])) == 2
    assert len(routes) == 5 and routes.links() == [2, 3]
    assert [routes.lookup(i) for i in (5, 8, 11)] == [2, 3, fp.LINK_UP]
    assert routes.ids_via(2) == [5, 6, 7]
    assert routes.remove_subtree([5, 6, 42]) == 2
    assert routes.ids_via(2) == [7] and len(routes) == 3
    assert routes.remove(7) is True and routes.remove(7) is False
    assert routes.links() == [3]


def test_moving_an_id_to_another_link(routes):
    routes.add_subtree(1, [1, 2])
    routes.add(2, 4)
    routes.add(2, 4)  # same link again: no change
    assert routes.ids_via(1) == [1] and routes.ids_via(4) == [2]
    routes.add(1, 4)
    assert routes.links() == [4] and routes.ids_via(1) == []


def test_remove_link_drops_the_whole_subtree(fp, routes):
    routes.add_subtree(1, range(100, 0, -1))
    routes.add_subtree(2, [500])
    assert routes.remove_link(1) == list(range(1, 101))
    assert len(routes) == 1 and routes.links() == [2] and routes.lookup(50) == fp.LINK_UP
    assert routes.remove_link(1) == []


def test_clear(routes):
    routes.add_subtree(1, range(10))
    routes.clear()
    assert len(routes) == 0 and routes.links() == []


def test_large_table_grows(fp, routes):
    routes.add_subtree(7, range(0, 200_000, 3))
    assert len(routes) == 66_667
    assert routes.lookup(199_998) == 7 and routes.lookup(199_999) == fp.LINK_UP
    assert routes.remove_subtree(range(0, 200_000, 6)) == 33_334
    assert routes.lookup(3) == 7 and routes.lookup(6) == fp.LINK_UP and len(routes) == 33_333


def test_id_and_link_ranges(routes):
    routes.add(2**32 - 1, 2**31 - 1)
    assert routes.lookup(2**32 - 1) == 2**31 - 1
    with pytest.raises(OverflowError):
        routes.add(2**32, 0)
    with pytest.raises(OverflowError):
        routes.add(-1, 0)
    with pytest.raises(ValueError):
        routes.add(1, -1)
    with pytest.raises(OverflowError):
        routes.add(1, 2**31)
    with pytest.raises(OverflowError):  # the id is checked before the link
        routes.add_subtree(-1, [-1])
    assert routes.add_subtree(-1, []) == 0


def test_lookups_follow_dict_semantics(fp, routes):
    routes.add_subtree(3, [1, 5])
    assert (True in routes) and (5.0 in routes), "like a dict: True == 1 and 5.0 == 5 find their routes"
    assert "5" not in routes and 2**70 not in routes and -5 not in routes
    assert routes.lookup(True) == 3 and routes.lookup(-1) == fp.LINK_UP and routes.lookup(None) == fp.LINK_UP
    assert routes.ids_via(3.0) == [1, 5] and routes.ids_via("3") == []
    with pytest.raises(TypeError):
        [] in routes  # unhashable, as in a dict
    assert routes.remove(5.0) is True and routes.remove("1") is False


# -- Forwarder ----------------------------------------------------------------------

def frame(codec, dst, msg_id=1, src=3, ttl=8):
    return codec.pack(1, msg_id=msg_id, src=src, dst=dst, ttl=ttl)


def test_route_decisions(fp, codec, routes, fwd):
    routes.add_subtree(1, [20, 21])
    assert fwd.route(frame(codec, 10), 0) == fp.LINK_LOCAL
    assert fwd.route(frame(codec, 20), 0) == 1
    assert fwd.route(frame(codec, 20), 1) == fp.LINK_DROP  # would go back where it came from
    assert fwd.route(frame(codec, 99), 1) == fp.LINK_UP
    assert fwd.route(frame(codec, 99), fp.LINK_UP) == fp.LINK_DROP  # from the parent: nowhere to go
    assert fwd.route(frame(codec, 20, ttl=0), 0) == fp.LINK_DROP
    assert fwd.route(frame(codec, 10, ttl=0), 0) == fp.LINK_LOCAL  # ttl only limits forwarding
    assert fwd.route(b"short", 0) == fp.LINK_DROP
    assert dict(fwd.statistics()) == {
        "routed": 8, "delivered": 2, "forwarded_down": 1, "forwarded_up": 1, "broadcast": 0,
        "dropped_duplicate": 0, "dropped_ttl": 1, "dropped_malformed": 1,
        "dropped_unroutable": 1, "dropped_loop": 1,
    }
    assert dict(codec.statistics())["truncated"] == 1


def test_without_parent_unknown_is_unroutable(fp, codec, fwd):
    fwd.has_parent = False
    assert fwd.has_parent is False
    assert fwd.route(frame(codec, 99), 0) == fp.LINK_DROP
    assert fwd.statistics()["dropped_unroutable"] == 1


def test_malformed_frames_are_counted_not_raised(fp, mkcodec, fwd, codec):
    other = mkcodec(fp, version=2)
    bad = [b"", b"x" * 37, other.pack(1, dst=10), b"\x01\x63" + bytes(34), b"\x01\x01" + bytes(30) + b"\xff" * 4]
    assert fwd.route_batch(bad, 0) == [fp.LINK_DROP] * 5
    assert fwd.statistics()["dropped_malformed"] == 5
    stats = dict(codec.statistics())
    assert (stats["truncated"], stats["malformed"], stats["bad_version"], stats["unknown_type"], stats["too_large"]) == (1, 1, 1, 1, 1)


def test_route_non_buffer_raises_type_error(fwd):
    with pytest.raises(TypeError):
        fwd.route(42, 0)
    with pytest.raises(TypeError):
        fwd.route_batch([b"", 42], 0)
    assert fwd.statistics()["routed"] == 3  # counted before parsing, as the twin does


def test_broadcast_dedup_over_bounded_window(fp, codec, fwd):
    # window=4: an id is forgotten once 4 newer broadcasts were recorded.
    b = [frame(codec, BCAST, msg_id=i) for i in range(6)]
    assert fwd.route_batch(b[:4], 0) == [fp.LINK_BROADCAST] * 4
    assert fwd.route_batch(b[:4], 0) == [fp.LINK_DROP] * 4  # still in the window
    assert fwd.route(b[4], 0) == fp.LINK_BROADCAST  # evicts msg 0
    assert fwd.route(b[1], 0) == fp.LINK_DROP
    assert fwd.route(b[0], 0) == fp.LINK_BROADCAST  # fell out of the window; evicts msg 1
    assert fwd.route(b[1], 0) == fp.LINK_BROADCAST
    stats = fwd.statistics()
    assert (stats["broadcast"], stats["dropped_duplicate"]) == (7, 5)


def test_dedup_key_includes_source(fp, codec, fwd):
    assert fwd.route(frame(codec, BCAST, msg_id=9, src=1), 0) == fp.LINK_BROADCAST
    assert fwd.route(frame(codec, BCAST, msg_id=9, src=2), 0) == fp.LINK_BROADCAST
    assert fwd.route(frame(codec, BCAST, msg_id=9, src=1), 0) == fp.LINK_DROP


def test_broadcast_ignores_ttl(fp, codec, fwd):
    assert fwd.route(frame(codec, BCAST, ttl=0), 0) == fp.LINK_BROADCAST


def test_seen(fwd):
    assert fwd.seen(1, 2) is False and fwd.seen(1, 2) is True
    assert fwd.seen(2**32 - 1, 2**64 - 1) is False
    with pytest.raises(OverflowError):
        fwd.seen(2**32, 1)
    with pytest.raises(OverflowError):
        fwd.seen(1, -1)


def test_dedup_window_of_one(fp, codec, routes):
    f = fp.Forwarder(1, codec, routes, window=1)
    assert [f.seen(0, m) for m in (1, 1, 2, 1, 1)] == [False, True, False, False, True]


def test_route_batch_matches_route(fp, codec, mkcodec, routes):
    routes.add_subtree(1, range(100, 110))
    frames = [frame(codec, d, msg_id=i % 5) for i, d in enumerate([100, BCAST, 5, 10, 105, BCAST, 7])]
    frames += [b"", bytearray(frame(codec, 101)), memoryview(frame(codec, 102))]
    a = fp.Forwarder(10, codec, routes)
    b = fp.Forwarder(10, mkcodec(fp), routes)
    a.has_parent = b.has_parent = True
    assert a.route_batch(tuple(frames), 1) == [b.route(f, 1) for f in frames]
    assert a.route_batch(iter(frames), 2) == [b.route(f, 2) for f in frames]
    assert dict(a.statistics()) == dict(b.statistics())


def test_from_link_compares_like_python_ints(fp, codec, routes, fwd):
    routes.add(20, 1)
    f = frame(codec, 20)
    assert fwd.route(f, 1.0) == fp.LINK_DROP  # 1.0 == 1: a loop
    assert fwd.route(f, True) == fp.LINK_DROP
    assert fwd.route(f, 2**80) == 1 and fwd.route(f, "1") == 1 and fwd.route(f, None) == 1
    assert fwd.route(frame(codec, 99), -1.0) == fp.LINK_DROP  # equals LINK_UP
    assert fwd.route(frame(codec, 99), None) == fp.LINK_UP


def test_children_and_broadcast_links(fp, codec, routes, fwd):
    for link in (3, 1, 2):
        fwd.add_child(link)
    routes.add_subtree(2, [50, 51])
    assert fwd.children() == [1, 2, 3]
    assert fwd.broadcast_links(2) == [1, 3] and fwd.broadcast_links(fp.LINK_UP) == [1, 2, 3]
    assert fwd.remove_child(2) == [50, 51]
    assert fwd.children() == [1, 3] and routes.lookup(50) == fp.LINK_UP
    with pytest.raises(ValueError):
        fwd.add_child(-1)
    assert fwd.routes is routes


def test_forwarder_arguments(fp, codec, routes):
    f = fp.Forwarder(5, codec, routes)
    assert f.node_id == 5 and f.has_parent is False
    f.node_id = 2**32 - 1
    with pytest.raises(OverflowError):
        f.node_id = 2**32
    with pytest.raises(OverflowError):
        fp.Forwarder(-1, codec, routes)
    with pytest.raises(ValueError):
        fp.Forwarder(1, codec, routes, window=0)
    f.has_parent = 1
    assert f.has_parent is True


def test_node_id_change_applies_to_routing(fp, codec, fwd):
    fwd.node_id = 77
    assert fwd.route(frame(codec, 77), 0) == fp.LINK_LOCAL
