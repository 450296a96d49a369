"""Deploying applications on a real local cluster: bus-ctl deploy/apps/status/logs/stop/start/cleanup.

Real manager and bus-node processes on loopback, packages pulled over the data
plane, real supervised processes; everything is reaped by the ``state_dir`` fixture.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import wait_for
from tools import cluster, state
from tools.ctl import main

ROOT = Path(__file__).resolve().parents[2]


def _directory(path: Path, names, group="g") -> Path:
    rows = "\n".join(f'  <resource name="{n}" type="local" group="{group}"/>' for n in names)
    path.write_text(f"<resources>\n{rows}\n</resources>\n")
    return path


def _cli(*args, ok=True):
    res = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    return res


def _json(*args, ok=True):
    res = _cli(*args, "--json", ok=ok)
    return json.loads(res.stdout)


@pytest.fixture
def manager(state_dir):
    return cluster.start_manager(state_dir, port=0, heartbeat=0.2, misses=3)


def _node_pid(state_dir, name) -> int:
    info = cluster.cluster_info(state_dir)
    return next(n["pid"] for n in info["nodes"] if n["name"] == name)


def _procs(status: dict) -> dict:
    return {(r["node"], r["name"]): r for r in status["processes"]}


def test_simple_example_deploy_logs_twice_cleanup(state_dir, manager, monkeypatch):
    monkeypatch.chdir(ROOT)
    res = _cli("deploy", "examples/simple.xml", "-r", "examples/directory.xml", "--state-dir", state_dir)
    assert "simple (gen 1): completed on 2 node(s)" in res.stdout
    assert "install/Cluster1" in res.stdout and "cb1/p1" in res.stdout

    logs = _cli("logs", "simple", "--state-dir", state_dir).stdout
    assert "---- local1, local2 : cat ----" in logs  # identical output grouped
    assert logs.count("Hello from a Plush-style package!") == 1

    st = _json("status", "simple", "--state-dir", state_dir)
    procs = _procs(st)
    assert set(procs) == {("local1", "cat"), ("local2", "cat")}
    assert all(p["state"] == "exited" and p["exit_code"] == 0 for p in procs.values())

    # The same spec again: nothing is started twice.
    again = _cli("deploy", "examples/simple.xml", "-r", "examples/directory.xml", "--state-dir", state_dir)
    assert "already deployed" in again.stdout
    logs = _json("logs", "simple", "--state-dir", state_dir)
    assert all(v["cat"]["text"].count("Hello") == 1 for v in logs["logs"].values())

    apps = _json("apps", "--state-dir", state_dir)["apps"]
    assert [(a["name"], a["phase"]) for a in apps] == [("simple", "completed")]

    nodes_dir = state_dir / cluster.NODE_DIR
    assert (nodes_dir / "local1" / "apps" / "simple" / "simple" / "hello.txt").is_file()
    out = _json("cleanup", "simple", "--state-dir", state_dir)
    assert out["removed"] and not out["failed"] and not out["missing"]
    assert not any((nodes_dir / n / "apps" / "simple").exists() for n in ("local1", "local2", "local3", "local4"))
    assert _json("apps", "--state-dir", state_dir)["apps"] == []
    assert _cli("cleanup", "simple", "--state-dir", state_dir).exit_code == 0  # idempotent


def test_barrier_orders_blocks_across_components(state_dir, manager, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    spec = tmp_path / "barrier.xml"
    spec.write_text(f"""<project name="bar">
  <component name="first"><num_hosts>2</num_hosts><resource type="local" group="a"/></component>
  <component name="second"><num_hosts>2</num_hosts><resource type="local" group="b"/></component>
  <experiment name="e">
    <component_block name="one">
      <component name="first"/>
      <process_block name="write">
        <process name="writer">
          <path>sh</path>
          <cmdline><arg>-c</arg><arg>sleep 0.$(( $$ % 5 + 3 )); date +%s.%N > {marks}/a-$SNSBUS_NODE</arg></cmdline>
        </process>
      </process_block>
      <barrier_block name="sync_one"><barrier name="sync"/></barrier_block>
    </component_block>
    <component_block name="two">
      <component name="second"/>
      <barrier name="sync"/>
      <process_block name="read">
        <process name="reader">
          <path>sh</path>
          <cmdline><arg>-c</arg><arg>test "$(ls {marks} | grep -c '^a-')" -eq 2 &amp;&amp; date +%s.%N > {marks}/b-$SNSBUS_NODE</arg></cmdline>
        </process>
      </process_block>
    </component_block>
  </experiment>
</project>
""")
    d = tmp_path / "dir.xml"
    d.write_text("""<resources>
  <resource name="a1" type="local" group="a"/><resource name="a2" type="local" group="a"/>
  <resource name="b1" type="local" group="b"/><resource name="b2" type="local" group="b"/>
</resources>""")
    prog = _json("deploy", spec, "-r", d, "--state-dir", state_dir)
    assert prog["phase"] == "completed", prog
    assert prog["barriers"]["sync"]["need"] == 4 and prog["barriers"]["sync"]["released"]
    a = [float((marks / f"a-{n}").read_text()) for n in ("a1", "a2")]
    b = [float((marks / f"b-{n}").read_text()) for n in ("b1", "b2")]
    assert min(b) > max(a)  # no process of block 2 started before all of block 1 reached the barrier


RESTARTS = """<project name="{name}">
  <component name="c"><num_hosts>1</num_hosts><resource type="local" group="g"/></component>
  <experiment name="e"><component_block name="cb"><component name="c"/>
    <process_block name="pb">{process}</process_block>
  </component_block></experiment>
</project>"""


def test_restarts_flapping_stop_start(state_dir, manager, tmp_path):
    d = _directory(tmp_path / "dir.xml", ["r1"])
    flappy = tmp_path / "flappy.xml"
    flappy.write_text(RESTARTS.format(name="flappy", process="""
      <process name="crash"><path>sh</path><cmdline><arg>-c</arg><arg>echo boom; exit 3</arg></cmdline>
        <restart policy="on-failure" max="2" backoff="0.05" flap_window="30"/></process>"""))
    res = _cli("deploy", flappy, "-r", d, "--state-dir", state_dir, ok=False)
    assert res.exit_code == 1
    assert "FAILED cb/pb on r1: process 'crash'" in res.stdout and "flapping" in res.stdout
    st = _json("status", "flappy", "--state-dir", state_dir)
    crash = _procs(st)[("r1", "crash")]
    assert crash["state"] == "flapping" and crash["restarts"] == 2 and crash["exit_code"] == 3
    logs = _json("logs", "flappy", "--state-dir", state_dir)
    assert logs["logs"]["r1"]["crash"]["text"].count("boom") == 3

    svc = tmp_path / "svc.xml"
    svc.write_text(RESTARTS.format(name="svc", process="""
      <process name="daemon" wait="start"><path>sleep</path><cmdline><arg>300</arg></cmdline>
        <restart policy="always" backoff="0.05"/></process>"""))
    prog = _json("deploy", svc, "-r", d, "--state-dir", state_dir)
    assert prog["phase"] == "running"
    pid = _procs(_json("status", "svc", "--state-dir", state_dir))[("r1", "daemon")]["pid"]
    assert state.pid_alive(pid)
    _cli("stop", "svc", "--state-dir", state_dir)
    wait_for(lambda: not state.pid_alive(pid), timeout=5)
    time.sleep(0.5)  # longer than the backoff: a restart would have happened by now
    daemon = _procs(_json("status", "svc", "--state-dir", state_dir))[("r1", "daemon")]
    assert daemon["state"] == "stopped" and daemon["pid"] is None
    _cli("start", "svc", "--state-dir", state_dir)
    daemon = _procs(_json("status", "svc", "--state-dir", state_dir))[("r1", "daemon")]
    assert daemon["state"] == "running" and daemon["pid"] != pid
    new_pid = daemon["pid"]
    _cli("cleanup", "svc", "--state-dir", state_dir)
    wait_for(lambda: not state.pid_alive(new_pid), timeout=5)
    _cli("cleanup", "flappy", "--state-dir", state_dir)


def test_dead_node_mid_deploy_is_replaced_by_a_spare(state_dir, manager, tmp_path):
    d = _directory(tmp_path / "dir.xml", ["s1", "s2", "s3"])
    spec = tmp_path / "spare.xml"
    spec.write_text(RESTARTS.format(name="spare", process="""
      <process name="work"><path>sh</path><cmdline><arg>-c</arg><arg>sleep 2; echo done on $SNSBUS_NODE</arg>
      </cmdline></process>""").replace("<num_hosts>1</num_hosts>", "<num_hosts>2</num_hosts>"))
    started = _json("deploy", spec, "-r", d, "--no-wait", "--state-dir", state_dir)
    assert started["assignment"] == {"c": ["s1", "s2"]}
    with cluster.client(state_dir, manager["control"]) as client:
        wait_for(lambda: client.call("progress", app="spare")["phases"][0]["state"] == "running", timeout=10)
        time.sleep(0.3)  # the processes are running now
        assert cluster.kill_node(_node_pid(state_dir, "s2"), state_dir=state_dir)
        prog = wait_for(lambda: (lambda p: p if p["phase"] != "deploying" else None)(
            client.call("progress", app="spare")), timeout=20)
    assert prog["phase"] == "completed", prog
    assert prog["replaced"] == {"s2": "s3"} and prog["assignment"] == {"c": ["s1", "s3"]}
    logs = _json("logs", "spare", "--state-dir", state_dir)["logs"]
    assert logs["s3"]["work"]["text"] == "done on s3\n" and logs["s1"]["work"]["text"] == "done on s1\n"


def _tar(path: Path, members: dict) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def test_unsafe_archive_is_rejected_and_nothing_escapes(state_dir, manager, tmp_path):
    d = _directory(tmp_path / "dir.xml", ["u1"])
    _tar(tmp_path / "evil.tar", {"ok.txt": b"fine\n", "../escaped.txt": b"gotcha\n"})
    spec = tmp_path / "evil.xml"
    spec.write_text(RESTARTS.format(name="evil", process="""
      <process name="p"><path>true</path></process>""").replace(
        '<component name="c">', '<software name="s" type="tar"><package name="evil" type="file">'
                                '<path>evil.tar</path></package></software><component name="c">').replace(
        '<resource type="local" group="g"/>', '<resource type="local" group="g"/><software name="s"/>'))
    res = _cli("deploy", spec, "-r", d, "--state-dir", state_dir, ok=False)
    assert res.exit_code == 1
    assert "FAILED install/c on u1: package 'evil' of 's'" in res.stdout and "../escaped.txt" in res.stdout
    app_dir = state_dir / cluster.NODE_DIR / "u1" / "apps" / "evil"
    assert not (app_dir / "ok.txt").exists()  # validated before anything was written
    assert not (app_dir.parent / "escaped.txt").exists() and not list(state_dir.rglob("escaped.txt"))


def test_bad_spec_names_file_line_column_and_deploys_nothing(state_dir, manager, tmp_path):
    d = _directory(tmp_path / "dir.xml", ["x1"])
    spec = tmp_path / "bad.xml"
    spec.write_text('<project name="bad">\n  <component name="c">\n    <num_hosts>two</num_hosts>\n'
                    '  </component>\n</project>\n')
    res = _cli("deploy", spec, "-r", d, "--state-dir", state_dir, ok=False)
    assert res.exit_code == 6
    assert f"{spec}:3:" in res.output and "num_hosts" in res.output
    assert _json("apps", "--state-dir", state_dir)["apps"] == []

    missing = tmp_path / "missing.xml"
    missing.write_text(RESTARTS.format(name="m", process="<process name='p'><path>true</path></process>")
                       .replace("<num_hosts>1</num_hosts>", "<num_hosts>3</num_hosts>"))
    res = _cli("deploy", missing, "-r", d, "--state-dir", state_dir, ok=False)
    assert res.exit_code == 6 and "wants 3 host(s) but only 1 live node(s) match" in res.output


def test_manager_restart_keeps_applications_and_processes(state_dir, manager, tmp_path):
    d = _directory(tmp_path / "dir.xml", ["k1"])
    svc = tmp_path / "svc.xml"
    svc.write_text(RESTARTS.format(name="keep", process="""
      <process name="daemon" wait="start"><path>sleep</path><cmdline><arg>300</arg></cmdline></process>"""))
    assert _json("deploy", svc, "-r", d, "--state-dir", state_dir)["phase"] == "running"
    pid = _procs(_json("status", "keep", "--state-dir", state_dir))[("k1", "daemon")]["pid"]
    port = int(manager["control"].rsplit(":", 1)[1])
    os.kill(manager["pid"], 9)
    wait_for(lambda: not state.pid_alive(manager["pid"]), timeout=5)
    wait_for(lambda: cluster._port_free("127.0.0.1", port), timeout=10)
    cluster.start_manager(state_dir, port=port, heartbeat=0.2, misses=3)
    with cluster.client(state_dir, manager["control"]) as client:
        wait_for(lambda: client.call("ping")["members"] == 1, timeout=15)
    apps = _json("apps", "--state-dir", state_dir)["apps"]
    assert [(a["name"], a["phase"]) for a in apps] == [("keep", "running")]
    daemon = _procs(_json("status", "keep", "--state-dir", state_dir))[("k1", "daemon")]
    assert daemon["pid"] == pid and daemon["state"] == "running" and state.pid_alive(pid)
    _cli("cleanup", "keep", "--state-dir", state_dir)
    wait_for(lambda: not state.pid_alive(pid), timeout=5)


def test_multi_example_install_barrier_services(state_dir, manager, monkeypatch):
    monkeypatch.chdir(ROOT)
    res = _cli("deploy", "examples/multi.xml", "-r", "examples/directory.xml", "--state-dir", state_dir)
    assert "multi (gen 1): running on 4 node(s)" in res.stdout
    nodes_dir = state_dir / cluster.NODE_DIR
    for n in ("local1", "local2", "local3", "local4"):  # the install command ran everywhere
        assert (nodes_dir / n / "apps" / "multi" / "tools" / "INSTALLED").read_text() == f"installed on {n}\n"
    st = _json("status", "multi", "--state-dir", state_dir)
    procs = _procs(st)
    assert {k for k in procs} == {("local1", "server"), ("local2", "server"), ("local3", "client"),
                                  ("local4", "client"), ("local3", "summary"), ("local4", "summary")}
    servers = [procs[(n, "server")] for n in ("local1", "local2")]
    assert all(s["state"] == "running" and state.pid_alive(s["pid"]) for s in servers)
    logs = _json("logs", "multi", "--process", "summary", "--state-dir", state_dir)["logs"]
    assert {n: v["summary"]["text"] for n, v in logs.items()} == {"local3": "all done\n", "local4": "all done\n"}
    _cli("cleanup", "multi", "--state-dir", state_dir)
    for s in servers:
        wait_for(lambda: not state.pid_alive(s["pid"]), timeout=5)
    assert not any((nodes_dir / n / "apps" / "multi").exists() for n in ("local1", "local2", "local3", "local4"))


def test_web_package_pinned_by_sha256_and_tampered_copy_refused(state_dir, manager, tmp_path):
    import functools
    import hashlib
    import http.server
    import threading

    www = tmp_path / "www"
    www.mkdir()
    _tar(www / "app.tar", {"data/msg.txt": b"served over http\n"})
    good = hashlib.sha256((www / "app.tar").read_bytes()).hexdigest()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/app.tar"
        d = _directory(tmp_path / "dir.xml", ["w1"])

        def spec(name, sha):
            path = tmp_path / f"{name}.xml"
            path.write_text(RESTARTS.format(name=name, process="""
              <process name="show"><path>cat</path><cmdline><arg>data/msg.txt</arg></cmdline></process>""").replace(
                '<component name="c">', f'<software name="s"><package name="web" type="web" sha256="{sha}">'
                                        f'<path>{url}</path></package></software><component name="c">').replace(
                '<resource type="local" group="g"/>', '<resource type="local" group="g"/><software name="s"/>'))
            return path

        prog = _json("deploy", spec("webok", good), "-r", d, "--state-dir", state_dir)
        assert prog["phase"] == "completed", prog
        assert _json("logs", "webok", "--state-dir", state_dir)["logs"]["w1"]["show"]["text"] == "served over http\n"

        _tar(www / "app.tar", {"data/msg.txt": b"evil twin\n"})  # the origin's copy is replaced
        res = _cli("deploy", spec("webbad", good), "-r", d, "--state-dir", state_dir, ok=False)
        assert res.exit_code == 6 and "sha256 mismatch" in res.output and good in res.output
        assert [a["name"] for a in _json("apps", "--state-dir", state_dir)["apps"]] == ["webok"]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_logs_follow_streams_new_output(state_dir, manager, tmp_path):
    import subprocess
    import sys

    d = _directory(tmp_path / "dir.xml", ["f1"])
    spec = tmp_path / "ticker.xml"
    spec.write_text(RESTARTS.format(name="ticker", process="""
      <process name="tick" wait="start"><path>sh</path>
        <cmdline><arg>-c</arg><arg>i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 0.2; done</arg></cmdline>
      </process>"""))
    assert _json("deploy", spec, "-r", d, "--state-dir", state_dir)["phase"] == "running"
    proc = subprocess.Popen([sys.executable, "-m", "tools.ctl", "logs", "ticker", "--follow", "--state-dir",
                             str(state_dir)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        lines = [proc.stdout.readline() for _ in range(6)]
    finally:
        proc.terminate()
        proc.wait(5)
        proc.stdout.close()
    ticks = [int(line.rsplit(" ", 1)[1]) for line in lines if "tick" in line]
    assert all(line.startswith("f1 tick| tick ") for line in lines), lines
    assert ticks == list(range(ticks[0], ticks[0] + 6))  # in order, nothing repeated or skipped
    _cli("cleanup", "ticker", "--state-dir", state_dir)


def test_running_app_heals_a_dead_node_on_a_spare(state_dir, manager, tmp_path):
    """The manager restarts what a dead node ran (e.g. a front end) on a spare matching node."""
    d = _directory(tmp_path / "dir.xml", ["h1", "h2"])
    svc = tmp_path / "svc.xml"
    svc.write_text(RESTARTS.format(name="heal", process="""
      <process name="daemon" wait="start"><path>sleep</path><cmdline><arg>300</arg></cmdline></process>"""))
    prog = _json("deploy", svc, "-r", d, "--state-dir", state_dir)
    assert prog["phase"] == "running" and prog["assignment"] == {"c": ["h1"]}
    old = _procs(_json("status", "heal", "--state-dir", state_dir))[("h1", "daemon")]["pid"]
    assert cluster.kill_node(_node_pid(state_dir, "h1"), state_dir=state_dir)
    with cluster.client(state_dir, manager["control"]) as client:
        prog = wait_for(lambda: (lambda p: p if p["assignment"] == {"c": ["h2"]} and any(
            "healed" in e[1] for e in p["events"]) else None)(client.call("progress", app="heal")), timeout=30)
    assert prog["replaced"] == {"h1": "h2"} and prog["phase"] == "running"
    daemon = _procs(_json("status", "heal", "--state-dir", state_dir))[("h2", "daemon")]
    assert daemon["state"] == "running" and daemon["pid"] != old
    os.kill(old, 9)  # the killed node's own process group is gone; its app process survived it
    _cli("cleanup", "heal", "--state-dir", state_dir)
