"""Property tests: random input never crashes a twin, and both twins agree.

Differential tests drive the pure and the compiled twin with the same random
operation list and require identical results, exceptions (type and message)
and statistics after every operation.
"""

from __future__ import annotations

import struct
from types import MappingProxyType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import ProtocolError

# Deterministic (derandomized) and quick; the fixtures only hand out modules.
SETTINGS = settings(
    derandomize=True,
    deadline=None,
    database=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
U32 = 2**32 - 1
U64 = 2**64 - 1
BCAST = 0xFFFFFFFF
TYPES = (1, 2, 3, 16, 17, 64, 65)


def norm(value):
    if isinstance(value, MappingProxyType):
        return dict(value)
    if hasattr(value, "as_tuple"):
        return ("Header", value.as_tuple())
    if isinstance(value, (list, tuple)):
        return type(value)(norm(v) for v in value)
    return value


def outcome(obj, name, args):
    try:
        return ("ok", norm(getattr(obj, name)(*args)))
    except Exception as e:  # noqa: BLE001 - the exception is the result under test
        return ("raise", type(e).__name__, str(e))


def edge_ints(lo, hi, limit):
    """Mostly small values (collisions), plus the range edges and just beyond."""
    return st.one_of(st.integers(lo, hi), st.sampled_from([-1, 0, limit, limit + 1]))


# -- parsing -------------------------------------------------------------------------

header_fields = st.tuples(
    st.sampled_from([0, 1, 2, 255]),
    st.one_of(st.sampled_from(TYPES), st.integers(0, 255)),
    st.integers(0, 0xFFFF),
    st.integers(0, U64),
    st.integers(0, U64),
    st.integers(0, U32),
    st.one_of(st.integers(0, U32), st.just(BCAST)),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.one_of(st.integers(0, 1 << 20), st.integers(0, U32)),
)
frames = st.one_of(
    st.binary(max_size=80),
    header_fields.map(lambda t: struct.pack("<BBHQQIIBBHI", *t)),
    header_fields.map(lambda t: struct.pack("<BBHQQIIBBHI", *t) + b"\0"),
)


@SETTINGS
@given(data=frames)
def test_random_frames_never_crash(fp, mkcodec, data):
    codec = mkcodec(fp, types=TYPES)
    try:
        h = codec.parse(data)
    except ProtocolError:
        assert sum(codec.statistics().values()) == 1
        assert codec.statistics()["parsed"] == 0
    else:
        assert struct.pack("<BBHQQIIBBHI", *h.as_tuple()) == data
        assert codec.statistics()["parsed"] == 1
    forwarder = fp.Forwarder(1, codec, fp.RoutingTable())
    assert forwarder.route(data, 0) in (fp.LINK_LOCAL, fp.LINK_DROP, fp.LINK_BROADCAST)


@SETTINGS
@given(data=frames)
def test_twins_parse_alike(both, mkcodec, data):
    codecs = [mkcodec(m, types=TYPES) for m in both]
    assert outcome(codecs[0], "parse", (data,)) == outcome(codecs[1], "parse", (data,))
    assert outcome(codecs[0], "advance", (data,)) == outcome(codecs[1], "advance", (data,))
    assert dict(codecs[0].statistics()) == dict(codecs[1].statistics())


pack_args = st.tuples(
    edge_ints(0, 255, 0xFF),
    edge_ints(0, 3, 0xFFFF),
    edge_ints(0, 3, U64),
    edge_ints(0, 3, U64),
    edge_ints(0, 3, U32),
    edge_ints(0, 3, U32),
    edge_ints(0, 3, 0xFF),
    edge_ints(0, 3, 0xFF),
    edge_ints(0, 3, 0xFFFF),
    st.one_of(edge_ints(0, 3, U32), st.just((1 << 20) + 1)),
)


@SETTINGS
@given(args=pack_args)
def test_twins_pack_alike(both, mkcodec, args):
    codecs = [mkcodec(m, types=TYPES) for m in both]
    results = [outcome(c, "pack", args) for c in codecs]
    assert results[0] == results[1]
    if results[0][0] == "ok":
        assert codecs[0].parse(results[0][1]).as_tuple() == (1, *args)
    else:
        assert results[0][1] in ("OverflowError", "UnknownType", "FrameTooLarge")
    assert dict(codecs[0].statistics()) == dict(codecs[1].statistics())


@SETTINGS
@given(args=st.lists(edge_ints(0, 3, U64), min_size=11, max_size=11))
def test_twins_build_headers_alike(both, args):
    pure, compiled = both
    assert outcome(pure, "Header", args) == outcome(compiled, "Header", args)


# -- differential operation sequences ------------------------------------------------------


def run_ops(objs, ops, state=None):
    """Apply ``ops`` to each twin's object; every result and snapshot must match."""
    for i, (name, args) in enumerate(ops):
        results = [outcome(o, name, args) for o in objs]
        assert results[0] == results[1], (i, name, args)
        if state is not None:
            assert state(objs[0]) == state(objs[1]), (i, name, args)


node_ids = edge_ints(0, 12, U32)
links = edge_ints(0, 4, 2**31 - 1)
routing_ops = st.one_of(
    st.tuples(st.just("add"), st.tuples(node_ids, links)),
    st.tuples(st.just("add_subtree"), st.tuples(links, st.lists(node_ids, max_size=6))),
    st.tuples(st.just("remove"), st.tuples(node_ids)),
    st.tuples(st.just("remove_subtree"), st.tuples(st.lists(node_ids, max_size=6))),
    st.tuples(st.just("remove_link"), st.tuples(links)),
    st.tuples(st.just("lookup"), st.tuples(node_ids)),
    st.tuples(st.just("__contains__"), st.tuples(node_ids)),
    st.tuples(st.just("ids_via"), st.tuples(links)),
    st.tuples(st.just("links"), st.just(())),
    st.tuples(st.just("__len__"), st.just(())),
    st.tuples(st.just("clear"), st.just(())),
)


@SETTINGS
@given(ops=st.lists(routing_ops, max_size=60))
def test_routing_tables_agree(both, ops):
    tables = [m.RoutingTable() for m in both]
    run_ops(tables, ops, state=lambda t: (len(t), t.links(), [t.ids_via(link) for link in t.links()]))


dsts = st.one_of(st.integers(0, 12), st.just(BCAST), st.just(100))
fwd_frames = st.one_of(
    st.tuples(st.integers(0, 6), st.integers(0, 3), dsts, st.integers(0, 2)).map(
        lambda t: struct.pack("<BBHQQIIBBHI", 1, 1, 0, t[0], 0, t[1], t[2], t[3], 0, 0, 0)
    ),
    st.binary(max_size=40),
)
from_links = st.one_of(st.integers(-4, 4), st.sampled_from([2**40, -(2**70)]))
forwarder_ops = st.one_of(
    st.tuples(st.just("route"), st.tuples(fwd_frames, from_links)),
    st.tuples(st.just("route_batch"), st.tuples(st.lists(fwd_frames, max_size=8), from_links)),
    st.tuples(st.just("seen"), st.tuples(edge_ints(0, 3, U32), edge_ints(0, 6, U64))),
    st.tuples(st.just("add_child"), st.tuples(links)),
    st.tuples(st.just("remove_child"), st.tuples(links)),
    st.tuples(st.just("children"), st.just(())),
    st.tuples(st.just("broadcast_links"), st.tuples(from_links)),
    st.tuples(st.just("add_route"), st.tuples(node_ids, links)),
    st.tuples(st.just("set_parent"), st.tuples(st.booleans())),
    st.tuples(st.just("set_node_id"), st.tuples(edge_ints(0, 12, U32))),
)


class ForwarderDriver:
    """A Forwarder plus the setters and table edits a random op list needs."""

    def __init__(self, mod, window):
        self.codec = mod.FrameCodec(1, TYPES, 1 << 20, 8 << 20)
        self.fwd = mod.Forwarder(100, self.codec, mod.RoutingTable(), window=window)

    def __getattr__(self, name):
        return getattr(self.fwd, name)

    def add_route(self, node_id, link):
        self.fwd.routes.add(node_id, link)

    def set_parent(self, value):
        self.fwd.has_parent = value

    def set_node_id(self, value):
        self.fwd.node_id = value
        return self.fwd.node_id

    def state(self):
        return (dict(self.fwd.statistics()), dict(self.codec.statistics()), self.fwd.routes.links())


@SETTINGS
@given(window=st.integers(1, 6), ops=st.lists(forwarder_ops, max_size=60))
def test_forwarders_agree(both, window, ops):
    drivers = [ForwarderDriver(m, window) for m in both]
    run_ops(drivers, ops, state=ForwarderDriver.state)


op_ids = edge_ints(0, 6, U64)
agg_links = st.integers(0, 4)
aggregator_ops = st.one_of(
    st.tuples(st.just("open"), st.tuples(op_ids, st.lists(agg_links, max_size=4), st.integers(0, 20).map(float))),
    st.tuples(st.just("open"), st.tuples(op_ids, st.lists(agg_links, max_size=4), st.integers(0, 20))),
    st.tuples(st.just("reply"), st.tuples(op_ids, agg_links, st.integers(-2, 5), st.integers(0, 5))),
    st.tuples(st.just("forget_link"), st.tuples(agg_links)),
    st.tuples(st.just("expired"), st.tuples(st.one_of(st.integers(0, 25), st.floats(0, 25)))),
    st.tuples(st.just("close"), st.tuples(op_ids)),
    st.tuples(st.just("owing"), st.tuples(op_ids)),
    st.tuples(st.just("counts"), st.tuples(op_ids)),
    st.tuples(st.just("is_complete"), st.tuples(op_ids)),
    st.tuples(st.just("__len__"), st.just(())),
    st.tuples(st.just("__contains__"), st.tuples(op_ids)),
)


@SETTINGS
@given(ops=st.lists(aggregator_ops, max_size=60))
def test_aggregators_agree(both, ops):
    aggs = [m.Aggregator() for m in both]
    run_ops(aggs, ops, state=lambda a: dict(a.statistics()))


workers = edge_ints(0, 9, U32)
amounts = edge_ints(0, 6, U32)
loadtable_ops = st.one_of(
    st.tuples(st.just("add"), st.tuples(workers, st.one_of(st.integers(0, 20), amounts))),
    st.tuples(st.just("remove"), st.tuples(workers)),
    st.tuples(st.just("report"), st.tuples(workers, amounts)),
    st.tuples(st.just("dispatched"), st.tuples(workers, amounts)),
    st.tuples(st.just("completed"), st.tuples(workers, amounts)),
    st.tuples(st.just("pick"), st.just(())),
    st.tuples(st.just("acquire"), st.just(())),
    st.tuples(st.just("pick_lottery"), st.tuples(st.one_of(st.floats(0, 1, exclude_max=True), st.sampled_from([1.0, -0.5, 0])))),
    st.tuples(st.just("load"), st.tuples(workers)),
    st.tuples(st.just("inflight"), st.tuples(workers)),
    st.tuples(st.just("queue"), st.tuples(workers)),
    st.tuples(st.just("workers"), st.just(())),
    st.tuples(st.just("__len__"), st.just(())),
)


@SETTINGS
@given(ops=st.lists(loadtable_ops, max_size=80))
def test_load_tables_agree(both, ops):
    tables = [m.LoadTable() for m in both]
    run_ops(tables, ops, state=lambda t: (dict(t.statistics()), {w: t.load(w) for w in t.workers()}))


peers = st.sampled_from([b"a", b"b", "c", 3])
credit_ops = st.one_of(
    st.tuples(st.just("grant"), st.tuples(peers, amounts)),
    st.tuples(st.just("take"), st.tuples(peers, amounts)),
    st.tuples(st.just("forget"), st.tuples(peers)),
    st.tuples(st.just("available"), st.tuples(peers)),
)


@SETTINGS
@given(initial=st.integers(0, 5), ops=st.lists(credit_ops, max_size=40))
def test_credits_agree(both, initial, ops):
    credits = [m.Credits(initial) for m in both]
    run_ops(credits, ops, state=lambda c: dict(c.statistics()))


@pytest.mark.parametrize("seed", range(3))
def test_long_load_table_run_agrees(both, seed):
    # A longer deterministic run than hypothesis explores: 64 workers, 5000 ops.
    import random

    rnd = random.Random(seed)
    tables = [m.LoadTable() for m in both]
    ops = []
    for i in range(5000):
        k = rnd.random()
        w = rnd.randrange(80)
        if k < 0.05:
            ops.append(("add", (w, rnd.randrange(1, 40))))
        elif k < 0.08:
            ops.append(("remove", (w,)))
        elif k < 0.4:
            ops.append(("acquire", ()))
        elif k < 0.6:
            ops.append(("completed", (w, rnd.randrange(3))))
        elif k < 0.75:
            ops.append(("report", (w, rnd.randrange(30))))
        else:
            ops.append(("pick_lottery", (rnd.random(),)))
    run_ops(tables, ops)
    assert dict(tables[0].statistics()) == dict(tables[1].statistics())


@pytest.mark.parametrize("frame", [None, 42, "x" * 36, memoryview(bytes(72))[::2], memoryview(bytes(40))[::2]])
def test_twins_reject_odd_objects_alike(both, mkcodec, frame):
    codecs = [mkcodec(m) for m in both]
    assert outcome(codecs[0], "parse", (frame,)) == outcome(codecs[1], "parse", (frame,))
    fwds = [m.Forwarder(1, c, m.RoutingTable()) for m, c in zip(both, codecs)]
    assert outcome(fwds[0], "route", (frame, 0)) == outcome(fwds[1], "route", (frame, 0))
    assert outcome(fwds[0], "route_batch", ([b"", frame], 0)) == outcome(fwds[1], "route_batch", ([b"", frame], 0))
    assert dict(fwds[0].statistics()) == dict(fwds[1].statistics())
    assert dict(codecs[0].statistics()) == dict(codecs[1].statistics())
