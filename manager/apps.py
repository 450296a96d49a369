"""The application controller (Plush): deploy, watch, stop, start and clean up apps.

A deploy is driven from the manager through the tree, phase by phase:

1. **check**: the spec and the resource directory are parsed (problems name
   file:line:col), components are matched to live nodes, every package is read
   into the manager's content-addressed cache.  Any problem here deploys nothing.
2. **install** (per component, concurrently): ``app.prepare`` on the
   component's nodes: each pulls the packages from its parent over the data
   plane (the parent caches), extracts them safely, runs the install command.
3. **blocks**: component blocks run concurrently unless ordered by
   ``predecessor``; inside one, blocks run in order.  A process block is
   ``app.run`` on the component's nodes (done when each process exited with an
   expected code, or runs, for ``wait="start"``); a barrier holds every node
   that arrives until ``max`` (default: all of its users) arrived.
4. **running / completed**, or **failed** with one sentence per failed node.

Every phase is a convergecast (the root handles O(fanout) messages) whose
result names every node that did not answer.  A node alive but cut off during
a repair is asked again (operations are idempotent); a dead node is replaced by
a spare matching node that then catches up on the phases done so far.

The record of each application (spec, assignment, phases, events) is written
to ``<state>/apps/NAME.json`` after every change, so a restarted manager keeps
every application and resumes a deploy that was in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
import urllib.request
from pathlib import Path

from manager import plan
from manager.resources import NotEnoughResources, parse_directory
from manager.spec import BarrierBlock, ProcessBlock, SpecError, parse

__all__ = ["AppController", "DeployError", "PHASES"]

log = logging.getLogger(__name__)

DEPLOYING, RUNNING, COMPLETED, FAILED, STOPPED = "deploying", "running", "completed", "failed", "stopped"
PHASES = (DEPLOYING, RUNNING, COMPLETED, FAILED, STOPPED)
_RETRIES = 3  # times a phase is re-sent to live nodes that did not answer (cut off by a repair)
_WEB_TIMEOUT = 60.0


class DeployError(Exception):
    """A deploy refused before anything was sent; ``code`` names the kind."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class _Barrier:
    def __init__(self, name: str, need: int, timeout: float | None):
        self.name, self.need, self.timeout = name, need, timeout
        self.arrived: set[str] = set()
        self.released = asyncio.Event()
        if need <= 0:
            self.released.set()

    def arrive(self, nodes) -> None:
        self.arrived.update(nodes)
        if len(self.arrived) >= self.need:
            self.released.set()


class AppController:
    """Applications of one manager; ``commands`` calls the ``cmd_*``-facing methods."""

    def __init__(self, mgr, state_dir: Path):
        from nodes.packages import PackageCache

        self.mgr = mgr
        self.dir = Path(state_dir) / "apps"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cache = PackageCache(Path(state_dir) / "cache")
        self.records: dict[str, dict] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._fencing: set[asyncio.Task] = set()
        for path in sorted(self.dir.glob("*.json")):
            try:
                rec = json.loads(path.read_text())
                self.records[rec["name"]] = rec
            except (OSError, ValueError, KeyError) as e:
                log.warning("ignoring unreadable application record %s: %s", path, e)

    # -- lifecycle -----------------------------------------------------------------
    def resume(self) -> None:
        """Continue deploys a previous manager left in flight (every step is idempotent)."""
        for rec in self.records.values():
            if rec["phase"] in (RUNNING, COMPLETED):
                self._register_services(rec, parse(rec["spec"], rec["spec_file"]),
                                        parse_directory(rec["resources"], rec["resources_file"]))
            if rec["phase"] == DEPLOYING:
                self._event(rec, "manager restarted: resuming the deploy")
                rec["resumed"] = True
                self._start(rec)

    def start_watch(self, interval: float = 1.0, grace: float = 3.0) -> None:
        """Heal running applications: a node of theirs that died is replaced by a spare (below)."""
        self._heal_grace = grace
        # After a (re)start the nodes need a moment to re-register: none of them is judged gone before.
        self._watch_from = time.monotonic() + max(10.0, 3 * grace)
        self._watch = asyncio.get_running_loop().create_task(self._watch_forever(interval))

    async def _watch_forever(self, interval: float) -> None:
        lost_since: dict[str, float] = {}
        while True:
            await asyncio.sleep(interval)
            if time.monotonic() < self._watch_from:
                continue
            try:
                alive = {m.name for m in self.mgr.membership.alive()}
                now = time.monotonic()
                for rec in list(self.records.values()):
                    self._fence(rec, alive)
                    if rec["phase"] != RUNNING or rec["name"] in self._tasks:
                        continue
                    back = next(((n, c) for n, c in rec.get("dropped", {}).items() if n in alive), None)
                    if back is not None:  # dropped for want of a spare, and alive again: take it back
                        self._tasks[rec["name"]] = asyncio.get_running_loop().create_task(
                            self._heal(rec, back[1], None, back=back[0]))
                        continue
                    for comp, names in rec["assignment"].items():
                        for node in list(names):
                            if node in alive:
                                lost_since.pop(node, None)
                                continue
                            since = lost_since.setdefault(node, now)
                            if now - since >= self._heal_grace:
                                lost_since.pop(node, None)
                                self._tasks[rec["name"]] = asyncio.get_running_loop().create_task(
                                    self._heal(rec, comp, node))
                                break
            except Exception:  # a bug here must not stop the watch
                log.exception("application watch failed")

    def _fence(self, rec: dict, alive: set) -> None:
        """A node whose part was moved to a spare and that is back (it was cut off, not dead)
        still runs its copy: stop it there, once, so no process runs twice."""
        fenced = rec.setdefault("fenced", [])
        used = plan.used_nodes(rec["assignment"])
        for old in rec.get("replaced", {}):
            if old in alive and old not in used and old not in fenced:
                fenced.append(old)
                self._event(rec, f"node {old} is back but was replaced: stopping its copy of {rec['name']}")
                self._save(rec)
                task = asyncio.get_running_loop().create_task(
                    self._ask([old], "app.cleanup", {"app": rec["name"]}, 30.0))
                self._fencing.add(task)
                task.add_done_callback(self._fencing.discard)

    async def _heal(self, rec: dict, comp: str, node: str | None, *, back: str | None = None) -> None:
        """Put ``comp``'s part of a running app back on a spare node: install, then its process blocks.

        With ``back``: a node dropped earlier for want of a spare is alive again; it gets its part
        back the same way (it may still run its processes, or have taken them back after a restart:
        ``app.run`` starts nothing that runs)."""
        try:
            app = parse(rec["spec"], rec["spec_file"])
            resources = parse_directory(rec["resources"], rec["resources_file"])
            packages = {tuple(k.split("\0", 1)): v for k, v in rec["packages"].items()}
            ctx = _Context(self, rec, app, resources, packages)
            if back is not None:
                spare = back
                del rec["dropped"][back]
                rec["assignment"][comp].append(back)
                self._event(rec, f"node {back} ({comp}) is back: it runs its part again")
                self._save(rec)
            else:
                live = [m.name for m in self.mgr.membership.alive() if m.name]
                used = plan.used_nodes(rec["assignment"]) | set(rec["replaced"])
                spare = plan.spare_for(app.component_named(comp), resources, live, used)
            if spare is None:
                self._event(rec, f"node {node} of {comp!r} is gone and no spare node matches: running without it")
                rec["assignment"][comp] = [n for n in rec["assignment"][comp] if n != node]
                rec.setdefault("dropped", {})[node] = comp  # taken back if it returns (see _watch_forever)
                self._save(rec)
                return
            if back is None:
                names = rec["assignment"][comp]
                names[names.index(node)] = spare
                rec["replaced"][node] = spare
                self._event(rec, f"node {node} ({comp}) is gone: healing on spare {spare}")
                self._save(rec)
            steps = []
            if app.component_named(comp).software:
                steps.append(("app.prepare", {"app": app.name, "software": plan.software_of(app, comp, packages)},
                              120.0 + sum(s.install_timeout or 300.0 for s in app.software)))
            for cb in app.blocks:
                if cb.component != comp:
                    continue
                for b in cb.blocks:
                    if isinstance(b, ProcessBlock):
                        procs = [plan.process_def(p, b.name) for p in b.processes]
                        budget = max([p.run_timeout or 0.0 for p in b.processes] + [0.0]) + 30.0
                        steps.append(("app.run", {"app": app.name, "gen": rec["gen"], "block": b.name,
                                                  "processes": procs}, min(budget, rec["timeout"])))
            for op, args, budget in steps:
                answered, failed, lost = await ctx._try([spare], op, args, budget)
                if not answered:
                    why = failed.get(spare) or lost.get(spare, "did not answer")
                    self._event(rec, f"healing {comp!r} on {spare} failed ({op}): {why}")
                    rec["error"] = f"healing {comp!r} on {spare} failed: {why}"
                    self._save(rec)
                    return
            self._event(rec, f"healed: {comp!r} runs on {spare}" + (f" in place of {node}" if node else " again"))
            self._save(rec)
        finally:
            if self._tasks.get(rec["name"]) is asyncio.current_task():
                self._tasks.pop(rec["name"], None)

    async def close(self) -> None:
        for t in list(self._fencing):
            t.cancel()
        watch = getattr(self, "_watch", None)
        if watch is not None:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        for t in self._tasks.values():
            t.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()

    def _save(self, rec: dict) -> None:
        rec["updated"] = time.time()
        tmp = self.dir / f".{rec['name']}.json.tmp"
        tmp.write_text(json.dumps(rec))
        tmp.replace(self.dir / f"{rec['name']}.json")

    def _event(self, rec: dict, text: str) -> None:
        rec.setdefault("events", []).append([round(time.time(), 3), text])
        del rec["events"][:-200]
        log.info("app %s: %s", rec["name"], text)

    # -- deploy --------------------------------------------------------------------------
    async def deploy(self, args: dict) -> dict:
        spec_text, spec_file = args.get("spec"), args.get("spec_file") or "<spec>"
        res_text, res_file = args.get("resources"), args.get("resources_file") or "<resources>"
        if not isinstance(spec_text, str) or not isinstance(res_text, str):
            raise DeployError("BAD_ARGS", "deploy needs the spec and the resource directory (XML text)")
        try:
            app = parse(spec_text, spec_file)
            resources = parse_directory(res_text, res_file)
        except SpecError as e:
            raise DeployError("BAD_SPEC", str(e)) from None
        digest = hashlib.sha256(spec_text.encode() + b"\0" + res_text.encode()).hexdigest()
        old = self.records.get(app.name)
        if old is not None and old["digest"] == digest and old["phase"] in (DEPLOYING, RUNNING, COMPLETED) \
                and not args.get("force"):
            return {"app": app.name, "gen": old["gen"], "already": True, "phase": old["phase"]}
        live = [m.name for m in self.mgr.membership.alive() if m.name]
        try:
            assignment = plan.assign(app, resources, live)
        except NotEnoughResources as e:
            raise DeployError("NOT_ENOUGH_NODES", str(e)) from None
        packages = await self._load_packages(app, spec_file, args.get("cwd") or os.getcwd())
        if old is not None and old["phase"] == DEPLOYING and app.name in self._tasks:
            self._tasks.pop(app.name).cancel()
        rec = {
            "name": app.name, "digest": digest, "gen": (old["gen"] + 1) if old else 1,
            "spec": spec_text, "spec_file": spec_file, "resources": res_text, "resources_file": res_file,
            "assignment": assignment, "packages": {f"{s}\0{p}": v for (s, p), v in packages.items()},
            "phase": DEPLOYING, "phases": {k: {"state": "pending", "component": c, "done": [], "failed": {}}
                                           for k, c in plan.phase_keys(app).items()},
            "barriers": {}, "replaced": {}, "error": None, "events": [], "created": time.time(),
            "timeout": float(args.get("timeout") or 600.0),
        }
        self._event(rec, f"deploy gen {rec['gen']}: " + ", ".join(
            f"{c} on {', '.join(n)}" for c, n in assignment.items()))
        self.records[app.name] = rec
        self._save(rec)
        self._start(rec)
        return {"app": app.name, "gen": rec["gen"], "already": False, "phase": DEPLOYING,
                "assignment": assignment}

    async def _load_packages(self, app, spec_file: str, cwd: str) -> dict:
        out = {}
        for soft in app.software:
            for pk in soft.packages:
                where = f"package {pk.name!r} of software {soft.name!r}"
                if pk.type == "web":
                    try:
                        digest = await asyncio.to_thread(self._fetch_web, pk.path)
                    except OSError as e:
                        raise DeployError("BAD_PACKAGE", f"{where}: cannot download {pk.path}: {e}") from None
                else:
                    path = _find_file(pk.path, cwd, spec_file)
                    if path is None:
                        raise DeployError("BAD_PACKAGE", f"{where}: file {pk.path!r} not found (looked in {cwd} "
                                                         f"and next to {spec_file})")
                    digest = await asyncio.to_thread(self.cache.put, path)
                if pk.sha256 and digest != pk.sha256:
                    raise DeployError("BAD_PACKAGE", f"{where}: sha256 mismatch: the spec pins {pk.sha256} but "
                                                     f"{pk.path} has {digest}; the package was tampered with or "
                                                     f"replaced, nothing was deployed")
                out[(soft.name, pk.name)] = {"sha": digest, "size": self.cache.path(digest).stat().st_size}
        return out

    def _fetch_web(self, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise OSError("a web package needs an http(s) URL")
        with urllib.request.urlopen(url, timeout=_WEB_TIMEOUT) as resp:  # noqa: S310 (scheme checked)
            data = resp.read()
        return self.cache.put(data)

    def _start(self, rec: dict) -> None:
        task = asyncio.get_running_loop().create_task(self._drive(rec))
        self._tasks[rec["name"]] = task
        task.add_done_callback(lambda t, n=rec["name"]: self._tasks.pop(n, None) if self._tasks.get(n) is t else None)

    async def _drive(self, rec: dict) -> None:
        app = parse(rec["spec"], rec["spec_file"])
        resources = parse_directory(rec["resources"], rec["resources_file"])
        packages = {tuple(k.split("\0", 1)): v for k, v in rec["packages"].items()}
        ctx = _Context(self, rec, app, resources, packages)
        if rec.get("resumed"):
            await self._wait_nodes(rec, 15.0)
        try:
            await asyncio.wait_for(ctx.run(), rec["timeout"])
        except asyncio.TimeoutError:
            ctx.fail(f"the deploy did not finish within {rec['timeout']:g}s")
        except _Failed:
            pass
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a controller bug fails the deploy, never the manager
            log.exception("deploy of %s failed", rec["name"])
            ctx.fail(f"internal error: {type(e).__name__}: {e}")
        else:
            waiting = any(p.wait == "start" for p in app.processes())
            rec["phase"] = RUNNING if waiting else COMPLETED
            self._event(rec, f"deploy finished: {rec['phase']}")
        self._save(rec)

    async def _wait_nodes(self, rec: dict, timeout: float) -> None:
        """After a manager restart, give the app's nodes time to re-register."""
        want = plan.used_nodes(rec["assignment"])
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if want <= {m.name for m in self.mgr.membership.alive()}:
                return
            await asyncio.sleep(0.1)

    def _register_services(self, rec: dict, app, resources) -> None:
        services = getattr(self.mgr, "services", None)
        if services is None or not app.services:
            return
        overflow = plan.overflow_pool(app, resources)
        for svc in app.services:
            services.register(rec["name"], svc, rec["assignment"], overflow)

    # -- the other commands ------------------------------------------------------------
    def get(self, name) -> dict:
        rec = self.records.get(name) if isinstance(name, str) else None
        if rec is None:
            known = ", ".join(sorted(self.records)) or "none"
            raise DeployError("NO_SUCH_APP", f"no application named {name!r} (deployed: {known})")
        return rec

    def list(self) -> list[dict]:
        return [{"name": r["name"], "phase": r["phase"], "gen": r["gen"],
                 "nodes": sorted(plan.used_nodes(r["assignment"])), "created": r["created"],
                 "error": r["error"]} for r in sorted(self.records.values(), key=lambda r: r["name"])]

    def progress(self, name) -> dict:
        rec = self.get(name)
        return {"name": rec["name"], "phase": rec["phase"], "gen": rec["gen"], "error": rec["error"],
                "assignment": rec["assignment"], "replaced": rec["replaced"],
                "phases": [{"key": k, **v} for k, v in rec["phases"].items()],
                "barriers": rec["barriers"], "events": rec["events"][-20:]}

    async def status(self, name, timeout: float) -> dict:
        rec = self.get(name)
        nodes = plan.used_nodes(rec["assignment"])
        per_node, missing = await self._ask(nodes, "app.status", {"app": rec["name"]}, timeout)
        comp_of = {n: c for c, names in rec["assignment"].items() for n in names}
        rows = []
        for node, value in sorted(per_node.items()):
            if isinstance(value, dict) and "error" in value:
                rows.append({"node": node, "component": comp_of.get(node), "error": value["error"]})
                continue
            for proc in value.get("processes", []):
                rows.append(dict(proc, node=node, component=comp_of.get(node)))
        return {**self.progress(name), "processes": rows, "missing": missing}

    async def logs(self, args: dict, timeout: float) -> dict:
        rec = self.get(args.get("app"))
        nodes = plan.used_nodes(rec["assignment"])
        if args.get("node"):
            if args["node"] not in nodes:
                raise DeployError("BAD_ARGS", f"node {args['node']!r} runs nothing of {rec['name']!r}; "
                                              f"its nodes: {', '.join(sorted(nodes))}")
            nodes = {args["node"]}
        q = {"app": rec["name"], "process": args.get("process"), "stream": args.get("stream", "out"),
             "offsets": args.get("offsets") or {}, "limit": args.get("limit", 65536)}
        per_node, missing = await self._ask(nodes, "app.logs", q, timeout)
        per_node = {n: v for n, v in per_node.items() if v}  # nodes that do not run that process
        if args.get("process") and not per_node and not missing:
            raise DeployError("BAD_ARGS", f"no node of {rec['name']!r} runs a process named {args['process']!r}")
        return {"logs": per_node, "missing": missing}

    async def stop(self, name, timeout: float) -> dict:
        rec = self.get(name)
        task = self._tasks.pop(rec["name"], None)
        if task is not None:
            task.cancel()
        out = await self._everywhere(rec, "app.stop", timeout)
        rec["phase"] = STOPPED
        self._event(rec, "stopped by the user")
        self._save(rec)
        return out

    async def start(self, name, timeout: float) -> dict:
        rec = self.get(name)
        out = await self._everywhere(rec, "app.start", timeout)
        rec["phase"] = FAILED if out["failed"] else RUNNING
        self._event(rec, "started by the user")
        self._save(rec)
        return out

    async def cleanup(self, name, timeout: float) -> dict:
        """Stop and remove everything of ``name`` on every node; idempotent."""
        rec = self.records.get(name) if isinstance(name, str) else None
        if rec is None:
            # Nothing recorded: still sweep the nodes, a previous cleanup may have been cut short.
            rec = {"name": name, "assignment": {}}
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        services = getattr(self.mgr, "services", None)
        if services is not None:
            for svc in services.unregister(name):
                await self._ask(None, "svc.stop", {"svc": svc}, timeout)
        out = await self._everywhere(rec, "app.cleanup", timeout, everyone=True)
        if not out["failed"] and not out["missing"]:
            self.records.pop(name, None)
            (self.dir / f"{name}.json").unlink(missing_ok=True)
            out["removed"] = True
        else:
            out["removed"] = False
        return out

    async def _everywhere(self, rec: dict, op: str, timeout: float, everyone: bool = False) -> dict:
        nodes = None if everyone else plan.used_nodes(rec["assignment"])
        per_node, missing = await self._ask(nodes, op, {"app": rec["name"]}, timeout)
        done = sorted(n for n, v in per_node.items() if not (isinstance(v, dict) and "error" in v))
        failed = {n: v["error"] for n, v in per_node.items() if isinstance(v, dict) and "error" in v}
        return {"app": rec["name"], "done": done, "failed": failed, "missing": missing}

    async def _ask(self, nodes, op: str, args: dict, timeout: float) -> tuple[dict, list]:
        """Run ``op`` on ``nodes`` (names; None = every node) -> ({node: value}, [{node, reason}])."""
        mem = self.mgr.membership
        root = self.mgr.root
        if nodes is None:
            ids, expected = None, {m.id for m in mem.alive()}
            gone = []
        else:
            ids, gone = [], []
            alive = {x.id for x in mem.alive()}
            for n in sorted(nodes):
                m = mem.by_name(n)
                if m is None or m.id not in alive:
                    gone.append({"node": n, "reason": "dead" if m is not None else "not a member"})
                else:
                    ids.append(m.id)
            expected = set(ids)
            if not ids:
                return {}, gone
        result = await root.broadcast(op, args, ids=ids, timeout=timeout)
        out = root.outcome(result, expected)
        per_node = {}
        for g in out["groups"]:
            for n in g["nodes"]:
                per_node[n] = g["value"]
        return per_node, gone + out["missing"]


class _Failed(Exception):
    pass


class _Context:
    """One run of a deploy (see the module docstring)."""

    def __init__(self, ctl: AppController, rec: dict, app, resources, packages):
        self.ctl, self.rec, self.app, self.resources, self.packages = ctl, rec, app, resources, packages
        self.done: dict[str, asyncio.Event] = {}
        need = plan.barrier_expected(app, rec["assignment"])
        self.barriers = {b.name: _Barrier(b.name, need.get(b.name, 0), b.timeout) for b in app.barriers}
        for cb in app.blocks:
            self.done[cb.name] = asyncio.Event()
            for b in cb.blocks:
                self.done[b.name] = asyncio.Event()
        self.history: dict[str, list] = {}  # component -> [(op, args)] done so far (a spare replays them)

    def fail(self, why: str) -> None:
        rec = self.rec
        rec["phase"] = FAILED
        rec["error"] = rec["error"] or why
        for ph in rec["phases"].values():
            if ph["state"] in ("pending", "running"):
                ph["state"] = "cancelled"
        self.ctl._event(rec, f"deploy failed: {why}")
        self.ctl._save(rec)

    async def run(self) -> None:
        comps = [c for c in self.app.components if c.software]
        await asyncio.gather(*(self._install(c) for c in comps))
        if self.app.services:
            await self._services()
        await asyncio.gather(*(self._component_block(cb) for cb in self.app.blocks))

    async def _services(self) -> None:
        """Start the TACC services: their minimum workers and caches, before any process block runs."""
        key = "services"
        self.ctl._register_services(self.rec, self.app, self.resources)
        self._set(key, "running")
        for svc in self.app.services:
            if not await self.ctl.mgr.services.wait_ready(svc.name, 60.0):
                self.fail(f"service {svc.name!r}: its minimum workers did not start within 60s; "
                          f"see `bus-ctl services` for why")
                raise _Failed
        ph = self.rec["phases"][key]
        ph["done"] = sorted(plan.used_nodes({c.component: self.rec["assignment"].get(c.component, [])
                                             for s in self.app.services for c in (*s.workers, *s.caches)}))
        self._set(key, "done")

    # -- phases ----------------------------------------------------------------------------
    async def _install(self, comp) -> None:
        args = {"app": self.app.name, "software": plan.software_of(self.app, comp.name, self.packages)}
        budget = 120.0 + sum(s.install_timeout or 300.0 for s in self.app.software if s.name in comp.software)
        await self._phase(f"install/{comp.name}", comp.name, "app.prepare", args, budget)

    async def _component_block(self, cb) -> None:
        for pred in cb.predecessors:
            await self.done[pred].wait()
        for b in cb.blocks:
            for pred in b.predecessors:
                await self.done[pred].wait()
            key = plan.block_key(cb, b)
            bar = b.barrier if isinstance(b, (BarrierBlock, ProcessBlock)) else None
            if bar:
                await self._barrier(key, cb.component, bar)
            if isinstance(b, ProcessBlock):
                procs = [plan.process_def(p, b.name) for p in b.processes]
                args = {"app": self.app.name, "gen": self.rec["gen"], "block": b.name, "processes": procs}
                budget = max([p.run_timeout or 0.0 for p in b.processes] + [0.0])
                budget = budget + 30.0 if budget else self.rec["timeout"]
                await self._phase(key, cb.component, "app.run", args, budget)
            else:
                self._set(key, "done")
            self.done[b.name].set()
        self.done[cb.name].set()

    async def _barrier(self, key: str, component: str, name: str) -> None:
        bar = self.barriers[name]
        self._set(key, "running")
        nodes = self.rec["assignment"][component]
        bar.arrive(nodes)
        self.rec["barriers"][name] = {"need": bar.need, "arrived": sorted(bar.arrived)}
        self.ctl._save(self.rec)
        try:
            await asyncio.wait_for(bar.released.wait(), bar.timeout)
        except asyncio.TimeoutError:
            self.fail(f"barrier {name!r} timed out after {bar.timeout:g}s: {len(bar.arrived)} of {bar.need} "
                      f"arrived ({', '.join(sorted(bar.arrived)) or 'none'})")
            raise _Failed from None
        ph = self.rec["phases"].get(key)
        if ph is not None and isinstance(self._block(key), BarrierBlock):
            ph["done"] = sorted(set(nodes))
        self.rec["barriers"][name]["released"] = True

    def _block(self, key: str):
        cb_name, _, b_name = key.partition("/")
        for cb in self.app.blocks:
            if cb.name == cb_name:
                return next((b for b in cb.blocks if b.name == b_name), None)
        return None

    def _set(self, key: str, state: str) -> None:
        ph = self.rec["phases"].get(key)
        if ph is not None:
            ph["state"] = state
            self.ctl._save(self.rec)

    async def _phase(self, key: str, component: str, op: str, args: dict, budget: float) -> None:
        """Run ``op`` on the component's nodes until each answered, failed or was replaced."""
        ph = self.rec["phases"][key]
        ph["state"] = "running"
        self.ctl._save(self.rec)
        self.history.setdefault(component, []).append((op, args, budget))
        todo = [n for n in self.rec["assignment"][component] if n not in ph["done"]]
        while todo:
            answered, failed, lost = await self._try(todo, op, args, budget)
            ph["done"] = sorted(set(ph["done"]) | set(answered))
            ph["failed"].update(failed)
            self.ctl._save(self.rec)
            if failed:
                first = sorted(failed.items())[0]
                self.fail(f"{key}: {len(failed)} node(s) failed; {first[0]}: {first[1]}")
                raise _Failed
            todo = []
            for node, reason in lost.items():
                spare = await self._replace(component, node, reason)
                todo.append(spare)
        ph["state"] = "done"
        self.ctl._save(self.rec)

    async def _try(self, nodes: list, op: str, args: dict, budget: float) -> tuple[list, dict, dict]:
        """One phase on ``nodes``; live nodes that were cut off by a repair are asked again."""
        answered, failed, lost = [], {}, {}
        todo = list(nodes)
        for attempt in range(_RETRIES + 1):
            per_node, missing = await self.ctl._ask(todo, op, args, budget)
            for n, v in per_node.items():
                if isinstance(v, dict) and "error" in v:
                    failed[n] = v["error"]
                else:
                    answered.append(n)
            todo = []
            alive = {m.name for m in self.ctl.mgr.membership.alive()}
            for m in missing:
                if m["reason"] in ("dead", "left", "not a member") or m["node"] not in alive:
                    lost[m["node"]] = m["reason"]
                elif attempt < _RETRIES:
                    todo.append(m["node"])  # alive: it was cut off by a repair; its work is idempotent
                else:
                    lost[m["node"]] = m["reason"]
            if not todo:
                break
            await asyncio.sleep(0.2 * (attempt + 1))
        return answered, failed, lost

    async def _replace(self, component: str, node: str, reason: str) -> str:
        comp = self.app.component_named(component)
        live = [m.name for m in self.ctl.mgr.membership.alive() if m.name]
        used = plan.used_nodes(self.rec["assignment"]) | set(self.rec["replaced"])
        spare = plan.spare_for(comp, self.resources, live, used)
        if spare is None:
            self.fail(f"node {node} of component {component!r} is {reason} and no spare node matches "
                      f"{', '.join(s.describe() for s in comp.resources) or 'the component'}")
            raise _Failed
        names = self.rec["assignment"][component]
        names[names.index(node)] = spare
        self.rec["replaced"][node] = spare
        self.ctl._event(self.rec, f"node {node} ({component}) is {reason}: replaced by {spare}")
        self.ctl._save(self.rec)
        # The spare catches up on every phase this component finished (the last one is the caller's).
        for op, args, budget in self.history[component][:-1]:
            answered, failed, lost = await self._try([spare], op, args, budget)
            if not answered:
                why = failed.get(spare) or lost.get(spare, "did not answer")
                self.fail(f"spare node {spare} for {node} could not catch up ({op}): {why}")
                raise _Failed
        for bar in self.barriers.values():
            if node in bar.arrived:
                bar.arrived.discard(node)
                bar.arrive([spare])
        return spare


def _find_file(path: str, cwd: str, spec_file: str) -> Path | None:
    candidates = [Path(path)] if os.path.isabs(path) else [Path(cwd) / path, Path(spec_file).parent / path]
    for c in candidates:
        if c.is_file():
            return c
    return None
