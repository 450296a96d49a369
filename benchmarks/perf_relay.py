"""CPU cost of one forwarding hop across processes on tcp loopback.

    producer --PUSH/tcp--> relay --PUSH/tcp--> sink

The producer sends ``--messages`` messages ``[header, body]`` built with
``bus.protocol.encode`` (a ``--size``-byte msgpack body) to a destination in the
relay's routing table; the relay receives each one, decides where it goes and
sends it on to the sink.  Three relays run in turn, with the same N and the
same socket options (the relay's sockets keep libzmq's default HWM of 1000):

* ``pyzmq``: the ordinary relay loop, blocking ``recv_multipart`` then
  ``send_multipart`` (no decision at all: the baseline does less work);
* ``pure``: ``core._fastpath_py.relay()`` (parse, route, rewrite ttl/hops),
  driven by ``zmq.Poller``;
* ``compiled``: ``core._fastpath.relay()``, driven the same way.

Two regimes: ``queued`` (the producer has sent everything before the relay
starts: a full queue, the per-message cost) and ``live`` (all three processes
run at once, so the relay also pays a wake-up whenever it catches up).

The figure is the relay process's CPU time (``time.process_time``: its Python
thread plus libzmq's I/O thread) from before the producer starts until the sink
has everything, divided by N; ``time.thread_time`` gives the relay thread alone.
Each relay runs ``--repeat`` times, interleaved, and the median run is
reported.  The target: in each regime the compiled relay costs at most 1/3 of
the baseline's CPU per message; the script exits with status 1 when it does not.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MODES = ("pyzmq", "pure", "compiled")
REGIMES = {
    "queued": "the producer sends all N first; the relay then forwards a full queue "
    "(per-message cost, no idle wake-ups)",
    "live": "producer, relay and sink run at once (includes the relay's wake-ups "
    "whenever it catches up with the producer)",
}
TARGET = 1 / 3  # compiled CPU per message <= TARGET * baseline
# The relay's sockets keep libzmq's default HWM (1000) in every mode; the
# producer and the sink (not measured) hold any backlog: no limit there.
RELAY_HWM = 1000
PEER_HWM = 0
DST = 4242  # the destination every message carries; routed to link 1
BATCH = 4096  # max messages per relay() call
TIMEOUT = 120.0  # seconds for one run before giving up


def _message(size: int) -> list:
    from bus import protocol

    pad = 0
    while len(protocol.packb({"p": b"x" * pad})) < size:
        pad += 1
    frames = protocol.encode(protocol.MsgType.DATA, {"p": b"x" * pad}, src=1, dst=DST, msg_id=1)
    return frames


def _socket(ctx, kind, hwm):
    import zmq

    s = ctx.socket(kind)
    s.setsockopt(zmq.SNDHWM, hwm)
    s.setsockopt(zmq.RCVHWM, hwm)
    return s


def producer(endpoint: str, n: int, size: int, ready, go, sent) -> None:
    import zmq

    ctx = zmq.Context()
    s = _socket(ctx, zmq.PUSH, PEER_HWM)
    s.connect(endpoint)
    frames = _message(size)
    ready.set()
    go.wait()
    send = s.send_multipart
    for _ in range(n):
        send(frames)
    sent.set()
    s.close(linger=-1)  # deliver everything, however long the relay takes
    ctx.term()


def sink(endpoint_q, n: int, done) -> None:
    import zmq

    ctx = zmq.Context()
    s = _socket(ctx, zmq.PULL, PEER_HWM)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    endpoint_q.put(f"tcp://127.0.0.1:{port}")
    # Not measured, but it must keep up with the fastest relay, or that relay
    # would wait on a full pipe: drain in C (the compiled twin) in batches.
    from core._fastpath import drain

    got = 0
    while got < n:
        s.poll()
        got += len(drain(s, 10_000))
    done.set()
    s.close()
    ctx.term()


def relay_proc(mode: str, n: int, sink_endpoint: str, conn) -> None:
    import zmq

    ctx = zmq.Context()
    ins = _socket(ctx, zmq.PULL, RELAY_HWM)
    port = ins.bind_to_random_port("tcp://127.0.0.1")
    outs = _socket(ctx, zmq.PUSH, RELAY_HWM)
    outs.connect(sink_endpoint)
    if mode != "pyzmq":
        from bus import protocol

        if mode == "pure":
            from core import _fastpath_py as fp
        else:
            from core import _fastpath as fp
        codec = fp.FrameCodec(protocol.VERSION, [int(t) for t in protocol.MsgType],
                              protocol.MAX_BODY, protocol.MAX_FRAME)
        routes = fp.RoutingTable()
        routes.add_subtree(1, range(4000, 5000))
        forwarder = fp.Forwarder(7, codec, routes)
        relay = fp.relay
    conn.send(f"tcp://127.0.0.1:{port}")
    conn.recv()  # start
    p0, t0 = time.process_time(), time.thread_time()
    conn.recv()  # go: the producer has sent everything (queued) or has started (live)
    w0 = time.perf_counter()

    count = forwarded = 0
    if mode == "pyzmq":
        recv, send = ins.recv_multipart, outs.send_multipart
        while count < n:
            send(recv())
            count += 1
        forwarded = count
    else:
        poller = zmq.Poller()
        poller.register(ins, zmq.POLLIN)
        poll = poller.poll
        while count < n:
            poll()
            r, f = relay(ins, outs, forwarder, BATCH)
            count += r
            forwarded += f
    t1, w1 = time.thread_time(), time.perf_counter()
    conn.send(forwarded)
    conn.recv()  # the sink has everything: the I/O thread's sends are done
    p1 = time.process_time()
    stats = dict(forwarder.statistics()) if mode != "pyzmq" else {}
    conn.send({"cpu": p1 - p0, "thread": t1 - t0, "wall": w1 - w0, "stats": stats})
    ins.close()
    outs.close()
    ctx.term()


def run_once(mode: str, regime: str, n: int, size: int) -> dict:
    mpc = mp.get_context("spawn")
    endpoint_q = mpc.Queue()
    done, ready, go, sent = mpc.Event(), mpc.Event(), mpc.Event(), mpc.Event()
    procs = []
    try:
        snk = mpc.Process(target=sink, args=(endpoint_q, n, done), daemon=True)
        snk.start()
        procs.append(snk)
        sink_ep = endpoint_q.get(timeout=TIMEOUT)
        parent, child = mpc.Pipe()
        rly = mpc.Process(target=relay_proc, args=(mode, n, sink_ep, child), daemon=True)
        rly.start()
        procs.append(rly)
        if not parent.poll(TIMEOUT):
            raise RuntimeError("relay did not start")
        relay_ep = parent.recv()
        prod = mpc.Process(target=producer, args=(relay_ep, n, size, ready, go, sent), daemon=True)
        prod.start()
        procs.append(prod)
        if not ready.wait(TIMEOUT):
            raise RuntimeError("producer did not start")
        parent.send("start")
        if regime == "queued":
            go.set()
            # Everything is queued: in the producer, on the wire and (up to the
            # HWM) in the relay, whose I/O thread has been reading meanwhile.
            if not sent.wait(TIMEOUT):
                raise RuntimeError("producer did not finish sending")
            parent.send("go")
        else:
            parent.send("go")
            go.set()
        if not parent.poll(TIMEOUT):
            raise RuntimeError(f"{mode} relay did not finish within {TIMEOUT}s")
        forwarded = parent.recv()
        if not done.wait(TIMEOUT):
            raise RuntimeError("sink did not receive every message")
        parent.send("stop")
        if not parent.poll(TIMEOUT):
            raise RuntimeError("relay did not report")
        result = parent.recv()
        result["forwarded"] = forwarded
        return result
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


def report(regime: str, results: dict, n: int, size: int, repeat: int) -> bool:
    def med(mode, key):
        return statistics.median(r[key] for r in results[mode])

    base = med("pyzmq", "cpu") / n
    print(f"\n[{regime}] {REGIMES[regime]}")
    print(f"{n} messages of [36-byte header, {size}-byte body], median of {repeat} runs; "
          f"cpu = process_time (relay thread + libzmq I/O thread), thread = relay thread only")
    print(f"{'relay':<10} {'us cpu/msg':>11} {'us thread/msg':>14} {'msgs/s':>10} {'cpu vs pyzmq':>13}")
    for mode in MODES:
        cpu = med(mode, "cpu") / n
        thread = med(mode, "thread") / n
        rate = n / med(mode, "wall")
        print(f"{mode:<10} {cpu * 1e6:>11.2f} {thread * 1e6:>14.2f} {rate:>10.0f} {cpu / base:>13.3f}")
    ratio = med("compiled", "cpu") / med("pyzmq", "cpu")
    ok = ratio <= TARGET
    print(f"compiled/pyzmq cpu per message = {ratio:.3f} (target <= {TARGET:.3f}): {'PASS' if ok else 'FAIL'}")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=100_000, help="messages per run (default 100000)")
    ap.add_argument("--size", type=int, default=64, help="body bytes per message (default 64)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per relay; the median is reported")
    ap.add_argument("--regime", choices=(*REGIMES, "both"), default="both",
                    help="queued, live or both (default)")
    args = ap.parse_args(argv)
    n = args.messages
    regimes = list(REGIMES) if args.regime == "both" else [args.regime]

    ok = True
    for regime in regimes:
        results = {}
        for _ in range(args.repeat):
            for mode in MODES:  # interleaved, so drift in the machine's load hits every mode
                r = run_once(mode, regime, n, args.size)
                if r["forwarded"] != n or r["stats"].get("forwarded_down", n) != n:
                    print(f"{mode}: forwarded {r['forwarded']} of {n} ({r['stats']})", file=sys.stderr)
                    return 2
                results.setdefault(mode, []).append(r)
        ok = report(regime, results, n, args.size, args.repeat) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
