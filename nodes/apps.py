"""The applications a logical node hosts: packages, installs, processes.

One :class:`AppHost` per logical node owns a directory (``<state>/<node>/``)::

    cache/              content-addressed packages (nodes.packages.PackageCache)
    apps/APP/           the application's files: packages extracted here, cwd of its processes
    apps/APP/.snsbus/   app.json (process definitions, what was installed), logs/PROC.out|.err,
                        run/PROC.json (each running process: pid, start time...; nodes.supervisor)

The manager drives it through tree operations (``app.*`` below, registered as
handlers of the node).  Each is idempotent: a deploy sent twice, or resent
after a repair, never installs twice or starts a second copy of a process.
Values returned are the same on every node that succeeded (``"installed"``,
``"done"``...), so the convergecast merges them into one group; failures are
one sentence per node.

Packages are pulled from the parent over the data plane (:mod:`bus.transfer`),
which caches them, so each package crosses each tree link once.

A bus-node that died (kill -9, OOM) leaves its processes running in their own
sessions. When it is started again on the same directory, :meth:`AppHost.recover`
takes them back from their records before any operation is served: each one
still alive is supervised again (same pid), one that died meanwhile is handled
by its restart policy, so ``app.run`` never starts a second copy, ``app.status``
reports them and ``app.stop``/``app.cleanup`` (a fenced node) kill them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

__all__ = ["AppHost", "APP_HANDLERS", "WAIT_EXIT", "WAIT_START", "expand"]

log = logging.getLogger(__name__)

WAIT_EXIT = "exit"  # the block is done on a node when the process exited with an expected code
WAIT_START = "start"  # ... when the process is running (a service)
_START_SETTLE = 0.2  # a service must stay up this long after its start to count as started
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_ALIVE = ("starting", "running", "backoff", "stopping")


class AppError(Exception):
    """One sentence returned to the manager as this node's answer."""


def _check_name(what: str, name) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise AppError(f"bad {what} name {name!r}")
    return name


class AppHost:
    """Applications of one logical node (see the module docstring)."""

    def __init__(self, node, base_dir: str | os.PathLike, factory=None, loop=None, link=None):
        self.node = node
        self.base = Path(base_dir)
        self._factory, self._loop, self._link = factory, loop, link
        self._chunks = None
        self._upstream: str | None = None
        self._supervisors: dict = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._boot: asyncio.Task | None = None
        self.counters = {"installs": 0, "spawned": 0, "fetched_bytes": 0}

    # -- packages over the data plane -----------------------------------------------
    @property
    def chunks(self):
        if self._chunks is None:
            from bus.transfer import ChunkService
            from nodes.packages import PackageCache

            self._chunks = ChunkService(self._factory, self._loop, PackageCache(self.base / "cache"), root=False)
            self._chunks.serve(self._link, hook=False)  # nodes.agent routes CHUNK_REQUESTs to on_data
            self._chunks.set_upstream(self._upstream)
        return self._chunks

    def on_data(self, identity: bytes, msg) -> None:
        """A CHUNK_REQUEST from a child. The chunk service is built on first use (a
        child's request or our own fetch): a node that never moves a package pays nothing."""
        self.chunks.handle(identity, msg)

    def set_upstream(self, data_endpoint: str | None) -> None:
        """The parent changed (None: orphaned); an in-flight fetch follows it.

        The first call (the node joined the tree) also starts the adoption of the
        processes an earlier run of this node left (:meth:`recover`)."""
        self._upstream = data_endpoint
        if self._chunks is not None:
            self._chunks.set_upstream(data_endpoint)
        if self._boot is None:
            self._boot = asyncio.get_running_loop().create_task(self._adopt_all(), name=f"adopt-{self.node.name}")

    async def recover(self) -> None:
        """Take back the processes an earlier run of this node supervised (once; idempotent).

        Every operation awaits it first, so none acts on an application before its
        surviving processes are known."""
        if self._boot is None:
            self._boot = asyncio.get_running_loop().create_task(self._adopt_all(), name=f"adopt-{self.node.name}")
        await asyncio.shield(self._boot)

    async def _adopt_all(self) -> None:
        for app in self.list_apps():
            try:
                async with self._lock(app):
                    await self._adopt(app)
            except Exception:  # one unreadable application must not keep the others unsupervised
                log.exception("%s: cannot take back the processes of %r", self.node.name, app)

    async def _adopt(self, app: str) -> None:
        run_dir = self.app_dir(app) / ".snsbus" / "run"
        if not any(run_dir.glob("*.json")):
            return  # nothing was running here: no supervisor needed
        meta = self._meta(app)
        sup = await self._supervisor(app)
        for name in sup.recorded():
            pdef = meta["processes"].get(name)
            stopped = bool(pdef is None or pdef.get("stopped"))
            try:
                argv, cwd, env, policy = self._spec(app, pdef) if pdef is not None else (None, None, None, None)
            except (AppError, KeyError, TypeError, ValueError, OSError) as e:
                log.warning("%s: %s/%s: %s; restarts use its recorded definition", self.node.name, app, name, e)
                argv = cwd = env = policy = None
            ps = await sup.adopt(name, argv, cwd=cwd, env=env, policy=policy, stopped_by_user=stopped,
                                 tags={"block": pdef.get("block", "")} if pdef is not None else None)
            if ps is None:
                continue
            log.info("%s: %s/%s taken back: %s%s", self.node.name, app, name, ps.state,
                     f" (pid {ps.pid})" if ps.pid else f" ({ps.reason})")
            if stopped and ps.state == "stopping":
                # Stopped by the user (a stop cut short by the node's death), or no longer defined here.
                log.warning("%s: %s/%s (pid %d) should not be running: stopping it", self.node.name, app, name,
                            ps.pid)
                await sup.stop(name, grace=2.0)

    async def close(self) -> None:
        if self._boot is not None:
            self._boot.cancel()
            await asyncio.gather(self._boot, return_exceptions=True)
        await asyncio.gather(*(s.stop(grace=2.0) for s in self._supervisors.values()), return_exceptions=True)
        self._supervisors.clear()
        if self._chunks is not None:
            self._chunks.close()
            self._chunks = None

    # -- layout ------------------------------------------------------------------
    def app_dir(self, app: str) -> Path:
        return self.base / "apps" / _check_name("application", app)

    def _meta_path(self, app: str) -> Path:
        return self.app_dir(app) / ".snsbus" / "app.json"

    def _meta(self, app: str) -> dict:
        try:
            return json.loads(self._meta_path(app).read_text())
        except (OSError, ValueError):
            return {"installed": {}, "processes": {}}

    def _save_meta(self, app: str, meta: dict) -> None:
        path = self._meta_path(app)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(meta))
        tmp.replace(path)

    def _lock(self, app: str) -> asyncio.Lock:
        return self._locks.setdefault(app, asyncio.Lock())

    async def _supervisor(self, app: str):
        sup = self._supervisors.get(app)
        if sup is None:
            from nodes.supervisor import Supervisor

            meta_dir = self.app_dir(app) / ".snsbus"
            sup = self._supervisors[app] = Supervisor(meta_dir / "logs", run_dir=meta_dir / "run")
            await sup.start()
        return sup

    # -- prepare: fetch + install ---------------------------------------------------
    async def prepare(self, args: dict, budget: float) -> str:
        """Fetch every package of ``args["software"]`` and install it (once per content)."""
        from nodes.packages import InstallTimeout, PackageError, run_install, safe_extract

        app = _check_name("application", args.get("app"))
        deadline = time.monotonic() + budget
        async with self._lock(app):
            appdir = self.app_dir(app)
            appdir.mkdir(parents=True, exist_ok=True)
            meta = self._meta(app)
            for soft in args.get("software") or []:
                name = _check_name("software", soft.get("name"))
                key = ",".join(pk["sha"] for pk in soft.get("packages", [])) + "|" + (soft.get("install") or "")
                if meta["installed"].get(name) == key:
                    continue  # already installed with exactly this content
                for pk in soft.get("packages", []):
                    left = deadline - time.monotonic()
                    t0 = time.monotonic()
                    try:
                        path = await self.chunks.fetch(pk["sha"], int(pk["size"]), timeout=max(left, 0.01))
                    except (PackageError, TimeoutError) as e:
                        raise AppError(f"package {pk.get('name')!r} of {name!r}: {e}") from None
                    t1 = time.monotonic()
                    log.info("%s: package %s (%d bytes) fetched in %.3fs", self.node.name, pk["sha"][:12],
                             int(pk["size"]), t1 - t0)
                    try:
                        if pk.get("archive"):
                            await asyncio.to_thread(safe_extract, path, appdir)
                        else:
                            dest = _inside(appdir, pk.get("dest") or pk.get("name"), "package dest")
                            await asyncio.to_thread(shutil.copyfile, path, dest)
                    except PackageError as e:
                        raise AppError(f"package {pk.get('name')!r} of {name!r}: {e}") from None
                    log.info("%s: package %s unpacked in %.3fs", self.node.name, pk["sha"][:12], time.monotonic() - t1)
                cmd = soft.get("install")
                if cmd:
                    timeout = min(float(soft.get("install_timeout") or 300.0), max(deadline - time.monotonic(), 0.01))
                    try:
                        rc, out = await run_install(cmd, appdir, timeout, env=self._env(app, {}))
                    except InstallTimeout as e:
                        raise AppError(f"install of {name!r} timed out after {timeout:g}s: {_tail(e.output)}") from None
                    if rc != 0:
                        raise AppError(f"install of {name!r} ({cmd!r}) exited with {rc}: {_tail(out)}")
                meta["installed"][name] = key
                self._save_meta(app, meta)
                self.counters["installs"] += 1
        return "installed"

    # -- run ---------------------------------------------------------------------------
    def _env(self, app: str, extra: dict) -> dict:
        env = dict(os.environ)
        env.update(SNSBUS_APP=app, SNSBUS_NODE=self.node.name, SNSBUS_NODE_ID=str(self.node.node_id),
                   SNSBUS_APP_DIR=str(self.app_dir(app)), SNSBUS_PYTHON=sys.executable,
                   SNSBUS_MANAGER=str(getattr(self.node, "root_endpoint", "") or ""))
        env.update(_key_env(getattr(self.node, "security", None)))
        env.update({k: expand(str(v), env) for k, v in extra.items()})
        return env

    def _spec(self, app: str, pdef: dict) -> tuple:
        """``(argv, cwd, env, policy)`` of a process definition, as the supervisor runs it."""
        from nodes.supervisor import RestartPolicy

        appdir = self.app_dir(app)
        cwd = _inside(appdir, pdef.get("cwd") or ".", "process cwd")
        cwd.mkdir(parents=True, exist_ok=True)
        r = pdef.get("restart") or {}
        codes = frozenset(pdef.get("exit_codes") or [0])
        policy = RestartPolicy(
            mode=r.get("policy", "never"),
            max_restarts=r["max"] if r.get("max") is not None else 1_000_000,
            backoff_base=float(r.get("backoff", 1.0)),
            flap_window=float(r.get("flap_window", 60.0)),
            ok_codes=codes,
        )
        env = self._env(app, dict(pdef.get("env") or {}))
        path = expand(pdef["path"], env)
        if "/" in path and not os.path.isabs(path):
            path = str(cwd / path)
        argv = [path, *(expand(a, env) for a in pdef.get("args", []))]
        return argv, cwd, env, policy

    async def _spawn(self, app: str, pdef: dict):
        from nodes.supervisor import SupervisorError

        sup = await self._supervisor(app)
        argv, cwd, env, policy = self._spec(app, pdef)
        self.counters["spawned"] += 1
        try:
            return await sup.spawn(pdef["name"], argv, cwd=cwd, env=env, policy=policy,
                                   tags={"block": pdef.get("block", "")})
        except SupervisorError as e:
            raise AppError(f"process {pdef['name']!r}: {e}") from None

    async def run(self, args: dict, budget: float) -> str:
        """Start the processes of one block (never a second copy) and wait as each asks."""
        app = _check_name("application", args.get("app"))
        gen = args.get("gen", 0)
        procs = args.get("processes") or []
        deadline = time.monotonic() + budget
        async with self._lock(app):
            meta = self._meta(app)
            sup = await self._supervisor(app)
            for pdef in procs:
                name = _check_name("process", pdef.get("name"))
                known = meta["processes"].get(name)
                current = _state(sup, name)
                if current is not None and current["state"] in _ALIVE:
                    continue  # running already: a deploy sent twice starts nothing twice
                if known is not None and known.get("gen") == gen and current is not None:
                    continue  # this deploy already ran it here; its outcome stands
                if known is not None and known.get("stopped") and known.get("gen") == gen:
                    continue  # stopped by the user: only `start` brings it back
                meta["processes"][name] = dict(pdef, gen=gen, stopped=False)
                self._save_meta(app, meta)
                ps = await self._spawn(app, pdef)
                if ps.state == "failed":
                    raise AppError(f"process {name!r}: {ps.reason}")
        for pdef in procs:
            await self._await_process(app, sup, pdef, deadline)
        return "done"

    async def _await_process(self, app: str, sup, pdef: dict, deadline: float) -> None:
        name = pdef["name"]
        if pdef.get("wait", WAIT_EXIT) == WAIT_START:
            await asyncio.sleep(max(0.0, min(_START_SETTLE, deadline - time.monotonic())))
            st = _state(sup, name)
            if st is None or st["state"] in ("failed", "flapping") or (
                    st["state"] == "exited" and st["exit_code"] not in (pdef.get("exit_codes") or [0])):
                raise AppError(f"process {name!r} did not stay up: {_why(st)}")
            return
        run_timeout = pdef.get("run_timeout")
        limit = deadline - time.monotonic()
        if run_timeout:
            limit = min(limit, float(run_timeout))
        try:
            ps = await asyncio.wait_for(sup.wait(name), max(limit, 0.0))
        except asyncio.TimeoutError:
            if run_timeout and float(run_timeout) <= limit + 1e-3:
                await sup.stop(name, grace=float(pdef.get("stop_grace") or 5.0))
                raise AppError(f"process {name!r} ran longer than its run timeout of {run_timeout:g}s "
                               f"and was stopped") from None
            raise AppError(f"process {name!r} still running at the deadline") from None
        if ps.state == "stopped":
            raise AppError(f"process {name!r} was stopped by the user")
        if ps.state == "flapping":
            raise AppError(f"process {name!r}: {ps.reason}")
        if ps.state == "failed":
            raise AppError(f"process {name!r}: {ps.reason}")
        if ps.exit_code is None:
            raise AppError(f"process {name!r} exited with an unknown code: an earlier run of this bus-node "
                           f"started it, so it is not the node's child")
        if ps.exit_code not in (pdef.get("exit_codes") or [0]):
            raise AppError(f"process {name!r} exited with {ps.exit_code} "
                           f"(expected {' '.join(map(str, pdef.get('exit_codes') or [0]))})")

    # -- operate -----------------------------------------------------------------------
    def status(self, args: dict) -> dict:
        app = _check_name("application", args.get("app"))
        meta = self._meta(app) if self.app_dir(app).exists() else None
        if meta is None:
            return {"present": False, "processes": []}
        sup = self._supervisors.get(app)
        now = time.monotonic()
        out = []
        for name, pdef in meta["processes"].items():
            st = _state(sup, name) if sup is not None else None
            if st is None:
                st = {"name": name, "state": "stopped" if pdef.get("stopped") else "not running", "pid": None,
                      "restarts": 0, "exit_code": None, "since": now, "reason": ""}
            st = dict(st, block=pdef.get("block", ""), age=round(now - st.pop("since", now), 1))
            out.append(st)
        return {"present": True, "processes": out, "installed": sorted(meta["installed"])}

    def logs(self, args: dict) -> dict:
        """Bytes of a process's log from ``offset`` (negative: the last -offset bytes)."""
        app = _check_name("application", args.get("app"))
        meta = self._meta(app)
        names = sorted(meta["processes"])
        if args.get("process"):
            names = [n for n in names if n == args["process"]]  # a node without it has nothing to show
        stream = args.get("stream", "out")
        if stream not in ("out", "err"):
            raise AppError("stream must be out or err")
        limit = min(int(args.get("limit", 65536)), 1 << 20)
        offsets = (args.get("offsets") or {}).get(self.node.name) or {}
        out = {}
        for name in names:
            _check_name("process", name)
            path = self.app_dir(app) / ".snsbus" / "logs" / f"{name}.{stream}"
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                out[name] = {"text": "", "offset": 0, "size": 0}
                continue
            start = int(offsets.get(name, -limit))
            start = max(size + start, 0) if start < 0 else min(start, size)
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(limit)
            out[name] = {"text": data.decode("utf-8", "replace"), "offset": start + len(data), "size": size}
        return out

    async def stop(self, args: dict, budget: float) -> str:
        app = _check_name("application", args.get("app"))
        async with self._lock(app):
            meta = self._meta(app)
            sup = self._supervisors.get(app)
            names = args.get("processes") or list(meta["processes"])
            for name in names:
                if name in meta["processes"]:
                    meta["processes"][name]["stopped"] = True
            if meta["processes"]:
                self._save_meta(app, meta)
            if sup is not None:
                grace = min(5.0, max(budget / 2, 0.1))
                await asyncio.gather(*(sup.stop(n, grace=grace) for n in names if _state(sup, n) is not None))
        return "stopped"

    async def start(self, args: dict, budget: float) -> str:
        """Start again every process the user stopped (or that exited); running ones stay."""
        app = _check_name("application", args.get("app"))
        async with self._lock(app):
            meta = self._meta(app)
            if not meta["processes"]:
                raise AppError(f"application {app!r} has no process on this node")
            sup = await self._supervisor(app)
            for name, pdef in meta["processes"].items():
                st = _state(sup, name)
                if st is not None and st["state"] in _ALIVE:
                    continue
                pdef["stopped"] = False
                ps = await self._spawn(app, pdef)
                if ps.state == "failed":
                    raise AppError(f"process {name!r}: {ps.reason}")
            self._save_meta(app, meta)
        return "started"

    async def cleanup(self, args: dict, budget: float) -> str:
        """Stop every process of the app and remove its files; cleaning twice is fine."""
        app = _check_name("application", args.get("app"))
        async with self._lock(app):
            sup = self._supervisors.pop(app, None)
            if sup is not None:
                await sup.stop(grace=min(5.0, max(budget / 2, 0.1)))
            await asyncio.to_thread(shutil.rmtree, self.app_dir(app), True)
        self._locks.pop(app, None)
        return "cleaned"

    def list_apps(self) -> list[str]:
        try:
            return sorted(d.name for d in (self.base / "apps").iterdir() if d.is_dir())
        except FileNotFoundError:
            return []

    def statistics(self) -> dict:
        out = dict(self.counters)
        if self._chunks is not None:
            out.update(self._chunks.statistics())
        return out


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _key_env(security) -> dict:
    """What a process run by this node needs to reach the bus as the node does (a front end, say):
    the node's key dir and the pinned manager key, or ``SNSBUS_INSECURE=1`` without CURVE."""
    if security is None:
        return {"SNSBUS_INSECURE": "1"}
    from bus.security import encode_key

    env = {"SNSBUS_INSECURE": "0"}
    if security.manager_key:
        env["SNSBUS_MANAGER_KEY"] = encode_key(security.manager_key)
    if security.key_dir is not None:
        env["SNSBUS_KEY_DIR"] = str(security.key_dir)
    return env


def expand(text: str, env: dict) -> str:
    """``${NAME}`` and ``${NAME:-default}`` from the process environment (nothing else is special)."""
    return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) if m.group(2) is not None else ""), text)


def _state(sup, name: str) -> dict | None:
    try:
        return sup.get(name).as_dict()
    except Exception:  # SupervisorError: never started here
        return None


def _why(st: dict | None) -> str:
    if st is None:
        return "it was never started"
    return st.get("reason") or f"state {st['state']}, exit code {st.get('exit_code')}"


def _tail(text: str, n: int = 300) -> str:
    text = (text or "").strip()
    return ("..." + text[-n:]) if len(text) > n else (text or "(no output)")


def _inside(base: Path, rel: str, what: str) -> Path:
    """``base/rel``, refusing anything that leaves ``base`` (absolute paths, ``..``)."""
    if not isinstance(rel, str) or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise AppError(f"{what} {rel!r} must be a relative path inside the application directory")
    return base / rel


# -- handlers: op(node, args, budget) ------------------------------------------------------

def _host(node) -> AppHost:
    host = getattr(node, "apps", None)
    if host is None:
        raise AppError("this node hosts no applications (started without a state directory)")
    return host


def _guard(fn):
    async def op(node, args, budget):
        try:
            host = _host(node)
            await host.recover()  # the processes an earlier run left are known before anything is done
            return await fn(host, args, budget)
        except AppError as e:
            return {"error": str(e)}
    op.__name__ = fn.__name__
    return op


def _guard_sync(fn):
    async def op(node, args, budget):
        try:
            host = _host(node)
            await host.recover()
            return fn(host, args)
        except AppError as e:
            return {"error": str(e)}
    op.__name__ = fn.__name__
    return op


APP_HANDLERS = {
    "app.prepare": _guard(AppHost.prepare),
    "app.run": _guard(AppHost.run),
    "app.stop": _guard(AppHost.stop),
    "app.start": _guard(AppHost.start),
    "app.cleanup": _guard(AppHost.cleanup),
    "app.status": _guard_sync(AppHost.status),
    "app.logs": _guard_sync(AppHost.logs),
}
