"""FrameCodec and Header, against each twin (fixture ``fp``)."""

from __future__ import annotations

import array
import struct

import pytest

from core.errors import (
    BadVersion,
    FrameTooLarge,
    MalformedFrame,
    ProtocolError,
    TruncatedFrame,
    UnknownType,
)

FIELDS = dict(flags=0xBEEF, msg_id=2**64 - 1, ref=12345678901234, src=7, dst=2**32 - 2, ttl=9, hops=254, extra=3, body_len=100)
LIMITS = dict(type=0xFF, flags=0xFFFF, msg_id=2**64 - 1, ref=2**64 - 1, src=2**32 - 1, dst=2**32 - 1, ttl=0xFF, hops=0xFF, extra=0xFFFF)


def test_pack_parse_round_trip(codec):
    frame = codec.pack(64, **FIELDS)
    assert isinstance(frame, bytes) and len(frame) == 36
    h = codec.parse(frame)
    assert h.as_tuple() == (1, 64, *FIELDS.values())
    assert (h.version, h.type, h.flags, h.msg_id, h.ref, h.src, h.dst) == (1, 64, 0xBEEF, 2**64 - 1, 12345678901234, 7, 2**32 - 2)
    assert (h.ttl, h.hops, h.extra, h.body_len) == (9, 254, 3, 100)


def test_layout_is_little_endian_struct(codec):
    frame = codec.pack(2, **FIELDS)
    assert struct.unpack("<BBHQQIIBBHI", frame) == (1, 2, *FIELDS.values())


def test_pack_defaults(codec):
    assert codec.parse(codec.pack(1)).as_tuple() == (1, 1, 0, 0, 0, 0, 0, 32, 0, 0, 0)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview, "array", "zmq"])
def test_parse_any_bytes_like(codec, kind):
    frame = codec.pack(3, src=5, dst=6)
    if kind == "array":
        obj = array.array("I", frame)  # itemsize 4: nbytes is what counts
    elif kind == "zmq":
        import zmq

        obj = zmq.Frame(frame)
    else:
        obj = kind(frame)
    assert codec.parse(obj).as_tuple() == codec.parse(frame).as_tuple()


@pytest.mark.parametrize(
    "frame, exc, counter",
    [
        (b"", TruncatedFrame, "truncated"),
        (b"\x01" * 35, TruncatedFrame, "truncated"),
        (b"\x01" * 37, MalformedFrame, "malformed"),
        (b"\x02\x01" + bytes(34), BadVersion, "bad_version"),
        (b"\x01\x63" + bytes(34), UnknownType, "unknown_type"),
        (b"\x01\x01" + bytes(30) + struct.pack("<I", (1 << 20) + 1), FrameTooLarge, "too_large"),
    ],
)
def test_parse_rejections(codec, frame, exc, counter):
    with pytest.raises(exc) as info:
        codec.parse(frame)
    assert isinstance(info.value, ProtocolError) and isinstance(info.value, ValueError)
    stats = dict(codec.statistics())
    assert stats[counter] == 1
    assert sum(stats.values()) == 1


def test_parse_body_len_at_limit(fp, mkcodec):
    c = mkcodec(fp, max_body=100)
    assert c.parse(c.pack(1, body_len=100)).body_len == 100
    with pytest.raises(FrameTooLarge):
        c.pack(1, body_len=101)
    with pytest.raises(FrameTooLarge):
        c.parse(b"\x01\x01" + bytes(30) + struct.pack("<I", 101))


def test_parse_non_buffer_is_type_error(codec):
    with pytest.raises(TypeError):
        codec.parse(12345)
    with pytest.raises(TypeError):
        codec.parse("x" * 36)


def test_pack_unknown_type(codec):
    with pytest.raises(UnknownType):
        codec.pack(99)


@pytest.mark.parametrize("field, limit", sorted(LIMITS.items()))
def test_pack_out_of_range(codec, field, limit):
    kwargs = {"type": 1} if field != "type" else {}
    with pytest.raises(OverflowError, match=field):
        codec.pack(**{**kwargs, field: limit + 1})
    with pytest.raises(OverflowError, match=field):
        codec.pack(**{**kwargs, field: -1})
    if field != "type":
        assert codec.parse(codec.pack(**{**kwargs, field: limit})).as_tuple()


def test_pack_checks_in_order(codec):
    # type, then body_len, then the other fields in argument order.
    with pytest.raises(OverflowError, match="type"):
        codec.pack(300, body_len=-1)
    with pytest.raises(UnknownType):
        codec.pack(99, body_len=2**40)
    with pytest.raises(FrameTooLarge):
        codec.pack(1, flags=-1, body_len=(1 << 20) + 1)
    with pytest.raises(OverflowError, match="flags"):
        codec.pack(1, flags=-1, msg_id=-1)
    with pytest.raises(OverflowError, match="body_len"):
        codec.pack(1, body_len=2**32)


def test_pack_accepts_int_like(codec):
    assert codec.pack(True, src=3.9, dst=7) == codec.pack(1, src=3, dst=7)
    assert dict(codec.statistics())["packed"] == 2


def test_pack_rejects_non_numbers(codec):
    with pytest.raises((TypeError, ValueError)):
        codec.pack(1, src="x")


@pytest.mark.parametrize("bad", [dict(version=256), dict(version=-1), dict(max_body=2**32), dict(max_frame=-5)])
def test_codec_constructor_ranges(fp, mkcodec, bad):
    with pytest.raises(OverflowError):
        mkcodec(fp, **bad)


def test_codec_constructor_type_range(fp, mkcodec):
    with pytest.raises(OverflowError):
        mkcodec(fp, types=(1, 256))


def test_codec_properties_and_types(fp, mkcodec):
    c = mkcodec(fp, version=3, types=[5, 200], max_body=10, max_frame=20)
    assert (c.version, c.max_body, c.max_frame) == (3, 10, 20)
    assert c.is_valid_type(5) is True and c.is_valid_type(200) is True
    assert c.is_valid_type(6) is False and c.is_valid_type(-1) is False and c.is_valid_type(256) is False


def test_check_frame_size(fp, mkcodec):
    c = mkcodec(fp, max_frame=100)
    assert c.check_frame_size(100) is None
    with pytest.raises(FrameTooLarge):
        c.check_frame_size(101)
    with pytest.raises(FrameTooLarge):
        c.check_frame_size(2**70)
    assert dict(c.statistics())["too_large"] == 2


def test_advance_rewrites_ttl_and_hops(codec):
    frame = codec.pack(1, src=1, dst=2, ttl=5, hops=7)
    out = codec.advance(frame)
    assert isinstance(out, bytes) and out != frame
    assert codec.parse(out).as_tuple()[7:9] == (4, 8)
    assert out[:28] == frame[:28] and out[30:] == frame[30:]
    assert codec.advance(bytearray(frame)) == out


def test_advance_saturates(codec):
    out = codec.advance(codec.pack(1, ttl=0, hops=255))
    assert codec.parse(out).as_tuple()[7:9] == (0, 255)


def test_advance_rejects_like_parse(codec):
    with pytest.raises(TruncatedFrame):
        codec.advance(b"abc")


def test_statistics_snapshot(codec):
    stats = codec.statistics()
    assert list(stats) == ["packed", "parsed", "truncated", "too_large", "bad_version", "unknown_type", "malformed"]
    codec.parse(codec.pack(1))
    assert stats["parsed"] == 0  # a snapshot, not a live view
    with pytest.raises(TypeError):
        stats["parsed"] = 5
    assert codec.statistics()["parsed"] == 1


def test_header_is_read_only(codec):
    h = codec.parse(codec.pack(1, src=4))
    with pytest.raises(AttributeError):
        h.src = 5
    with pytest.raises(AttributeError):
        h.other = 1
    assert h.src == 4


def test_header_equality_hash_repr(fp, codec):
    a = codec.parse(codec.pack(1, flags=2, msg_id=3, src=4, dst=5))
    b = fp.Header(*a.as_tuple())
    assert a == b and not (a != b) and hash(a) == hash(b)
    assert a != fp.Header(*a.as_tuple()[:-1], 1)
    assert a != a.as_tuple()
    assert repr(a) == "Header(type=1, flags=0x2, msg_id=3, ref=0, src=4, dst=5, ttl=32, hops=0, extra=0, body_len=0)"


@pytest.mark.parametrize("index, limit", [(0, 0xFF), (1, 0xFF), (2, 0xFFFF), (3, 2**64 - 1), (4, 2**64 - 1), (5, 2**32 - 1), (6, 2**32 - 1), (7, 0xFF), (8, 0xFF), (9, 0xFFFF), (10, 2**32 - 1)])
def test_header_constructor_ranges(fp, index, limit):
    fields = [1] * 11
    fields[index] = limit
    assert fp.Header(*fields).as_tuple()[index] == limit
    fields[index] = limit + 1
    with pytest.raises(OverflowError):
        fp.Header(*fields)
    fields[index] = -1
    with pytest.raises(OverflowError):
        fp.Header(*fields)
