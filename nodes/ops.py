"""Operations a bus-node runs when a COMMAND reaches it (broadcast or unicast).

Each is ``op(node, args, budget) -> value`` (or an ``async def`` for work that
waits, like ``exec``): ``budget`` is the time the
node has before its answer is due; the value is msgpack-able and identical
values from different nodes are merged on the way up the tree.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

__all__ = ["HANDLERS", "op_exec", "op_ping", "op_info", "op_proc", "MAX_OUTPUT", "PROC_OP"]

MAX_OUTPUT = 64 * 1024  # bytes of stdout/stderr kept per node and command
TIMEOUT_RC = 124  # as timeout(1)


def _text(data: bytes) -> str:
    if len(data) > MAX_OUTPUT:
        data = data[:MAX_OUTPUT] + b"\n[output truncated by snsbus]\n"
    return data.decode("utf-8", "replace")


async def op_exec(node, args: dict, budget: float) -> dict:
    """Run ``args["cmd"]`` with /bin/sh; {stdout, stderr, rc}.  Killed at the deadline."""
    cmd = args.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        return {"stdout": "", "stderr": "snsbus: exec needs a command\n", "rc": 2}
    env = dict(os.environ, SNSBUS_NODE=node.name, SNSBUS_NODE_ID=str(node.node_id))
    proc = await asyncio.create_subprocess_shell(
        cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,  # its own process group, so a timeout kills all of it
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=max(budget, 0.01))
    except (asyncio.TimeoutError, asyncio.CancelledError) as e:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await proc.wait()
        if isinstance(e, asyncio.CancelledError):
            raise
        return {"stdout": "", "stderr": f"snsbus: command timed out after {budget:.2f}s\n", "rc": TIMEOUT_RC}
    return {"stdout": _text(out), "stderr": _text(err), "rc": proc.returncode}


def op_ping(node, args: dict, budget: float) -> str:
    """A no-op: measures the tree's broadcast + convergecast round trip."""
    return "pong"


def op_info(node, args: dict, budget: float) -> dict:
    """This node's view of its tree position and counters."""
    return node.snapshot()


# -- proc: CPU, memory and running processes, for the monitor ------------------------------

PROC_OP = "proc"
_SAMPLE_EVERY = 0.5  # seconds: the logical nodes of one process share one CPU sample
_sample: dict = {}  # the last sample of this process: {"at", "cpu_s", "value"}


def _process_usage() -> dict:
    """{pid, cpu: percent of one core since the previous sample, rss: bytes, threads, source}.

    Every logical node of a process (``--virtual N``) asks within the same
    broadcast; they share one sample taken at most every ``_SAMPLE_EVERY``
    seconds, so they all report the same figure instead of the first one
    taking the whole CPU delta.  psutil is used when installed; without it,
    ``os.times`` and ``/proc/self/statm`` give the same figures on Linux.
    """
    now = time.monotonic()
    if _sample and now - _sample["at"] < _SAMPLE_EVERY:
        return _sample["value"]
    try:
        import psutil  # imported lazily: an agent that is never asked pays nothing
    except ImportError:
        psutil = None
    if psutil is not None:
        proc = psutil.Process()
        with proc.oneshot():
            t = proc.cpu_times()
            cpu_s, rss, threads = t.user + t.system, proc.memory_info().rss, proc.num_threads()
        source = "psutil"
    else:
        t = os.times()
        cpu_s, threads, source = t.user + t.system, 0, "os"
        try:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            rss = 0
    cpu = 0.0
    if _sample and now > _sample["at"]:
        cpu = max(0.0, 100.0 * (cpu_s - _sample["cpu_s"]) / (now - _sample["at"]))
    value = {"pid": os.getpid(), "cpu": round(cpu, 1), "rss": int(rss), "threads": threads, "source": source}
    _sample.update(at=now, cpu_s=cpu_s, value=value)
    return value


def _app_processes(node) -> list[dict]:
    """Processes the node supervises for its applications: {app, name, state, pid, restarts, exit_code}."""
    host = getattr(node, "apps", None)
    out = []
    for app, sup in sorted(getattr(host, "_supervisors", {}).items()):
        for st in sup.status():
            out.append({"app": app, "name": st["name"], "state": st["state"], "pid": st["pid"],
                        "restarts": st["restarts"], "exit_code": st["exit_code"]})
    return out


def _worker_processes(node) -> list[dict]:
    """TACC worker instances of the node's stub: {id, state, pid, restarts, crashes, queued}."""
    stub = getattr(node, "stub", None)
    if stub is None:
        return []
    workers = stub.statistics().get("workers", {})
    return [{"id": wid, "state": w["state"], "pid": w["pid"], "restarts": w["restarts"], "crashes": w["crashes"],
             "queued": w["queued"]} for wid, w in sorted(workers.items())]


def op_proc(node, args: dict, budget: float) -> dict:
    """``proc`` -> {pid, cpu, rss, threads, source, procs: [...], workers: [...]}: the node's process
    (CPU percent of one core since the last sample, resident bytes) and what it runs.

    Logical nodes sharing a process report the same pid/cpu/rss; ``procs`` and
    ``workers`` are this logical node's own.  The manager's monitor asks every
    few seconds (manager/monitor.py), never per page view.
    """
    return {**_process_usage(), "procs": _app_processes(node), "workers": _worker_processes(node)}


HANDLERS = {"exec": op_exec, "ping": op_ping, "info": op_info, PROC_OP: op_proc}
