"""Fixtures of the fast-path tests: every test runs against each available twin."""

from __future__ import annotations

import pytest
import zmq

from core import fastpath

VERSION = 1
TYPES = (1, 2, 3, 16, 17, 64, 65)  # the codec of these tests knows only these types
MAX_BODY = 1 << 20
MAX_FRAME = 8 << 20


def _twin_ids():
    return sorted(fastpath.twins())


@pytest.fixture(params=_twin_ids())
def fp(request):
    """Each available twin module (``core._fastpath_py``, ``core._fastpath``)."""
    return fastpath.twins()[request.param]


@pytest.fixture
def both():
    """(pure, compiled) twin modules, for differential tests; skipped without a build."""
    twins = fastpath.twins()
    if "cython" not in twins:
        pytest.skip("differential test: needs the compiled twin (BUS_NO_EXTENSIONS is set)")
    return twins["python"], twins["cython"]


def make_codec(mod, version=VERSION, types=TYPES, max_body=MAX_BODY, max_frame=MAX_FRAME):
    return mod.FrameCodec(version, types, max_body, max_frame)


@pytest.fixture
def mkcodec():
    """``mkcodec(mod, **limits)``: a FrameCodec of twin ``mod`` for these tests."""
    return make_codec


@pytest.fixture
def codec(fp):
    return make_codec(fp)


class _TrackingContext:
    """A zmq context that keeps every socket it made, so teardown can close them."""

    def __init__(self):
        self.ctx = zmq.Context()
        self.sockets = []

    def socket(self, kind):
        s = self.ctx.socket(kind)
        self.sockets.append(s)
        return s

    def close(self):
        for s in self.sockets:
            s.close(linger=0)
        self.ctx.term()


@pytest.fixture
def zctx():
    """A zmq context; every socket made with ``zctx.socket()`` is closed after the test."""
    ctx = _TrackingContext()
    try:
        yield ctx
    finally:
        ctx.close()
