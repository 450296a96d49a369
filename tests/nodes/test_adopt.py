"""A restarted bus-node takes back the processes it supervised (nodes.supervisor adoption).

Supervisor level: a helper process plays the bus-node (it supervises a process,
then is killed with SIGKILL), and a new Supervisor on the same run directory
adopts what it left. End to end: a real cluster, a deployed app, the hosting
bus-node killed -9 and restarted with the same name and state directory.
Every process started here is killed at the end, adopted or not.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from nodes.supervisor import ALWAYS, NEVER, ON_FAILURE, RestartPolicy, Supervisor, SupervisorError
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
FAST = dict(backoff_base=0.05, backoff_cap=1.0, flap_window=30.0)

# The "bus-node": supervises one process, says its pid, and waits to be killed.
_NODE = """
import asyncio, json, sys
from nodes.supervisor import RestartPolicy, Supervisor

async def main():
    logs, run, name, argv, mode = sys.argv[1:6]
    sup = Supervisor(logs, run_dir=run)
    await sup.start()
    pol = RestartPolicy(mode=mode, backoff_base=0.05, backoff_cap=1.0, flap_window=30.0)
    ps = await sup.spawn(name, json.loads(argv), policy=pol, tags={"block": "pb"})
    print(ps.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def strays():
    """Pids (process group leaders) to kill at the end: adopted processes are nobody's children."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _orphan(tmp_path: Path, strays: list, argv: list[str], name: str = "p", mode: str = ON_FAILURE) -> int:
    """Supervise ``argv`` from a helper process, then kill the helper (-9): returns the orphan's pid."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    helper = subprocess.Popen([sys.executable, "-c", _NODE, str(tmp_path / "logs"), str(tmp_path / "run"), name,
                               json.dumps(argv), mode], stdout=subprocess.PIPE, env=env, cwd=ROOT, text=True)
    try:
        pid = int(helper.stdout.readline())
        strays.append(pid)
    finally:
        helper.kill()
        helper.wait(5)
        helper.stdout.close()
    assert _alive(pid), "the supervised process outlives its supervisor"
    return pid


def arun(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 15))
    return wrapper


async def until(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


def _sup(tmp_path: Path) -> Supervisor:
    return Supervisor(tmp_path / "logs", run_dir=tmp_path / "run")


# ------------------------------------------------------------------ supervisor level


@arun
async def test_adopts_notices_exit_restarts_and_stops(tmp_path, strays):
    pid = _orphan(tmp_path, strays, ["sleep", "30"])
    record = json.loads((tmp_path / "run" / "p.json").read_text())
    assert record["pid"] == pid and record["argv"] == ["sleep", "30"] and record["tags"] == {"block": "pb"}
    assert record["start"] == int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    async with _sup(tmp_path) as sup:
        assert set(sup.recorded()) == {"p"}
        ps = await sup.adopt("p")  # argv and policy from the record
        assert ps.state == "running" and ps.pid == pid and ps.policy.mode == ON_FAILURE
        assert "adopted" in ps.reason
        with pytest.raises(SupervisorError, match="already supervised"):
            await sup.adopt("p")
        # Not our child: its exit is noticed all the same (code unknown: a failure, so restarted).
        os.kill(pid, signal.SIGKILL)
        await until(lambda: ps.state == "running" and ps.pid not in (None, pid))
        assert ps.restarts == 1 and ps.history[-1].code is None
        assert json.loads((tmp_path / "run" / "p.json").read_text())["pid"] == ps.pid
        new = ps.pid
        await sup.stop("p", grace=2)
        assert ps.state == "stopped" and not _alive(new)
        assert not (tmp_path / "run" / "p.json").exists(), "the record goes with the process"


@arun
async def test_stop_kills_an_adopted_process_group(tmp_path, strays):
    child = tmp_path / "child.pid"
    pid = _orphan(tmp_path, strays, ["sh", "-c", f"sleep 60 & echo $! > {child}; wait"], mode=ALWAYS)
    wait_for(lambda: child.exists() and child.read_text().strip(), 5)
    grandchild = int(child.read_text())
    async with _sup(tmp_path) as sup:
        ps = await sup.adopt("p", policy=RestartPolicy(mode=ALWAYS, **FAST))
        assert ps.state == "running" and ps.pid == pid
        await sup.stop("p", grace=2)
        assert ps.state == "stopped" and ps.exit_code is None and ps.restarts == 0
        await until(lambda: not _alive(pid) and not _alive(grandchild))
        assert sup.recorded() == {}


@arun
async def test_polling_without_pidfd(tmp_path, strays, monkeypatch):
    pid = _orphan(tmp_path, strays, ["sleep", "30"], mode=NEVER)
    monkeypatch.delattr(os, "pidfd_open")  # an old kernel or Python: the exit is polled from /proc
    async with _sup(tmp_path) as sup:
        ps = await sup.adopt("p")
        assert ps.state == "running" and ps.pid == pid
        os.kill(pid, signal.SIGTERM)
        await sup.wait("p")
        assert ps.state == "exited" and ps.exit_code is None and "unknown" in ps.reason


@arun
async def test_died_while_unsupervised_follows_the_policy(tmp_path, strays):
    pid = _orphan(tmp_path, strays, ["sleep", "30"])
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not _alive(pid), 5)
    async with _sup(tmp_path) as sup:
        ps = await sup.adopt("p")  # on-failure: an unknown exit code is a failure
        await until(lambda: ps.state == "running")
        assert ps.pid != pid and ps.restarts == 1 and [e.code for e in ps.history] == [None]
        await sup.stop("p", grace=2)

    pid = _orphan(tmp_path, strays, ["sleep", "30"], name="q", mode=NEVER)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not _alive(pid), 5)
    async with _sup(tmp_path) as sup:
        ps = await sup.adopt("q")
        assert ps.state == "exited" and ps.pid is None and ps.exit_code is None
        assert "nobody supervised" in ps.reason and "never" in ps.reason
        assert sup.recorded() == {}


@arun
async def test_reused_pid_is_left_alone(tmp_path, strays):
    decoy = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        (tmp_path / "run").mkdir()
        # A record whose pid now names another process (another start time): a reused pid.
        (tmp_path / "run" / "p.json").write_text(json.dumps(
            {"name": "p", "pid": decoy.pid, "start": 1, "argv": ["sleep", "30"], "cwd": None, "restarts": 0,
             "policy": {"mode": "never", "max_restarts": 5, "backoff_base": 0.05, "backoff_cap": 1.0,
                        "flap_window": 30.0, "ok_codes": [0]}}))
        async with _sup(tmp_path) as sup:
            ps = await sup.adopt("p")
            assert ps.state == "exited" and ps.pid is None and ps.exit_code is None
            assert sup.recorded() == {}
            assert await sup.adopt("p") is None  # no record left
        assert decoy.poll() is None, "the process that got the pid is not ours: never signalled"
    finally:
        decoy.kill()
        decoy.wait(5)


@arun
async def test_spawn_refuses_a_second_copy_of_a_recorded_process(tmp_path, strays):
    pid = _orphan(tmp_path, strays, ["sleep", "30"])
    async with _sup(tmp_path) as sup:
        with pytest.raises(SupervisorError, match=f"still runs as pid {pid}"):
            await sup.spawn("p", ["sleep", "30"])
        assert _alive(pid)
        ps = await sup.adopt("p")
        assert ps.pid == pid
    assert not _alive(pid), "stopping the supervisor stops what it adopted"


# ------------------------------------------------------------------ AppHost (a node's applications)

_HOST = """
import asyncio, sys, types
from nodes.apps import AppHost

async def main():
    host = AppHost(types.SimpleNamespace(name="n1", node_id=7, root_endpoint=""), sys.argv[1])
    pdef = {"name": "daemon", "path": "sleep", "args": ["300"], "wait": "start", "block": "pb",
            "restart": {"policy": "always", "backoff": 0.05}}
    assert await host.run({"app": "a", "gen": 1, "processes": [pdef]}, 10) == "done"
    print(host.status({"app": "a"})["processes"][0]["pid"], flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""
RUN_ARGS = {"app": "a", "gen": 1, "processes": [
    {"name": "daemon", "path": "sleep", "args": ["300"], "wait": "start", "block": "pb",
     "restart": {"policy": "always", "backoff": 0.05}}]}


@arun
async def test_app_host_takes_back_on_join_and_fencing_cleanup_kills(tmp_path, strays):
    import types

    from nodes.apps import AppHost

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    helper = subprocess.Popen([sys.executable, "-c", _HOST, str(tmp_path)], stdout=subprocess.PIPE, env=env,
                              cwd=ROOT, text=True)
    try:
        pid = int(helper.stdout.readline())
        strays.append(pid)
    finally:
        helper.kill()
        helper.wait(5)
        helper.stdout.close()
    record = tmp_path / "apps" / "a" / ".snsbus" / "run" / "daemon.json"
    assert json.loads(record.read_text())["pid"] == pid
    host = AppHost(types.SimpleNamespace(name="n1", node_id=7, root_endpoint=""), tmp_path)
    try:
        host.set_upstream(None)  # the node joined (or not): its processes are taken back without any request
        await host.recover()
        [row] = host.status({"app": "a"})["processes"]
        assert row["state"] == "running" and row["pid"] == pid and row["block"] == "pb"
        # Supervised again: its death is noticed and the policy (always) restarts it.
        os.kill(pid, signal.SIGKILL)
        await until(lambda: json.loads(record.read_text())["pid"] != pid)
        new = json.loads(record.read_text())["pid"]
        assert host.status({"app": "a"})["processes"][0]["restarts"] == 1
        assert await host.run(RUN_ARGS, 10) == "done"  # the same deploy again starts nothing
        assert host.status({"app": "a"})["processes"][0]["pid"] == new
        # A node that was replaced while it was away is fenced: app.cleanup.
        assert await host.cleanup({"app": "a"}, 10) == "cleaned"
        assert not _alive(new) and not (tmp_path / "apps" / "a").exists()
    finally:
        await host.close()


# ------------------------------------------------------------------ end to end


SPEC = """<project name="adopt">
  <component name="c"><num_hosts>1</num_hosts><resource type="local" group="g"/></component>
  <experiment name="e"><component_block name="cb"><component name="c"/>
    <process_block name="pb">
      <process name="daemon" wait="start"><path>sh</path>
        <cmdline><arg>-c</arg><arg>echo started $$ >> {marks}; exec sleep 300</arg></cmdline>
        <restart policy="always" backoff="0.05"/></process>
    </process_block>
  </component_block></experiment>
</project>
"""


@pytest.fixture
def sdir(tmp_path, monkeypatch):
    from tools import cluster

    d = tmp_path / "state"
    monkeypatch.setenv("SNSBUS_STATE_DIR", str(d))
    monkeypatch.delenv("SNSBUS_ENDPOINT", raising=False)
    try:
        yield d
    finally:
        cluster.down(d, grace=1.0)


def test_restarted_node_takes_back_its_app(sdir, tmp_path, strays):
    from click.testing import CliRunner

    from tools import cluster
    from tools.ctl import main

    def ctl(*args):
        res = CliRunner().invoke(main, [*map(str, args), "--state-dir", str(sdir), "--json"])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    def daemon():
        rows = [r for r in ctl("status", "adopt")["processes"] if r["name"] == "daemon"]
        assert len(rows) <= 1, rows
        return rows[0] if rows else {}  # {}: the node did not answer (it is down)

    marks = tmp_path / "marks"
    spec = tmp_path / "adopt.xml"
    spec.write_text(SPEC.format(marks=marks))
    directory = tmp_path / "dir.xml"
    directory.write_text('<resources><resource name="a1" type="local" group="g"/></resources>')
    cluster.start_manager(sdir, port=0, heartbeat=0.2, misses=3)
    assert ctl("deploy", spec, "-r", directory)["phase"] == "running"
    before = daemon()
    pid = before["pid"]
    strays.append(pid)
    assert before["state"] == "running" and before["node"] == "a1" and _alive(pid)

    node = next(n for n in cluster.cluster_info(sdir)["nodes"] if n["name"] == "a1")
    assert cluster.kill_node(node["pid"], state_dir=sdir)  # SIGKILL: its app process survives it
    assert _alive(pid)
    cluster.start_named_node(sdir, "a1", group="g")
    after = wait_for(lambda: (lambda r: r if r.get("state") == "running" else None)(daemon()), timeout=10)
    assert after["pid"] == pid and "adopted" in after["reason"]
    assert ctl("apps")["apps"][0]["phase"] == "running"

    # A deploy sent again (app.run) starts nothing twice.
    assert ctl("deploy", spec, "-r", directory, "--force")["phase"] == "running"
    assert daemon()["pid"] == pid
    assert marks.read_text().splitlines() == [f"started {pid}"]

    ctl("stop", "adopt")
    wait_for(lambda: not _alive(pid), timeout=5)
    assert daemon()["state"] == "stopped"
    time.sleep(0.3)  # longer than the backoff: a restart would have happened by now
    assert daemon()["state"] == "stopped" and not _alive(pid)
    assert marks.read_text().splitlines() == [f"started {pid}"], "never started twice"
    ctl("cleanup", "adopt")


def test_a_node_dropped_without_a_spare_is_taken_back_when_it_returns(sdir, tmp_path, strays):
    """No spare matches, so the manager runs the app without the dead node; when the node comes back (and
    takes back its process) the manager puts it back in the app: status sees it and stop reaches it."""
    from click.testing import CliRunner

    from tools import cluster
    from tools.ctl import main

    def ctl(*args):
        res = CliRunner().invoke(main, [*map(str, args), "--state-dir", str(sdir), "--json"])
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    def daemon():
        rows = [r for r in ctl("status", "adopt")["processes"] if r["name"] == "daemon"]
        return rows[0] if rows else {}

    def events():
        return " | ".join(e if isinstance(e, str) else json.dumps(e) for e in ctl("status", "adopt")["events"])

    marks = tmp_path / "marks"
    spec = tmp_path / "adopt.xml"
    spec.write_text(SPEC.format(marks=marks))
    directory = tmp_path / "dir.xml"
    directory.write_text('<resources><resource name="a1" type="local" group="g"/></resources>')
    cluster.start_manager(sdir, port=0, heartbeat=0.2, misses=3)
    assert ctl("deploy", spec, "-r", directory)["phase"] == "running"
    pid = daemon()["pid"]
    strays.append(pid)
    node = next(n for n in cluster.cluster_info(sdir)["nodes"] if n["name"] == "a1")
    assert cluster.kill_node(node["pid"], state_dir=sdir)
    # The watch judges nodes 10 s after the manager started, then waits its grace.
    wait_for(lambda: "no spare node matches" in events(), timeout=30)
    assert daemon() == {}  # a1 is not in the app any more
    cluster.start_named_node(sdir, "a1", group="g")
    wait_for(lambda: "a1 (c) is back" in events() and daemon().get("state") == "running", timeout=20)
    assert daemon()["pid"] == pid and daemon()["node"] == "a1"
    assert marks.read_text().splitlines() == [f"started {pid}"], "taken back, not started again"
    ctl("stop", "adopt")
    wait_for(lambda: not _alive(pid), timeout=5)
    ctl("cleanup", "adopt")
