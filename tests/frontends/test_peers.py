"""Process peers: a front end restarts a dead manager (and the policy that decides it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from frontends.peers import should_restart
from tests.helpers import wait_for
from tools import cluster, state

ROOT = Path(__file__).resolve().parents[2]
INFO = {"argv": ["python", "-m", "manager"], "cwd": "/", "host": "here"}


@pytest.mark.parametrize("silent, info, host, last, ok, why", [
    (None, INFO, "here", None, False, "flowing"),
    (2.0, INFO, "here", None, False, "flowing"),
    (6.0, INFO, "here", None, True, "no beacon for 6.0s"),
    (6.0, INFO, "elsewhere", None, False, "not here"),
    (6.0, None, "here", None, False, "did not say"),
    (6.0, INFO, "here", 95.0, False, "waiting"),
    (6.0, INFO, "here", 80.0, True, "no beacon"),
])
def test_should_restart(silent, info, host, last, ok, why):
    got, reason = should_restart(silent, 5.0, info, host, last, 100.0, 15.0)
    assert got is ok and why in reason


def _stats(url):
    with urllib.request.urlopen(url + "/stats", timeout=3) as r:
        return json.loads(r.read())


def test_front_end_restarts_a_killed_manager(tmp_path):
    sdir = tmp_path / "state"
    mgr = cluster.start_manager(sdir, port=0, heartbeat=0.2, misses=3)
    port = cluster.free_port("127.0.0.1")
    fe = subprocess.Popen([sys.executable, "-m", "frontends", "--manager", mgr["control"], "--port", str(port),
                           "--key-dir", mgr["keys"]["frontend_keys"]],
                          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _try(lambda: _stats(url)["beacons"]["beacons"] > 0), timeout=15)
        os.kill(mgr["pid"], signal.SIGKILL)
        wait_for(lambda: not state.pid_alive(mgr["pid"]), timeout=5)
        # The front end notices the silence (5 s grace), finds the port dead and starts the manager again.
        new = wait_for(lambda: _new_manager(sdir, mgr["pid"]), timeout=25)
        with cluster.client(sdir, mgr["control"], timeout=3) as client:
            assert client.call("ping")["pid"] == new
        assert _stats(url)["peers"]["manager_restarts"] == 1
        wait_for(lambda: _try(lambda: _stats(url)["beacons"]["stale"] is False), timeout=10)
    finally:
        fe.terminate()
        fe.wait(10)
        cluster.down(sdir, grace=2.0)


def _try(fn):
    try:
        return fn()
    except OSError:
        return None


def _new_manager(sdir, old_pid):
    info = state.manager_info(sdir)
    pid = info.get("pid") if info else None
    return pid if pid and pid != old_pid and state.pid_alive(pid) else None


def test_restart_command_survives_a_front_end_restart(tmp_path, monkeypatch):
    """A front end restarted while the manager is down still knows how to restart it."""
    import asyncio
    from types import SimpleNamespace

    from frontends.peers import ManagerWatch

    monkeypatch.setenv("SNSBUS_APP_DIR", str(tmp_path))
    live = SimpleNamespace(restart_info=dict(INFO), endpoint="tcp://127.0.0.1:1", age=lambda: 0.1)

    async def first():
        w = ManagerWatch(live, interval=60)
        w.start()
        await w.check()  # beacons flowing: nothing to do, but the command is kept on disk
        await w.stop()

    asyncio.run(first())
    assert json.loads((tmp_path / ".snsbus" / "manager-restart.json").read_text()) == INFO
    reborn = SimpleNamespace(restart_info=None, endpoint="tcp://127.0.0.1:1", age=lambda: None)

    async def second():
        w = ManagerWatch(reborn, interval=60)
        w.start()
        await w.stop()

    asyncio.run(second())
    assert reborn.restart_info == INFO
