"""The overlay tree with real processes on loopback: join, exec, kill -9, manager restart.

Every process is started through ``tools.cluster`` in a per-test state
directory and always reaped (``cluster.down`` in the fixture).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.helpers import wait_for
from tools import cluster
from manager.keys import local_cluster_keys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def sdir(tmp_path):
    d = tmp_path / "state"
    try:
        yield d
    finally:
        cluster.down(d, grace=2.0)


def names_of(groups) -> list[str]:
    return sorted(n for g in groups for n in g["nodes"])


def alive_members(client) -> dict:
    """Alive members that have registered (a route alone shows up as ``#id`` until then)."""
    return {m["name"]: m for m in client.call("status")["members"]
            if m["state"] == "alive" and not m["name"].startswith("#")}


def test_fifty_nodes_form_one_tree_and_all_answer_exec(sdir):
    up = cluster.up(50, per_process=10, max_children=4, port=0, state_dir=sdir)
    assert up["members"] == 50
    with cluster.client(sdir, up["manager"]["control"], timeout=15) as c:
        members = alive_members(c)
        assert len(members) == 50
        ids = {m["id"] for m in members.values()}
        # One tree: every parent is the root (id 1) or another member; fan-out bounded.
        assert all(m["parent"] == 1 or m["parent"] in ids for m in members.values())
        assert all(m["children"] <= 4 for m in members.values())
        assert max(m["depth"] for m in members.values()) >= 2
        res = c.call("exec", cmd="hostname; echo $SNSBUS_NODE", timeout=10)
        assert res["missing"] == []
        assert names_of(res["groups"]) == sorted(members)
        host = subprocess.run(["hostname"], capture_output=True, text=True).stdout
        for g in res["groups"]:
            assert g["rc"] == 0
            assert g["stdout"] == f"{host}{g['nodes'][0]}\n"  # each node ran it itself


def test_kill_interior_process_repairs_and_names_the_dead(sdir):
    up = cluster.up(50, per_process=10, max_children=3, port=0, state_dir=sdir)
    endpoint = up["manager"]["control"]
    with cluster.client(sdir, endpoint, timeout=15) as c:
        members = alive_members(c)
        by_id = {m["id"]: m for m in members.values()}
        # The process whose nodes have the most descendants in other processes.
        def interior_weight(entry):
            prefix = entry["name"] + "-"
            return sum(1 for m in members.values()
                       if not m["name"].startswith(prefix) and by_id.get(m["parent"], {}).get("name", "").startswith(prefix))
        victim = max(up["nodes"], key=interior_weight)
        assert interior_weight(victim) > 0, "expected interior nodes in some process"
        prefix = victim["name"] + "-"
        dead = sorted(n for n in members if n.startswith(prefix))
        survivors = sorted(n for n in members if not n.startswith(prefix))
        assert cluster.kill_node(victim["pid"], state_dir=sdir)
        t0 = time.monotonic()

        def reaches_exactly_survivors():
            res = c.call("broadcast", op="ping", timeout=2)
            return names_of(res["groups"]) == survivors and res
        wait_for(reaches_exactly_survivors, timeout=10)
        repaired_in = time.monotonic() - t0
        # Default settings: process deaths are repaired well inside the heartbeat deadline.
        assert repaired_in < 5.0, repaired_in
        res = c.call("exec", cmd="true", timeout=5)
        assert names_of(res["groups"]) == survivors
        assert sorted(m["node"] for m in res["missing"]) == dead, "dead nodes are named, never a silent gap"
        assert {m["reason"] for m in res["missing"]} <= {"dead", "unreachable"}
        status = c.call("status")
        kinds = {e["kind"] for e in status["events"]}
        assert "lost" in kinds and "rejoined" in kinds


def test_manager_restart_gets_every_node_back_and_leaves_processes_alone(sdir):
    up = cluster.up(30, per_process=10, max_children=4, port=0, state_dir=sdir)
    endpoint = up["manager"]["control"]
    with cluster.client(sdir, endpoint, timeout=15) as c:
        before = {n: m["id"] for n, m in alive_members(c).items()}
        # A long-running "application" process on every node.
        res = c.call("exec", cmd="nohup sleep 300 >/dev/null 2>&1 & echo $!", timeout=10)
        pids = [int(line) for g in res["groups"] for line in g["stdout"].split()]
        assert len(pids) == 30
    try:
        node_pids = [n["pid"] for n in up["nodes"]]
        mgr = up["manager"]
        os.kill(mgr["pid"], signal.SIGKILL)
        port = int(endpoint.rsplit(":", 1)[1])
        # The main thread turns zombie before libzmq's I/O thread has closed the listener.
        wait_for(lambda: cluster._port_free("127.0.0.1", port) and cluster._port_free("127.0.0.1", port + 1), 5)
        restarted = cluster.start_manager(sdir, port=port, max_children=4)
        assert restarted["control"] == endpoint
        with cluster.client(sdir, endpoint, timeout=15) as c:
            wait_for(lambda: len(alive_members(c)) == 30, timeout=20)
            after = {n: m["id"] for n, m in alive_members(c).items()}
            assert after == before, "every node re-registered, with its own id"
            assert not any(m["name"].startswith("#") for m in c.call("status")["members"])
            res = c.call("exec", cmd="true", timeout=5)
            assert len(names_of(res["groups"])) == 30
        assert all(psutil.pid_exists(p) for p in node_pids), "bus-nodes kept running"
        assert all(psutil.pid_exists(p) for p in pids), "application processes untouched"
    finally:
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_node_without_manager_retries_with_backoff_and_joins_later(sdir, tmp_path):
    port = cluster.free_port()
    env = dict(os.environ, PYTHONPATH=ROOT)
    log = open(tmp_path / "node.log", "wb")
    keys = local_cluster_keys(sdir)  # what the manager started below will use: the node pins its key
    proc = subprocess.Popen([sys.executable, "-m", "nodes.cli", "--join", f"tcp://127.0.0.1:{port}",
                             "--name", "lonely", "--virtual", "5", "--key-dir", keys["node_keys"]],
                            stdout=log, stderr=log, env=env, cwd=ROOT)
    try:
        ps = psutil.Process(proc.pid)
        time.sleep(1.0)  # let it start and begin retrying
        cpu0 = sum(ps.cpu_times()[:2])
        t0 = time.monotonic()
        time.sleep(4.0)
        cpu = (sum(ps.cpu_times()[:2]) - cpu0) / (time.monotonic() - t0)
        assert cpu < 0.05, f"a node waiting for the manager used {cpu:.1%} CPU"
        assert proc.poll() is None
        mgr = cluster.start_manager(sdir, port=port)
        with cluster.client(sdir, mgr["control"], timeout=10) as c:
            wait_for(lambda: c.call("ping")["members"] == 5, timeout=15)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(10) == 0, "clean exit on SIGTERM"
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()


def test_bus_node_exit_codes(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    port = cluster.free_port()
    bad = subprocess.run([sys.executable, "-m", "nodes.cli", "--join", "nonsense"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=20)
    assert bad.returncode == 2 and "tcp://HOST:PORT" in bad.stderr
    late = subprocess.run([sys.executable, "-m", "nodes.cli", "--join", f"tcp://127.0.0.1:{port}", "--insecure",
                           "--join-timeout", "1"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert late.returncode == 3 and "joined" in late.stderr
    # CURVE is on by default, and a node that cannot pin the manager's key does not start.
    nokey = subprocess.run([sys.executable, "-m", "nodes.cli", "--join", f"tcp://127.0.0.1:{port}", "--state-dir",
                            str(tmp_path / "n")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert nokey.returncode == 2 and "no manager key" in nokey.stderr and "manager.pub" in nokey.stderr
    assert (tmp_path / "n" / "keys" / "identity.key").stat().st_mode & 0o777 == 0o600  # its key, made on first start
