"""The wire protocol: round trips, limits, and every way a frame can be bad."""

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus import protocol as p
from core import fastpath

BODIES = [None, {}, {"name": "n1", "attrs": {"group": "a"}}, {"ids": list(range(100))}, {"blob": b"\x00" * 1000}]


@pytest.mark.parametrize("msg_type", list(p.MsgType))
def test_round_trip_every_type(msg_type):
    frames = p.encode(
        msg_type,
        {"k": [1, "two", b"three"]},
        src=7,
        dst=p.BROADCAST_ID,
        msg_id=2**64 - 1,
        ref=12345,
        flags=p.Flag.UPWARD | p.Flag.AGGREGATE,
        ttl=9,
        hops=3,
        extra=[b"chunk-1", b""],
    )
    assert len(frames[0]) == p.HEADER_SIZE == 36
    m = p.decode(frames)
    assert m.type is msg_type
    assert m.body == {"k": [1, "two", b"three"]}
    assert m.extra == [b"chunk-1", b""]
    h = m.header
    assert (h.version, h.src, h.dst, h.msg_id, h.ref, h.ttl, h.hops, h.extra) == (
        p.VERSION, 7, p.BROADCAST_ID, 2**64 - 1, 12345, 9, 3, 2,
    )
    assert h.flags == p.Flag.UPWARD | p.Flag.AGGREGATE
    assert h.body_len == len(frames[1])


@pytest.mark.parametrize("body", BODIES)
def test_body_round_trip(body):
    m = p.decode(p.encode(p.MsgType.COMMAND, body))
    assert m.body == ({} if body is None else body)


def test_header_layout_is_little_endian_and_fixed():
    h = p.codec.pack(int(p.MsgType.PING), 0x0102, 0x1122334455667788, 5, 0xA0B0C0D0, 3, 7, 1, 2, 40)
    fields = struct.unpack("<BBHQQIIBBHI", h)
    assert fields == (p.VERSION, p.MsgType.PING, 0x0102, 0x1122334455667788, 5, 0xA0B0C0D0, 3, 7, 1, 2, 40)
    assert h[4:12] == bytes.fromhex("8877665544332211")


def test_planes_split_at_64():
    for t in p.MsgType:
        assert 0 < t <= 255
        assert p.plane_of(t) is (p.Plane.DATA if t >= 64 else p.Plane.CONTROL)
    assert p.plane_of(p.MsgType.HEARTBEAT) is p.Plane.CONTROL
    assert p.plane_of(p.MsgType.CHUNK) is p.Plane.DATA


def test_message_ids_are_unique_and_64_bit():
    ids = {p.next_msg_id() for _ in range(10000)}
    assert len(ids) == 10000
    assert all(0 <= i < 2**64 for i in ids)


def test_errors_are_value_errors_with_named_codes():
    for cls, code in [
        (p.TruncatedFrame, p.ErrorCode.TRUNCATED),
        (p.FrameTooLarge, p.ErrorCode.TOO_LARGE),
        (p.BadVersion, p.ErrorCode.BAD_VERSION),
        (p.UnknownType, p.ErrorCode.UNKNOWN_TYPE),
        (p.MalformedFrame, p.ErrorCode.MALFORMED_FRAME),
        (p.MalformedBody, p.ErrorCode.MALFORMED_BODY),
    ]:
        assert issubclass(cls, p.ProtocolError)
        assert issubclass(cls, p.BusError)
        assert issubclass(cls, ValueError)
        assert cls.code is code


def _header(**kw):
    fields = dict(version=p.VERSION, type=int(p.MsgType.PING), flags=0, msg_id=1, ref=0, src=1, dst=2, ttl=4,
                  hops=0, extra=0, body_len=1)
    fields.update(kw)
    return struct.pack("<BBHQQIIBBHI", *fields.values())


@pytest.mark.parametrize(
    "frames, error",
    [
        ([], p.MalformedFrame),
        ([_header()], p.MalformedFrame),
        ([_header()[:20], b"\x80"], p.TruncatedFrame),
        ([_header() + b"x", b"\x80"], p.MalformedFrame),
        ([_header(version=2), b"\x80"], p.BadVersion),
        ([_header(type=200), b"\x80"], p.UnknownType),
        ([_header(type=0), b"\x80"], p.UnknownType),
        ([_header(body_len=p.MAX_BODY + 1), b"\x80"], p.FrameTooLarge),
        ([_header(body_len=5), b"\x80"], p.MalformedFrame),
        ([_header(extra=1), b"\x80"], p.MalformedFrame),
        ([_header(), b"\xc1"], p.MalformedBody),
        ([_header(body_len=2), b"\x80\x80"], p.MalformedBody),
    ],
    ids=["no-frames", "no-body", "truncated", "long-header", "version", "type-200", "type-0",
         "body-limit", "length-mismatch", "extra-count", "bad-msgpack", "trailing-data"],
)
def test_malformed_messages_rejected_with_the_right_error(frames, error):
    with pytest.raises(error):
        p.decode(frames)


def test_rejections_are_counted_by_the_codec():
    c = p.new_codec()
    for frame in (_header()[:3], _header(version=9), _header(type=250)):
        with pytest.raises(p.ProtocolError):
            c.parse(frame)
    s = c.statistics()
    assert (s["truncated"], s["bad_version"], s["unknown_type"]) == (1, 1, 1)
    with pytest.raises(TypeError):
        s["truncated"] = 0  # a frozen snapshot


def test_oversized_message_refused_at_send_time():
    with pytest.raises(p.FrameTooLarge):
        p.encode(p.MsgType.DATA, {"blob": b"x" * p.MAX_BODY})
    with pytest.raises(p.FrameTooLarge):
        p.encode(p.MsgType.CHUNK, {}, extra=[b"x" * (p.MAX_FRAME + 1)])
    with pytest.raises(p.FrameTooLarge):
        p.encode(p.MsgType.CHUNK, {}, extra=[b""] * (p.MAX_EXTRA + 1))
    # At the limits exactly, it goes.
    assert p.decode(p.encode(p.MsgType.CHUNK, {}, extra=[b"x" * p.MAX_FRAME])).extra[0] == b"x" * p.MAX_FRAME


def test_unencodable_body_is_a_protocol_error():
    with pytest.raises(p.MalformedBody):
        p.encode(p.MsgType.DATA, {"x": object()})


def test_out_of_range_header_fields_are_overflow_errors():
    for kw in ({"src": 2**32}, {"ttl": 256}, {"msg_id": -1}, {"flags": 2**16}):
        with pytest.raises(OverflowError):
            p.encode(p.MsgType.DATA, {}, **kw)


def test_msgpack_bombs_are_refused():
    # A map header announcing 2**31 entries must not allocate.
    bomb = b"\xdf\x7f\xff\xff\xff"
    frames = [p.codec.pack(int(p.MsgType.DATA), body_len=len(bomb)), bomb]
    with pytest.raises(p.MalformedBody):
        p.decode(frames)


def test_protocol_uses_the_selected_twin():
    assert type(p.codec) is fastpath.FrameCodec


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=5))
def test_random_frames_only_raise_protocol_errors(frames):
    try:
        p.decode(frames)
    except p.ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(list(p.MsgType)),
    st.recursive(
        st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=20),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=20,
    ),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
)
def test_round_trip_property(msg_type, body, src, msg_id):
    m = p.decode(p.encode(msg_type, {"b": body}, src=src, msg_id=msg_id))
    assert m.body == {"b": body}
    assert (m.header.src, m.header.msg_id, m.type) == (src, msg_id, msg_type)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=36, max_size=36), st.binary(max_size=40))
def test_mutated_headers_never_crash(header, body):
    try:
        m = p.decode([header, body])
    except p.ProtocolError:
        return
    assert m.header.body_len == len(body)


def test_only_msgpack_configuration_is_here():
    # The body is plain msgpack a peer in another language could read.
    raw = p.packb({"a": b"\x01", "s": "x"})
    assert msgpack.unpackb(raw, raw=False) == {"a": b"\x01", "s": "x"}


def test_decode_checked_matches_decode_for_checked_frames():
    frames = p.encode(p.MsgType.COMMAND, {"op": "ping", "ids": [1, 2]}, src=3, dst=4, extra=[b"x"])
    routed = [b"\x01peer", *frames]
    assert p.decode_checked(routed, 1, p.new_codec()) == p.decode(frames)
    with pytest.raises(p.MalformedBody):
        p.decode_checked([frames[0], b"\xc1"], 0, p.new_codec())
