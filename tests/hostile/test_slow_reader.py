"""A slow reader on the data plane: a peer that never reads (issue 7, item 3).

The sender's memory must stay bounded.  Two measures, in this process (the
peer's own buffers are capped by ``RCVHWM=1`` and a 4 KiB socket buffer, so
what grows is the sender's queue):

* ``PlaneLoop.send`` on a data socket stops accepting at the high-water mark
  (it returns False, and callers back off): accepted messages, hence queued
  bytes, are bounded by the HWM.
* ``ChunkService`` serving a hostile fetcher that ignores the credit window
  and sends request after request without reading the chunks.  Credits are
  granted by the receiver, so they bound nothing here; the data ROUTER's
  send HWM (``planes.DATA_ROUTER_SNDHWM``, 64 messages) times the largest
  chunk a request may ask for (``transfer.MAX_CHUNK``, 1 MiB) does: the rest
  of the replies is dropped and counted, and an honest fetcher asks again.
"""

from __future__ import annotations

import asyncio
import os
import time

import psutil
import pytest
import zmq

from bus import protocol as p
from bus.planes import PlaneLoop, SocketFactory
from bus.transfer import ChunkService
from nodes.packages import PackageCache

MB = 1 << 20


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


def never_reading_peer(ctx, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"\x01slow")
    sock.connect(endpoint)
    return sock


def test_plane_send_stops_at_the_high_water_mark(zctx):
    hwm, size = 100, 64 * 1024

    async def main():
        factory = SocketFactory(zctx, linger=0, data_hwm=hwm)
        loop = PlaneLoop()
        try:
            router = factory.data_router("tcp://127.0.0.1:0")
            loop.add(router, p.Plane.DATA, lambda batch: None)
            await loop.start()
            peer = never_reading_peer(zctx, router.getsockopt(zmq.LAST_ENDPOINT).decode())
            peer.send_multipart(p.encode(p.MsgType.DATA, {}))  # so the ROUTER knows the peer
            await asyncio.sleep(0.1)
            rss0 = psutil.Process().memory_info().rss
            payload = os.urandom(size)
            accepted = refused = 0
            deadline = time.monotonic() + 10
            while refused < 50 and time.monotonic() < deadline:
                if loop.send(router, [b"\x01slow", *p.encode(p.MsgType.DATA, {}, extra=[payload])]):
                    accepted += 1
                else:
                    refused += 1
                    await asyncio.sleep(0.001)
            grown = psutil.Process().memory_info().rss - rss0
            print(f"\naccepted {accepted} x {size >> 10} KiB before the HWM refused; RSS +{grown / MB:.1f} MB")
            assert refused >= 50, "the sender never met the high-water mark"
            # HWM on the ROUTER pipe plus what libzmq and the kernel hold in flight.
            assert accepted <= 3 * hwm and grown < 3 * hwm * size + 16 * MB
            peer.close(0)
        finally:
            await loop.stop()
            factory.close(linger=0)

    asyncio.run(main())


class _Link:
    """What ChunkService.serve needs of a NodeLink: the data ROUTER and its ``on_data``."""

    data = None
    on_data = None


def test_chunk_service_memory_bounded_with_a_fetcher_that_never_reads(zctx, tmp_path):
    requests, chunk = 600, 256 * 1024

    async def main():
        factory = SocketFactory(zctx, linger=0)  # the defaults bus-node uses
        loop = PlaneLoop()
        try:
            cache = PackageCache(tmp_path / "cache")
            digest = cache.put(os.urandom(4 * chunk))
            link = _Link()
            link.data = factory.data_router("tcp://127.0.0.1:0")

            def on_batch(batch):
                for frames in batch:
                    decoded = loop.decode(link.data, frames)
                    if decoded is not None:
                        link.on_data(bytes(decoded[0][0]), decoded[1])

            loop.add(link.data, p.Plane.DATA, on_batch)
            await loop.start()
            svc = ChunkService(factory, loop, cache)
            svc.serve(link)
            peer = never_reading_peer(zctx, link.data.getsockopt(zmq.LAST_ENDPOINT).decode())
            rss0 = psutil.Process().memory_info().rss
            for i in range(requests):
                peer.send_multipart(p.encode(p.MsgType.CHUNK_REQUEST,
                                             {"d": digest, "o": (i % 4) * chunk, "n": chunk, "s": 4 * chunk}))  # fmt: skip
            deadline = time.monotonic() + 30
            while svc.statistics()["requests"] < requests and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            grown = psutil.Process().memory_info().rss - rss0
            s = svc.statistics()
            print(f"\n{s['requests']} requests, {s['chunks_served']} chunks queued, {s['replies_dropped']} dropped; "
                  f"RSS +{grown / MB:.0f} MB")  # fmt: skip
            peer.close(0)
            svc.close()
            assert grown < 64 * MB, f"the server holds {grown / MB:.0f} MB for one peer that never reads"
        finally:
            await loop.stop()
            factory.close(linger=0)

    asyncio.run(main())
