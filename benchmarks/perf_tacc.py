"""TACC service benchmarks (issue 5), each figure against a baseline from the same run.

    python benchmarks/perf_tacc.py [--only NAME] [--seconds 5] [--workers 2] [--spawn-trials 3] [--keep-logs]

Every benchmark deploys a generated spec with ``bus-ctl deploy`` on a fresh
manager (``tools.cluster``) with real bus-nodes, worker processes, cache
partitions and, where HTTP is measured, the front end (``python -m frontends``
run by the deploy) and the origin server of ``examples/transend/origin.py``;
everything is stopped at the end, also after a failure.  "The front end's
dispatch" below is :class:`frontends.dispatch.TaskClient` (what the HTTP front
end uses) running in this process, subscribed to the manager's beacons.

* ``distill``: distillation throughput through the whole service (HTTP, the
  originals in the cache, every result a cache miss) vs the same Pillow
  function in a ``multiprocessing`` pool with as many processes (N, default
  one per CPU) as the service has distillers, on the same image and
  parameter sequence, in alternating windows.  Target >= 90% of direct.
  Also printed: the share of the service's CPU spent outside the distillers
  (front end, stub, load generator, manager), and for information the same
  comparison with one distiller, which leaves a CPU to the rest.
* ``echo``: tiny tasks (the echo worker): requests/s and CPU per request of
  every process involved, at the dispatch level (many concurrent
  ``TaskClient.call`` in one process: one front end) and over HTTP with the
  load generator; baseline the echo function in a ``multiprocessing`` pool.
  Targets (dispatch level): >= 5,000 req/s, CPU per task < Dask's ~200 us.
* ``cache``: p50/p99 latency of a cached ``/distill`` over HTTP at 1 and 4
  clients; baseline ``/health`` of the same front end (the HTTP floor).
  Targets p50 <= 2 ms, p99 <= 10 ms.
* ``balance``: four sleeper workers, one of them 4x slower, Poisson arrivals;
  p99 latency with the front end's default choice (power of two choices on
  queue x cost) vs round-robin in the same run.  Target <= 0.5x.
* ``spawn``: a step from idle to saturating load on a class with one worker
  (max two); the time until the queues are balanced again (definition printed
  with the figure).  Target <= 1 s (TranSend: ~5 s).

Exit status 1 if a target is missed; the figures are printed either way.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Iterable, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import tacc_workers  # noqa: E402
from bus.planes import PlaneLoop, SocketFactory, new_context  # noqa: E402
from frontends.beacon import TRANSFORMATION, BeaconClient, WorkerRow  # noqa: E402
from frontends.dataplane import DataPlane  # noqa: E402
from frontends.dispatch import NO_WORKERS, NoWorkerAvailable, TaskClient  # noqa: E402
from tools import cluster, state  # noqa: E402

ROWS: list[tuple] = []
W = "benchmarks.tacc_workers"
INSECURE = False  # --insecure: plain TCP; by default the clusters run CurveZMQ, as `bus-ctl up` does
DISTILL = "examples.transend.distill:distill_worker"
TINY = "tiny.bin"  # the echo benchmark's "original": 64 bytes on the origin


def row(name: str, value: float, unit: str, target: str, ok: bool | None, note: str = "") -> None:
    ROWS.append((name, value, unit, target, ok, note))
    mark = "" if ok is None else ("PASS" if ok else "FAIL")
    print(f"  {name:<46} {value:>10.3f} {unit:<6} {target:<12} {mark:<5} {note}", flush=True)


def pct(xs: list, q: float) -> float:
    """The ``q`` quantile (0..1) of sorted ``xs``, nearest rank."""
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


# -- processes and their CPU -----------------------------------------------------------


def cpu_of(pid: int) -> float:
    """CPU seconds of every thread of ``pid`` (schedstat: nanoseconds; 0.0 for a process that is gone)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass  # the thread ended
    return total / 1e9


def cpu_snapshot(pids: Iterable[int]) -> dict[int, float]:
    """``pid -> CPU seconds`` now; subtract from :func:`cpu_of` later for the CPU used in between."""
    return {pid: cpu_of(pid) for pid in pids}


# -- the origin and a deployment ---------------------------------------------------------


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except OSError:
        return 0, b""


def _until(cond, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


class Origin:
    """``examples/transend/origin.py`` over a generated image set plus a 64-byte file."""

    def __init__(self, count: int = 16, seed: int = 5):
        self.count, self.seed = count, seed
        self.proc = None

    def __enter__(self) -> "Origin":
        from tools.imagegen import write_set

        self.dir = Path(tempfile.mkdtemp(prefix="snsbus-tacc-origin-"))
        try:
            manifest = write_set(self.dir, self.count, seed=self.seed)
            self.names = [m["name"] for m in manifest]
            self.images = [(self.dir / n).read_bytes() for n in self.names]
            (self.dir / TINY).write_bytes(bytes(range(64)))
            port = cluster.free_port("127.0.0.1")
            self.url = f"http://127.0.0.1:{port}"
            self.proc = subprocess.Popen([sys.executable, "-m", "examples.transend.origin", str(self.dir), "--port",
                                          str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _until(lambda: _get(self.url + "/")[0] == 200, 15, "the origin server")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


FRONTEND = """
  <experiment name="serve"><component_block name="fe"><component name="fe"/>
    <process_block name="frontend"><process name="frontend" wait="start">
      <path>${{SNSBUS_PYTHON}}</path>
      <cmdline><arg>-m</arg><arg>frontends</arg><arg>--manager</arg><arg>${{SNSBUS_MANAGER}}</arg>
        <arg>--service</arg><arg>{svc}</arg><arg>--port</arg><arg>{port}</arg><arg>--origin</arg><arg>{origin}</arg>
        <arg>--timeout</arg><arg>10</arg><arg>--max-queue</arg><arg>256</arg><arg>--log-level</arg><arg>WARNING</arg>
      </cmdline>
      <env name="PYTHONUNBUFFERED" value="1"/>
    </process></process_block>
  </component_block></experiment>"""


class Deployment:
    """A manager, the bus-nodes of one generated spec (deployed with ``bus-ctl deploy``), and its front end.

    ``workers`` are ``<worker>`` attribute maps (component "workers"); with
    ``origin`` an HTTP front end is part of the spec.
    """

    keep_logs = False  # keep the state directories (logs) for a look: --keep-logs

    def __init__(self, app: str, workers: list[dict], *, slots: int, caches: int = 0, origin: Origin | None = None):
        self.app = self.svc = app
        self.workers, self.slots, self.caches, self.origin = workers, slots, caches, origin
        self.sdir: Path | None = None
        self.fe = None

    def spec(self, port: int | None) -> str:
        ws = "\n    ".join("<worker " + " ".join(f'{k}="{v}"' for k, v in w.items()) + ' component="workers"/>'
                           for w in self.workers)
        cache = f'<cache component="workers" instances="{self.caches}" max_bytes="268435456"/>' if self.caches else ""
        fe_comp = (f'<component name="fe"><num_hosts>1</num_hosts><resource type="local" group="{self.app}-fe"/>'
                   "</component>") if port else ""
        fe = FRONTEND.format(svc=self.svc, port=port, origin=self.origin.url) if port else ""
        return (f'<project name="{self.app}">\n  {fe_comp}\n'
                f'  <component name="workers"><num_hosts>1</num_hosts><resource type="local" group="{self.app}-w"/>'
                f'</component>\n  <service name="{self.svc}" slots="{self.slots}">\n    {ws}\n    {cache}\n'
                f"  </service>{fe}\n</project>\n")

    def __enter__(self) -> "Deployment":
        self.sdir = Path(tempfile.mkdtemp(prefix=f"snsbus-tacc-{self.app}-"))
        try:
            self.manager = cluster.start_manager(self.sdir, port=0, insecure=INSECURE)
            self.control = self.manager["control"]
            self.security = None  # the in-process dispatch connects as the cluster's front ends do
            if self.manager["keys"]:
                from bus.security import Security

                self.security = Security.from_key_dir(self.manager["keys"]["frontend_keys"])
            port = cluster.free_port("127.0.0.1") if self.origin else None
            spec, directory = self.sdir / "bench.xml", self.sdir / "directory.xml"
            spec.write_text(self.spec(port))
            fe_res = f'<resource name="{self.app}-fe" type="local" group="{self.app}-fe"/>' if port else ""
            directory.write_text(f'<resources>{fe_res}<resource name="{self.app}-w" type="local" '
                                 f'group="{self.app}-w"/></resources>')
            out = self.ctl("deploy", str(spec), "-r", str(directory), "--json", timeout=120)
            phase = json.loads(out).get("phase")
            if phase not in ("running", "completed"):
                raise SystemExit(f"the {self.app} deploy ended {phase}: {out[:400]}")
            want = sum(int(w["min"]) for w in self.workers)
            _until(lambda: len(self.instances(False)) >= want and len(self.instances(True)) >= self.caches, 30,
                   f"{want} workers of {self.app}")
            if port:
                self.fe = f"http://127.0.0.1:{port}"
                _until(lambda: self.fe_stats().get("beacons", {}).get("workers", 0) >= want, 30,
                       "the front end's first beacon")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            if (self.sdir / state.CLUSTER_FILE).exists() and not self.keep_logs:
                self.ctl("cleanup", self.app, timeout=30, check=False)
        except subprocess.TimeoutExpired:
            pass  # down() below stops the processes anyway
        finally:
            cluster.down(self.sdir, grace=2.0)
            if self.keep_logs:
                print(f"    logs of {self.app} kept in {self.sdir / state.LOG_DIR}", flush=True)
            else:
                shutil.rmtree(self.sdir, ignore_errors=True)

    def ctl(self, *args: str, timeout: float = 60, check: bool = True) -> str:
        env = dict(os.environ, SNSBUS_STATE_DIR=str(self.sdir))
        env.pop("SNSBUS_ENDPOINT", None)
        res = subprocess.run([sys.executable, "-m", "tools.ctl", *args, "--state-dir", str(self.sdir)], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise SystemExit(f"bus-ctl {args[0]} failed ({res.returncode}): {(res.stdout + res.stderr)[-800:]}")
        return res.stdout

    def services(self) -> dict:
        with cluster.client(self.sdir, self.control, timeout=10) as c:
            return c.call("services")

    def instances(self, cache: bool) -> list[dict]:
        """The manager's rows of this service's worker (or cache) instances."""
        svc = next((s for s in self.services()["services"] if s["name"] == self.svc), {"instances": []})
        return [i for i in svc["instances"] if i["cache"] == cache]

    def fe_stats(self) -> dict:
        status, body = _get(self.fe + "/stats")
        return json.loads(body) if status == 200 else {}

    def diagnose(self) -> str:
        """Why HTTP requests failed, in a few words for a figure's note ("" when the front end answers)."""
        if _get(self.fe + "/health", 2.0)[0] == 200:
            return ""
        how = "still running" if self.pids()["frontend"] else "its process is gone"
        logs = sorted(self.sdir.glob("nodes/*/apps/*/.snsbus/logs/frontend.err"))
        tail = logs[0].read_text(errors="replace").strip().splitlines()[-2:] if logs else []
        return f"the front end does not answer ({how})" + (": " + " | ".join(tail) if tail else "")

    def pids(self) -> dict[str, list[int]]:
        """Processes by role: manager, worker node (stub + caches), worker processes, front end."""
        nodes = {n["name"]: n["pid"] for n in (cluster.cluster_info(self.sdir) or {}).get("nodes", [])}
        node = nodes.get(f"{self.app}-w")
        procs = state.processes()
        workers = [pid for pid, ppid, argv in procs if ppid == node and b"nodes.worker" in argv]
        fe = [pid for pid, _, argv in procs if b"frontends" in argv and self.control.encode() in argv]
        return {"manager": [self.manager["pid"]], "node": [node] if node else [], "workers": workers, "frontend": fe}


class RoundRobinClient(TaskClient):
    """The front end's dispatch taking the workers in turn, whatever their load (the baseline)."""

    turn = 0

    def pick(self, kind: str | None = TRANSFORMATION, name: str | None = None,
             exclude: Iterable[str] = ()) -> WorkerRow:  # fmt: skip
        banned = set(exclude)
        rows = sorted((r for r in self.workers(kind, name) if r.id not in banned), key=lambda r: r.id)
        if not rows:
            raise NoWorkerAvailable(f"no {name or kind} worker of {self.svc}", NO_WORKERS, tuple(banned))
        self.turn += 1
        return rows[self.turn % len(rows)]


@asynccontextmanager
async def dispatcher(control: str, svc: str, *, round_robin: bool = False, timeout: float = 10.0, security=None):
    """The front end's dispatch (beacons, data plane, TaskClient; and a round-robin one) in this process."""
    ctx = new_context()
    factory = SocketFactory(ctx, linger=0, security=security)
    loop = PlaneLoop()
    await loop.start()
    beacons = BeaconClient(factory, loop, control, svc)
    plane = DataPlane(factory, loop)
    tasks = TaskClient(plane, beacons, timeout=timeout, attempts=1)
    rr = RoundRobinClient(plane, beacons, timeout=timeout, attempts=1) if round_robin else None
    try:
        await plane.start()
        await beacons.start()
        await beacons.next_beacon(10.0)
        yield beacons, tasks, rr
    finally:
        await beacons.stop()
        await plane.stop()
        await loop.stop()
        factory.close(linger=0)
        ctx.term()


# -- 1. distillation throughput -----------------------------------------------------------


class _HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection of the distill load generator: a GET at a time, whole answers.

    The load generator shares the CPUs with the service, so the distill figure charges its CPU to the
    service; aiohttp's client spends ~0.5 ms per request, this one a fraction of that.  It reads what
    the figure needs: the status, the headers and the whole body (``Content-Length``; anything else,
    e.g. a chunked answer, fails the request, which then counts as another answer).
    """

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.head: tuple[int, dict, int, int] | None = None  # (status, headers, body start, end) of the answer
        self.waiter: asyncio.Future | None = None
        self.lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"the front end closed the connection: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            try:
                status = int(lines[0].split(" ", 2)[1])
                if "transfer-encoding" in headers:
                    raise ValueError(f"a {headers['transfer-encoding']} answer")
                self.head = (status, headers, end + 4, end + 4 + int(headers.get("content-length", "0")))
            except (ValueError, IndexError) as e:
                waiter.set_exception(ConnectionError(f"an answer this client does not read: {e}"))
                self.transport.close()
                return
        status, headers, start, end = self.head
        if len(self.buf) >= end:
            body = bytes(self.buf[start:end])
            del self.buf[:end]
            self.head = None
            waiter.set_result((status, headers, body))

    async def get(self, target: bytes, host: bytes, timeout: float) -> tuple[int, dict, bytes]:
        """``GET target``: (status, lower-case headers, body); ``TimeoutError`` after ``timeout`` seconds."""
        if self.lost:
            raise ConnectionError("the connection is closed")
        loop = asyncio.get_running_loop()
        waiter = self.waiter = loop.create_future()
        timer = loop.call_later(timeout, lambda: waiter.done() or waiter.set_exception(TimeoutError("no answer")))
        self.transport.write(b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        try:
            return await waiter
        finally:
            timer.cancel()


async def _http_distill(fe: str, origin: Origin, concurrency: int, seconds: float,
                        counter: Iterator[int]) -> tuple[int, int, float]:  # fmt: skip
    """Closed loop over the request sequence from ``counter`` on; (distilled answers, other answers, elapsed).

    An answer counts as distilled when it is a 200 with ``X-Cache: miss`` and not approximate, its
    whole body read (see :class:`_HttpConnection`).
    """
    from urllib.parse import quote, urlsplit

    good = bad = 0
    end = time.monotonic() + seconds
    m = len(origin.names)
    where = urlsplit(fe)
    host = where.netloc.encode()
    urls = [quote(f"{origin.url}/{name}", safe="") for name in origin.names]
    loop = asyncio.get_running_loop()

    async def connect() -> _HttpConnection:
        return (await loop.create_connection(_HttpConnection, where.hostname, where.port))[1]

    async def client():
        nonlocal good, bad
        conn = await connect()
        try:
            while time.monotonic() < end:
                i, p = tacc_workers.distill_task(next(counter), m)
                target = (f"/distill?url={urls[i]}&w={p['max_width']}&h={p['max_height']}&q={p['quality']}").encode()
                try:
                    if conn.lost:
                        conn = await connect()
                    status, headers, _ = await conn.get(target, host, 60.0)
                    real = status == 200 and headers.get("x-cache") == "miss" and "x-sns-approximate" not in headers
                except OSError:  # ConnectionError, TimeoutError
                    conn.transport.close()
                    conn.lost = True
                    real = False
                if time.monotonic() <= end:
                    good += real
                    bad += not real
        finally:
            conn.transport.close()

    t0 = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return good, bad, min(time.monotonic(), end) - t0


def _windows(dep: Deployment, origin: Origin, n: int, conc: int, seconds: float) -> tuple[dict, int, dict]:
    """Pool (A) and service (B) in windows A B B A: {side: [done, seconds]}, other answers, CPU ms/image by role.

    Both sides share the machine: the pool's processes wait while the service runs, the cluster idles
    while the pool runs, and the order A B B A cancels a linear drift of the other work on the host.
    """
    m = len(origin.names)
    roles = {**dep.pids(), "load generator": [os.getpid()]}
    cpu = dict.fromkeys(roles, 0.0)
    seq = {"direct": itertools.count(), "service": itertools.count()}  # one sequence each side
    got, bad = {"direct": [0, 0.0], "service": [0, 0.0]}, 0
    with multiprocessing.get_context("spawn").Pool(n, tacc_workers.pool_init, (origin.images,)) as pool:
        pool.map(tacc_workers.distill_direct, [tacc_workers.distill_task(i, m) for i in range(2 * n)])  # warm-up
        for side in ("direct", "service", "service", "direct"):
            if side == "direct":
                done, took = tacc_workers.run_window(pool, m, conc, seconds / 2, seq[side])
            else:
                c0 = {k: cpu_snapshot(v) for k, v in roles.items()}
                done, other, took = asyncio.run(_http_distill(dep.fe, origin, conc, seconds / 2, seq[side]))
                bad += other
                for k, v in c0.items():
                    cpu[k] += sum(cpu_of(pid) - c for pid, c in v.items())
            got[side][0] += done
            got[side][1] += took
    return got, bad, {k: v / max(got["service"][0], 1) * 1e3 for k, v in cpu.items()}


def bench_distill(args, origin: Origin, n: int, *, throughput: bool = True, hits: bool = True,
                  judged: bool = True) -> None:  # fmt: skip
    """Distillation throughput with ``n`` distillers (judged against the target, or for information)."""
    conc = 3 * n
    spec = [{"name": "distill", "callable": DISTILL, "min": n, "max": n}]
    with Deployment("tdistill", spec, slots=n, caches=1, origin=origin) as dep:
        if throughput:
            why = "" if judged else f" (for information: {(os.cpu_count() or 1) - n} CPU(s) left to the rest)"
            print(f"\n[distill: N={n} distillers through the whole service vs a pool of N processes{why}, {conc} "
                  f"requests in flight, {len(origin.names)} images, every request a new (image, h, q): cache "
                  "misses; windows direct, service, service, direct]")
            # Originals into the cache first (steady state: only results miss), parameters outside the sequence.
            for name in origin.names:
                _get(f"{dep.fe}/distill?url={origin.url}/{name}&q=30", timeout=30)
            got, bad, per = _windows(dep, origin, n, conc, args.seconds)
            (d_done, d_took), (s_done, s_took) = got["direct"], got["service"]
            row(f"direct: pool of {n} distill_worker (baseline)", d_done / d_took, "img/s", "", None,
                f"{d_done} images")
            row(f"service, {n} distillers: HTTP -> bus -> workers", s_done / s_took, "img/s", "", None,
                f"{s_done} distilled" + (f", {bad} other answers {dep.diagnose()}" if bad else ""))
            ratio = (s_done / s_took) / (d_done / d_took) if d_done else 0.0
            ok = ratio >= 0.90 and bad == 0
            row(f"service / direct, N={n}" + ("" if judged else " (info)"), ratio, "x", ">= 0.90" if judged else "",
                ok if judged else None, "" if judged else f"(would {'PASS' if ok else 'FAIL'})")
            share = 1 - per["workers"] / sum(per.values()) if sum(per.values()) else 0.0
            row("  CPU outside the distillers, share (info)", share, "", "", None,
                "ms per image: " + ", ".join(f"{k} {v:.2f}" for k, v in per.items()))
        if hits:
            bench_cache_hits(args, dep, origin)


# -- 3. cache hits ------------------------------------------------------------------------


def bench_cache_hits(args, dep: Deployment, origin: Origin) -> None:
    from tools.loadgen import run_load

    print(f"\n[cache hits: GET /distill of {len(origin.names)} cached results over HTTP on loopback; "
          "baseline GET /health of the same front end]")
    params = {"w": 320, "q": 50}
    for name in origin.names:  # one miss each: the results are cached from here on
        _get(f"{dep.fe}/distill?url={origin.url}/{name}&w=320&q=50", timeout=30)
    secs = max(1.0, args.seconds / 2)
    for c in (1, 4):
        base = run_load(dep.fe, origin.names, origin.url, concurrency=c, duration=secs, zipf=0.0, path="/health")
        hits = run_load(dep.fe, origin.names, origin.url, concurrency=c, duration=secs, zipf=0.0, params=params)
        ok = hits["errors"] == 0 and hits["cache_hit_rate"] == 1.0
        note = f"{hits['requests']} requests, hit rate {100 * hits['cache_hit_rate']:.1f}%"
        if hits["errors"]:
            note += f", {hits['errors']} errors {hits['statuses']} {dep.diagnose()}"
        row(f"GET /health, {c} client(s), p50 (baseline)", base["latency_ms"]["p50"], "ms", "", None)
        row(f"cached /distill, {c} client(s), p50", hits["latency_ms"]["p50"], "ms", "<= 2 ms",
            ok and hits["latency_ms"]["p50"] <= 2.0, note)
        row(f"GET /health, {c} client(s), p99 (baseline)", base["latency_ms"]["p99"], "ms", "", None)
        row(f"cached /distill, {c} client(s), p99", hits["latency_ms"]["p99"], "ms", "<= 10 ms",
            ok and hits["latency_ms"]["p99"] <= 10.0)


# -- 2. tiny tasks ------------------------------------------------------------------------


async def _echo_calls(tasks, concurrency: int, seconds: float) -> tuple[int, int, float]:
    payload = b"x" * 64
    done = errors = 0
    end = time.monotonic() + seconds

    async def client():
        nonlocal done, errors
        while time.monotonic() < end:
            try:
                await tasks.call([payload])
                done += 1
            except Exception as e:  # a DispatchError: counted, the figure is then marked
                errors += 1
                if errors == 1:
                    print(f"    echo call failed: {e}", flush=True)

    t0 = time.monotonic()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done, errors, time.monotonic() - t0


def _pool_echo(workers: int, seconds: float) -> tuple[int, float, float]:
    """Echo in a pool: (tasks, elapsed, CPU seconds of the parent and the pool processes)."""
    payload = b"x" * 64
    with multiprocessing.get_context("spawn").Pool(workers, tacc_workers.pool_init) as pool:
        t0 = time.monotonic()
        calib = 2000
        for _ in pool.imap_unordered(tacc_workers.echo_direct, [payload] * calib, chunksize=1):
            pass
        count = max(calib, int(calib / (time.monotonic() - t0) * seconds))
        pids = [os.getpid(), *(c.pid for c in multiprocessing.active_children())]
        c0 = cpu_snapshot(pids)
        t0 = time.monotonic()
        for _ in pool.imap_unordered(tacc_workers.echo_direct, [payload] * count, chunksize=1):
            pass
        took = time.monotonic() - t0
        cpu = sum(cpu_of(p) - c for p, c in c0.items())
    return count, took, cpu


def bench_echo(args, origin: Origin) -> None:
    from tools.loadgen import run_load

    n = args.workers
    conc = 64
    print(f"\n[echo: tiny tasks on {n} echo worker processes; CPU of every process involved, per task]")
    count, took, cpu = _pool_echo(n, args.seconds)
    row("pool of N, imap_unordered (baseline)", count / took, "req/s", "", None,
        f"CPU {cpu / count * 1e6:.0f} us/task (parent + pool)")
    spec = [{"name": "echo", "callable": f"{W}:echo", "min": n, "max": n}]
    with Deployment("techo", spec, slots=n, caches=1, origin=origin) as dep:
        roles = dep.pids()

        async def dispatch_level():
            async with dispatcher(dep.control, dep.svc, security=dep.security) as (_, tasks, _rr):
                await _echo_calls(tasks, conc, 0.5)  # warm up: connections, costs
                pids = {"front end (this process)": [os.getpid()], "stub (node)": roles["node"],
                        "workers": roles["workers"], "manager": roles["manager"]}
                c0 = {k: cpu_snapshot(v) for k, v in pids.items()}
                done, errors, took = await _echo_calls(tasks, conc, args.seconds)
                used = {k: sum(cpu_of(p) - c for p, c in v.items()) for k, v in c0.items()}
                return done, errors, took, used

        done, errors, took, used = asyncio.run(dispatch_level())
        rate = done / took
        per = sum(used.values()) / max(done, 1)
        parts = ", ".join(f"{k} {v / max(done, 1) * 1e6:.0f}" for k, v in used.items())
        row(f"dispatch level: {conc} concurrent TaskClient.call", rate, "req/s", ">= 5000",
            rate >= 5000 and errors == 0, f"{errors} errors" if errors else "")
        row("  CPU per task, all processes", per * 1e6, "us", "< 200 us", per < 200e-6 and errors == 0,
            f"({parts} us)")

        # Over HTTP: the whole /distill path with the echo worker (?worker=echo): result cache miss,
        # the original from the cache, dispatch, the result stored; random w and q so every key is new.
        http_conc = 32
        warm = run_load(dep.fe, [TINY], origin.url, concurrency=4, requests=50, zipf=0.0, params={"worker": "echo"},
                        vary={"w": range(1, 16385), "q": range(1, 101)})
        if warm["errors"]:
            print(f"    HTTP warm-up had {warm['errors']} errors: {warm['statuses']}", flush=True)
        svc_pids = [*roles["frontend"], *roles["node"], *roles["workers"], *roles["manager"]]
        c0, me = cpu_snapshot(svc_pids), cpu_of(os.getpid())
        rep = run_load(dep.fe, [TINY], origin.url, concurrency=http_conc, duration=args.seconds, zipf=0.0,
                       params={"worker": "echo"}, vary={"w": range(1, 16385), "q": range(1, 101)}, seed=1)
        served = max(rep["ok"], 1)
        svc_cpu = sum(cpu_of(p) - c for p, c in c0.items()) / served
        client_cpu = (cpu_of(os.getpid()) - me) / served
        fe_cpu = sum(cpu_of(p) - c0[p] for p in roles["frontend"]) / served
        approx = sum(rep["approximate"].values())
        row(f"HTTP /distill?worker=echo, {http_conc} clients (info)", rep["rps"], "req/s", "(>= 5000)", None,
            f"{rep['errors']} errors, {approx} approximate, hit rate {100 * rep['cache_hit_rate']:.1f}%"
            + (f" {dep.diagnose()}" if rep["errors"] else ""))
        row("  service CPU per request (info)", svc_cpu * 1e6, "us", "", None,
            f"front end {fe_cpu * 1e6:.0f} us; load generator {client_cpu * 1e6:.0f} us more")


# -- 4. balancing quality ---------------------------------------------------------------------


async def _open_loop(tasks, rate: float, seconds: float, ms: float, seed: int) -> tuple[list, int]:
    """Poisson arrivals at ``rate``/s; latencies (from each request's scheduled time) and errors."""
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    lat: list[float] = []
    errors = 0
    running: set = set()

    async def one(at: float) -> None:
        nonlocal errors
        try:
            await tasks.call([b"x"], {"ms": ms})
            lat.append(loop.time() - at)
        except Exception:
            errors += 1

    t0 = at = loop.time()
    while True:
        at += rng.expovariate(rate)
        if at - t0 > seconds:
            break
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(one(at))
        running.add(task)
        task.add_done_callback(running.discard)
    await asyncio.gather(*running)
    return sorted(lat), errors


async def _settle(beacons, clients, timeout: float = 20.0) -> None:
    """Until nothing is in flight and the latest beacon shows every queue (smoothed) near 0."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        b = beacons.latest
        busy = any(sum(c.statistics()["inflight"].values()) for c in clients)
        if not busy and b is not None and all(w.q < 0.1 for w in b.workers):
            return
        await asyncio.sleep(0.1)
    raise SystemExit("the workers did not settle")


def bench_balance(args) -> None:
    fast, ms = 3, 10.0
    slow_ms = ms * tacc_workers.SLOW_FACTOR
    # The rate that keeps the slow worker 75% busy under round-robin (its 1/4 of the requests):
    # round-robin stays stable, so its p99 is a figure rather than a function of the run's length.
    rate = 0.75 * (fast + 1) / (slow_ms / 1000.0)
    seconds = max(args.seconds, 5.0)
    print(f"\n[balance: {fast} sleepers of {ms:g} ms + 1 of {slow_ms:g} ms, Poisson arrivals at {rate:.0f}/s for "
          f"{seconds:g} s each; latency from the scheduled arrival]")
    spec = [{"name": "fast", "callable": f"{W}:sleeper", "min": fast, "max": fast, "idle_after": 3600},
            {"name": "slow", "callable": f"{W}:sleeper_x4", "min": 1, "max": 1, "idle_after": 3600}]
    with Deployment("tbalance", spec, slots=fast + 1) as dep:

        async def run():
            async with dispatcher(dep.control, dep.svc, round_robin=True, security=dep.security) as (beacons, p2c, rr):
                await _open_loop(rr, rate, 2.0, ms, seed=0)  # warm up: every worker's cost measured
                await _settle(beacons, (p2c, rr))
                out = {}
                for name, client in (("p2c", p2c), ("rr", rr)):
                    out[name] = await _open_loop(client, rate, seconds, ms, seed=1)
                    await _settle(beacons, (p2c, rr))
                costs = {w.id.split("/")[1].split("@")[0]: w.cost for w in beacons.latest.workers}
                return out, costs

        out, costs = asyncio.run(run())
    (lat_p, err_p), (lat_r, err_r) = out["p2c"], out["rr"]
    row("round-robin p99 (baseline)", pct(lat_r, 0.99) * 1e3, "ms", "", None,
        f"p50 {pct(lat_r, 0.5) * 1e3:.1f} ms, {len(lat_r)} requests, {err_r} errors")
    row("queue-length (p2c, the default) p99", pct(lat_p, 0.99) * 1e3, "ms", "", None,
        f"p50 {pct(lat_p, 0.5) * 1e3:.1f} ms, {len(lat_p)} requests, {err_p} errors")
    ratio = pct(lat_p, 0.99) / pct(lat_r, 0.99)
    row("p99 p2c / round-robin", ratio, "x", "<= 0.5", ratio <= 0.5 and not err_p and not err_r,
        "beaconed cost " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in sorted(costs.items())))


# -- 5. spawning ------------------------------------------------------------------------------

SPAWN_DEFINITION = (
    "t=0: {c} closed-loop clients start at once against a class with 1 idle worker (min 1, max 2, H {h:g}, "
    "D 1 s); balanced = the first moment from which, for {hold:g} s, a worker spawned after t=0 has answered "
    "and the requests outstanding per worker (queued + running, counted by the front end's dispatch every "
    "5 ms) differ by at most 1")


async def _step(dep: Deployment, tasks, c: int, ms: float, hold: float, limit: float) -> dict:
    """One step of ``c`` clients; seconds after it: spawn decided, the new worker's first answer, balanced."""
    before = {w.id for w in tasks.workers()}
    wall0, t0 = time.time(), time.monotonic()
    first: dict[str, float] = {}  # worker -> its first answer
    samples: list[tuple[float, dict]] = []  # (t, worker -> outstanding)
    stop = False
    errors = 0

    async def client():
        nonlocal errors
        while not stop:
            try:
                res = await tasks.call([b"x"], {"ms": ms})
            except Exception:  # a DispatchError: counted, the trial then fails
                errors += 1
                continue
            first.setdefault(res.worker, time.monotonic() - t0)

    async def sampler():
        while not stop:
            samples.append((time.monotonic() - t0, {w.id: tasks.inflight(w.id) for w in tasks.workers()}))
            await asyncio.sleep(0.005)

    def balanced_at() -> float | None:
        start = None
        for t, load in samples:
            new = [w for w in load if w not in before and first.get(w, 1e9) <= t]
            ok = bool(new) and max(load.values()) - min(load.values()) <= 1
            if not ok:
                start = None
            elif start is None:
                start = t
            elif t - start >= hold:
                return start
        return None

    jobs = [asyncio.ensure_future(client()) for _ in range(c)] + [asyncio.ensure_future(sampler())]
    try:
        while time.monotonic() - t0 < limit and balanced_at() is None:
            await asyncio.sleep(0.05)
    finally:
        stop = True
        await asyncio.gather(*jobs)
    events = dep.services()["events"]
    spawned = [e["t"] - wall0 for e in events if e["kind"] == "spawn" and e["t"] >= wall0]
    new = [t for w, t in first.items() if w not in before]
    return {"balanced": balanced_at() if not errors else None, "decided": min(spawned, default=None),
            "first_new": min(new, default=None), "errors": errors}


async def _wait_idle_pool(dep: Deployment, beacons, timeout: float = 30.0) -> None:
    """Until the manager has reaped back to one worker, the front end knows it, and its queue is ~0."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        inst = dep.instances(False)
        b = beacons.latest
        if len(inst) == 1 and inst[0]["smoothed"] < 0.05 and b is not None and len(b.workers) == 1:
            return
        await asyncio.sleep(0.2)
    raise SystemExit("the spawned worker was not reaped after the step")


def bench_spawn(args) -> None:
    c, h, ms, hold = 8, 2.0, 20.0, 0.25
    print(f"\n[spawn: a step from idle to {c} clients, sleeper of {ms:g} ms; {args.spawn_trials} trials]")
    print("    definition: " + SPAWN_DEFINITION.format(c=c, h=h, hold=hold))
    spec = [{"name": "sleep", "callable": f"{W}:sleeper", "min": 1, "max": 2, "high_water": h, "delay": 1,
             "idle_after": 1, "calm_for": 1}]
    with Deployment("tspawn", spec, slots=2) as dep:

        async def run():
            out = []
            async with dispatcher(dep.control, dep.svc, security=dep.security) as (beacons, tasks, _):
                for i in range(args.spawn_trials):
                    await _wait_idle_pool(dep, beacons)
                    r = await _step(dep, tasks, c, ms, hold, limit=10.0)
                    fmt = lambda x: "never" if x is None else f"{x:.2f}s"  # noqa: E731
                    print(f"    trial {i + 1}: spawn decided at {fmt(r['decided'])}, the new worker's first answer "
                          f"at {fmt(r['first_new'])}, balanced at {fmt(r['balanced'])}"
                          + (f" ({r['errors']} failed calls)" if r["errors"] else ""), flush=True)
                    out.append(r)
            return out

        trials = asyncio.run(run())
    times = [r["balanced"] if r["balanced"] is not None else float("inf") for r in trials]
    decided = [r["decided"] for r in trials if r["decided"] is not None]
    first = [r["first_new"] for r in trials if r["first_new"] is not None]
    if decided:
        row("spawn decided by the manager after the step (p50)", statistics.median(decided), "s", "", None)
    if first:
        row("first answer of the new worker (p50)", statistics.median(first), "s", "", None)
    p50 = statistics.median(times)
    row(f"step -> queues balanced (p50 of {len(times)})", p50, "s", "<= 1 s", p50 <= 1.0, "TranSend: ~5 s")


# -- main ---------------------------------------------------------------------------------------

BENCHES = ("distill", "echo", "cache", "balance", "spawn")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=BENCHES, default=None, help="run one benchmark")
    ap.add_argument("--seconds", type=float, default=5.0, help="measuring time per phase")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="distill/echo worker processes (N)")
    ap.add_argument("--spawn-trials", type=int, default=3)
    ap.add_argument("--keep-logs", action="store_true", help="keep the state directories (logs) for a look")
    ap.add_argument("--insecure", action="store_true", help="plain TCP instead of CurveZMQ")
    args = ap.parse_args()
    global INSECURE
    INSECURE = args.insecure
    Deployment.keep_logs = args.keep_logs
    from core import fastpath

    print(f"snsbus TACC benchmarks (fast path: {fastpath.IMPLEMENTATION}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, {'plain TCP' if INSECURE else 'CurveZMQ'})")
    want = (lambda name: args.only in (None, name))  # noqa: E731
    if want("distill") or want("cache") or want("echo"):
        with Origin() as origin:
            if want("distill") or want("cache"):
                bench_distill(args, origin, args.workers, throughput=want("distill"), hits=want("cache"))
            if want("distill") and args.workers > 1:
                # One distiller, the other core(s) left to the front end, stub and load generator (TranSend's
                # front ends had machines of their own): what the bus costs when it does not take the
                # distillers' CPU.
                bench_distill(args, origin, 1, hits=False, judged=False)
            if want("echo"):
                bench_echo(args, origin)
    if want("balance"):
        bench_balance(args)
    if want("spawn"):
        bench_spawn(args)
    failed = [r for r in ROWS if r[4] is False]
    print(f"\n{len(ROWS)} figures, {len(failed)} targets missed" + (": " + ", ".join(r[0].strip() for r in failed)
                                                                     if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    sys.exit(main())
