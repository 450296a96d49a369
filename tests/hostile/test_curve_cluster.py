"""CurveZMQ on a real cluster (`bus-ctl up`, real manager and bus-node processes, loopback).

Who gets in: the keys `bus-ctl up` made and admitted; not a client without a key,
with an unknown key, pinned to the wrong manager key, or speaking plain ZeroMQ.
A new node is pending until `bus-ctl keys accept`, joins then, and exits 4 when
`bus-ctl keys revoke` takes its key away.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
from click.testing import CliRunner

from bus import protocol as p
from bus.security import KeyPair, Security, client_security, fingerprint, read_key_file
from tests.helpers import wait_for
from tools import cluster
from tools.client import AUTH, CtlClient, CtlError
from tools.ctl import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def secure(tmp_path):
    sdir = tmp_path / "state"
    up = cluster.up(3, max_children=2, port=0, state_dir=sdir, heartbeat=0.2, misses=3)
    try:
        yield sdir, up
    finally:
        cluster.down(sdir, grace=2.0)


def _ctl(sdir, *args):
    return CliRunner().invoke(main, [*args, "--state-dir", str(sdir)])


def test_up_makes_private_keys_and_only_admitted_keys_get_in(secure):
    sdir, up = secure
    control = up["manager"]["control"]
    keys = up["keys"]
    mk = read_key_file(sdir / "keys" / "manager.pub")[0]
    assert json.loads((sdir / "manager.json").read_text())["key"] == keys["manager_key"]
    for f in (sdir / "keys" / "manager.key", sdir / "client.key", sdir / "nodes" / "keys" / "identity.key"):
        assert f.stat().st_mode & 0o777 == 0o600, f
    assert (sdir / "keys").stat().st_mode & 0o777 == 0o700
    # The nodes' endpoints carry their key; the manager's stay plain (everyone pins it).
    members = _ctl(sdir, "status", "--json")
    assert members.exit_code == 0, members.output
    assert "#" not in control
    listed = json.loads(_ctl(sdir, "keys", "list", "--json").stdout)
    assert {k["name"] for k in listed["keys"] if k["state"] == "accepted"} >= {"bus-ctl", "local-nodes"}

    def refused(security) -> CtlError:
        with pytest.raises(CtlError) as err, CtlClient(control, timeout=2, connect_timeout=1.5,
                                                        security=security) as c:
            c.call("ping")
        return err.value

    plain = refused(None)
    assert plain.code == AUTH and "requires CURVE" in str(plain)
    stranger = KeyPair.generate()
    unknown = refused(Security(stranger, manager_key=mk))
    assert unknown.code == AUTH and "refused this client's key" in str(unknown)
    wrong = refused(Security(KeyPair.generate(), manager_key=KeyPair.generate().public))
    assert wrong.code == AUTH and "manager key is wrong" in str(wrong)
    # The unknown key knocked: it is pending, with where it came from, and nothing else changed.
    listed = json.loads(_ctl(sdir, "keys", "list", "--json").stdout)
    pending = [k for k in listed["keys"] if k["state"] == "pending"]
    assert [k["fingerprint"] for k in pending] == [fingerprint(stranger.public)]
    assert pending[0]["address"] == "127.0.0.1"
    # A raw ZeroMQ client that ignores the handshake never reaches the control API.
    ctx = zmq.Context()
    try:
        raw = ctx.socket(zmq.DEALER)
        raw.linger = 0
        raw.connect(control)
        raw.send_multipart(p.encode(p.MsgType.CTL_REQUEST, {"cmd": "ping", "args": {}}))
        assert raw.poll(1000) == 0
        raw.close()
    finally:
        ctx.term()
    with cluster.client(sdir, timeout=5) as c:  # bus-ctl's own key still gets in
        assert c.call("ping")["members"] == 3


def test_a_new_node_is_pending_joins_when_accepted_and_exits_4_when_revoked(secure, tmp_path):
    sdir, up = secure
    control = up["manager"]["control"]
    kdir = tmp_path / "web-7" / "keys"
    kdir.mkdir(parents=True)
    shutil.copy(sdir / "keys" / "manager.pub", kdir / "manager.pub")
    log = open(tmp_path / "web-7.log", "wb")
    node = subprocess.Popen([sys.executable, "-m", "nodes.cli", "--join", control, "--name", "web-7",
                             "--state-dir", str(tmp_path / "web-7")], cwd=ROOT, stdout=log, stderr=log,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        key = wait_for(lambda: (kdir / "identity.key").exists() and read_key_file(kdir / "identity.key")[0], 10)
        fp = fingerprint(key)

        def pending():
            listed = json.loads(_ctl(sdir, "keys", "list", "--json").stdout)["keys"]
            return any(k["fingerprint"] == fp and k["state"] == "pending" for k in listed)
        wait_for(pending, timeout=15)
        with cluster.client(sdir, timeout=5) as c:
            assert c.call("ping")["members"] == 3  # refused while pending
            res = _ctl(sdir, "keys", "accept", fp, "--name", "web-7")
            assert res.exit_code == 0 and "accepted web-7" in res.stdout, res.output
            wait_for(lambda: c.call("ping")["members"] == 4, timeout=15)  # its next retry gets in
            # The keyring reached every node process (its cache in the shared key dir of the local nodes).
            version = json.loads(_ctl(sdir, "keys", "list", "--json").stdout)["version"]
            ring = sdir / "nodes" / "keys" / "authorized.json"
            wait_for(lambda: json.loads(ring.read_text())["v"] == version, timeout=10)
            res = _ctl(sdir, "keys", "revoke", "web-7")
            assert res.exit_code == 0 and "revoked web-7" in res.stdout, res.output
            assert node.wait(timeout=15) == 4
            wait_for(lambda: c.call("ping")["members"] == 3, timeout=15)
            assert all(m["name"] != "web-7" or m["state"] != "alive" for m in c.call("status")["members"])
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGKILL)
            node.wait()
        log.close()
    assert "revoked" in (tmp_path / "web-7.log").read_text()


def test_insecure_cluster_and_client_agree(tmp_path):
    sdir = tmp_path / "state"
    up = cluster.up(2, port=0, state_dir=sdir, insecure=True)
    try:
        assert up["keys"] is None and not (sdir / "client.key").exists()
        assert json.loads((sdir / "manager.json").read_text())["key"] is None
        assert client_security(sdir) is None
        res = CliRunner().invoke(main, ["exec", "--state-dir", str(sdir), "--", "true"])
        assert res.exit_code == 0, res.output
    finally:
        cluster.down(sdir, grace=2.0)
