"""Local cluster management for ``bus-ctl up`` / ``bus-ctl down``, tests and the demo.

``up`` starts a manager and bus-node processes in the background, each in its
own session (so the terminal's Ctrl-C does not reach them) with its output in
``DIR/logs/``, records them in ``DIR/cluster.json`` and waits until the manager's
``ping`` counts every node.  ``down`` stops whatever ``cluster.json`` (and a
stray ``manager.json``) names: SIGTERM, a grace period, then SIGKILL of the
process group, and removes the state files.  Both leave no orphans: a failed
``up`` tears down what it started.

``cluster.json``::

    {"manager": {"pid", "start", "pgid", "control", "data", "log"} | null,
     "nodes": [{"pid", "start", "pgid", "name", "virtual", "group", "log"}],
     "next_index": int, "max_children": int, "policy": str, "created": float}

``start`` is the process start time from ``/proc`` (guards against a reused
pid); ``pgid`` is set only for processes this module made session leaders.

CurveZMQ is on unless ``insecure=True`` (recorded as ``"insecure"`` in
``cluster.json``, so nodes started later agree): :func:`start_manager` makes
every key the local cluster needs first (:func:`manager.keys.local_cluster_keys`:
the store in ``DIR/keys``, one key shared by the local bus-nodes in
``DIR/nodes/keys``, bus-ctl's ``DIR/client.key``), all pre-authorized, so no join
is refused while the tree forms.  :func:`client` gives a control client that
uses them.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bus.protocol import BusError
from tools import state
from tools.client import AUTH, CtlClient, CtlError

__all__ = [
    "ClusterError",
    "DEFAULT_PORT",
    "POLICIES",
    "up",
    "down",
    "start_manager",
    "start_nodes",
    "kill_node",
    "wait_members",
    "free_port",
    "cluster_info",
    "client",
    "client_security",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 7070
POLICIES = ("randtree", "balanced", "star")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
MANAGER_ARGV = (sys.executable, "-m", "manager")
NODE_ARGV = (sys.executable, "-m", "nodes.cli")
NODE_DIR = "nodes"  # under the state directory: each node's packages, applications and logs

# Popen objects of the processes this interpreter started and has not reaped yet:
# kept so they are reaped (no zombies) and never garbage-collected while running.
_children: dict[int, subprocess.Popen] = {}
_exit_codes: dict[int, int] = {}  # pid -> exit status of the children reaped so far


class ClusterError(BusError, RuntimeError):
    """A local cluster could not be started or stopped; the message says what to do."""


# --------------------------------------------------------------------------- ports


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # zmq listens with SO_REUSEADDR, so a port in TIME_WAIT is usable: mirror that.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now, below the ephemeral range.

    Outside the kernel's ephemeral range, so no outgoing connection (of the
    nodes, say) can be holding it as its source port when a restarted manager
    binds it again.
    """
    lo, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(lo, 10001))
        if _port_free(host, port) and _port_free(host, port + 1):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # crowded: let the kernel choose
        s.bind((host, 0))
        return s.getsockname()[1]


def _pick_ports(host: str, port: int) -> tuple[int, int]:
    if port == 0:
        control = free_port(host)
        data = free_port(host)
        while data == control:
            data = free_port(host)
        return control, data
    for p in (port, port + 1):
        if not _port_free(host, p):
            raise ClusterError(
                f"port {p} on {host} is in use (another manager?); run `bus-ctl down`, "
                f"choose another with `--port`, or use `--port 0` for free ports"
            )
    return port, port + 1


# --------------------------------------------------------------------------- processes


def _env() -> dict:
    env = dict(os.environ)
    root = str(PROJECT_ROOT)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = root if not path else f"{root}{os.pathsep}{path}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _reap_finished() -> None:
    """Reap the children that died since we last looked (a node or manager killed with
    ``kill_node`` or ``os.kill``): no zombies pile up in a long-lived caller."""
    for pid in list(_children):
        _alive(pid)


def _spawn(argv: list[str], log_path: Path) -> dict:
    _reap_finished()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=_env(),
            cwd=str(PROJECT_ROOT),
        )
    _children[proc.pid] = proc
    st = state.proc_stat(proc.pid)
    log.debug("started pid %d: %s", proc.pid, " ".join(argv))
    return {"pid": proc.pid, "start": st[1] if st else None, "pgid": proc.pid, "log": str(log_path)}


def _alive(pid: int) -> bool:
    proc = _children.get(pid)
    if proc is not None:
        if proc.poll() is None:
            return True
        _exit_codes[pid] = proc.returncode
        del _children[pid]
        return False
    return state.pid_alive(pid)


def _exit_code(pid: int) -> int | None:
    proc = _children.get(pid)
    return _exit_codes.get(pid) if proc is None else proc.poll()


def _is_ours(entry: dict) -> bool:
    """Whether ``entry["pid"]`` is still the process we recorded (pids get reused)."""
    recorded = entry.get("start")
    if recorded is not None:
        st = state.proc_stat(entry["pid"])
        if st is None or (st[1] is not None and st[1] != recorded):
            return False
    match = entry.get("match")
    if match:
        cmdline = state.proc_cmdline(entry["pid"])
        return cmdline is None or match in cmdline
    return True


def _signal(entry: dict, sig: int, group: bool = False) -> None:
    try:
        if group and entry.get("pgid"):
            os.killpg(entry["pgid"], sig)
        else:
            os.kill(entry["pid"], sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_dead(pids: list[int], deadline: float) -> list[int]:
    """Poll until every pid is gone or ``deadline`` passes; returns the survivors."""
    left = [p for p in pids if _alive(p)]
    while left and time.monotonic() < deadline:
        proc = _children.get(left[0])
        if proc is not None:
            try:
                proc.wait(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
        else:
            time.sleep(0.02)
        left = [p for p in left if _alive(p)]
    return left


def _stop(entries: list[dict], grace: float) -> list[dict]:
    """SIGTERM, wait ``grace``, SIGKILL the group; one report line per entry."""
    report, targets = [], []
    for e in entries:
        item = {"role": e["role"], "name": e.get("name"), "pid": e["pid"]}
        if e["pid"] <= 1 or e["pid"] in (os.getpid(), os.getppid()):
            item["how"] = "not stopped: that is this process or its parent"
        elif not _alive(e["pid"]):
            item["how"] = "already gone"
        elif not _is_ours(e):
            item["how"] = "pid reused by another process, left alone"
        else:
            _signal(e, signal.SIGTERM)
            targets.append((e, item))
        report.append(item)
    survivors = set(_wait_dead([e["pid"] for e, _ in targets], time.monotonic() + grace))
    for e, item in targets:
        if e["pid"] in survivors:
            _signal(e, signal.SIGKILL, group=True)
            item["how"] = "killed (did not stop on SIGTERM)"
        else:
            item["how"] = "terminated"
    still = _wait_dead(list(survivors), time.monotonic() + 5.0)
    for e, item in targets:
        if e["pid"] in still:
            item["how"] = "could not be stopped"
        elif e.get("pgid"):
            # Sweep what the process left behind in its own session (its workers).
            _signal(e, signal.SIGKILL, group=True)
    return report


# --------------------------------------------------------------------------- state


def cluster_info(state_dir=None) -> dict | None:
    """The ``cluster.json`` of ``state_dir``, or None."""
    return state.read_json(state.resolve_state_dir(state_dir) / state.CLUSTER_FILE)


def _save(sdir: Path, info: dict) -> None:
    state.write_json(sdir / state.CLUSTER_FILE, info)


def _insecure(sdir: Path) -> bool:
    return bool((cluster_info(sdir) or {}).get("insecure"))


def _key_args(sdir: Path, insecure: bool | None = None) -> list[str]:
    """The security flags of a bus-node of the cluster in ``sdir`` (``insecure`` None: as its cluster.json says)."""
    if insecure is None:
        insecure = _insecure(sdir)
    return ["--insecure"] if insecure else ["--key-dir", str(sdir / NODE_DIR / "keys")]


def client_security(state_dir=None):
    """CURVE settings for a control client of the cluster in ``state_dir`` (None: it runs insecure)."""
    from bus.security import client_security as from_state

    return from_state(state.resolve_state_dir(state_dir))


def client(state_dir=None, endpoint: str | None = None, **kw) -> CtlClient:
    """A :class:`CtlClient` of the manager recorded in ``state_dir`` (or at ``endpoint``), with the
    cluster's client key when it runs with CURVE.  Keywords go to :class:`CtlClient`."""
    sdir = state.resolve_state_dir(state_dir)
    if endpoint is None:
        endpoint = (state.manager_info(sdir) or (cluster_info(sdir) or {}).get("manager") or {}).get("control")
        if not endpoint:
            raise ClusterError(f"no manager recorded in {sdir}; start one with `bus-ctl up`")
    return CtlClient(endpoint, security=client_security(sdir), **kw)


def _log_tail(path, lines: int = 5) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join("    " + line for line in tail)


def _running(info: dict) -> list[dict]:
    entries = ([dict(info["manager"], role="manager")] if info.get("manager") else []) + [
        dict(n, role="node") for n in info.get("nodes", [])
    ]
    return [e for e in entries if _alive(e["pid"]) and _is_ours(e)]


# --------------------------------------------------------------------------- public


def start_manager(
    state_dir=None,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    max_children: int = 4,
    policy: str = "randtree",
    heartbeat: float | None = None,
    misses: int | None = None,
    timeout: float = 15.0,
    manager_argv=None,
    insecure: bool | None = None,
) -> dict:
    """Start a manager in the background and wait for its ``manager.json``.

    Records it in ``cluster.json`` (creating it) and returns its entry
    ``{"pid", "control", "data", "log", "keys", ...}``.  On failure the manager is
    stopped and a :class:`ClusterError` quotes its log.  ``insecure`` None keeps
    what ``cluster.json`` says (CURVE on for a new cluster); with CURVE the
    local keys are made first and ``keys`` describes them.
    """
    if policy not in POLICIES:
        raise ClusterError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    sdir = state.resolve_state_dir(state_dir)
    logs = sdir / state.LOG_DIR
    logs.mkdir(parents=True, exist_ok=True)
    control_port, data_port = _pick_ports(host, port)
    control, data = f"tcp://{host}:{control_port}", f"tcp://{host}:{data_port}"
    (sdir / state.MANAGER_FILE).unlink(missing_ok=True)
    log_path = logs / "manager.log"
    if insecure is None:
        insecure = _insecure(sdir)
    keys = None
    if not insecure:
        from bus.security import SecurityError
        from manager.keys import local_cluster_keys

        try:
            keys = local_cluster_keys(sdir)
        except (SecurityError, OSError) as e:
            raise ClusterError(f"cannot make the cluster's keys in {sdir}: {e}") from e
    argv = [*(manager_argv or MANAGER_ARGV), "--control", control, "--data", data, "--state-dir", str(sdir),
            "--max-children", str(max_children), "--policy", policy,
            *(["--insecure"] if insecure else ["--keys", str(sdir / "keys")])]
    if heartbeat is not None:
        argv += ["--heartbeat", str(heartbeat)]
    if misses is not None:
        argv += ["--misses", str(misses)]
    entry = dict(_spawn(argv, log_path), name="manager", control=control, data=data, keys=keys)
    info = cluster_info(sdir) or {}
    info.update(manager=entry, max_children=max_children, policy=policy, created=time.time(), insecure=insecure)
    info.setdefault("nodes", [])
    info.setdefault("next_index", 0)
    _save(sdir, info)

    deadline = time.monotonic() + timeout
    proc = _children[entry["pid"]]
    while True:
        ready = state.manager_info(sdir)
        if ready and ready.get("control"):
            entry["control"] = ready["control"]
            entry["data"] = ready.get("data", data)
            _save(sdir, info)
            return entry
        if proc.poll() is not None:
            raise ClusterError(
                f"the manager exited with code {proc.returncode} before it was ready; "
                f"see {log_path}:\n{_log_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise ClusterError(
                f"the manager (pid {proc.pid}) did not write {sdir / state.MANAGER_FILE} "
                f"within {timeout:g}s; see {log_path}:\n{_log_tail(log_path)}"
            )
        try:
            proc.wait(timeout=0.02)
        except subprocess.TimeoutExpired:
            pass


def start_nodes(
    state_dir=None,
    count: int = 1,
    *,
    per_process: int = 1,
    join: str | None = None,
    prefix: str = "node",
    group: str | None = None,
    node_argv=None,
    extra_args=(),
    insecure: bool | None = None,
) -> list[dict]:
    """Start ``count`` logical bus-nodes, ``per_process`` per process; returns their entries.

    Process ``i`` is named ``{prefix}-{i}`` (indices continue from earlier calls);
    with ``per_process > 1`` it hosts ``{prefix}-{i}-0 ..`` via ``--virtual``.
    ``join`` defaults to the manager recorded in ``state_dir``.  ``insecure``:
    plain TCP (default: as ``cluster.json`` says; a manager embedded in a test
    without keys needs True).  Does not wait for the nodes to join: see
    :func:`wait_members`.
    """
    if count < 1 or per_process < 1:
        raise ClusterError("the node count and --per-process must be at least 1")
    sdir = state.resolve_state_dir(state_dir)
    info = cluster_info(sdir) or {"manager": None, "nodes": [], "next_index": 0}
    if join is None:
        mgr = state.manager_info(sdir) or info.get("manager") or {}
        join = mgr.get("control")
        if not join:
            raise ClusterError(f"no manager recorded in {sdir}; start one with `bus-ctl up`")
    started = []
    index = info.get("next_index", 0)
    left = count
    while left > 0:
        k = min(per_process, left)
        name = f"{prefix}-{index}"
        argv = [*(node_argv or NODE_ARGV), "--join", join, "--name", name,
                "--state-dir", str(sdir / NODE_DIR), *_key_args(sdir, insecure)]
        if per_process > 1:
            argv += ["--virtual", str(k)]
        if group:
            argv += ["--group", group]
        argv += list(extra_args)
        entry = dict(_spawn(argv, sdir / state.LOG_DIR / f"{name}.log"),
                     name=name, virtual=k if per_process > 1 else 0, group=group)
        started.append(entry)
        info.setdefault("nodes", []).append(entry)
        index += 1
        left -= k
        info["next_index"] = index
        _save(sdir, info)  # after each spawn: a crash here must not orphan a node
    return started


def start_named_node(state_dir=None, name: str = "node", *, join: str | None = None, group: str | None = None,
                     attrs: dict | None = None, node_argv=None) -> dict:
    """Start one bus-node joining as ``name`` (a resource of a directory); returns its entry.

    Recorded in ``cluster.json`` like the others, so ``down`` stops it.
    """
    sdir = state.resolve_state_dir(state_dir)
    info = cluster_info(sdir) or {"manager": None, "nodes": [], "next_index": 0}
    if join is None:
        join = (state.manager_info(sdir) or info.get("manager") or {}).get("control")
        if not join:
            raise ClusterError(f"no manager recorded in {sdir}; start one with `bus-ctl up`")
    argv = [*(node_argv or NODE_ARGV), "--join", join, "--name", name, "--state-dir", str(sdir / NODE_DIR),
            *_key_args(sdir)]
    if group:
        argv += ["--group", group]
    for k, v in (attrs or {}).items():
        argv += ["--attr", f"{k}={v}"]
    entry = dict(_spawn(argv, sdir / state.LOG_DIR / f"{name}.log"), name=name, virtual=0, group=group)
    info.setdefault("nodes", []).append(entry)
    _save(sdir, info)
    return entry


def wait_members(endpoint: str, expected: int, timeout: float = 30.0, *, watch=(), state_dir=None) -> int:
    """Ping the manager until it reports at least ``expected`` members; returns the count.

    ``watch`` lists process entries (from :func:`start_nodes`) whose early exit
    fails the wait at once.  ``state_dir``: the cluster whose client key to use
    (default: the default state directory).  Raises :class:`ClusterError`
    naming what is missing.
    """
    deadline = time.monotonic() + timeout
    members = 0
    with CtlClient(endpoint, timeout=1.0, connect_timeout=0.5, security=client_security(state_dir)) as client:
        while True:
            try:
                members = int(client.call("ping").get("members", 0))
            except CtlError as e:
                if e.code == AUTH:  # retrying does not change keys
                    raise ClusterError(f"{e} (is state_dir the cluster's state directory?)") from e
                if time.monotonic() > deadline:
                    raise ClusterError(f"the manager at {endpoint} stopped answering: {e}") from e
            if members >= expected:
                return members
            for e in watch:
                if not _alive(e["pid"]):
                    code = _exit_code(e["pid"])
                    raise ClusterError(
                        f"{e.get('name', 'node')} process (pid {e['pid']}) exited"
                        f"{'' if code is None else f' with code {code}'}; see {e.get('log')}:\n"
                        f"{_log_tail(e.get('log'))}"
                    )
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"only {members} of {expected} nodes joined the manager at {endpoint} "
                    f"within {timeout:g}s"
                )
            time.sleep(0.05)  # between pings: joins take a few round trips


def up(
    n_local_nodes: int = 4,
    per_process: int = 1,
    max_children: int = 4,
    policy: str = "randtree",
    *,
    state_dir=None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    heartbeat: float | None = None,
    misses: int | None = None,
    timeout: float | None = None,
    manager_argv=None,
    node_argv=None,
    insecure: bool = False,
) -> dict:
    """Start a manager and ``n_local_nodes`` bus-nodes; wait until all have joined.

    Returns ``{"state_dir", "logs", "manager", "nodes", "members", "elapsed", "keys"}``
    (``keys``: where the cluster's CurveZMQ keys are, None with ``insecure``).
    Refuses to start over a running cluster; on any failure (or Ctrl-C) stops
    what it started, keeps the logs and raises :class:`ClusterError`.
    ``port=0`` picks free ports; ``manager_argv``/``node_argv`` replace the
    command prefixes (default ``python -m manager`` / ``python -m nodes.cli``).
    """
    t0 = time.monotonic()
    sdir = state.resolve_state_dir(state_dir)
    old = cluster_info(sdir)
    running = _running(old) if old else []
    mgr = state.manager_info(sdir)
    stray = {"role": "manager", "pid": int((mgr or {}).get("pid") or 0), "match": "manager"}
    if not running and stray["pid"] and _alive(stray["pid"]) and _is_ours(stray):
        running = [stray]
    if running:
        where = (old or {}).get("manager") or mgr or {}
        raise ClusterError(
            f"a cluster is already running from {sdir} (manager at {where.get('control', '?')}, "
            f"{len(running)} processes); run `bus-ctl down` first"
        )
    if old or mgr:
        down(sdir)  # stale files of a cluster that died: clear them
    if timeout is None:
        timeout = 30.0 + 0.05 * n_local_nodes
    logs = sdir / state.LOG_DIR
    try:
        manager = start_manager(sdir, host=host, port=port, max_children=max_children,
                                policy=policy, heartbeat=heartbeat, misses=misses,
                                timeout=min(timeout, 15.0), manager_argv=manager_argv, insecure=insecure)
        nodes = []
        if n_local_nodes > 0:
            nodes = start_nodes(sdir, n_local_nodes, per_process=per_process,
                                join=manager["control"], node_argv=node_argv)
        try:
            members = wait_members(manager["control"], n_local_nodes,
                                   max(1.0, timeout - (time.monotonic() - t0)),
                                   watch=[manager, *nodes], state_dir=sdir)
        except ClusterError as e:
            raise ClusterError(f"{e}\nlogs are in {logs}") from e
    except BaseException:
        down(sdir)
        raise
    return {
        "state_dir": str(sdir),
        "logs": str(logs),
        "manager": manager,
        "nodes": nodes,
        "members": members,
        "elapsed": round(time.monotonic() - t0, 3),
        "keys": manager.get("keys"),
    }


def down(state_dir=None, *, grace: float = 5.0) -> dict:
    """Stop the nodes, then the manager, named in ``state_dir``; remove the state files.

    Idempotent: with nothing recorded it stops nothing and removes nothing.
    Returns ``{"stopped": [{"role", "name", "pid", "how"}], "removed": [paths]}``.
    """
    sdir = state.resolve_state_dir(state_dir)
    info = cluster_info(sdir) or {}
    mgr_file = state.manager_info(sdir)
    nodes = [dict(n, role="node") for n in info.get("nodes") or [] if n.get("pid")]
    managers = [dict(info["manager"], role="manager", name="manager")] if info.get("manager") else []
    if mgr_file and mgr_file.get("pid") and all(m["pid"] != mgr_file["pid"] for m in managers):
        # Known only from the manager's own file: no start time, so check the command line.
        managers.append({"role": "manager", "name": "manager", "pid": int(mgr_file["pid"]), "match": "manager"})
    # Nodes first, so the manager does not spend its last moments repairing the tree.
    stopped = _stop(nodes, grace) + _stop(managers, grace)
    removed = []
    for name in (state.CLUSTER_FILE, state.MANAGER_FILE):
        path = sdir / name
        if path.exists():
            path.unlink()
            removed.append(str(path))
    return {"stopped": stopped, "removed": removed}


def kill_node(pid: int, sig: int = signal.SIGKILL, *, state_dir=None, timeout: float = 5.0) -> bool:
    """Send ``sig`` to a node process (its whole session if ``up`` made it) and wait for it.

    Simulates a machine failure for tests and the demo.  With ``state_dir`` the
    entry is dropped from ``cluster.json``.  Returns True if the process is gone.
    """
    sdir = state.resolve_state_dir(state_dir) if state_dir is not None else None
    info = cluster_info(sdir) if sdir else None
    entry = next((n for n in (info or {}).get("nodes", []) if n.get("pid") == pid), {"pid": pid})
    if _alive(pid) and _is_ours(entry):
        _signal(entry, sig, group=sig == signal.SIGKILL)
    gone = not _wait_dead([pid], time.monotonic() + timeout)
    if info is not None and gone:
        info["nodes"] = [n for n in info.get("nodes", []) if n.get("pid") != pid]
        _save(sdir, info)
    return gone
