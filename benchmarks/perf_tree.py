"""Overlay-tree benchmarks at scale, each with its baseline from the same run.

    python benchmarks/perf_tree.py [--nodes 1000] [--procs 10] [--rounds 30] [--insecure]

The clusters run as ``bus-ctl up`` runs them: with CurveZMQ, unless
``--insecure`` (plain TCP, the configuration issue 3's targets were first met in).

Starts real managers and bus-node processes on loopback (``tools.cluster``),
always stopped at the end, and prints one table:

* construction: N logical nodes from process start to fully registered (tree and star);
* broadcast + convergecast of a no-op to all N: p50/p99 latency (tree and star);
* root CPU per broadcast, tree vs star (manager process CPU, idle CPU subtracted);
* repair: kill -9 a process holding N/procs nodes (interior ones included), time until a
  broadcast reaches exactly the survivors; three trials, p50;
* ``bus-ctl exec -- true`` on 30 nodes, wall time including interpreter start, against
  ``python -c pass`` in the same run;
* memory: RSS of a 1-node process and per extra logical node.

Exit status 1 if a target is missed; the figures are printed either way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from tools import cluster  # noqa: E402

INSECURE = False  # --insecure: plain TCP instead of CurveZMQ

ROWS: list[tuple] = []


def row(name: str, value: float, unit: str, target: str, ok: bool | None, note: str = "") -> None:
    ROWS.append((name, value, unit, target, ok, note))
    mark = "" if ok is None else ("PASS" if ok else "FAIL")
    print(f"  {name:<44} {value:>10.3f} {unit:<6} {target:<14} {mark:<5} {note}", flush=True)


def cpu_of(pid: int) -> float:
    """CPU seconds of every thread of ``pid``, in nanoseconds' precision (schedstat)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except OSError:
                pass  # the thread ended
    except OSError:
        t = psutil.Process(pid).cpu_times()  # no /proc/*/schedstat: 10 ms ticks
        return t.user + t.system
    return total / 1e9


class Cluster:
    """A manager and node processes in a temporary state directory."""

    def __init__(self, nodes: int, procs: int, *, policy: str = "randtree", max_children: int = 16,
                 heartbeat: float | None = None):
        self.sdir = Path(tempfile.mkdtemp(prefix="snsbus-bench-"))
        self.n = nodes
        self.procs = procs
        self.policy = policy
        self.max_children = max_children
        self.heartbeat = heartbeat

    def __enter__(self) -> "Cluster":
        self.client = None
        try:
            self.manager = cluster.start_manager(self.sdir, port=0, policy=self.policy,
                                                 max_children=self.max_children, heartbeat=self.heartbeat,
                                                 insecure=INSECURE)
            self.endpoint = self.manager["control"]
            self.client = cluster.client(self.sdir, self.endpoint, timeout=60, connect_timeout=10)
            t0 = time.monotonic()
            per = -(-self.n // self.procs)
            self.nodes = cluster.start_nodes(self.sdir, self.n, per_process=per)
            self.wait_members(self.n)
            self.joined_in = time.monotonic() - t0
        except BaseException:
            self.__exit__()  # never leave a half-started cluster behind
            raise
        return self

    def wait_members(self, n: int, timeout: float = 120.0) -> None:
        # A patient loop: a star root is busy enough to miss cluster.wait_members' 1 s pings.
        deadline = time.monotonic() + timeout
        while self.client.call("ping")["members"] < n:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {self.client.call('ping')['members']} of {n} nodes joined")
            time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        if self.client is not None:
            self.client.close()
        cluster.down(self.sdir, grace=2.0)
        shutil.rmtree(self.sdir, ignore_errors=True)

    def broadcast(self, timeout: float = 5.0) -> tuple[float, dict]:
        t = time.perf_counter()
        res = self.client.request("broadcast", {"op": "ping", "timeout": timeout})
        return time.perf_counter() - t, res

    def names(self, res: dict) -> set:
        return {n for g in res["groups"] for n in g["nodes"]}

    def latency_and_root_cpu(self, rounds: int) -> tuple[list, float]:
        """Sorted broadcast latencies, and the root's CPU per broadcast (its idle rate subtracted)."""
        for _ in range(3):  # warm up
            self.broadcast()
        pid = self.manager["pid"]
        c0, t0 = cpu_of(pid), time.monotonic()
        time.sleep(3.0)
        idle = (cpu_of(pid) - c0) / (time.monotonic() - t0)
        lat = []
        c0, t0 = cpu_of(pid), time.monotonic()
        for _ in range(max(rounds, 100)):
            dt, res = self.broadcast()
            if res["answered"] != self.n:
                raise SystemExit(f"broadcast reached {res['answered']} of {self.n}: {res['missing'][:5]}")
            lat.append(dt)
        busy = cpu_of(pid) - c0 - idle * (time.monotonic() - t0)
        return sorted(lat), max(busy, 0.0) / len(lat)


def pct(xs: list, q: float) -> float:
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def bench_tree_vs_star(args) -> None:
    print(f"\n[tree vs star: {args.nodes} logical nodes in {args.procs} processes]")
    with Cluster(args.nodes, args.procs) as tree:
        row("construction, tree (s)", tree.joined_in, "s", "<= 3 s", tree.joined_in <= 3.0)
        lat, tree_cpu = tree.latency_and_root_cpu(args.rounds)
        row("broadcast+aggregate p50, tree", pct(lat, 0.5) * 1e3, "ms", "<= 100 ms", pct(lat, 0.5) <= 0.100)
        row("broadcast+aggregate p99, tree", pct(lat, 0.99) * 1e3, "ms", "", None)
        row("root CPU per broadcast, tree", tree_cpu * 1e3, "ms", "", None)
        depth = max(m["depth"] for m in tree.client.call("status")["members"])
        row("tree depth", depth, "", "", None)
        bench_repair(tree, args)
    with Cluster(args.nodes, args.procs, policy="star") as star:
        row("construction, star (baseline)", star.joined_in, "s", "", None)
        lat, star_cpu = star.latency_and_root_cpu(args.rounds)
        row("broadcast+aggregate p50, star (baseline)", pct(lat, 0.5) * 1e3, "ms", "", None)
        row("broadcast+aggregate p99, star (baseline)", pct(lat, 0.99) * 1e3, "ms", "", None)
        row("root CPU per broadcast, star (baseline)", star_cpu * 1e3, "ms", "", None)
    ratio = tree_cpu / star_cpu if star_cpu else float("inf")
    row("root CPU tree / star", ratio, "x", "<= 0.10", ratio <= 0.10)


def bench_repair(c: Cluster, args) -> None:
    times = []
    victims = sorted(c.nodes, key=lambda e: e["name"])[: args.repair_trials]
    for victim in victims:
        status = c.client.call("status")
        prefix = victim["name"] + "-"
        alive = {m["name"] for m in status["members"] if m["state"] == "alive"}
        survivors = {n for n in alive if not n.startswith(prefix)}
        by_id = {m["id"]: m for m in status["members"]}
        interior = sum(1 for m in status["members"]
                       if not m["name"].startswith(prefix) and by_id.get(m["parent"], {}).get("name", "").startswith(prefix))
        cluster.kill_node(victim["pid"], state_dir=c.sdir)
        t0 = time.monotonic()
        while True:
            _, res = c.broadcast(timeout=1.0)
            if c.names(res) == survivors:
                break
            if time.monotonic() - t0 > 30:
                raise SystemExit("repair did not complete within 30 s")
        times.append(time.monotonic() - t0)
        print(f"    killed {victim['name']} ({len(alive) - len(survivors)} nodes, {interior} orphans in other"
              f" processes): all survivors reached after {times[-1]:.3f} s", flush=True)
        # Bring the process back so the next trial starts from N nodes again.
        hosted = victim.get("virtual") or 1
        cluster.start_nodes(c.sdir, hosted, per_process=hosted, prefix=victim["name"] + "r")
        c.wait_members(c.n, timeout=60)
    p50 = statistics.median(times)
    row(f"repair after kill -9 of {100 // args.procs}% (p50 of {len(times)})", p50, "s", "<= 2 s", p50 <= 2.0)


def bench_exec_cli(args) -> None:
    print("\n[bus-ctl exec -- true on 30 nodes, wall time including interpreter start]")
    ctl = shutil.which("bus-ctl", path=str(Path(sys.executable).parent)) or ""
    argv = [ctl] if ctl else [sys.executable, "-m", "tools.ctl"]
    with Cluster(30, 3, max_children=16) as c:
        env = dict(os.environ, SNSBUS_ENDPOINT=c.endpoint, SNSBUS_STATE_DIR=str(c.sdir))  # its client key
        walls, base = [], []
        for _ in range(args.exec_rounds):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            base.append(time.perf_counter() - t)
            t = time.perf_counter()
            out = subprocess.run([*argv, "exec", "--", "true"], env=env, capture_output=True, text=True)
            walls.append(time.perf_counter() - t)
            if out.returncode != 0:
                raise SystemExit(f"bus-ctl exec failed: {out.stderr}")
    row("python -c pass (baseline)", statistics.median(base), "s", "", None)
    row("bus-ctl exec -- true, 30 nodes (p50)", statistics.median(walls), "s", "<= 0.3 s",
        statistics.median(walls) <= 0.3)


def bench_memory(args) -> None:
    print("\n[memory: RSS of bus-node processes]")
    with Cluster(1, 1) as one:
        rss1 = psutil.Process(one.nodes[0]["pid"]).memory_info().rss
        cluster.start_nodes(one.sdir, 100, per_process=100, prefix="many")
        one.wait_members(101, timeout=60)
        many = cluster.cluster_info(one.sdir)["nodes"][-1]
        one.broadcast()  # touch every node's state once
        rss100 = psutil.Process(many["pid"]).memory_info().rss
    row("RSS of a 1-node process", rss1 / 2**20, "MB", "<= 30 MB", rss1 <= 30 * 2**20)
    per = (rss100 - rss1) / 99
    row("RSS per extra logical node", per / 2**20, "MB", "<= 1 MB", per <= 2**20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--repair-trials", type=int, default=3)
    ap.add_argument("--exec-rounds", type=int, default=10)
    ap.add_argument("--only", choices=["tree", "exec", "memory"], default=None)
    ap.add_argument("--insecure", action="store_true", help="plain TCP instead of CurveZMQ")
    args = ap.parse_args()
    global INSECURE
    INSECURE = args.insecure
    from core import fastpath

    print(f"snsbus tree benchmarks (fast path: {fastpath.IMPLEMENTATION}, {os.cpu_count()} CPUs, "
          f"{'plain TCP' if INSECURE else 'CurveZMQ'})")
    if args.only in (None, "memory"):
        bench_memory(args)
    if args.only in (None, "exec"):
        bench_exec_cli(args)
    if args.only in (None, "tree"):
        bench_tree_vs_star(args)
    failed = [r for r in ROWS if r[4] is False]
    print(f"\n{len(ROWS)} figures, {len(failed)} targets missed" + (": " + ", ".join(r[0] for r in failed) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    sys.exit(main())
