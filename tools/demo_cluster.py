"""Part two of ``make demo``: a local cluster of bus-nodes in a self-healing tree.

Brings up a manager and 20 logical nodes (4 processes x 5) on loopback, prints
the tree, runs ``exec`` on every node, kills one node process with SIGKILL,
shows the repair and the nodes named as missing, and stops everything.  Uses
the same functions as ``bus-ctl`` (``tools.cluster``, ``tools.client``,
``tools.render``, ``tools.treeviz``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

from tools import cluster, render, treeviz

__all__ = ["run"]


def _indent(text: str, pad: str = "      ") -> str:
    return "\n".join(pad + line for line in text.rstrip("\n").splitlines())


def _interior_process(status: dict, nodes: list[dict]) -> dict:
    """The node process whose logical nodes have the most children in other processes."""
    by_id = {m["id"]: m for m in status["members"]}

    def orphans(entry):
        prefix = entry["name"] + "-"
        return sum(1 for m in status["members"]
                   if not m["name"].startswith(prefix) and by_id.get(m["parent"], {}).get("name", "").startswith(prefix))

    return max(nodes, key=orphans)


def run(out: Callable[[str], None] = print, *, nodes: int = 20, per_process: int = 5,
        max_children: int = 3) -> int:
    """The tour; 0 on success.  Every process it starts is stopped before it returns."""
    sdir = Path(tempfile.mkdtemp(prefix="snsbus-demo-"))
    out(f"\nsnsbus demo: a self-healing tree of {nodes} nodes")
    status = 0
    try:
        out(f"  [1/6] bus-ctl up --local-nodes {nodes} --per-process {per_process} --max-children {max_children}")
        up = cluster.up(nodes, per_process=per_process, max_children=max_children, port=0, state_dir=sdir)
        out(f"      manager at {up['manager']['control']}; {up['members']} nodes joined in {up['elapsed']:.2f} s"
            f" ({len(up['nodes'])} processes)")
        out(f"      CurveZMQ on every socket: manager key {up['keys']['fingerprint']}; the nodes, bus-ctl and the "
            f"front ends have keys of their own, made and admitted by `up`")
        with cluster.client(sdir, up["manager"]["control"], timeout=15) as client:
            st = client.call("tree")
            out("  [2/6] bus-ctl tree")
            out(_indent(treeviz.render_text(st)))

            out("  [3/6] bus-ctl exec -- 'uname -s; echo ok'   (identical outputs grouped, as dshbak -c)")
            t = time.perf_counter()
            res = client.call("exec", cmd="uname -s; echo ok", timeout=10)
            stdout, stderr = render.format_exec(res)
            out(_indent(stdout))
            if stderr.strip():
                out(_indent(stderr))
            out(f"      (round trip through the tree, seen from here: {time.perf_counter() - t:.3f} s)")

            victim = _interior_process(st, up["nodes"])
            prefix = victim["name"] + "-"
            dead = sorted(m["name"] for m in st["members"] if m["name"].startswith(prefix))
            survivors = sorted(m["name"] for m in st["members"] if not m["name"].startswith(prefix))
            out(f"  [4/6] kill -9 {victim['name']} (pid {victim['pid']}): it hosts {render.compact_names(dead)}")
            cluster.kill_node(victim["pid"], state_dir=sdir)
            t0 = time.monotonic()
            while True:
                res = client.call("broadcast", op="ping", timeout=2)
                if sorted(n for g in res["groups"] for n in g["nodes"]) == survivors:
                    break
                if time.monotonic() - t0 > 20:
                    raise RuntimeError("the tree did not repair within 20 s")
            out(f"      a broadcast reaches all {len(survivors)} survivors again after {time.monotonic() - t0:.2f} s")
            for e in client.call("status")["events"]:
                if e["kind"] in ("lost", "rejoined") and e["t"] >= time.time() - 30:
                    out(f"      event: {e['kind']:<8} {e['node']:<10} {e['detail']}")

            out("  [5/6] bus-ctl exec -- true   (the dead are named, never a silent gap)")
            res = client.call("exec", cmd="true", timeout=5)
            stdout, stderr = render.format_exec(res)
            out(_indent(stdout))
            out(_indent(stderr))
            out("      the repaired tree:")
            out(_indent(treeviz.render_text(client.call("tree")), "        "))
    except Exception as e:
        out(f"      FAILED: {e}")
        status = 1
    finally:
        stopped = cluster.down(sdir, grace=3.0)
        out(f"  [6/6] bus-ctl down: stopped {len(stopped['stopped'])} processes")
    return status
