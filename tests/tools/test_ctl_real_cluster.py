"""`bus-ctl` against the real manager and real bus-nodes on loopback (always reaped)."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from click.testing import CliRunner

from conftest import wait_for
from tools import cluster, state
from tools.ctl import main
from tools.render import expand_names

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("manager.__main__") is None or importlib.util.find_spec("nodes.cli") is None,
    reason="the manager and bus-node entry points are not in this tree yet",
)


def test_up_exec_failure_down(state_dir):
    runner = CliRunner()
    res = runner.invoke(main, ["up", "-n", "6", "--per-process", "3", "--port", "0", "--max-children", "2",
                               "--heartbeat", "0.1", "--misses", "3", "--json", "--state-dir", str(state_dir)])
    assert res.exit_code == 0, res.output
    up = json.loads(res.stdout)
    assert up["members"] == 6
    endpoint = up["manager"]["control"]

    res = runner.invoke(main, ["status", "--json", "--state-dir", str(state_dir)])
    assert res.exit_code == 0, res.output
    status = json.loads(res.stdout)
    names = sorted(m["name"] for m in status["members"])
    assert names == ["node-0-0", "node-0-1", "node-0-2", "node-1-0", "node-1-1", "node-1-2"]
    assert all(m["state"] == "alive" for m in status["members"])

    res = runner.invoke(main, ["exec", "--state-dir", str(state_dir), "--", "echo", "hi"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[1] == "node-[0-1]-[0-2] (6)"
    assert res.stdout.splitlines()[3] == "hi"

    victim = up["nodes"][1]
    assert cluster.kill_node(victim["pid"], state_dir=state_dir)
    with cluster.client(state_dir, endpoint) as client:
        wait_for(lambda: client.call("ping")["members"] == 3, timeout=20)
        # ...and the survivors' repair is done: a broadcast reaches all three of them again.
        wait_for(lambda: client.call("broadcast", op="ping", timeout=1.0)["answered"] == 3, timeout=20)
    res = runner.invoke(main, ["exec", "--state-dir", str(state_dir), "--timeout", "3", "--", "true"])
    assert res.exit_code == 1
    line = res.stderr.splitlines()[0]
    assert line.startswith("did not answer: ")
    missing = re.findall(r"(\S+) \((dead|unreachable|timed out)\)", line)
    assert sorted(n for names, _ in missing for n in expand_names(names)) == ["node-1-0", "node-1-1", "node-1-2"]

    res = runner.invoke(main, ["down", "--json", "--state-dir", str(state_dir)])
    assert res.exit_code == 0
    stopped = json.loads(res.stdout)["stopped"]
    assert {s["name"]: s["how"] for s in stopped} == {"node-0": "terminated", "manager": "terminated"}
    assert not any(state.pid_alive(p) for p in (up["manager"]["pid"], *(n["pid"] for n in up["nodes"])))
