"""Chaos under load: TranSend with two front ends, ``kill -9`` on a schedule, every request accounted for.

::

    python -m tools.chaos [--seconds 60] [--seed 1] [--report chaos-report.json] [--concurrency 8]
                          [--kinds worker,node,frontend,manager] [--node-downtime 3] [--keep]

What it does, in order:

1. Starts an origin web server (a generated image set), a manager
   (``python -m manager``, so front ends know how to restart it) and five
   bus-nodes (``fe1 fe2 w1 w2 o1`` of ``examples/transend/chaos-directory.xml``;
   ``fe1``/``fe2`` get their HTTP port in ``CHAOS_FE_PORT``), then deploys
   ``examples/transend/chaos.xml`` with ``bus-ctl deploy --no-bootstrap``.
2. Serves a steady closed-loop load (``/distill``, Zipf-skewed images, random
   width and quality, as ``tools.loadgen``) for ``--seconds``, with client-side failover:
   a connection refused (or reset before it was established) by a dead front
   end was never accepted, so that one request is sent again to the other
   front end (counted as ``refused``); a request cut by the ``kill -9`` of the
   front end that had accepted it (reset within 3 s of that kill) is counted
   as ``cut_by_kill`` and sent again too, as a browser would.  Any other
   error, non-200 answer or timeout of an accepted request is ``failed``.
3. Meanwhile kills, at seeded times (:func:`schedule`), with ``SIGKILL``:
   ``worker`` a worker process (``python -m nodes.worker``, its stub restarts
   it), ``node`` a worker bus-node (restarted ``--node-downtime`` seconds
   later, as a rebooted machine would be; its worker processes must exit on
   their own), ``frontend`` a front-end process (its node's supervisor
   restarts it), ``manager`` the manager (a front end restarts it after 5 s
   without beacons: ``frontends/peers.py``).  ``fe-node`` (not in the default
   schedule) kills a front end's bus-node, and reports what becomes of the
   front end it supervised.
4. Checks that no application state was lost: the manager answers, every
   application is listed with its phase, every worker class has its minimum
   and the caches their partitions, every node is back, both front ends
   answer ``/health`` and run under their supervisor.  A changed assignment
   (a component healed onto a spare) is reported too, as a change, not a loss.
5. Prints the figures and the command to reproduce, writes them to
   ``--report`` (JSON), and exits 0 only if no accepted request failed and no
   state was lost.

Every process it starts carries ``SNSBUS_CHAOS_RUN=<token>`` in its
environment, as do their children (workers, front ends, a manager restarted by
a front end); teardown kills exactly those, whatever happened.

This module owns the schedule, the load, the kills and the report; the
cluster (its processes, ``/proc`` lookups, teardown, the control-API probes
and the state checks) is ``tools.chaos_cluster``.
"""

from __future__ import annotations

import asyncio
import atexit
import bisect
import itertools
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click

from tools.chaos_cluster import (FRONTEND_NODES, NODES, ROOT, WORKER_NODES, Cluster, _alive, _drift, _http_json,
                                 _problems, _proc_stat, _state, _try_call, reap)

__all__ = ["KINDS", "DEFAULT_KINDS", "schedule", "Tally", "run", "reap", "main"]

SPEC = ROOT / "examples" / "transend" / "chaos.xml"
DIRECTORY = ROOT / "examples" / "transend" / "chaos-directory.xml"
KINDS = ("worker", "node", "frontend", "manager", "fe-node")
DEFAULT_KINDS = ("worker", "node", "frontend", "manager")
CUT_WINDOW = 3.0  # a disconnect this soon after the kill of that front end is blamed on the kill
RECOVERY_LIMIT = 30.0  # seconds an event's recovery is watched
WARMUP, TAIL, SPACING = 3.0, 6.0, 5.0


# --------------------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class Event:
    at: float  # seconds after the load started
    kind: str


def schedule(seconds: float, seed: int, kinds=DEFAULT_KINDS, *, warmup: float = WARMUP, tail: float = TAIL,
             spacing: float = SPACING) -> list[Event]:
    """The kills of a run: every kind at least once, about one per ``spacing`` s, in a seeded order.

    Events fall between ``warmup`` s after the load started and ``tail`` s
    before it ends, evenly spaced; raises ValueError when that window cannot
    hold one of each kind ``spacing`` / 2 apart.
    """
    kinds = list(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"unknown kind(s) {bad or kinds}; choose among {', '.join(KINDS)}")
    span = seconds - warmup - tail
    n = max(len(kinds), int(span // spacing) + 1)
    if span < 0 or (n > 1 and span / (n - 1) < spacing / 2):
        need = warmup + tail + (len(kinds) - 1) * spacing / 2
        raise ValueError(f"{seconds:g} s cannot hold {len(kinds)} kinds of kill; give at least --seconds {need:g}")
    rng = random.Random(f"chaos-schedule:{seed}")
    order: list[str] = []
    while len(order) < n:
        block = list(kinds)
        rng.shuffle(block)
        order.extend(block)
    step = span / (n - 1) if n > 1 else 0.0
    return [Event(round(warmup + i * step, 3), order[i]) for i in range(n)]


@dataclass
class Tally:
    """What became of the requests (see the module docstring for the categories)."""

    sent: int = 0
    attempts: int = 0
    exact: int = 0
    approximate: Counter = field(default_factory=Counter)  # X-SNS-Approximate value -> count
    reasons: Counter = field(default_factory=Counter)  # X-SNS-Reason of approximate answers
    failed: Counter = field(default_factory=Counter)  # accepted by a live front end, then not answered (why)
    refused: int = 0  # connections refused: failed over, sent again elsewhere
    cut_by_kill: int = 0  # in flight on a front end when it was killed: sent again elsewhere
    unaccepted: int = 0  # no front end took it within the retry budget
    cache_hits: int = 0
    errors: Counter = field(default_factory=Counter)  # client-side exceptions seen, by type (any category)
    latencies: list = field(default_factory=list)
    timeline: dict = field(default_factory=dict)  # second -> [exact, approximate, failed, failovers]

    def mark(self, t: float, slot: int) -> None:
        row = self.timeline.setdefault(int(t), [0, 0, 0, 0])
        row[slot] += 1

    def as_dict(self) -> dict:
        from tools.loadgen import percentile

        ms = sorted(x * 1000.0 for x in self.latencies)

        def pct(p):
            return round(percentile(ms, p), 1) if ms else None

        return {
            "sent": self.sent, "answered_exact": self.exact, "answered_approximate": sum(self.approximate.values()),
            "approximate_by_kind": dict(self.approximate), "approximate_by_reason": dict(self.reasons),
            "failed_accepted": sum(self.failed.values()), "failed_by_reason": dict(self.failed),
            "refused_failed_over": self.refused, "cut_by_frontend_kill_retried": self.cut_by_kill,
            "not_accepted_anywhere": self.unaccepted, "attempts": self.attempts, "cache_hits": self.cache_hits,
            "client_errors": dict(self.errors),
            "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": pct(100)},
            "timeline": [[s, *row] for s, row in sorted(self.timeline.items())],
        }  # fmt: skip


# --------------------------------------------------------------------------- polling


async def _until(predicate: Callable[[], object], timeout: float, interval: float = 0.1):
    """Poll a blocking ``predicate`` in a thread until it is true; its value, or None at the deadline."""
    end = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(predicate)
        if value or time.monotonic() > end:
            return value or None
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- load


class Load:
    """Closed-loop clients over several front ends, with failover (see the module docstring)."""

    def __init__(self, frontends: list[str], images: list[str], origin: str, tally: Tally, *, concurrency: int,
                 seed: int, timeout: float = 20.0, retry_budget: float = 10.0):
        self.frontends, self.images, self.origin = frontends, images, origin
        self.tally, self.concurrency, self.seed = tally, concurrency, seed
        self.timeout, self.retry_budget = timeout, retry_budget
        self.killed_at: dict[str, float] = {}  # front end URL -> monotonic time of its last kill
        self.in_flight: Counter = Counter()  # front end URL -> requests sent to it and not answered yet
        self.t0 = 0.0

    async def run(self, seconds: float) -> None:
        import aiohttp

        rng = random.Random(f"chaos-ranks:{self.seed}")
        names = list(self.images)
        rng.shuffle(names)
        cum = list(itertools.accumulate(1.0 / k for k in range(1, len(names) + 1)))  # Zipf(1)
        self.t0 = time.monotonic()
        stop_at = self.t0 + seconds
        connector = aiohttp.TCPConnector(limit=4 * self.concurrency, force_close=True)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(self._client(session, i, names, cum, stop_at) for i in range(self.concurrency)))

    async def _client(self, session, i: int, names: list[str], cum: list[float], stop_at: float) -> None:
        rng = random.Random(f"chaos-client:{self.seed}:{i}")
        while time.monotonic() < stop_at:
            name = names[min(bisect.bisect_left(cum, rng.random() * cum[-1]), len(names) - 1)]
            # Random sizes and qualities: most results are new (the workers work), popular ones repeat.
            query = {"url": f"{self.origin}/{name}", "w": str(rng.choice((160, 240, 320, 400))),
                     "q": str(rng.randrange(20, 96))}
            await self._one(session, query, start=i % len(self.frontends))

    async def _one(self, session, query: dict, start: int) -> None:
        import aiohttp

        t = self.tally
        t.sent += 1
        t0 = time.monotonic()
        order = self.frontends[start:] + self.frontends[:start]
        k = 0
        while True:
            fe = order[k % len(order)]
            k += 1
            t.attempts += 1
            self.in_flight[fe] += 1
            try:
                async with session.get(fe + "/distill", params=query) as resp:
                    body = await resp.read()
                    status, headers = resp.status, resp.headers
            except aiohttp.ClientConnectorError as e:
                # Refused: this front end is down, the request was never accepted. Fail over.
                t.errors[type(e).__name__] += 1
                t.refused += 1
                t.mark(time.monotonic() - self.t0, 3)
                if time.monotonic() - t0 > self.retry_budget:
                    t.unaccepted += 1
                    return
                if k % len(order) == 0:
                    await asyncio.sleep(0.1)  # every front end refused: give the supervisors a moment
                continue
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as e:
                t.errors[type(e).__name__] += 1
                if time.monotonic() - self.killed_at.get(fe, -math.inf) < CUT_WINDOW:
                    t.cut_by_kill += 1  # accepted by a front end that was then killed: the client sends it again
                    t.mark(time.monotonic() - self.t0, 3)
                    continue
                self._fail(f"{type(e).__name__} from a live front end")
                return
            except asyncio.TimeoutError:
                self._fail(f"no answer within {self.timeout:g}s")
                return
            finally:
                self.in_flight[fe] -= 1
            if status != 200 or not body:
                self._fail(f"HTTP {status}")
                return
            t.latencies.append(time.monotonic() - t0)
            kind = headers.get("X-SNS-Approximate")
            if kind:
                t.approximate[kind] += 1
                t.reasons[headers.get("X-SNS-Reason", "?")] += 1
                t.mark(time.monotonic() - self.t0, 1)
            else:
                t.exact += 1
                t.cache_hits += headers.get("X-Cache") == "hit"
                t.mark(time.monotonic() - self.t0, 0)
            return

    def _fail(self, why: str) -> None:
        self.tally.failed[why] += 1
        self.tally.mark(time.monotonic() - self.t0, 2)


# --------------------------------------------------------------------------- chaos


class Chaos:
    """Carries out the schedule's kills and watches each recovery."""

    def __init__(self, cluster: Cluster, load: Load, seed: int, node_downtime: float, out: Callable[[str], None]):
        self.c, self.load, self.out = cluster, load, out
        self.rng = random.Random(f"chaos-targets:{seed}")
        self.node_downtime = node_downtime
        self.records: list[dict] = []
        self._watchers: set[asyncio.Task] = set()
        self.down: set[str] = set()  # bus-nodes killed and not restarted yet

    async def run(self, events: list[Event]) -> None:
        for ev in events:
            await asyncio.sleep(max(0.0, self.load.t0 + ev.at - time.monotonic()))
            rec = {"at": round(time.monotonic() - self.load.t0, 2), "kind": ev.kind}
            try:
                await getattr(self, "_" + ev.kind.replace("-", "_"))(rec)
            except Exception as e:  # an action that could not run is reported, never fatal
                rec["error"] = f"{type(e).__name__}: {e}"
            self.records.append(rec)
            self.out(f"  t={rec['at']:5.1f}s kill -9 {ev.kind:8} {rec.get('target', '')} "
                     f"(pid {rec.get('pid', '-')}){' ' + rec['error'] if 'error' in rec else ''}")

    async def settle(self) -> None:
        """Until every watcher (and what they started) is done."""
        while self._watchers:
            await asyncio.gather(*list(self._watchers), return_exceptions=True)

    def _watch(self, rec: dict, key: str, predicate: Callable[[], object], t_from: float,
               then: Callable[[], None] | None = None) -> None:
        async def watch():
            ok = await _until(predicate, RECOVERY_LIMIT)
            rec[key] = round(time.monotonic() - t_from, 3) if ok else None
            if then is not None and ok:
                then()
        self._spawn(watch())

    def _kill(self, pid: int) -> None:
        self.c.killed.add(pid)
        os.kill(pid, signal.SIGKILL)

    async def _worker(self, rec: dict) -> None:
        nodes = [n for n in WORKER_NODES if n not in self.down]
        pool = sorted(await asyncio.to_thread(lambda: [(pid, n) for n in nodes
                                                       for pid in self.c.children(n, "nodes.worker")]))
        if not pool:
            raise RuntimeError("no worker process to kill")
        pid, node = self.rng.choice(pool)
        before = len([p for p, n in pool if n == node])
        rec.update(target=f"worker on {node}", pid=pid)
        self._kill(pid)
        t = time.monotonic()
        # The stub restarts it at once: the node is back to as many worker processes, none of them the dead one.
        self._watch(rec, "recovered_after", lambda: (lambda now: len(now) >= before and pid not in now)(
            self.c.children(node, "nodes.worker")), t)

    async def _node(self, rec: dict) -> None:
        nodes = [n for n in WORKER_NODES if n not in self.down]
        busy = [n for n in nodes if await asyncio.to_thread(self.c.children, n, "nodes.worker")]
        node = self.rng.choice(sorted(busy or nodes))
        proc = self.c.node_procs[node]
        workers = await asyncio.to_thread(self.c.children, node, "nodes.worker")
        rec.update(target=node, pid=proc.pid, workers=len(workers))
        self._kill(proc.pid)
        self.down.add(node)
        t = time.monotonic()
        await asyncio.to_thread(proc.wait)
        # Its worker processes must notice (stdin EOF) and exit by themselves.
        left = await _until(lambda: not any(_alive(w) for w in workers), 5.0, 0.05)
        rec["workers_exited_after"] = round(time.monotonic() - t, 3) if left else None
        rec["workers_left_running"] = [w for w in workers if _alive(w)]

        def dropped():  # the manager's load table no longer lists an instance on that node
            svcs = _try_call(self.c.control, "services", 3.0)
            return svcs is not None and not any(i["node"] == node for s in svcs["services"] for i in s["instances"])
        self._watch(rec, "manager_dropped_its_instances_after", dropped, t)

        async def restart():
            await asyncio.sleep(self.node_downtime)
            self.c.start_node(node)
            t_up = time.monotonic()
            rec["restarted_after"] = round(t_up - t, 3)
            self.down.discard(node)
            self._watch(rec, "rejoined_after_restart", lambda: any(
                m["name"] == node and m["state"] == "alive"
                for m in (_try_call(self.c.control, "status", 3.0) or {}).get("members", [])), t_up)
        self._spawn(restart())

    async def _frontend(self, rec: dict) -> None:
        name = self.rng.choice(FRONTEND_NODES)
        pids = await asyncio.to_thread(self.c.frontend_pids, name)
        if not pids:
            raise RuntimeError(f"no front-end process of {name} to kill")
        url = f"http://127.0.0.1:{self.c.fe_ports[name]}"
        rec.update(target=f"front end of {name}", pid=pids[0], in_flight=self.load.in_flight[url])
        self.load.killed_at[url] = time.monotonic()
        self._kill(pids[0])
        t = time.monotonic()
        self._watch(rec, "recovered_after", lambda: _http_json(url + "/health", 1.0), t)

    async def _manager(self, rec: dict) -> None:
        # Its pid from `ping`, not manager.json: a second manager that a front end started in vain removes
        # manager.json as it exits.  One killed a moment ago may not be back yet: wait (the kill moves later).
        t_wait = time.monotonic()
        ping = await _until(lambda: _try_call(self.c.control, "ping", 2.0), RECOVERY_LIMIT, 0.2)
        pid = (ping or {}).get("pid")
        if pid is None or not _alive(pid):
            raise RuntimeError(f"no manager answered within {RECOVERY_LIMIT:g}s: nothing to kill")
        if time.monotonic() - t_wait > 0.5:
            rec["waited_for_a_manager_s"] = round(time.monotonic() - t_wait, 2)
        rec.update(target="manager", pid=pid)
        self._kill(pid)
        t = time.monotonic()

        def back():
            res = _try_call(self.c.control, "ping", 2.0)
            return res is not None and res.get("pid") != pid and res

        def empty_tables():
            # After the new manager is up: how long each front end's load table lists no worker at all
            # (the new manager beacons what the stubs re-reported so far), sampled for 10 s.
            empty = dict.fromkeys(FRONTEND_NODES, 0.0)
            end = time.monotonic() + 10.0
            while time.monotonic() < end:
                for n in FRONTEND_NODES:
                    h = _http_json(f"http://127.0.0.1:{self.c.fe_ports[n]}/health", 0.5)
                    empty[n] += 0.2 if h is not None and h.get("workers") == 0 else 0.0
                time.sleep(0.2)
            rec["frontends_without_workers_s"] = {n: round(v, 1) for n, v in empty.items()}
        self._watch(rec, "recovered_after", back, t,
                    then=lambda: self._spawn(asyncio.to_thread(empty_tables)))

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _fe_node(self, rec: dict) -> None:
        name = self.rng.choice(FRONTEND_NODES)
        proc = self.c.node_procs[name]
        fe = await asyncio.to_thread(self.c.frontend_pids, name)
        rec.update(target=name, pid=proc.pid, frontend_pid=fe[0] if fe else None)
        self._kill(proc.pid)
        self.down.add(name)
        t = time.monotonic()
        await asyncio.to_thread(proc.wait)
        await asyncio.sleep(self.node_downtime)
        rec["frontend_alive_while_node_down"] = bool(fe) and _alive(fe[0])
        new = self.c.start_node(name)
        self.down.discard(name)
        rec["restarted_after"] = round(time.monotonic() - t, 3)

        def observe():
            # Once the node is back: who runs that front end now, and does the application still count the node?
            back = _wait(lambda: any(m["name"] == name and m["state"] == "alive" for m in (
                _try_call(self.c.control, "status", 3.0) or {}).get("members", [])), RECOVERY_LIMIT)
            pids = self.c.frontend_pids(name)
            prog = _try_call(self.c.control, "progress", 3.0, app="transend") or {}
            rec.update(node_rejoined=back, frontend_pids_after=pids,
                       frontend_supervised_after=any((_proc_stat(x) or ("", 0))[1] == new.pid for x in pids),
                       node_in_assignment_after=name in (prog.get("assignment") or {}).get("frontends", []))
        self._spawn(asyncio.to_thread(observe))


# --------------------------------------------------------------------------- the run


def _command(seconds, seed, report, concurrency, kinds, node_downtime) -> str:
    argv = ["python", "-m", "tools.chaos", "--seconds", f"{seconds:g}", "--seed", str(seed)]
    if concurrency != 8:
        argv += ["--concurrency", str(concurrency)]
    if tuple(kinds) != DEFAULT_KINDS:
        argv += ["--kinds", ",".join(kinds)]
    if node_downtime != 3.0:
        argv += ["--node-downtime", f"{node_downtime:g}"]
    if report:
        argv += ["--report", str(report)]
    return shlex.join(argv)


async def _ready(c: Cluster, timeout: float) -> bool:
    def ok():
        return all((h := _http_json(fe + "/health", 1.0)) and h["workers"] >= 3 and not h["stale"]
                   for fe in c.frontends())
    return bool(await _until(ok, timeout, 0.2))


def run(seconds: float = 60.0, seed: int = 1, *, report: str | os.PathLike | None = None, concurrency: int = 8,
        kinds=DEFAULT_KINDS, node_downtime: float = 3.0, state_dir: str | os.PathLike | None = None,
        token: str | None = None, keep: bool = False, settle: float = 25.0,
        out: Callable[[str], None] = print) -> dict:
    """One chaos run (see the module docstring); returns the report (also written to ``report``)."""
    kinds = tuple(dict.fromkeys(kinds))
    events = schedule(seconds, seed, kinds)
    command = _command(seconds, seed, report, concurrency, kinds, node_downtime)
    own_dir = state_dir is None
    sdir = Path(tempfile.mkdtemp(prefix="snsbus-chaos-")) if own_dir else Path(state_dir)
    token = token or uuid.uuid4().hex
    cluster = Cluster(sdir, token, seed=seed)
    atexit.register(reap, token)
    result: dict = {"command": command, "seed": seed, "seconds": seconds, "concurrency": concurrency,
                    "kinds": list(kinds), "schedule": [[e.at, e.kind] for e in events], "state_dir": str(sdir)}
    try:
        out(f"chaos: TranSend with 2 front ends under load for {seconds:g}s, "
            f"{len(events)} kill(s): {', '.join(f'{e.kind}@{e.at:g}s' for e in events)}")
        images = cluster.start_origin()
        cluster.start_manager()
        for name in NODES:
            cluster.start_node(name)
        joined = _wait(lambda: (_try_call(cluster.control, "ping", 1.0) or {}).get("members") == len(NODES), 30)
        if not joined:
            raise RuntimeError(f"the {len(NODES)} bus-nodes did not join within 30 s; see {cluster.logs}")
        res = cluster.ctl("deploy", str(SPEC), "-r", str(DIRECTORY), "--no-bootstrap", "--endpoint", cluster.control,
                          "--state-dir", str(sdir), "--set", f"ORIGIN={cluster.origin}",
                          "--set", f"PROFILES={sdir / 'profiles.sqlite'}", "--json")
        if res.returncode != 0:
            raise RuntimeError(f"bus-ctl deploy exited with {res.returncode}: {(res.stdout + res.stderr)[-600:]}")
        before, tally = asyncio.run(_drive(cluster, images, events, seconds, seed, concurrency, node_downtime,
                                           settle, result, out))
        result["requests"] = tally.as_dict()
        result["state_before"] = before
        r = result["requests"]
        result["target_met"] = r["failed_accepted"] == 0 and r["not_accepted_anywhere"] == 0 and not result[
            "state_problems"] and not any("error" in e for e in result["events"]) and not result["unexpected_deaths"]
    finally:
        left = cluster.close()
        result["teardown_left"] = left
        if keep:
            out(f"state directory and logs kept in {sdir}")
        try:
            atexit.unregister(reap)
        except Exception:  # interpreter shutting down
            pass
        if own_dir and not keep:
            shutil.rmtree(sdir, ignore_errors=True)
        if report:
            Path(report).write_text(json.dumps(result, indent=1, default=str) + "\n")
    _print(result, out)
    return result


def _wait(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return False


async def _drive(c: Cluster, images, events, seconds, seed, concurrency, node_downtime, settle, result, out):
    if not await _ready(c, 30.0):
        raise RuntimeError("the front ends did not get the workers' load table within 30 s")
    before = await asyncio.to_thread(_state, c)
    tally = Tally()
    load = Load(c.frontends(), images, c.origin, tally, concurrency=concurrency, seed=seed)
    chaos = Chaos(c, load, seed, node_downtime, out)
    load_task = asyncio.get_running_loop().create_task(load.run(seconds))
    while not load.t0:
        await asyncio.sleep(0.01)
    try:
        await chaos.run(events)
        await load_task
    finally:
        if not load_task.done():
            load_task.cancel()
            await asyncio.gather(load_task, return_exceptions=True)
    await chaos.settle()
    result["events"] = chaos.records
    # Give the system time to converge after the last kill, then compare with the state before.
    t = time.monotonic()
    now = await asyncio.to_thread(_state, c)
    while _problems(before, now) and time.monotonic() - t < settle:
        await asyncio.sleep(0.5)
        now = await asyncio.to_thread(_state, c)
    result["state_after"] = now
    result["state_problems"] = _problems(before, now)
    result["state_drift"] = _drift(before, now)
    result["unexpected_deaths"] = c.unexpected()
    result["converged_after_load"] = round(time.monotonic() - t, 2)
    result["frontend_stats"] = {n: _http_json(f"http://127.0.0.1:{c.fe_ports[n]}/stats") for n in FRONTEND_NODES}
    svcs = await asyncio.to_thread(_try_call, c.control, "services", 3.0)
    result["service_events"] = (svcs or {}).get("events", [])
    return before, tally


def _print(result: dict, out: Callable[[str], None]) -> None:
    r = result.get("requests")
    if r is None:
        out(f"chaos run did not complete; reproduce with: {result['command']}")
        return
    lat = r["latency_ms"]
    out(f"requests: {r['sent']} sent, {r['answered_exact']} answered exactly, {r['answered_approximate']} "
        f"approximately {r['approximate_by_kind'] or ''}, {r['failed_accepted']} failed after being accepted "
        f"{r['failed_by_reason'] or ''}")
    out(f"  failover: {r['refused_failed_over']} refused connections sent elsewhere, "
        f"{r['cut_by_frontend_kill_retried']} cut by a front-end kill and sent again, "
        f"{r['not_accepted_anywhere']} accepted nowhere; latency ms p50 {lat['p50']} p99 {lat['p99']} max {lat['max']}")
    for e in result.get("events", []):
        extra = {k: v for k, v in e.items() if k not in ("at", "kind", "target", "pid")}
        out(f"  t={e['at']:5.1f}s {e['kind']:8} {e.get('target', '')}: {extra}")
    problems = result.get("state_problems", [])
    out("application state: " + ("nothing lost (apps, services at their minimum, caches, nodes, front ends)"
                                 if not problems else "LOST: " + "; ".join(problems)))
    for line in result.get("state_drift", []):
        out(f"  changed: {line}")
    for d in result.get("unexpected_deaths", []):
        out(f"  WARNING: {d['name']} (pid {d['pid']}) died with {d['code']} without being killed by this run "
            f"(another program's kill?): the figures are not this system's alone")
    out(f"target (no failed accepted request, no lost state): {'met' if result.get('target_met') else 'NOT met'}")
    out(f"reproduce: {result['command']}")


@click.command(name="chaos", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--seconds", default=60.0, show_default=True, type=click.FloatRange(min=10),
              help="Seconds of load, kills included.")
@click.option("--seed", default=1, show_default=True, type=int, help="Seeds the schedule, the targets and the load.")
@click.option("--report", default=None, type=click.Path(dir_okay=False), help="Write the figures here as JSON.")
@click.option("--concurrency", default=8, show_default=True, type=click.IntRange(1, 256), help="Load clients.")
@click.option("--kinds", default=",".join(DEFAULT_KINDS), show_default=True,
              help=f"What to kill, comma-separated, among {', '.join(KINDS)}.")
@click.option("--node-downtime", default=3.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds before a killed bus-node is started again.")
@click.option("--keep", is_flag=True, help="Keep the state directory (logs) after the run.")
def main(seconds, seed, report, concurrency, kinds, node_downtime, keep):
    """Kill workers, bus-nodes, front ends and the manager of TranSend under load; account for every request."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that teardown runs (`finally` in run)
    try:
        result = run(seconds, seed, report=report, concurrency=concurrency, kinds=kinds.split(","),
                     node_downtime=node_downtime, keep=keep)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        raise click.ClickException(f"{e}; rerun with --keep to look at the logs") from e
    sys.exit(0 if result.get("target_met") else 1)


if __name__ == "__main__":
    main()
