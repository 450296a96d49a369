"""Bootstrap over a real OpenSSH server on 127.0.0.1 (non-default port, key auth) into a real manager.

The sshd (``tools.sshd.TestSshd``) logs in as the unprivileged ``snsbus-ssh``
user, whose /usr/bin/python3 receives the shipped wheelhouse.  The wheelhouse
is built once and cached in build/wheelhouse.  Every process is reaped:
bus-nodes through ``stop_remote``, then whatever the sshd's sessions left
behind when the sshd stops, then the manager.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import wait_for
from tools import cluster, state
from tools.bootstrap import (
    BootstrapError,
    _check_target,
    _classify_ssh_failure,
    _Payload,
    _Target,
    admit,
    bootstrap,
    bootstrap_all,
    build_wheelhouse,
    stop_remote,
)
from tools.sshd import SshdError, TestSshd

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates the snsbus-ssh user and runs sshd"),
    # The first run builds the wheelhouse (compiles the extension) and installs it remotely.
    pytest.mark.timeout(300),
]


@pytest.fixture(scope="module")
def wheelhouse():
    return build_wheelhouse()


@pytest.fixture(scope="module")
def sshd():
    server = TestSshd()
    try:
        server.start()
    except SshdError as e:
        pytest.fail(f"{e}\n(scripts/test-deps.sh installs OpenSSH)")
    try:
        yield server
    finally:
        server.stop(grace=2.0)


@pytest.fixture(scope="module")
def remote_dir(sshd):
    """A fresh install directory in the test user's home, removed afterwards."""
    name = f".snsbus-test-{secrets.token_hex(4)}"
    try:
        yield f"~/{name}"
    finally:
        shutil.rmtree(sshd.home / name, ignore_errors=True)


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    sdir = tmp_path_factory.mktemp("state")
    entry = cluster.start_manager(sdir, port=0, heartbeat=0.2, misses=3)
    try:
        yield dict(entry, sdir=sdir)
    finally:
        cluster.down(sdir, grace=2.0)


@pytest.fixture
def ssh_opts(sshd, remote_dir):
    return {"identity_file": sshd.identity_file, "known_hosts": sshd.known_hosts, "remote_dir": remote_dir}


@pytest.fixture
def started(sshd, ssh_opts):
    """Names of the resources a test bootstraps; their bus-nodes are stopped afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        try:
            stop_remote(sshd.resource(name), grace=2.0, **ssh_opts)
        except BootstrapError:
            pass  # the sshd fixture's stop() ends whatever its sessions left running


def _members(manager: dict) -> dict[str, dict]:
    """The manager's members by name; a restarted node's live entry wins over its departed one."""
    with cluster.client(manager["sdir"]) as client:
        members = client.call("status")["members"]
    return {m["name"]: m for m in sorted(members, key=lambda m: m["state"] == "alive")}


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
    except OSError:
        return []


def _bus_nodes(uid: int, name: str) -> list[int]:
    """Live bus-node processes of ``uid`` named ``name``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        except OSError:
            continue
        if not any(a.endswith(b"/bus-node") for a in argv) or b"--name" not in argv:
            continue
        i = argv.index(b"--name")
        if argv[i + 1:i + 2] == [name.encode()] and state.pid_alive(int(entry)):
            pids.append(int(entry))
    return pids


def _boot(resource, manager, **kw):
    """bootstrap() with CURVE: the node pins the manager's key, then its own key is admitted."""
    res = bootstrap(resource, manager["control"], manager_key=manager["keys"]["manager_key"], **kw)
    with cluster.client(manager["sdir"]) as client:
        admit(client.call, f"ssh-{resource.name}", res.key)
    return res


def test_bootstrap_installs_starts_joins_and_is_idempotent(sshd, wheelhouse, manager, ssh_opts, started):
    resource = sshd.resource("ssh-node-1", group="web", attrs=(("rack", "r1"),))
    started.append(resource.name)
    uid = pwd.getpwnam(sshd.user).pw_uid

    first = _boot(resource, manager, wheelhouse=wheelhouse, **ssh_opts)
    assert first.installed and first.state == "started"
    assert first.host == f"{sshd.user}@127.0.0.1:{sshd.port}" and sshd.port != 22
    install = sshd.home / ssh_opts["remote_dir"].removeprefix("~/")
    assert (install / "venv" / "bin" / "bus-node").is_file()
    assert first.log == str(install / "logs" / "ssh-node-1.log")
    assert _bus_nodes(uid, "ssh-node-1") == [first.pid]

    # The node joins the real manager under the resource's name, with its group and attributes.
    cluster.wait_members(manager["control"], 1, timeout=30, state_dir=manager["sdir"])
    member = wait_for(lambda: _members(manager).get("ssh-node-1"), timeout=10)
    assert member["state"] == "alive" and member["pid"] == first.pid
    assert member["attrs"] == {"group": "web", "rack": "r1"}

    # The remote install runs the compiled fast path from the shipped wheel.
    probe = subprocess.run(
        ["ssh", "-T", "-p", str(sshd.port), "-i", sshd.identity_file, "-o", "BatchMode=yes",
         "-o", f"UserKnownHostsFile={sshd.known_hosts}", "-l", sshd.user, "127.0.0.1",
         f"{ssh_opts['remote_dir']}/venv/bin/python -c 'import core.fastpath as f; print(f.IMPLEMENTATION)'"],
        capture_output=True, text=True, timeout=30)
    assert probe.stdout.strip() == "cython", probe.stderr

    # A second bootstrap neither reinstalls nor starts a second bus-node.
    again = _boot(resource, manager, wheelhouse=wheelhouse, **ssh_opts)
    assert again.key == first.key  # the node keeps its key (REMOTE_DIR/keys)
    assert (again.installed, again.state, again.pid, again.started) == (False, "running", first.pid, False)
    assert _bus_nodes(uid, "ssh-node-1") == [first.pid]

    # Stopping it: the manager sees it leave.
    stopped = stop_remote(resource, **ssh_opts)
    assert (stopped.how, stopped.pid) == ("terminated", first.pid)
    assert _bus_nodes(uid, "ssh-node-1") == []
    wait_for(lambda: _members(manager)["ssh-node-1"]["state"] != "alive", timeout=15)
    assert stop_remote(resource, **ssh_opts).how == "not running"


def test_bootstrap_all_in_parallel(sshd, wheelhouse, manager, ssh_opts, started):
    resources = [sshd.resource(f"ssh-par-{i}") for i in range(3)]
    started.extend(r.name for r in resources)
    results = bootstrap_all(resources, manager["control"], wheelhouse=wheelhouse,
                            manager_key=manager["keys"]["manager_key"], **ssh_opts)
    assert list(results) == [r.name for r in resources]
    assert all(not isinstance(r, BootstrapError) for r in results.values()), results
    # One host, one install directory: the three bus-nodes share one key (like an ssh host key), even though
    # they started at the same moment.  Admitted once (earlier tests may have admitted it already), it lets
    # all three in.
    keys = {res.key for res in results.values()}
    assert len(keys) == 1 and None not in keys
    key = keys.pop()
    with cluster.client(manager["sdir"]) as client:
        admitted = [admit(client.call, f"ssh-{r.name}", key) for r in resources]
        assert admitted.count(True) <= 1 and admitted[1:] == [False, False]
        assert [k["state"] for k in client.call("keys", op="list")["keys"] if k["key"] == key] == ["accepted"]
    uid = pwd.getpwnam(sshd.user).pw_uid
    for r in resources:
        assert _bus_nodes(uid, r.name) == [results[r.name].pid]
    wait_for(lambda: all(_members(manager).get(r.name, {}).get("state") == "alive"
                         for r in resources), timeout=30)


def test_stale_install_is_replaced_and_the_node_restarted(sshd, wheelhouse, manager, ssh_opts, started):
    resource = sshd.resource("ssh-upgrade")
    started.append(resource.name)
    first = _boot(resource, manager, wheelhouse=wheelhouse, **ssh_opts)
    install = sshd.home / ssh_opts["remote_dir"].removeprefix("~/")
    old_venv = (install / "venv").resolve()
    (old_venv / ".snsbus-digest").write_text("an older version\n")  # as if another wheelhouse had been installed

    second = _boot(resource, manager, wheelhouse=wheelhouse, **ssh_opts)
    assert second.installed and second.state == "restarted" and second.pid != first.pid
    assert not state.pid_alive(first.pid)
    assert (install / "venv").resolve() != old_venv
    wait_for(lambda: _members(manager).get("ssh-upgrade", {}).get("pid") == second.pid, timeout=30)
    # The old install is removed unless another running bus-node still uses it.
    in_use = any(str(old_venv) + "/" in " ".join(map(str, _cmdline(p))) for p in sshd.processes())
    assert in_use or not old_venv.exists()


def test_pip_failure_names_the_host_and_quotes_pip(sshd, wheelhouse, ssh_opts, tmp_path):
    partial = tmp_path / "wheels"
    partial.mkdir()
    for whl in wheelhouse.glob("snsbus-*.whl"):  # without its dependencies: pip cannot resolve them offline
        shutil.copy(whl, partial)
    opts = dict(ssh_opts, remote_dir=ssh_opts["remote_dir"] + "-pip")
    try:
        with pytest.raises(BootstrapError) as err:
            bootstrap(sshd.resource("ssh-pip"), "tcp://127.0.0.1:9", wheelhouse=partial, **opts)
    finally:
        shutil.rmtree(sshd.home / opts["remote_dir"].removeprefix("~/"), ignore_errors=True)
    e = err.value
    assert e.reason == "pip" and e.name == "ssh-pip"
    first_line = str(e).splitlines()[0]
    assert first_line.startswith(f"ssh-pip ({sshd.user}@127.0.0.1:{sshd.port}): ") and "pip install" in first_line
    assert "pyzmq" in e.tail or "msgpack" in e.tail or "No matching distribution" in e.tail, str(e)


def test_bad_key_is_an_authentication_error(sshd, wheelhouse, ssh_opts):
    opts = dict(ssh_opts, identity_file=sshd.new_key("stranger"))
    with pytest.raises(BootstrapError) as err:
        bootstrap(sshd.resource("ssh-badkey"), "tcp://127.0.0.1:9", wheelhouse=wheelhouse, **opts)
    first_line = str(err.value).splitlines()[0]
    assert err.value.reason == "auth"
    assert f"127.0.0.1:{sshd.port}" in first_line and "authentication" in first_line


def test_closed_port_is_unreachable(sshd, wheelhouse, ssh_opts):
    port = cluster.free_port()
    resource = dataclasses.replace(sshd.resource("ssh-closed"), port=port)
    with pytest.raises(BootstrapError) as err:
        bootstrap(resource, "tcp://127.0.0.1:9", wheelhouse=wheelhouse, timeout=20, **ssh_opts)
    first_line = str(err.value).splitlines()[0]
    assert err.value.reason == "unreachable"
    assert f"127.0.0.1:{port}" in first_line and "unreachable" in first_line


def test_unknown_host_key_is_refused(sshd, wheelhouse, ssh_opts, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(BootstrapError) as err:
        bootstrap(sshd.resource("ssh-hostkey"), "tcp://127.0.0.1:9", wheelhouse=wheelhouse,
                  **dict(ssh_opts, known_hosts=str(empty)))
    assert err.value.reason == "hostkey" and "host key" in str(err.value).splitlines()[0]


@pytest.mark.parametrize("stderr, reason", [
    ("u@h: Permission denied (publickey).", "auth"),
    ("ssh: connect to host h port 1: Connection refused", "unreachable"),
    ("ssh: connect to host 10.255.255.1 port 22: Connection timed out", "unreachable"),
    ("ssh: Could not resolve hostname nowhere.invalid: Name or service not known", "unreachable"),
    ("Host key verification failed.", "hostkey"),
    ("kex_exchange_identification: Connection closed by remote host", "ssh"),
    ("something else entirely", "ssh"),
])
def test_ssh_failures_are_classified(stderr, reason):
    assert _classify_ssh_failure(stderr)[0] == reason


def test_a_python_that_does_not_match_the_wheelhouse_is_refused(sshd, wheelhouse):
    target = _Target(sshd.resource("ssh-old-python"))
    probe = {"impl": "cpython", "version": [3, 9], "machine": "aarch64", "python": "/usr/bin/python3"}
    with pytest.raises(BootstrapError) as err:
        _check_target(target, _Payload(wheelhouse), probe)
    line = str(err.value).splitlines()[0]
    assert err.value.reason == "incompatible"
    assert line.startswith("ssh-old-python (") and "cpython 3.9 on aarch64" in line and "CPython 3.11" in line


def test_deploy_on_an_ssh_resource_end_to_end(sshd, wheelhouse, manager, tmp_path):
    """`bus-ctl deploy` bootstraps the ssh resource, then deploys and runs a process there as its user."""
    import json

    from click.testing import CliRunner

    from tools.ctl import main

    directory = tmp_path / "dir.xml"
    directory.write_text(f'<resources><resource name="ssh-app" type="ssh" address="{sshd.address}" '
                         f'port="{sshd.port}" user="{sshd.user}" group="remote"/></resources>')
    spec = tmp_path / "remote.xml"
    spec.write_text("""<project name="remote">
  <component name="c"><num_hosts>1</num_hosts><resource type="ssh" group="remote"/></component>
  <experiment name="e"><component_block name="cb"><component name="c"/>
    <process_block name="pb"><process name="who"><path>sh</path>
      <cmdline><arg>-c</arg><arg>echo "$SNSBUS_NODE as $(id -un)"</arg></cmdline></process></process_block>
  </component_block></experiment>
</project>""")
    common = ["--endpoint", manager["control"], "--state-dir", str(manager["sdir"])]
    try:
        res = CliRunner().invoke(main, ["deploy", str(spec), "-r", str(directory), "--identity", sshd.identity_file,
                                        "--known-hosts", sshd.known_hosts, "--json", *common])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["phase"] == "completed"
        res = CliRunner().invoke(main, ["logs", "remote", "--json", *common])
        assert json.loads(res.stdout)["logs"]["ssh-app"]["who"]["text"] == f"ssh-app as {sshd.user}\n"
        res = CliRunner().invoke(main, ["cleanup", "remote", *common])
        assert res.exit_code == 0, res.output
        assert not (sshd.home / ".snsbus" / "node" / "ssh-app" / "apps" / "remote").exists()
    finally:
        try:
            stop_remote(sshd.resource("ssh-app"), grace=2.0, identity_file=sshd.identity_file,
                        known_hosts=sshd.known_hosts)
        except BootstrapError:
            pass
        shutil.rmtree(sshd.home / ".snsbus", ignore_errors=True)
