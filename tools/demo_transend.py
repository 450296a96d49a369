"""Part four of ``make demo``: the TranSend service (TACC on the bus) under load.

A manager, the service deployed with one ``bus-ctl deploy`` of
``examples/transend/transend.xml`` (its bus-nodes started by the deploy), a
local origin web server with a generated image set, then the load generator:
prints throughput, latency percentiles, the cache hit rate, BASE answers, and
the workers the manager spawned as queues grew.  Everything is stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["run"]


def _up(url: str, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.1)
    return False


def run(out: Callable[[str], None] = print, *, seconds: float = 8.0, concurrency: int = 16) -> int:
    from tools import cluster
    from tools.imagegen import write_set
    from tools.loadgen import format_report, run_load

    sdir = Path(tempfile.mkdtemp(prefix="snsbus-demo-transend-"))
    env = dict(os.environ, SNSBUS_STATE_DIR=str(sdir))
    env.pop("SNSBUS_ENDPOINT", None)
    status = 0
    origin = None

    def ctl(*args: str, check: bool = True, show: bool = True) -> str:
        if show:
            out(f"  $ bus-ctl {' '.join(args)}")
        res = subprocess.run([sys.executable, "-m", "tools.ctl", *args], cwd=ROOT, env=env, text=True,
                             capture_output=True, timeout=180)
        if show:
            for line in (res.stdout + res.stderr).rstrip("\n").splitlines():
                out(f"      {line}")
        if check and res.returncode != 0:
            raise RuntimeError(f"bus-ctl {args[0]} exited with {res.returncode}")
        return res.stdout

    out("\nsnsbus demo: TranSend, an image distillation service (TACC workers, cache, BASE), under load")
    try:
        images = sdir / "images"
        manifest = write_set(images, 32, seed=1)
        oport, fport = cluster.free_port("127.0.0.1"), cluster.free_port("127.0.0.1")
        origin = subprocess.Popen([sys.executable, "-m", "examples.transend.origin", str(images), "--port",
                                   str(oport)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        origin_url, fe = f"http://127.0.0.1:{oport}", f"http://127.0.0.1:{fport}"
        if not _up(origin_url + "/", 15):
            raise RuntimeError("the origin server did not start")
        out(f"  origin server with {len(manifest)} generated images at {origin_url}")
        ctl("up", "--local-nodes", "0", "--port", "0")
        ctl("deploy", "examples/transend/transend.xml", "-r", "examples/transend/directory.xml",
            "--set", f"ORIGIN={origin_url}", "--set", f"PORT={fport}",
            "--set", f"PROFILES={sdir / 'profiles.sqlite'}")
        if not _up(fe + "/health", 20):
            raise RuntimeError("the front end did not come up")
        end = time.monotonic() + 10
        while time.monotonic() < end:  # until the front end has the manager's load table
            with urllib.request.urlopen(fe + "/stats", timeout=2) as r:
                if json.loads(r.read())["beacons"]["workers"] >= 2:
                    break
            time.sleep(0.1)
        names = [m["name"] for m in manifest]
        out(f"  load: {concurrency} clients for {seconds:g} s, GET {fe}/distill?url=...&w=640&q=<random>"
            f" (Zipf-skewed image choice)")
        report = run_load(fe, names, origin_url, concurrency=concurrency, duration=seconds, zipf=1.0,
                          params={"w": 640}, vary={"q": range(40, 90, 5)}, timeout=30)
        for line in format_report(report).splitlines():
            out(f"      {line}")
        state = json.loads(ctl("services", "--json", show=False))
        spawns = [e for e in state["events"] if e["kind"] == "spawn"]
        out(f"  the manager spawned {len(spawns)} worker(s) in all (the minimum first, then by queue length):")
        for e in spawns:
            out(f"      {e['detail']}")
        ctl("services")
        if report["errors"]:
            raise RuntimeError(f"{report['errors']} requests failed")
        ctl("cleanup", "transend")
    except (RuntimeError, OSError, subprocess.TimeoutExpired, ValueError) as e:
        out(f"      FAILED: {e}")
        status = 1
    finally:
        ctl("down", check=False, show=False)
        if origin is not None:
            origin.terminate()
            origin.wait(5)
        out("  stopped the cluster and the origin server")
    return status
