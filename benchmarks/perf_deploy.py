"""Deploy benchmark: a 10 MB package + one process + a barrier on 100 logical nodes.

    python benchmarks/perf_deploy.py [--nodes 100] [--procs 10] [--mb 10]

Runs the same deploy twice in one go, on a tree (max_children 4) and on a star
(the baseline), with real manager and bus-node processes on loopback
(``tools.cluster``), each node with its own package cache.  Prints the wall
time from the deploy request to every node past the barrier, and the bytes the
controller (the root) uploaded.  Targets (issue 4): time <= 5 s; tree upload <=
fanout x package size.  Exit status 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tools import cluster  # noqa: E402

SPEC = """<project name="bench">
  <software name="payload" type="tar"><package name="payload" type="file"><path>{pkg}</path></package></software>
  <component name="all"><num_hosts>{n}</num_hosts><resource type="local" group="bench"/>
    <software name="payload"/></component>
  <experiment name="e"><component_block name="cb"><component name="all"/>
    <process_block name="check">
      <process name="size"><path>sh</path><cmdline><arg>-c</arg><arg>test -s payload/blob.bin</arg></cmdline></process>
    </process_block>
    <barrier_block name="sync"><barrier name="everyone"/></barrier_block>
  </component_block></experiment>
</project>
"""


def make_package(path: Path, mb: int) -> int:
    blob = path.with_suffix(".bin")
    with open(blob, "wb") as f:
        f.write(os.urandom(mb << 20))  # incompressible: the bytes really travel
    with tarfile.open(path, "w") as tf:
        tf.add(blob, "payload/blob.bin")
    blob.unlink()
    return path.stat().st_size


def run(mode: str, args, work: Path, pkg: Path) -> tuple[float, int, str]:
    sdir = work / mode
    policy, k = ("star", 4) if mode == "star" else ("randtree", args.fanout)
    try:
        mgr = cluster.start_manager(sdir, port=0, policy=policy, max_children=k, insecure=args.insecure)
        per = args.nodes // args.procs
        nodes = cluster.start_nodes(sdir, args.nodes, per_process=per, prefix="bench", group="bench")
        cluster.wait_members(mgr["control"], args.nodes, timeout=60, watch=nodes, state_dir=sdir)
        names = [f"{e['name']}-{i}" for e in nodes for i in range(per)]
        rows = "\n".join(f'<resource name="{n}" type="local" group="bench"/>' for n in names)
        directory = f"<resources>{rows}</resources>"
        spec = SPEC.format(pkg=pkg, n=args.nodes)
        with cluster.client(sdir, mgr["control"], timeout=120) as client:
            t0 = time.perf_counter()
            client.request("deploy", {"spec": spec, "spec_file": str(work / "bench.xml"), "resources": directory,
                                      "resources_file": str(work / "dir.xml"), "cwd": str(work)})
            marks: dict[str, float] = {}
            while True:
                prog = client.call("progress", app="bench")
                now = time.perf_counter() - t0
                for ph in prog["phases"]:
                    if ph["state"] == "done":
                        marks.setdefault(ph["key"], now)
                if prog["phase"] != "deploying":
                    break
                time.sleep(0.02)
            elapsed = time.perf_counter() - t0
            print(f"    {mode}: " + ", ".join(f"{k} done at {v:.2f}s" for k, v in marks.items()), flush=True)
            uploaded = client.call("status")["transfer"].get("bytes_served", 0)
        return elapsed, uploaded, prog["phase"] + (f" ({prog['error']})" if prog.get("error") else "")
    finally:
        cluster.down(sdir, grace=2.0)
        if args.keep_logs:
            print(f"    logs kept in {sdir / 'logs'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--procs", type=int, default=10)
    ap.add_argument("--mb", type=int, default=10)
    ap.add_argument("--fanout", type=int, default=4)
    ap.add_argument("--keep-logs", action="store_true", help="keep the state directories (logs) for a look")
    ap.add_argument("--only", choices=("tree", "star"), default=None)
    ap.add_argument("--insecure", action="store_true", help="plain TCP instead of CurveZMQ (the default)")
    args = ap.parse_args()
    # On tmpfs when there is one: 100 logical nodes share this machine's one disk, where a real
    # deploy has a disk per machine; the figure is the system's, not this disk's fsync queue.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    work = Path(tempfile.mkdtemp(prefix="snsbus-deploy-bench-", dir=shm))
    ok = True
    try:
        pkg = work / "payload.tar"
        size = make_package(pkg, args.mb)
        print(f"deploy of a {size / 1e6:.1f} MB package + 1 process + a barrier on {args.nodes} nodes "
              f"({args.procs} processes), tree fanout {args.fanout} vs star:")
        results = {}
        for mode in ([args.only] if args.only else ("tree", "star")):
            elapsed, uploaded, phase = run(mode, args, work, pkg)
            results[mode] = (elapsed, uploaded)
            print(f"  {mode:<5} {elapsed:6.2f} s   controller uploaded {uploaded / 1e6:8.1f} MB "
                  f"({uploaded / size:5.1f} x package)   {phase}", flush=True)
            ok &= phase == "completed"
        if len(results) < 2:
            return 0 if ok else 1
        t_ok = results["tree"][0] <= 5.0
        up_ok = results["tree"][1] <= args.fanout * size
        print(f"  target: tree time <= 5 s: {'PASS' if t_ok else 'FAIL'} ({results['tree'][0]:.2f} s)")
        print(f"  target: tree upload <= fanout x package ({args.fanout * size / 1e6:.1f} MB): "
              f"{'PASS' if up_ok else 'FAIL'} ({results['tree'][1] / 1e6:.1f} MB; star "
              f"{results['star'][1] / 1e6:.1f} MB)")
        ok &= t_ok and up_ok
    finally:
        if not args.keep_logs:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
