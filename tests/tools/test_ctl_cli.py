"""``bus-ctl`` commands through click's CliRunner against the fake manager."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from click.testing import CliRunner
from PIL import Image

from fake_manager import FakeError
from tools import state
from tools.cluster import free_port
from tools.ctl import main
from tools.treeviz import png_layout


def run(*args, **kw):
    return CliRunner().invoke(main, list(args), catch_exceptions=False, **kw)


def test_status_table(fake):
    res = run("status", "--endpoint", fake.endpoint)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "ID", "DEPTH", "PARENT"]
    assert any(line.split() == ["node-7", "9", "2", "node-0", "0", "0.2s", "dead"] for line in lines)
    assert "30 members (28 alive, 2 dead), max depth 3" in res.stdout
    assert "lost     node-7: missed 3 heartbeats" in res.stdout
    assert "rejoined node-28: under node-1" in res.stdout


def test_status_json_is_exactly_the_result(fake):
    res = run("status", "--json", "--endpoint", fake.endpoint)
    assert res.exit_code == 0
    assert json.loads(res.stdout) == fake.status({})


def test_endpoint_from_environment(fake, monkeypatch):
    monkeypatch.setenv("SNSBUS_ENDPOINT", fake.endpoint)
    res = run("ping", "--json")
    assert res.exit_code == 0
    assert json.loads(res.stdout)["members"] == 30


def test_endpoint_from_state_dir(fake, state_dir):
    state.write_json(state_dir / "manager.json",
                     {"pid": os.getpid(), "control": fake.endpoint, "data": "tcp://127.0.0.1:1", "epoch": 1})
    res = run("ping", "--state-dir", str(state_dir))
    assert res.exit_code == 0
    assert "30 members" in res.stdout
    # `down` must not take the pid in manager.json (this test process) for a manager to stop.
    assert run("down", "--json", "--state-dir", str(state_dir)).exit_code == 0
    assert not (state_dir / "manager.json").exists()


def test_tree_text(fake):
    res = run("tree", "--endpoint", fake.endpoint)
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"manager [1] {fake.endpoint}  (30 members, 2 dead, depth 3")
    assert lines[1] == "├── node-0 [2]"
    assert lines[2] == "│   ├── node-4 [6]"
    assert "│   └── node-7 [9]  DEAD" in lines
    assert lines[-1] == "    └── node-19 [21]"


def test_tree_png(fake, tmp_path):
    path = tmp_path / "tree.png"
    res = run("tree", "--png", str(path), "--endpoint", fake.endpoint)
    assert res.exit_code == 0
    lay = png_layout(fake.status({}))
    assert res.stdout == f"wrote {path} ({lay.width}x{lay.height} px, 30 members)\n"
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (lay.width, lay.height)


def test_tree_png_unwritable(fake, tmp_path):
    res = run("tree", "--png", str(tmp_path / "missing-dir" / "t.png"), "--endpoint", fake.endpoint)
    assert res.exit_code == 6
    assert "cannot write" in res.stderr and "--png" in res.stderr


def test_exec_groups_outputs_and_lists_the_missing(fake):
    fake.timeouts = {"node-3"}
    res = run("exec", "--endpoint", fake.endpoint, "--", "echo", "hi")
    assert res.exit_code == 1
    assert res.stdout.splitlines() == [
        "----------------",
        "node-[0-2,4-6,8-11,13-29] (27)",
        "----------------",
        "hi",
    ]
    missing, summary = res.stderr.splitlines()
    assert missing == "did not answer: node-[7,12] (dead), node-3 (timed out)"
    assert summary.startswith("27 of 30 nodes answered in ") and summary.endswith("s, 3 did not answer")
    assert fake.requests[-1] == ("exec", {"cmd": "echo hi", "selector": None, "timeout": 10.0})


def test_exec_all_ok_exits_zero(fake):
    res = run("exec", "--nodes", "node-1,node-2*", "--timeout", "2", "--endpoint", fake.endpoint, "true")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[1] == "node-[1-2,20-29] (12)"
    assert "did not answer" not in res.stderr
    assert fake.requests[-1] == ("exec", {"cmd": "true", "selector": "node-1,node-2*", "timeout": 2.0})


def test_exec_options_after_command_belong_to_the_command(fake):
    res = run("exec", "--endpoint", fake.endpoint, "--nodes", "group=web", "ls", "-l", "--json")
    assert res.exit_code == 1  # exit 127 from the fake's unknown command, node-12 dead
    assert fake.requests[-1][1]["cmd"] == "ls -l --json"
    assert "node-[0,2,4,6,8,10,14,16,18,20,22,24,26,28] (14)  exit 127" in res.stdout
    assert "did not answer: node-12 (dead)" in res.stderr


def test_exec_json(fake):
    res = run("exec", "--json", "--endpoint", fake.endpoint, "--", "hostname")
    assert res.exit_code == 1  # two dead nodes
    out = json.loads(res.stdout)
    assert out["expected"] == 30 and out["answered"] == 28
    assert sorted(out["missing"], key=lambda m: m["node"]) == [
        {"node": "node-12", "reason": "dead"}, {"node": "node-7", "reason": "dead"}]
    assert len(out["groups"]) == 28


def test_exec_bad_selector(fake):
    res = run("exec", "--nodes", "web-*", "--endpoint", fake.endpoint, "true")
    assert res.exit_code == 4
    assert "selector 'web-*' matches no node" in res.stderr
    assert "bus-ctl status" in res.stderr


def test_exec_needs_a_command(fake):
    res = run("exec", "--endpoint", fake.endpoint)
    assert res.exit_code == 2


def test_exec_mistyped_option_is_not_run(fake):
    res = run("exec", "--endpoint", fake.endpoint, "--nodse", "web-1", "true")
    assert res.exit_code == 2
    assert "No such option '--nodse'" in res.stderr
    assert all(cmd != "exec" for cmd, _ in fake.requests)


def test_manager_not_running():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    res = run("status", "--timeout", "0.2", "--endpoint", endpoint)
    assert res.exit_code == 3
    assert res.stderr == f"Error: manager not running at {endpoint} (start it with `bus-ctl up`)\n"


def test_no_manager_recorded(state_dir):
    res = run("exec", "--state-dir", str(state_dir), "true")
    assert res.exit_code == 3
    assert f"no manager is recorded in {state_dir}; start one with `bus-ctl up`" in res.stderr


def test_stale_manager_file(state_dir):
    proc = subprocess.Popen(["true"])
    proc.wait()
    state.write_json(state_dir / "manager.json", {"pid": proc.pid, "control": "tcp://127.0.0.1:1"})
    res = run("status", "--state-dir", str(state_dir))
    assert res.exit_code == 3
    assert f"pid {proc.pid}" in res.stderr and "has exited" in res.stderr and "bus-ctl up" in res.stderr


def test_manager_timeout(fake):
    fake.drop = {"status"}
    res = run("status", "--timeout", "0.2", "--endpoint", fake.endpoint)
    assert res.exit_code == 5
    assert "did not answer `status` within 0.2s" in res.stderr
    assert "--timeout" in res.stderr


def test_manager_refusal(fake):
    def busy(args):
        raise FakeError("BUSY", "the tree is being repaired")

    fake.handlers["tree"] = busy
    res = run("tree", "--endpoint", fake.endpoint)
    assert res.exit_code == 6
    assert res.stderr == "Error: the manager refused `tree` (BUSY): the tree is being repaired\n"


@pytest.mark.parametrize("cmd", ["up", "down", "status", "tree", "exec", "ping"])
def test_help(cmd):
    res = run(cmd, "--help")
    assert res.exit_code == 0
    assert "--state-dir" in res.stdout
    if cmd != "down":
        assert "--json" in res.stdout
