"""The TranSend example end to end: one `bus-ctl deploy`, real processes, real images.

Manager, bus-nodes (front end, workers, overflow), worker processes, cache
partitions, an origin web server and the load generator, all on loopback and
all reaped by the ``state_dir`` fixture (and the origin's own teardown).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import wait_for
from tools import cluster, state
from tools.ctl import main

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "examples" / "transend" / "transend.xml"
DIRECTORY = ROOT / "examples" / "transend" / "directory.xml"

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def origin(tmp_path):
    from tools.imagegen import write_set

    images = tmp_path / "images"
    manifest = write_set(images, 12, seed=3)
    port = cluster.free_port("127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-m", "examples.transend.origin", str(images), "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _get(url + "/")[0] == 200, timeout=15)
        yield url, images, manifest
    finally:
        proc.terminate()
        proc.wait(5)


def _get(url, headers=None):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()
    except OSError:
        return 0, {}, b""


def _deploy(state_dir, tmp_path, origin_url, port):
    res = CliRunner().invoke(main, ["deploy", str(SPEC), "-r", str(DIRECTORY), "--state-dir", str(state_dir),
                                    "--set", f"ORIGIN={origin_url}", "--set", f"PORT={port}",
                                    "--set", f"PROFILES={tmp_path / 'profiles.sqlite'}", "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _services(client) -> dict:
    return client.call("services")["services"][0]


def test_transend_deploy_distill_cache_profiles_spawn_and_cleanup(state_dir, tmp_path, origin):
    origin_url, images, manifest = origin
    mgr = cluster.start_manager(state_dir, port=0, heartbeat=0.2, misses=3)
    port = cluster.free_port("127.0.0.1")
    prog = _deploy(state_dir, tmp_path, origin_url, port)
    assert prog["phase"] == "running", prog
    fe = f"http://127.0.0.1:{port}"
    wait_for(lambda: _get(fe + "/health")[0] == 200, timeout=20)
    # The front end knows the workers from the manager's beacon (until then it answers approximately).
    wait_for(lambda: json.loads(_get(fe + "/stats")[2])["beacons"]["workers"] >= 3, timeout=10)

    with cluster.client(state_dir, mgr["control"], timeout=10) as client:
        svc = _services(client)
        kinds = sorted((i["w"], i["cache"]) for i in svc["instances"])
        assert kinds.count(("cache", True)) == 2 and ("distill", False) in kinds and ("sheet", False) in kinds
        assert ("grey", False) in kinds
        assert not any(i["overflow"] for i in svc["instances"])  # overflow only when the main pool is full

        jpeg = next(m for m in manifest if m["name"].endswith(".jpg"))
        original = (images / jpeg["name"]).read_bytes()
        url = f"{fe}/distill?url={origin_url}/{jpeg['name']}&w=200&q=50"
        status, headers, body = _get(url)
        assert status == 200 and headers["Content-Type"] == "image/jpeg", (status, headers, body[:200])
        assert headers["X-Cache"] == "miss" and "X-SNS-Approximate" not in headers
        img = Image.open(io.BytesIO(body))
        assert img.width <= 200 and len(body) < len(original)
        status, headers, body2 = _get(url)
        assert status == 200 and headers["X-Cache"] == "hit" and body2 == body

        # The user's profile (the SQLite file, the one ACID store) shapes the answer.
        from frontends.profiles import SQLiteProfileStore

        with SQLiteProfileStore(tmp_path / "profiles.sqlite") as store:
            store.put("alice", {"max_width": 64, "format": "webp"})
        status, headers, body = _get(f"{fe}/distill?url={origin_url}/{jpeg['name']}", {"X-User": "alice"})
        assert status == 200 and headers["Content-Type"] == "image/webp"
        assert Image.open(io.BytesIO(body)).width <= 64

        # Aggregation: a contact sheet of several images.
        names = [m["name"] for m in manifest[:3]]
        status, headers, body = _get(f"{fe}/sheet?" + "&".join(f"url={origin_url}/{n}" for n in names))
        assert status == 200 and Image.open(io.BytesIO(body)).width > 0

        # A pipeline worker class ("grey | distill", like a shell pipe), picked with ?worker=.
        status, headers, body = _get(f"{fe}/distill?url={origin_url}/{jpeg['name']}&w=150&worker=grey")
        assert status == 200 and "X-SNS-Approximate" not in headers, headers
        grey = Image.open(io.BytesIO(body))
        assert grey.mode == "L" and grey.width <= 150

        # A non-allowed origin is refused (no fetch from anywhere else).
        status, _, body = _get(f"{fe}/distill?url=http://10.0.0.1/x.jpg")
        assert status == 403

        # Load: queues grow past H, the manager spawns distillers (D apart), then overflow.
        from tools.loadgen import run_load

        before = len([i for i in _services(client)["instances"] if i["w"] == "distill"])
        report = run_load(fe, [m["name"] for m in manifest], origin_url, concurrency=24, duration=6.0,
                          zipf=0.0, params={"w": 900}, vary={"q": range(20, 96)}, timeout=30)
        assert report["errors"] == 0, report
        everything = client.call("services")
        svc = everything["services"][0]
        spawned = [e for e in everything["events"] if e["kind"] == "spawn" and "distill" in e["detail"]]
        peak = len([i for i in svc["instances"] if i["w"] == "distill"])
        assert len(spawned) > 1 and peak > before, (everything["events"], report)

        # kill -9 a worker process in the middle of traffic: nothing is lost.
        pids = _worker_pids(state_dir)
        assert pids
        os.kill(pids[0], signal.SIGKILL)
        report = run_load(fe, [m["name"] for m in manifest], origin_url, concurrency=4, requests=20,
                          params={"w": 300}, timeout=30)
        assert report["errors"] == 0 and report["ok"] == 20, report

    res = CliRunner().invoke(main, ["cleanup", "transend", "--state-dir", str(state_dir)])
    assert res.exit_code == 0, res.output
    wait_for(lambda: not _worker_pids(state_dir), timeout=15)
    assert _get(fe + "/health")[0] == 0  # the front end is gone too


def _worker_pids(state_dir) -> list[int]:
    """Worker processes (python -m nodes.worker) whose parent is a bus-node of this cluster."""
    nodes = {n["pid"] for n in (cluster.cluster_info(state_dir) or {}).get("nodes", [])}
    return [pid for pid, ppid, argv in state.processes()
            if b"nodes.worker" in argv and ppid in nodes and state.pid_alive(pid)]



def test_manager_killed_under_load_is_restarted_by_the_front_end_and_idle_workers_are_reaped(
        state_dir, tmp_path, origin):
    """Front ends keep serving on the last load table; a front end restarts the manager, which
    rebuilds its load table from the stubs' reports; after the burst, idle workers are reaped."""
    import threading

    from tools.loadgen import run_load

    origin_url, images, manifest = origin
    spec = tmp_path / "transend.xml"
    spec.write_text(SPEC.read_text().replace('idle_after="20" calm_for="5"', 'idle_after="2" calm_for="2"'))
    mgr = cluster.start_manager(state_dir, port=0, heartbeat=0.2, misses=3)
    port = cluster.free_port("127.0.0.1")
    res = CliRunner().invoke(main, ["deploy", str(spec), "-r", str(DIRECTORY), "--state-dir", str(state_dir),
                                    "--set", f"ORIGIN={origin_url}", "--set", f"PORT={port}", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["phase"] == "running", res.output
    fe = f"http://127.0.0.1:{port}"
    wait_for(lambda: _get(fe + "/health")[0] == 200, timeout=20)
    wait_for(lambda: json.loads(_get(fe + "/stats")[2])["beacons"]["workers"] >= 3, timeout=10)

    reports = []
    load = threading.Thread(target=lambda: reports.append(run_load(
        fe, [m["name"] for m in manifest], origin_url, concurrency=8, duration=10.0, zipf=0.0,
        params={"w": 500}, vary={"q": range(20, 96)}, timeout=30)))
    load.start()
    with cluster.client(state_dir, mgr["control"], timeout=10) as client:  # the burst spawns a second distiller first
        wait_for(lambda: len([i for i in _services(client)["instances"] if i["w"] == "distill"]) >= 2, timeout=8)
    os.kill(mgr["pid"], signal.SIGKILL)
    load.join(60)
    report = reports[0]
    assert report["errors"] == 0 and report["ok"] > 50, report  # nothing lost while the manager was gone

    new_pid = wait_for(lambda: (lambda i: i["pid"] if i and i.get("pid") != mgr["pid"]
                                and state.pid_alive(i["pid"]) else None)(state.manager_info(state_dir)), timeout=20)
    assert json.loads(_get(fe + "/stats")[2])["peers"]["manager_restarts"] == 1
    with cluster.client(state_dir, mgr["control"], timeout=10) as client:
        assert client.call("ping")["pid"] == new_pid
        # The load table is rebuilt from the stubs' reports (soft state), with no duplicate minimum spawns.
        rebuilt = wait_for(lambda: (lambda s: s if any(i["w"] == "distill" for i in s["instances"])
                                    and len([i for i in s["instances"] if i["cache"]]) == 2 else None)(
            _services(client)), timeout=15)
        assert {i["w"] for i in rebuilt["instances"]} >= {"distill", "sheet", "grey", "cache"}
        # After the burst the idle distillers are reaped down to the minimum (overflow first).
        wait_for(lambda: len([i for i in _services(client)["instances"] if i["w"] == "distill"]) == 1,
                 timeout=30)
        events = client.call("services")["events"]
        if len([i for i in rebuilt["instances"] if i["w"] == "distill"]) > 1:
            # (the old manager may have reaped the extra one itself before it was killed)
            assert any(e["kind"] == "reap" for e in events), events
        assert not any(e["kind"] == "spawn" and "below the minimum" in e["detail"] for e in events), events
    status, headers, _ = _get(f"{fe}/distill?url={origin_url}/{manifest[0]['name']}&w=123")
    assert status == 200 and "X-SNS-Approximate" not in headers
