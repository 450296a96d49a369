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

__all__ = ["HANDLERS", "op_exec", "op_ping", "op_info", "MAX_OUTPUT"]

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


HANDLERS = {"exec": op_exec, "ping": op_ping, "info": op_info}
