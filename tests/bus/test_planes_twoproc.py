"""Two processes: a data flood must not delay control-plane pings.

The child (``flood_peer.py``, a real subprocess with its own PlaneLoop) sends
200k data-plane messages to this process's data ROUTER while it pings our
control ROUTER; every PONG reports how far the flood has got.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bus.planes import PlaneLoop, endpoint_of
from bus.protocol import MsgType, Plane, encode

COUNT = 200_000
ROOT = Path(__file__).resolve().parents[2]
PEER = Path(__file__).with_name("flood_peer.py")
# Measured on the shared 2-CPU dev box with both processes and both zmq I/O
# threads busy: p99 14-39 ms (p50 1-8 ms) at host load 2-5, pure and compiled
# twins alike; 80-230 ms at load 7-10.  The tail is CPU scheduling: the loop
# checks control after every data batch (128 msgs, < 1 ms).  So the bound is
# 50 ms on a host that is not oversubscribed (CI) and scales with measured
# oversubscription on a shared one.  A loop that starved control behind data
# fails anyway: its PINGs time out (5 s) or come back only after the flood.
P99_BOUND_MS = 50.0


def _p99_bound_ms() -> float:
    oversubscribed = os.getloadavg()[0] / (os.cpu_count() or 1)
    return P99_BOUND_MS * max(1.0, oversubscribed)


def _spawn(control_ep: str, data_ep: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, str(PEER), control_ep, data_ep, str(COUNT)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.timeout(90)
def test_pings_answer_during_a_200k_data_flood(factory, arun, until):
    ctl = factory.control_router("tcp://127.0.0.1:0")
    data = factory.data_router("tcp://127.0.0.1:0")
    received = [0]
    out_of_order = [0]
    at_ping = []  # data messages received when each PING was answered

    def on_data(batch):
        expect = received[0]
        for frames in batch:
            if int.from_bytes(frames[-1], "little") != expect:
                out_of_order[0] += 1
            expect += 1
        received[0] = expect

    def on_control(batch):
        for frames in batch:
            decoded = pl.decode(ctl, frames)
            if decoded is None:
                continue
            ids, msg = decoded
            if msg.type is MsgType.PING:
                at_ping.append(received[0])
                pl.send(ctl, [*ids, *encode(MsgType.PONG, {"received": received[0]}, ref=msg.header.msg_id)])

    async def main(proc):
        await until(lambda: proc.poll() is not None, timeout=75, what="the flooding child to finish")
        return pl.statistics()

    pl = PlaneLoop()
    pl.add(ctl, Plane.CONTROL, on_control)
    pl.add(data, Plane.DATA, on_data)
    proc = _spawn(endpoint_of(ctl), endpoint_of(data))
    bound = _p99_bound_ms()
    try:

        async def served():
            async with pl:
                return await main(proc)

        stats = arun(served(), timeout=80)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)  # reap and close the pipes
    assert proc.returncode == 0, err.decode(errors="replace")
    report = json.loads(out.decode().strip().splitlines()[-1])
    print(
        f"\n200k flood: {report['seconds']:.2f}s ({COUNT / report['seconds']:.0f} msg/s), "
        f"{report['pings']} pings, {report['pongs_during_flood']} during the flood, "
        f"RTT p50 {report['rtt_p50_ms']:.2f} ms p99 {report['rtt_p99_ms']:.2f} ms "
        f"max {report['rtt_max_ms']:.2f} ms (bound {bound:.0f} ms); receiver max batch {stats.data.max_batch}"
    )

    assert received[0] == COUNT and out_of_order[0] == 0
    assert stats.data.messages == COUNT and stats.data.dropped_total == 0
    assert report["sent"] == COUNT
    # Interleaved: PINGs were answered while the flood was still arriving.
    during = [n for n in at_ping if 0 < n < COUNT]
    assert len(during) >= 5, at_ping[:20]
    assert report["pongs_during_flood"] >= 5
    bound = max(bound, _p99_bound_ms())  # the host's load over the whole run
    assert report["rtt_p99_ms"] < bound, report
