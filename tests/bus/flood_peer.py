"""Child process of test_planes_twoproc: floods the data plane while pinging on control.

Usage: ``python flood_peer.py CONTROL_ENDPOINT DATA_ENDPOINT COUNT``

It runs its own PlaneLoop with a control DEALER and a data DEALER (built by the
SocketFactory), sends COUNT ``DATA`` messages (extra frame: 4-byte sequence
number) with back-pressure, and meanwhile sends one ``PING`` at a time on the
control plane.  Each ``PONG`` carries how many data messages the receiver has
seen.  It stops when a PONG reports all COUNT received (or a deadline passes)
and prints one JSON line: round-trip times and how many PONGs came back while
the flood was still in progress.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import zmq

from bus.planes import PlaneLoop, SocketFactory
from bus.protocol import MsgType, Plane, encode

PING_GAP = 0.002  # seconds between a PONG and the next PING
DEADLINE = 60.0


async def main(control_ep: str, data_ep: str, count: int) -> dict:
    ctx = zmq.Context()
    factory = SocketFactory(ctx, linger=0)
    try:
        ctl = factory.control_dealer(control_ep, b"flooder")
        data = factory.data_dealer(data_ep, b"flooder")
        pongs: dict[int, asyncio.Future] = {}
        last_received = [0]
        rtts, during = [], [0]

        def on_control(batch):
            for frames in batch:
                decoded = pl.decode(ctl, frames)
                if decoded is None or decoded[1].type is not MsgType.PONG:
                    continue
                fut = pongs.pop(decoded[1].header.ref, None)
                if fut is not None and not fut.done():
                    fut.set_result(decoded[1].body["received"])

        async def flood():
            header, body = encode(MsgType.DATA, {}, extra=[bytes(4)])[:2]
            i = 0
            while i < count:
                if pl.send(data, [header, body, i.to_bytes(4, "little")]):
                    i += 1
                    if i % 128 == 0:
                        await asyncio.sleep(0)  # let PONGs in: pings measure the receiver
                elif not await pl.writable(data, timeout=10.0):
                    raise RuntimeError(f"data plane stuck after {i} messages")

        async def ping():
            while last_received[0] < count:
                frames = encode(MsgType.PING, {})
                fut = asyncio.get_running_loop().create_future()
                pongs[int.from_bytes(frames[0][4:12], "little")] = fut
                t0 = time.perf_counter()
                if not pl.send(ctl, frames):
                    raise RuntimeError("control queue full")
                received = await asyncio.wait_for(fut, 5.0)
                rtts.append(time.perf_counter() - t0)
                last_received[0] = received
                if 0 < received < count:
                    during[0] += 1
                await asyncio.sleep(PING_GAP)

        async with PlaneLoop() as pl:
            pl.add(ctl, Plane.CONTROL, on_control)
            pl.add(data, Plane.DATA, lambda batch: None)
            started = time.perf_counter()
            flooder = pl.spawn(flood(), name="flood")
            await asyncio.wait_for(ping(), DEADLINE)
            await flooder
            elapsed = time.perf_counter() - started
            stats = pl.statistics()
        rtts.sort()
        return {
            "sent": stats.data.sent,
            "seconds": elapsed,
            "pings": len(rtts),
            "pongs_during_flood": during[0],
            "rtt_p50_ms": 1000 * rtts[len(rtts) // 2],
            "rtt_p99_ms": 1000 * rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))],
            "rtt_max_ms": 1000 * rtts[-1],
        }
    finally:
        factory.close(0)
        ctx.term()


if __name__ == "__main__":
    result = asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    print(json.dumps(result), flush=True)
