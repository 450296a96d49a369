"""The cluster of a chaos run (``tools.chaos``): its processes, how they are found and killed, its state.

Owns the shape of the cluster (:data:`NODES`), :class:`Cluster` (starts the
origin, the manager and the bus-nodes, each tagged with ``SNSBUS_CHAOS_RUN``
in its environment; finds their children through ``/proc``), :func:`reap`
(teardown: SIGKILL every process carrying a run's token), the control-API and
HTTP probes, and the state checks that tell what a run lost (:func:`_state`,
:func:`_problems`, :func:`_drift`).  The schedule, the load, the kills and
the report are ``tools.chaos``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

from tools import state

__all__ = ["ROOT", "TOKEN_VAR", "NODES", "WORKER_NODES", "FRONTEND_NODES", "Cluster", "reap"]

ROOT = Path(__file__).resolve().parents[1]
TOKEN_VAR = "SNSBUS_CHAOS_RUN"
NODES = {"fe1": ("transend-fe", False), "fe2": ("transend-fe", False), "w1": ("transend-workers", False),
         "w2": ("transend-workers", False), "o1": ("transend-workers", True)}  # name -> (group, overflow)
WORKER_NODES = ("w1", "w2", "o1")
FRONTEND_NODES = ("fe1", "fe2")


# --------------------------------------------------------------------------- processes


def _proc_env(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _proc_argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _tagged(token: str) -> list[int]:
    """Live processes whose environment carries this run's token."""
    mark = f"{TOKEN_VAR}={token}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and mark in _proc_env(int(entry)) and _alive(int(entry)):
            out.append(int(entry))
    return out


def reap(token: str, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process of run ``token`` until none is left; returns the pids that would not die."""
    return state.kill_until_gone(lambda: _tagged(token), time.monotonic() + timeout)


class Cluster:
    """The processes of one run: origin, manager, bus-nodes (see the module docstring)."""

    def __init__(self, sdir: Path, token: str, *, seed: int):
        from tools.cluster import free_port

        self.sdir, self.token, self.seed = sdir, token, seed
        self.logs = sdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.popens: list[subprocess.Popen] = []
        ports: set[int] = set()

        def port():
            while (p := free_port("127.0.0.1")) in ports:
                pass
            ports.add(p)
            return p

        self.control = f"tcp://127.0.0.1:{port()}"
        self.data = f"tcp://127.0.0.1:{port()}"
        self.origin_port = port()
        self.fe_ports = {name: port() for name in FRONTEND_NODES}
        self.node_procs: dict[str, subprocess.Popen] = {}
        self.named: list[tuple[str, subprocess.Popen]] = []  # every bus-node and the origin, in start order
        self.killed: set[int] = set()  # pids this run killed on purpose
        # CURVE as `bus-ctl up` sets it up: every key made and admitted before the first process starts.
        from bus.security import client_security
        from manager.keys import local_cluster_keys

        self.keys = local_cluster_keys(sdir)
        _SECURITY[self.control] = client_security(sdir)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.origin_port}"

    def frontends(self) -> list[str]:
        return [f"http://127.0.0.1:{self.fe_ports[n]}" for n in FRONTEND_NODES]

    def _env(self, **extra) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
        env[TOKEN_VAR] = self.token
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        env.pop("SNSBUS_ENDPOINT", None)
        return env

    def _popen(self, argv: list[str], log: str, **env) -> subprocess.Popen:
        with open(self.logs / log, "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=str(ROOT), env=self._env(**env))
        self.popens.append(proc)
        return proc

    def start_origin(self, count: int = 16) -> list[str]:
        from tools.imagegen import write_set

        images = self.sdir / "images"
        manifest = write_set(images, count, seed=self.seed)
        self.named.append(("origin", self._popen([sys.executable, "-m", "examples.transend.origin", str(images),
                                                  "--port", str(self.origin_port)], "origin.log")))
        return [m["name"] for m in manifest]

    def start_manager(self) -> None:
        # As `python -m manager` and with its log where peers.py appends: a front end restarts it as it was.
        self._popen([sys.executable, "-m", "manager", "--control", self.control, "--data", self.data,
                     "--state-dir", str(self.sdir), "--max-children", "4", "--heartbeat", "0.2", "--misses", "3"],
                    "manager.log")

    def start_node(self, name: str) -> subprocess.Popen:
        group, overflow = NODES[name]
        argv = [sys.executable, "-m", "nodes.cli", "--join", self.control, "--name", name, "--group", group,
                "--state-dir", str(self.sdir / "nodes"), "--key-dir", self.keys["node_keys"]]
        if overflow:
            argv += ["--attr", "overflow=true"]
        extra = {"CHAOS_FE_PORT": str(self.fe_ports[name])} if name in self.fe_ports else {}
        proc = self.node_procs[name] = self._popen(argv, f"{name}.log", **extra)
        self.named.append((name, proc))
        return proc

    def unexpected(self) -> list[dict]:
        """Bus-nodes and origin that died although this run did not kill them."""
        return [{"name": name, "pid": proc.pid, "code": proc.returncode} for name, proc in self.named
                if proc.poll() is not None and proc.pid not in self.killed]

    def children(self, name: str, marker: str) -> list[int]:
        """Live processes of this run whose parent is node ``name``'s bus-node and whose argv has ``marker``."""
        proc = self.node_procs.get(name)
        if proc is None or proc.poll() is not None:
            return []
        return [pid for pid in _tagged(self.token)
                if (st := _proc_stat(pid)) and st[1] == proc.pid and marker in _proc_argv(pid)]

    def frontend_pids(self, name: str) -> list[int]:
        """Front-end processes serving node ``name``'s port, supervised or orphaned."""
        port = str(self.fe_ports[name])
        return [pid for pid in _tagged(self.token)
                if "frontends" in (argv := _proc_argv(pid)) and port in argv]

    def ctl(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tools.ctl", *args], cwd=str(ROOT), env=self._env(),
                              capture_output=True, text=True, timeout=timeout)

    def close(self) -> list[int]:
        left = reap(self.token)
        for proc in self.popens:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return left


# --------------------------------------------------------------------------- control API and HTTP probes


_SECURITY: dict = {}  # control endpoint -> the client CURVE settings of this run's cluster


def _call(endpoint: str, cmd: str, wait: float = 5.0, **args):
    """One control-API call, waiting at most ``wait`` seconds (``args`` go to the manager)."""
    from tools.client import CtlClient

    with CtlClient(endpoint, timeout=wait, connect_timeout=min(1.0, wait), security=_SECURITY.get(endpoint)) as client:
        return client.call(cmd, **args)


def _try_call(endpoint: str, cmd: str, wait: float = 5.0, **args):
    """:func:`_call`, or None when the manager is down, slow or refuses."""
    from tools.client import CtlError

    try:
        return _call(endpoint, cmd, wait, **args)
    except CtlError:
        return None


def _http_json(url: str, timeout: float = 2.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.loads(r.read()) if r.status == 200 else None
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- state checks


def _state(c: Cluster) -> dict:
    """What the manager and the front ends say now (blocking)."""
    out: dict = {"manager": _try_call(c.control, "ping", 3.0)}
    apps = _try_call(c.control, "apps", 3.0)
    out["apps"] = {a["name"]: a["phase"] for a in apps["apps"]} if apps else None
    out["assignment"] = {}
    for name in out["apps"] or {}:
        prog = _try_call(c.control, "progress", 3.0, app=name)
        out["assignment"][name] = prog["assignment"] if prog else None
    svcs = _try_call(c.control, "services", 3.0)
    if svcs:
        out["services"] = {}
        for s in svcs["services"]:
            count = Counter(i["w"] for i in s["instances"] if not i["cache"])
            out["services"][s["name"]] = {
                "workers": {cl["worker"]: [count.get(cl["worker"], 0), cl["min"]] for cl in s["classes"]},
                "caches": sum(1 for i in s["instances"] if i["cache"])}
    else:
        out["services"] = None
    status = _try_call(c.control, "status", 3.0)
    out["nodes"] = sorted(m["name"] for m in status["members"] if m["state"] == "alive") if status else None
    out["health"] = {n: bool(_http_json(f"http://127.0.0.1:{c.fe_ports[n]}/health", 2.0)) for n in FRONTEND_NODES}
    st = _try_call(c.control, "app_status", 8.0, app="transend", timeout=5.0)
    out["frontend_processes"] = {r["node"]: r["state"] for r in st["processes"]} if st else None
    return out


def _problems(before: dict, now: dict) -> list[str]:
    """Every way ``now`` lost something ``before`` had (empty: nothing lost)."""
    problems = []
    if not now["manager"]:
        problems.append("the manager does not answer")
    if now["apps"] != before["apps"]:
        problems.append(f"applications {before['apps']} became {now['apps']}")
    for name, svc in (now["services"] or {}).items():
        for w, (have, least) in svc["workers"].items():
            if have < least:
                problems.append(f"service {name}: {w} has {have} worker(s), below its minimum of {least}")
        want = before["services"][name]["caches"] if before["services"] and name in before["services"] else 0
        if svc["caches"] < want:
            problems.append(f"service {name}: {svc['caches']} cache partition(s), {want} before")
    if now["services"] is None or set(now["services"]) != set(before["services"] or {}):
        problems.append(f"services {sorted(before['services'] or {})} became {sorted(now['services'] or {})}")
    if now["nodes"] != before["nodes"]:
        problems.append(f"live nodes {before['nodes']} became {now['nodes']}")
    down = [n for n, ok in now["health"].items() if not ok]
    if down:
        problems.append(f"front end(s) {', '.join(down)} do not answer /health")
    if now["frontend_processes"] != before["frontend_processes"]:
        problems.append(f"front-end processes {before['frontend_processes']} became {now['frontend_processes']}")
    return problems


def _drift(before: dict, now: dict) -> list[str]:
    """Changes that lose nothing by the definition above but are worth reporting (assignments)."""
    return [f"{app}: assignment {before['assignment'].get(app)} became {now['assignment'].get(app)}"
            for app in before["assignment"] if now["assignment"].get(app) != before["assignment"].get(app)]
