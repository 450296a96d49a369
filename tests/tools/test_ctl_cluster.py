"""Local cluster processes: up/down with a fake manager and fake nodes, no orphans."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import FAKE_MANAGER, FAKE_NODE, wait_for
from tools import cluster, state
from tools.client import CtlClient
from tools.ctl import main


def _alive(pid):
    return state.pid_alive(pid)


def _up(state_dir, n=5, **kw):
    kw.setdefault("manager_argv", FAKE_MANAGER)
    kw.setdefault("node_argv", FAKE_NODE)
    kw.setdefault("port", 0)
    kw.setdefault("timeout", 30)
    kw.setdefault("insecure", True)  # the fake manager speaks plain TCP
    return cluster.up(n, state_dir=state_dir, **kw)


def _pids(res):
    return [res["manager"]["pid"], *(n["pid"] for n in res["nodes"])]


def test_up_then_down(state_dir):
    res = _up(state_dir, 5, per_process=2)
    assert res["members"] == 5
    assert [n["name"] for n in res["nodes"]] == ["node-0", "node-1", "node-2"]
    assert [n["virtual"] for n in res["nodes"]] == [2, 2, 1]
    assert all(_alive(p) for p in _pids(res))
    info = json.loads((state_dir / "cluster.json").read_text())
    assert info["manager"]["pid"] == res["manager"]["pid"]
    assert (state_dir / "logs" / "node-1.log").exists()
    with CtlClient(res["manager"]["control"]) as client:
        names = sorted(m["name"] for m in client.call("status")["members"])
    assert names == ["node-0-0", "node-0-1", "node-1-0", "node-1-1", "node-2-0"]

    with pytest.raises(cluster.ClusterError, match="already running .* run `bus-ctl down` first"):
        _up(state_dir, 1)

    out = cluster.down(state_dir)
    assert [(s["name"], s["how"]) for s in out["stopped"]] == [
        ("node-0", "terminated"), ("node-1", "terminated"), ("node-2", "terminated"),
        ("manager", "terminated")]
    assert not any(_alive(p) for p in _pids(res))
    assert sorted(out["removed"]) == sorted([str(state_dir / "cluster.json"), str(state_dir / "manager.json")])
    assert cluster.down(state_dir) == {"stopped": [], "removed": []}  # idempotent


def test_cli_up_status_down(state_dir, monkeypatch):
    monkeypatch.setattr(cluster, "MANAGER_ARGV", tuple(FAKE_MANAGER))
    monkeypatch.setattr(cluster, "NODE_ARGV", tuple(FAKE_NODE))
    runner = CliRunner()
    res = runner.invoke(main, ["up", "-n", "3", "--port", "0", "--state-dir", str(state_dir)])
    assert res.exit_code == 0, res.output
    assert "3 nodes in 3 processes joined" in res.stdout
    res = runner.invoke(main, ["exec", "--state-dir", str(state_dir), "--", "hostname"])
    assert res.exit_code == 0, res.output
    assert "node-[0-2]" not in res.stdout and "node-1 (1)" in res.stdout
    info = cluster.cluster_info(state_dir)
    res = runner.invoke(main, ["down", "--state-dir", str(state_dir)])
    assert res.exit_code == 0
    assert "manager manager (pid" in res.stdout and "terminated" in res.stdout
    assert not _alive(info["manager"]["pid"])
    res = runner.invoke(main, ["down", "--state-dir", str(state_dir)])
    assert res.stdout == f"nothing to stop in {state_dir}\n"


def test_down_stops_leftover_pids_and_is_idempotent(state_dir):
    node = subprocess.Popen(["sleep", "1000"])
    manager = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)", "fake-manager"])
    try:
        state.write_json(state_dir / "cluster.json", {"manager": None, "nodes": [{"pid": node.pid, "name": "dummy"}]})
        state.write_json(state_dir / "manager.json", {"pid": manager.pid, "control": "tcp://127.0.0.1:1"})
        out = cluster.down(state_dir, grace=5)
        assert out["stopped"] == [
            {"role": "node", "name": "dummy", "pid": node.pid, "how": "terminated"},
            {"role": "manager", "name": "manager", "pid": manager.pid, "how": "terminated"},
        ]
        assert node.wait(timeout=5) == -signal.SIGTERM
        assert manager.wait(timeout=5) == -signal.SIGTERM
        assert not (state_dir / "cluster.json").exists()
        assert cluster.down(state_dir) == {"stopped": [], "removed": []}
    finally:
        for p in (node, manager):
            p.kill()
            p.wait()


def test_down_leaves_a_reused_pid_alone(state_dir):
    other = subprocess.Popen(["sleep", "1000"])
    try:
        state.write_json(state_dir / "cluster.json",
                         {"manager": None, "nodes": [{"pid": other.pid, "start": 1, "name": "old"}]})
        out = cluster.down(state_dir, grace=1)
        assert out["stopped"][0]["how"] == "pid reused by another process, left alone"
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_down_leaves_a_stale_manager_file_pid_alone(state_dir):
    """After a reboot manager.json may name an unrelated process: only a manager is stopped."""
    other = subprocess.Popen(["sleep", "1000"])
    try:
        state.write_json(state_dir / "manager.json", {"pid": other.pid, "control": "tcp://127.0.0.1:1"})
        out = cluster.down(state_dir, grace=1)
        assert out["stopped"][0]["how"] == "pid reused by another process, left alone"
        assert out["removed"] == [str(state_dir / "manager.json")]
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_down_kills_a_node_that_ignores_sigterm(state_dir):
    res = _up(state_dir, 1)
    stubborn = cluster.start_nodes(state_dir, 1, node_argv=[*FAKE_NODE, "--ignore-term"])
    assert stubborn[0]["name"] == "node-1"
    cluster.wait_members(res["manager"]["control"], 2, 20)
    out = cluster.down(state_dir, grace=0.3)
    hows = {s["name"]: s["how"] for s in out["stopped"]}
    assert hows == {"node-0": "terminated", "node-1": "killed (did not stop on SIGTERM)", "manager": "terminated"}
    assert not _alive(stubborn[0]["pid"])


def test_kill_node_simulates_a_crash(state_dir):
    res = _up(state_dir, 3)
    victim = res["nodes"][1]
    assert cluster.kill_node(victim["pid"], state_dir=state_dir)
    assert not _alive(victim["pid"])
    assert [n["name"] for n in cluster.cluster_info(state_dir)["nodes"]] == ["node-0", "node-2"]
    more = cluster.start_nodes(state_dir, 2, per_process=2, group="web", node_argv=FAKE_NODE)
    assert more[0]["name"] == "node-3" and more[0]["group"] == "web"
    cluster.wait_members(res["manager"]["control"], 5, 20, watch=more)


def test_up_refuses_a_busy_port(state_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(cluster.ClusterError, match=f"port {port} on 127.0.0.1 is in use.*--port 0"):
            _up(state_dir, 1, port=port)
    assert not (state_dir / "cluster.json").exists()


def test_up_reports_a_manager_that_dies(state_dir):
    with pytest.raises(cluster.ClusterError) as info:
        _up(state_dir, 2, manager_argv=[*FAKE_MANAGER, "--fail"])
    text = str(info.value)
    assert "the manager exited with code 2 before it was ready" in text
    assert str(state_dir / "logs" / "manager.log") in text
    assert "failing on purpose" in text
    assert not (state_dir / "cluster.json").exists()


def test_up_reports_a_node_that_dies_and_stops_the_rest(state_dir):
    with pytest.raises(cluster.ClusterError) as info:
        _up(state_dir, 2, node_argv=[*FAKE_NODE, "--exit-code", "3"])
    text = str(info.value)
    assert "process (pid" in text and "exited with code 3" in text
    assert f"logs are in {state_dir / 'logs'}" in text
    assert "failing on purpose" in text
    assert cluster.cluster_info(state_dir) is None
    assert not any(p.poll() is None for p in cluster._children.values())


def test_up_times_out_naming_what_is_missing(state_dir):
    res = _up(state_dir, 0)
    with pytest.raises(cluster.ClusterError, match="only 0 of 3 nodes joined the manager at .* within 0.3s"):
        cluster.wait_members(res["manager"]["control"], 3, 0.3)
    wait_for(lambda: _alive(res["manager"]["pid"]))


def test_state_dir_default(monkeypatch, tmp_path):
    monkeypatch.setenv("SNSBUS_STATE_DIR", str(tmp_path / "x"))
    assert state.default_state_dir() == tmp_path / "x"
    monkeypatch.delenv("SNSBUS_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state.default_state_dir() == tmp_path / "xdg" / "snsbus"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert state.default_state_dir() == tmp_path / ".local" / "state" / "snsbus"


def test_processes_lists_pid_parent_and_argv():
    import os
    import sys

    from tools import state

    mine = [p for p in state.processes() if p[0] == os.getpid()]
    assert len(mine) == 1 and mine[0][1] == os.getppid()
    assert os.path.basename(sys.executable).encode() in os.path.basename(mine[0][2][0])


def test_a_child_killed_behind_our_back_is_reaped_at_the_next_spawn(tmp_path):
    """A manager or node killed with os.kill (as tests and chaos do) is reaped when the next process
    starts: no zombie, and no Popen of a dead child left for the interpreter's exit to warn about."""
    first = cluster._spawn(["sleep", "60"], tmp_path / "first.log")
    second = None
    try:
        os.kill(first["pid"], signal.SIGKILL)
        wait_for(lambda: (state.proc_stat(first["pid"]) or ("?",))[0] == "Z", timeout=5)  # a zombie until reaped
        second = cluster._spawn(["sleep", "60"], tmp_path / "second.log")
        assert state.proc_stat(first["pid"]) is None, "the killed child is still a zombie"
        assert first["pid"] not in cluster._children and cluster._exit_code(first["pid"]) == -signal.SIGKILL
    finally:
        for entry in (first, second):
            if entry is not None and entry["pid"] in cluster._children:
                cluster._children[entry["pid"]].kill()
                cluster._children.pop(entry["pid"]).wait()
