"""What CurveZMQ costs, each figure against plain TCP measured in the same run.

    python benchmarks/perf_curve.py [--part sockets|tree|all] [--nodes 200] [--procs 4]

``sockets`` (two processes, the bus's own sockets from ``SocketFactory``):

* data-plane throughput, DEALER -> ROUTER, messages of 100 B, 4 KiB and 64 KiB
  (header + msgpack body, sent with ``send_nowait``, received with ``drain``):
  messages/s with and without CURVE, alternating runs, median of ``--repeat``;
* control-plane round trip of a heartbeat-sized message, p50/p99;
* connection set-up (connect until writable: TCP + ZMTP, plus the CURVE
  handshake and the ZAP round trip when on), p50, what every join and
  rejoin pays once.

``tree`` (real manager and bus-node processes on loopback, ``tools.cluster``):
the same cluster with CURVE (keys made by ``cluster.up``) and with
``insecure=True``: construction, broadcast p50, idle CPU per node
(heartbeats), repair after kill -9 of a process, and detection + repair
of a hung process (SIGSTOP: only heartbeat silence tells).

Prints one table; every CURVE figure has its plain baseline and the ratio.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from bus import protocol as p  # noqa: E402
from bus.planes import SocketFactory, endpoint_of, new_context  # noqa: E402
from bus.security import KeyPair, Security  # noqa: E402
from core.fastpath import drain, send_nowait  # noqa: E402

MODES = ("plain", "curve")


def row(name: str, plain: float, curve: float, unit: str, lower_is_better: bool = False) -> None:
    ratio = curve / plain if plain else float("nan")
    cost = (ratio - 1) if lower_is_better else (1 - ratio)
    print(f"  {name:<46} {plain:>12.1f} {curve:>12.1f} {unit:<8} x{ratio:5.2f}  ({cost:+.0%} cost)", flush=True)


# -- processes of the socket benchmarks ------------------------------------------------------


def _factory(ctx, mode: str, keys: dict, role: str) -> tuple[SocketFactory, Security | None]:
    if mode == "plain":
        return SocketFactory(ctx, linger=0), None
    if role == "server":
        sec = Security(keys["server"], manager_key=keys["manager"], authorized=[keys["client"].public])
    else:
        sec = Security(keys["client"], manager_key=keys["manager"])
    return SocketFactory(ctx, linger=0, security=sec), sec


def _server(mode: str, kind: str, keys: dict, n: int, conn) -> None:
    """Bind a ROUTER; ``sink``: count n messages, report first-to-last seconds; ``echo``: send each back."""
    ctx = new_context()
    fac, sec = _factory(ctx, mode, keys, "server")
    try:
        sock = fac.data_router("tcp://127.0.0.1:0") if kind == "sink" else fac.control_router("tcp://127.0.0.1:0")
        ep = endpoint_of(sock)
        conn.send(sec.advertise(ep) if sec else ep)
        got, t_first = 0, None
        while got < n:
            if not sock.poll(20_000):
                break
            batch = drain(sock, 4096)
            if t_first is None:
                t_first = time.perf_counter()
            got += len(batch)
            if kind == "echo":
                for frames in batch:
                    while not send_nowait(sock, frames):
                        sock.poll(100, zmq.POLLOUT)
        conn.send((got, time.perf_counter() - (t_first or time.perf_counter())))
        conn.recv()  # the client is done: close
    finally:
        fac.close(0)
        ctx.term()


def _sender(endpoint: str, mode: str, keys: dict, n: int, size: int, conn) -> None:
    ctx = new_context()
    fac, _ = _factory(ctx, mode, keys, "client")
    try:
        sock = fac.data_dealer(endpoint, b"\x01sender")
        sock.poll(10_000, zmq.POLLOUT)
        frames = p.encode(p.MsgType.DATA, b"x" * size)
        for _ in range(n):
            while not send_nowait(sock, frames):
                sock.poll(100, zmq.POLLOUT)
        conn.send("sent")
        conn.recv()
    finally:
        fac.close(0)
        ctx.term()


def _pinger(endpoint: str, mode: str, keys: dict, rounds: int, handshakes: int, conn) -> None:
    """Round trips on one connection, then ``handshakes`` fresh connections timed until writable."""
    ctx = new_context()
    fac, _ = _factory(ctx, mode, keys, "client")
    try:
        sock = fac.control_dealer(endpoint, b"\x01pinger")
        sock.poll(10_000, zmq.POLLOUT)
        beat = p.encode(p.MsgType.HEARTBEAT, {})
        rtt = []
        for _ in range(rounds):
            t = time.perf_counter()
            send_nowait(sock, beat)
            sock.poll(5000)
            drain(sock, 1)
            rtt.append(time.perf_counter() - t)
        sock.close(0)
        setup = []
        for i in range(handshakes):
            t = time.perf_counter()
            s = fac.control_dealer(endpoint, b"\x02hs" + i.to_bytes(4, "little"))
            s.poll(10_000, zmq.POLLOUT)
            setup.append(time.perf_counter() - t)
            s.close(0)
        conn.send((sorted(rtt), sorted(setup)))
        conn.recv()
    finally:
        fac.close(0)
        ctx.term()


def _run(server_args: tuple, client, client_args: tuple):
    ctx = mp.get_context("spawn")
    s_parent, s_child = ctx.Pipe()
    c_parent, c_child = ctx.Pipe()
    srv = ctx.Process(target=_server, args=(*server_args, s_child))
    srv.start()
    endpoint = s_parent.recv()
    cli = ctx.Process(target=client, args=(endpoint, *client_args, c_child))
    cli.start()
    try:
        out = c_parent.recv()
        res = s_parent.recv() if server_args[1] == "sink" else None
    finally:
        for conn in (c_parent, s_parent):
            conn.send("bye")
        cli.join(30)
        srv.join(30)
    return res if server_args[1] == "sink" else out


def bench_sockets(args, keys: dict) -> None:
    print("\n[data plane: DEALER -> ROUTER, messages/s]" + " " * 12 + "plain        curve")
    for size, n in ((100, args.messages), (4096, args.messages // 4), (65536, args.messages // 40)):
        rates = {m: [] for m in MODES}
        for _ in range(args.repeat):
            for mode in MODES:
                got, secs = _run((mode, "sink", keys, n), _sender, (mode, keys, n, size))
                if got != n:
                    raise SystemExit(f"{mode}: {got} of {n} messages of {size} B arrived")
                rates[mode].append(n / secs)
        plain, curve = statistics.median(rates["plain"]), statistics.median(rates["curve"])
        row(f"throughput, {size} B messages", plain, curve, "msg/s")
        row(f"throughput, {size} B messages", plain * size / 1e6, curve * size / 1e6, "MB/s")
    print("\n[control plane: heartbeat round trip; connection set-up]")
    out = {m: _run((m, "echo", keys, args.rounds), _pinger, (m, keys, args.rounds, args.handshakes))
           for m in MODES}
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        row(f"heartbeat round trip {label}", *(_pct(out[m][0], q) * 1e6 for m in MODES), "us", True)
    row("connect until writable (handshake) p50", *(_pct(out[m][1], 0.5) * 1e6 for m in MODES), "us", True)


def _pct(xs: list, q: float) -> float:
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# -- the tree -------------------------------------------------------------------------------


def _cpu(pid: int) -> float:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total / 1e9


def _tree(mode: str, args) -> dict:
    from tools import cluster
    from tools.client import CtlClient

    sdir = Path(tempfile.mkdtemp(prefix=f"snsbus-curve-{mode}-"))
    out: dict = {}
    try:
        up = cluster.up(args.nodes, per_process=-(-args.nodes // args.procs), max_children=16, port=0,
                        state_dir=sdir, insecure=mode == "plain", timeout=120)
        out["construction"] = up["elapsed"]
        security = None if mode == "plain" else cluster.client_security(sdir)
        with CtlClient(up["manager"]["control"], timeout=30, security=security) as c:
            def bcast():
                t = time.perf_counter()
                res = c.request("broadcast", {"op": "ping", "timeout": 2.0})
                return time.perf_counter() - t, {n for g in res["groups"] for n in g["nodes"]}

            for _ in range(3):
                bcast()
            out["broadcast"] = statistics.median(bcast()[0] for _ in range(args.rounds // 100 or 20))
            pids = [up["manager"]["pid"], *(e["pid"] for e in up["nodes"])]
            c0, t0 = sum(map(_cpu, pids)), time.monotonic()
            time.sleep(3.0)
            out["idle_cpu"] = (sum(map(_cpu, pids)) - c0) / (time.monotonic() - t0) / args.nodes

            def until_survivors(survivors, limit=30.0):
                t0 = time.monotonic()
                while bcast()[1] != survivors:
                    if time.monotonic() - t0 > limit:
                        raise SystemExit(f"{mode}: the tree did not heal within {limit:g}s")
                return time.monotonic() - t0

            def survivors_without(victim):
                alive = {m["name"] for m in c.call("status")["members"] if m["state"] == "alive"}
                return {n for n in alive if not n.startswith(victim["name"] + "-")}

            heal, orphans = [], []
            for i in range(args.trials):  # kill -9: the connections close, orphans rejoin at once
                victim = up["nodes"][i % len(up["nodes"])]
                survivors, since = survivors_without(victim), time.time()
                cluster.kill_node(victim["pid"], state_dir=sdir)
                heal.append(until_survivors(survivors))
                orphans += [float(m.group(1)) for e in c.call("status")["events"] if e["t"] >= since
                            and (m := re.search(r"after ([0-9.]+)s as an orphan", e.get("detail", "")))]
                hosted = victim.get("virtual") or 1  # bring it back: every trial starts from N nodes
                cluster.start_nodes(sdir, hosted, per_process=hosted, prefix=f"{victim['name']}r")
                deadline = time.monotonic() + 60
                while c.call("ping")["members"] < args.nodes and time.monotonic() < deadline:
                    time.sleep(0.05)
            out["repair_kill"] = statistics.median(heal)
            out["orphan_rejoin"] = statistics.median(orphans) if orphans else float("nan")
            out["orphans"] = len(orphans)
            victim = up["nodes"][-1]  # a hung process: only heartbeat silence (3 x 1 s) tells
            survivors = survivors_without(victim)
            os.kill(victim["pid"], signal.SIGSTOP)
            try:
                out["repair_hang"] = until_survivors(survivors)
            finally:
                cluster.kill_node(victim["pid"], state_dir=sdir)  # SIGKILL ends a stopped process too
    finally:
        cluster.down(sdir, grace=2.0)
        shutil.rmtree(sdir, ignore_errors=True)
    return out


def bench_tree(args) -> None:
    print(f"\n[tree: {args.nodes} logical nodes in {args.procs} processes, heartbeat 1 s x 3; "
          f"median of {args.tree_repeat} alternating runs]" + " " * 2 + "plain        curve")
    runs = {m: [] for m in MODES}
    for _ in range(args.tree_repeat):  # alternate: the host's other load hits both modes alike
        for mode in MODES:
            runs[mode].append(_tree(mode, args))

    def med(mode, key, scale):
        values = [r[key] for r in runs[mode] if r[key] == r[key]]  # no NaN (a run without orphans)
        return statistics.median(values) * scale if values else float("nan")

    row("construction (up until all registered)", *(med(m, "construction", 1e3) for m in MODES), "ms", True)
    row("broadcast + convergecast p50", *(med(m, "broadcast", 1e3) for m in MODES), "ms", True)
    row("idle CPU per node (heartbeats)", *(med(m, "idle_cpu", 1e6) for m in MODES), "us/s", True)
    row(f"repair after kill -9 of a process ({args.trials}/run)", *(med(m, "repair_kill", 1e3) for m in MODES),
        "ms", True)
    row("orphan rejoin time (" + "/".join(str(sum(r["orphans"] for r in runs[m])) for m in MODES) + " orphans)",
        *(med(m, "orphan_rejoin", 1e3) for m in MODES), "ms", True)
    row("hung process (SIGSTOP): detect + repair", *(med(m, "repair_hang", 1e3) for m in MODES), "ms", True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("sockets", "tree", "all"), default="all")
    ap.add_argument("--messages", type=int, default=200_000, help="100-byte messages per run (fewer when larger)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3000, help="heartbeat round trips")
    ap.add_argument("--handshakes", type=int, default=200)
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--trials", type=int, default=3, help="kill -9 trials per cluster run")
    ap.add_argument("--tree-repeat", type=int, default=3, help="cluster runs per mode")
    args = ap.parse_args()
    print(f"libzmq {zmq.zmq_version()}, pyzmq {zmq.__version__}, CURVE {'yes' if zmq.has('curve') else 'NO'}; "
          f"{os.cpu_count()} CPUs")
    keys = {"server": KeyPair.generate(), "client": KeyPair.generate(), "manager": KeyPair.generate().public}
    if args.part in ("sockets", "all"):
        bench_sockets(args, keys)
    if args.part in ("tree", "all"):
        bench_tree(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
