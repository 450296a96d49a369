"""Alerts: rules over successive monitor snapshots, de-duplicated, sent to a hook.

TranSend's monitor paged the operator when a component stopped reporting.
Here the rules are pure functions over the monitor's snapshot
(:meth:`manager.monitor.Monitor.snapshot`) and a small state carried from
one snapshot to the next; each returns the *conditions* that hold now, keyed
by what they are about.  :func:`transitions` turns the set of conditions into
alerts: ``firing`` once when a key appears, ``resolved`` once when it goes.
Nothing is sent twice for the same condition, however many snapshots it lasts.

Rules (``AlertConfig`` holds their thresholds):

* ``node_down``: a member is ``dead`` or ``unreachable`` (it stopped answering
  its parent) and no live member has its name.  A clean ``left`` is no alert.
* ``tree_loss``: the live nodes are more than ``lost_percent`` % below the
  baseline (the most nodes seen alive, lowered by nodes that left cleanly).
* ``worker_silent``: the service manager dropped a worker instance because its
  load reports stopped.  Resolved when its class has an instance on that node
  again, or as many instances as before the loss (the manager replaced it).
* ``frontend_silent``: a front end's ``/stats`` has not answered for
  ``frontend_silence`` seconds (front ends the monitor polls).
* ``flapping``: an application process the supervisor marks ``flapping``, or
  a process or worker that restarted/crashed ``flap_restarts`` times within
  ``flap_window`` seconds.

:class:`AlertEngine` keeps the state and feeds :class:`AlertHooks`, which runs
a command (the alert as JSON on stdin, ``SNSBUS_ALERT_*`` in the environment)
and/or POSTs the JSON to a webhook URL, in order, one alert at a time.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import time
from dataclasses import dataclass, replace

__all__ = [
    "AlertConfig",
    "Condition",
    "RuleState",
    "AlertEngine",
    "AlertHooks",
    "FIRING",
    "RESOLVED",
    "evaluate",
    "transitions",
    "public",
    "node_down",
    "tree_loss",
    "worker_silent",
    "frontend_silent",
    "flapping",
]

log = logging.getLogger(__name__)

FIRING, RESOLVED = "firing", "resolved"
_DOWN = ("dead", "unreachable")


@dataclass(frozen=True)
class AlertConfig:
    """Thresholds of the rules (CLI: ``--alert-lost-percent`` ...)."""

    lost_percent: float = 20.0  # the tree lost more than this share of its nodes
    flap_restarts: int = 3  # restarts (or crashes) within flap_window that count as flapping
    flap_window: float = 60.0
    frontend_silence: float = 10.0  # seconds without an answer from a front end's /stats
    unreachable_hold: float = 3.0  # an orphan normally rejoins in milliseconds: wait this long

    def __post_init__(self) -> None:
        if not 0 < self.lost_percent <= 100:
            raise ValueError("lost_percent must be in (0, 100]")
        if self.flap_restarts < 1 or self.flap_window <= 0 or self.frontend_silence <= 0 or self.unreachable_hold < 0:
            raise ValueError("flap_restarts must be >= 1; flap_window and frontend_silence must be > 0; "
                             "unreachable_hold must be >= 0")


@dataclass(frozen=True)
class Condition:
    """Something wrong right now.  ``key`` names it; the same key is never alerted twice in a row."""

    key: str
    kind: str
    summary: str
    severity: str = "warning"
    labels: tuple = ()  # ((name, value), ...): hashable, so a condition can be compared
    hold: float = 0.0  # seconds it must last before it fires (transient states send nothing)


@dataclass(frozen=True)
class RuleState:
    """What the rules carry from one snapshot to the next (replaced, never mutated)."""

    baseline: int = 0  # most nodes seen alive, less those that left cleanly since
    left: frozenset = frozenset()  # names that had left at the previous snapshot
    instances: tuple = ()  # ((svc, worker, node, instance id), ...) at the previous snapshot
    seen_events: frozenset = frozenset()  # (t, detail) of service "lost" events already handled
    lost_workers: tuple = ()  # ((key, svc, worker, node, had), ...): open worker_silent conditions
    restarts: tuple = ()  # ((key, ((t, count), ...)), ...): restart counters inside the flap window
    started: float | None = None  # wall time of the first snapshot


# -- rules (pure) --------------------------------------------------------------------------

def node_down(snapshot: dict, cfg: AlertConfig = AlertConfig()) -> list[Condition]:
    """Members that stopped answering (dead, or unreachable behind a dead one) and did not come back.

    ``unreachable`` is also the state of an orphan for the milliseconds before
    it rejoins, so it must last ``unreachable_hold`` seconds to fire.
    """
    alive = {n["name"] for n in snapshot.get("nodes", ()) if n.get("state") == "alive"}
    out = {}
    for n in snapshot.get("nodes", ()):
        name, state = n.get("name", ""), n.get("state")
        if state in _DOWN and name not in alive and name not in out:
            why = "its parent lost it" if state == "dead" else "it sat behind a dead node and did not rejoin"
            out[name] = Condition(f"node:{name}", "node_down", f"node {name} is {state}: {why}", "critical",
                                  (("node", name),), cfg.unreachable_hold if state == "unreachable" else 0.0)
    return list(out.values())


def tree_loss(state: RuleState, snapshot: dict, cfg: AlertConfig) -> tuple[RuleState, list[Condition]]:
    """More than ``lost_percent`` % of the nodes gone, against the most ever seen alive."""
    nodes = snapshot.get("nodes", ())
    alive = sum(1 for n in nodes if n.get("state") == "alive")
    orphans = sum(1 for n in nodes if n.get("state") == "unreachable")
    left = frozenset(n["name"] for n in nodes if n.get("state") == "left")
    baseline = max(alive, state.baseline - len(left - state.left))
    state = replace(state, baseline=baseline, left=left)
    if baseline <= 0:
        return state, []
    lost = baseline - alive
    share = 100.0 * lost / baseline
    if share <= cfg.lost_percent:
        return state, []
    # Orphans normally rejoin within milliseconds: a loss that needs them to pass
    # the threshold must last unreachable_hold; one made of dead nodes alone fires
    # now, and its summary does not count the orphans that are about to come back.
    gone = lost - orphans
    if 100.0 * gone / baseline > cfg.lost_percent:
        hold, summary = 0.0, (f"the tree lost {gone} of {baseline} nodes ({100.0 * gone / baseline:.0f}% > "
                              f"{cfg.lost_percent:g}%)" + (f"; {orphans} more unreachable" if orphans else ""))
    else:
        hold, summary = cfg.unreachable_hold, (f"the tree lost {lost} of {baseline} nodes ({share:.0f}% > "
                                               f"{cfg.lost_percent:g}%), {orphans} of them unreachable")
    return state, [Condition("tree:loss", "tree_loss", summary, "critical",
                             (("lost", str(lost)), ("baseline", str(baseline))), hold)]


def _instances(snapshot: dict) -> tuple:
    return tuple(sorted((s["name"], i.get("w", ""), i.get("node", ""), i["id"])
                        for s in snapshot.get("services", ()) for i in s.get("instances", ()) if not i.get("cache")))


def worker_silent(state: RuleState, snapshot: dict) -> tuple[RuleState, list[Condition]]:
    """Worker instances the service manager dropped for silence, until their class is whole again."""
    now_inst = _instances(snapshot)
    before: dict = collections.Counter((svc, w) for svc, w, _, _ in state.instances)
    owner = {iid: (svc, w, node) for svc, w, node, iid in state.instances}
    open_ = {k: rest for k, *rest in state.lost_workers}
    seen = set(state.seen_events)
    for ev in snapshot.get("service_events", ()):
        ident = (ev.get("t"), ev.get("detail"))
        if ev.get("kind") != "lost" or ident in seen:
            continue
        seen.add(ident)
        iid = str(ev.get("detail", "")).split(" ", 1)[0]
        svc, w, node = owner.get(iid) or _parse_instance(iid)
        if not w:
            continue
        key = f"worker:{svc}/{w}@{node}"
        if key not in open_:
            open_[key] = (svc, w, node, max(before.get((svc, w), 0), 1))
    services = {s["name"] for s in snapshot.get("services", ())}
    count = collections.Counter((svc, w) for svc, w, _, _ in now_inst)
    on_node = {(svc, w, node) for svc, w, node, _ in now_inst}
    conds = []
    for key, (svc, w, node, had) in list(open_.items()):
        if svc not in services or (svc, w, node) in on_node or count[(svc, w)] >= had:
            del open_[key]
            continue
        conds.append(Condition(key, "worker_silent",
                               f"worker {svc}/{w} on {node} stopped reporting "
                               f"({count[(svc, w)]} of {had} instance(s) of its class left)",
                               "warning", (("service", svc), ("worker", w), ("node", node))))
    # Remember only recent events: the feed holds the last 50, older ones cannot come back.
    recent = {(ev.get("t"), ev.get("detail")) for ev in snapshot.get("service_events", ())}
    state = replace(state, instances=now_inst, seen_events=frozenset(seen & recent),
                    lost_workers=tuple((k, *v) for k, v in sorted(open_.items())))
    return state, conds


def _parse_instance(iid: str) -> tuple[str, str, str]:
    """``svc/worker@node#n`` -> (svc, worker, node); empty strings when it is not that shape."""
    svc, _, rest = iid.partition("/")
    w, _, rest = rest.partition("@")
    node = rest.rsplit("#", 1)[0]
    return (svc, w, node) if svc and w and node else ("", "", "")


def frontend_silent(state: RuleState, snapshot: dict, cfg: AlertConfig) -> list[Condition]:
    """Front ends whose ``/stats`` has not answered for ``frontend_silence`` seconds."""
    now = snapshot.get("t", 0.0)
    out = []
    for fe in snapshot.get("frontends", ()):
        last = fe.get("last_ok")
        since = last if last is not None else (state.started if state.started is not None else now)
        if now - since > cfg.frontend_silence:
            err = fe.get("error") or "no answer"
            out.append(Condition(f"frontend:{fe['url']}", "frontend_silent",
                                 f"front end {fe['url']} stopped reporting for {now - since:.0f}s: {err}",
                                 "critical", (("frontend", fe["url"]),)))
    return out


def _restart_counts(snapshot: dict) -> dict:
    """{key: (count, label pairs, what, flapping now)} of every process and worker with a restart counter."""
    out = {}
    for n in snapshot.get("nodes", ()):
        load = n.get("load") or {}
        for pr in load.get("procs", ()):
            key = f"flap:{n['name']}/{pr.get('app')}/{pr.get('name')}"
            out[key] = (int(pr.get("restarts") or 0), (("node", n["name"]), ("app", str(pr.get("app"))),
                        ("process", str(pr.get("name")))), f"process {pr.get('app')}/{pr.get('name')} on {n['name']}",
                        pr.get("state") == "flapping")
    for s in snapshot.get("services", ()):
        for i in s.get("instances", ()):
            if i.get("cache"):
                continue
            key = f"flap:{i['id']}"
            out[key] = (int(i.get("crashes") or 0), (("service", s["name"]), ("worker", str(i.get("w"))),
                        ("node", str(i.get("node")))), f"worker {i['id']}", False)
    return out


def flapping(state: RuleState, snapshot: dict, cfg: AlertConfig) -> tuple[RuleState, list[Condition]]:
    """Processes marked flapping, or restarting/crashing ``flap_restarts`` times within ``flap_window``."""
    now = snapshot.get("t", 0.0)
    history = dict(state.restarts)
    conds = []
    kept = []
    for key, (count, labels, what, marked) in sorted(_restart_counts(snapshot).items()):
        samples = [(t, c) for t, c in history.get(key, ()) if now - t <= cfg.flap_window and c <= count]
        samples.append((now, count))
        kept.append((key, tuple(samples)))
        recent = count - samples[0][1]
        if marked or recent >= cfg.flap_restarts:
            why = "the supervisor gave up on it" if marked else f"{recent} restarts in {cfg.flap_window:g}s"
            conds.append(Condition(key, "flapping", f"{what} is flapping: {why}", "warning", labels))
    return replace(state, restarts=tuple(kept)), conds


def evaluate(state: RuleState, snapshot: dict, cfg: AlertConfig) -> tuple[RuleState, dict[str, Condition]]:
    """Every rule over one snapshot: (the state for the next one, {key: condition} holding now)."""
    if state.started is None:
        state = replace(state, started=snapshot.get("t", 0.0))
    conds = node_down(snapshot, cfg)
    state, c = tree_loss(state, snapshot, cfg)
    conds += c
    state, c = worker_silent(state, snapshot)
    conds += c
    conds += frontend_silent(state, snapshot, cfg)
    state, c = flapping(state, snapshot, cfg)
    conds += c
    return state, {c.key: c for c in conds}


def transitions(active: dict, current: dict, now: float) -> tuple[dict, list[dict]]:
    """De-duplication: (the conditions being tracked {key: alert}, alerts to send).

    A key new in ``current`` fires once, after it has held for its
    condition's ``hold`` seconds (a key that clears before then sends
    nothing); a sent key missing from ``current`` is resolved once; a key in
    both sends nothing again, even if its summary changed (the page shows the
    current one).  Tracked alerts carry ``sent``; :func:`public` strips it.
    """
    out = []
    nxt = {}
    for key, cond in current.items():
        alert = active.get(key)
        if alert is None:
            alert = {"status": FIRING, "key": key, "kind": cond.kind, "severity": cond.severity,
                     "summary": cond.summary, "labels": dict(cond.labels), "since": now, "at": now, "sent": False}
        else:
            alert = dict(alert, summary=cond.summary)
        if not alert["sent"] and now - alert["since"] >= cond.hold:
            alert.update(sent=True, at=now)
            out.append(public(alert))
        nxt[key] = alert
    for key, alert in active.items():
        if key not in current and alert["sent"]:
            out.append(public(dict(alert, status=RESOLVED, at=now)))
    return nxt, out


def public(alert: dict) -> dict:
    """An alert as sent and shown: without the engine's bookkeeping."""
    return {k: v for k, v in alert.items() if k != "sent"}


# -- the engine and its hooks ------------------------------------------------------------------

class AlertEngine:
    """The rules' state, the active alerts and a bounded feed; sends every transition to ``hooks``.

    ``observe(snapshot)`` is called by the monitor once per sample.  With
    ``hooks`` None the alerts are only shown (page, ``/metrics``).
    """

    def __init__(self, config: AlertConfig = AlertConfig(), hooks: "AlertHooks | None" = None, *,
                 feed: int = 200, source: str = ""):
        self.config = config
        self.hooks = hooks
        self.source = source
        self.state = RuleState()
        self.tracked: dict[str, dict] = {}  # conditions holding now, sent or waiting for their hold
        self.feed: collections.deque = collections.deque(maxlen=feed)
        self.counters = collections.Counter()

    async def start(self) -> None:
        if self.hooks is not None:
            await self.hooks.start()

    async def stop(self) -> None:
        if self.hooks is not None:
            await self.hooks.stop()

    def observe(self, snapshot: dict) -> list[dict]:
        self.state, current = evaluate(self.state, snapshot, self.config)
        self.tracked, sent = transitions(self.tracked, current, snapshot.get("t", time.time()))
        for alert in sent:
            if self.source:
                alert["source"] = self.source
            self.counters[alert["status"]] += 1
            self.feed.append(alert)
            log.warning("alert %s: %s", alert["status"], alert["summary"])
            if self.hooks is not None:
                self.hooks.submit(alert)
        return sent

    def active(self) -> list[dict]:
        """Alerts fired and not resolved yet, oldest first."""
        return sorted((public(a) for a in self.tracked.values() if a["sent"]), key=lambda a: (a["since"], a["key"]))

    def statistics(self) -> dict:
        out = {"active": sum(1 for a in self.tracked.values() if a["sent"]), "fired": self.counters[FIRING],
               "resolved": self.counters[RESOLVED]}
        if self.hooks is not None:
            out.update(self.hooks.statistics())
        return out


class AlertHooks:
    """Runs ``command`` (``/bin/sh -c``, the alert as JSON on stdin) and/or POSTs to ``webhook``.

    The command's environment adds ``SNSBUS_ALERT_STATUS``, ``_KIND``, ``_KEY``,
    ``_SEVERITY``, ``_SUMMARY``.  Alerts go out in order, one at a time, each
    within ``timeout`` seconds (a command still running then is killed); at most
    ``backlog`` wait, the oldest are dropped beyond.  ``stop()`` gives the
    waiting ones ``timeout`` seconds to go out.
    """

    def __init__(self, command: str | None = None, webhook: str | None = None, *, timeout: float = 10.0,
                 backlog: int = 1000, headers: dict | None = None):
        if not command and not webhook:
            raise ValueError("an alert hook needs a command or a webhook URL")
        self.command = command
        self.webhook = webhook
        self.timeout = timeout
        self.headers = dict(headers or {})
        self._queue: collections.deque = collections.deque(maxlen=backlog)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._session = None
        self._idle: asyncio.Event | None = None
        self.counters = collections.Counter()

    async def start(self) -> None:
        self._wake, self._idle = asyncio.Event(), asyncio.Event()
        self._idle.set()
        if self.webhook:
            import aiohttp

            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        self._task = asyncio.get_running_loop().create_task(self._run())

    def submit(self, alert: dict) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.counters["hook_dropped"] += 1
        self._queue.append(alert)
        if self._wake is not None:
            self._idle.clear()
            self._wake.set()

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted alert went out (True) or ``timeout`` passed (False)."""
        if self._idle is None:
            return not self._queue
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self) -> None:
        if self._task is not None:
            await self.drain(self.timeout)
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        self.counters["hook_dropped"] += len(self._queue)
        self._queue.clear()

    def statistics(self) -> dict:
        return {k: self.counters[k] for k in ("hook_sent", "hook_failures", "hook_dropped")}

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                alert = self._queue.popleft()
                await self._deliver(alert)
            self._idle.set()

    async def _deliver(self, alert: dict) -> None:
        payload = json.dumps(alert, sort_keys=True).encode()
        if self.command:
            ok = await self._run_command(alert, payload)
            self.counters["hook_sent" if ok else "hook_failures"] += 1
        if self.webhook:
            ok = await self._post(payload)
            self.counters["hook_sent" if ok else "hook_failures"] += 1

    async def _run_command(self, alert: dict, payload: bytes) -> bool:
        env = dict(os.environ, SNSBUS_ALERT_STATUS=alert["status"], SNSBUS_ALERT_KIND=alert["kind"],
                   SNSBUS_ALERT_KEY=alert["key"], SNSBUS_ALERT_SEVERITY=alert["severity"],
                   SNSBUS_ALERT_SUMMARY=alert["summary"])
        try:
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-c", self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, env=env, start_new_session=True)
        except OSError as e:
            log.error("alert command %r could not start: %s", self.command, e)
            return False
        try:
            _, err = await asyncio.wait_for(proc.communicate(payload), self.timeout)
        except asyncio.TimeoutError:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            await proc.wait()
            log.error("alert command %r killed after %gs", self.command, self.timeout)
            return False
        if proc.returncode != 0:
            log.error("alert command %r exited with %d: %s", self.command, proc.returncode,
                      err.decode("utf-8", "replace").strip()[-300:])
            return False
        return True

    async def _post(self, payload: bytes) -> bool:
        import aiohttp

        headers = {"Content-Type": "application/json", **self.headers}
        for attempt in range(2):  # one retry: a receiver restarting should not lose a page
            try:
                async with self._session.post(self.webhook, data=payload, headers=headers) as resp:
                    if resp.status < 300:
                        return True
                    why = f"HTTP {resp.status}"
                    if resp.status < 500:
                        break  # the receiver refuses it: retrying changes nothing
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                why = f"{type(e).__name__}: {e}"
            if attempt == 0:
                await asyncio.sleep(0.5)
        log.error("alert webhook %s failed: %s", self.webhook, why)
        return False
