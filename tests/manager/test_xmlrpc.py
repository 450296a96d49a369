"""The manager's XML-RPC API, driven with the stdlib client.

Most tests run the real server against a small fake manager (the control API's
handlers need only ``root``, ``membership``, ``apps``); the last one runs a
real manager process with ``--xmlrpc`` and real bus-nodes through a whole
load/deploy/wait/status/logs/cleanup cycle of examples/simple.xml.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
import xmlrpc.client
from pathlib import Path

import pytest

from manager.membership import Membership
from manager.xmlrpc import (FAULT_CODES, METHODS, XmlRpcError, is_loopback, parse_address, start_xmlrpc,
                            to_xmlrpc)
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
BIG_ID = 3_000_000_001  # node ids are random 32-bit: above XML-RPC's signed <int>


# ------------------------------------------------------------------ values and addresses


def _roundtrip(value):
    """What a client receives: marshalled as the server does (no allow_none), parsed back."""
    return xmlrpc.client.loads(xmlrpc.client.dumps((value,), methodresponse=True))[0][0]


def test_values_are_xmlrpc_safe():
    raw = {"id": 7, "parent": BIG_ID, "path": [1, BIG_ID], "count": 1 << 40, "small": -5, "ok": True,
           "gone": None, "list": [None, 1.5, "x"], 3: "int key", "ctl": "a\x1b[31mred\x00", "b": b"\x00\x01",
           "nested": {"epoch": 12, "t": float("nan"), "s": {2, 1}}}
    safe = to_xmlrpc(raw)
    assert safe["id"] == "7" and safe["parent"] == str(BIG_ID) and safe["path"] == ["1", str(BIG_ID)]
    assert safe["count"] == str(1 << 40) and safe["small"] == -5 and safe["ok"] is True
    assert "gone" not in safe and safe["list"] == ["", 1.5, "x"] and safe["3"] == "int key"
    assert safe["ctl"] == "a\ufffd[31mred\ufffd"
    assert safe["nested"] == {"epoch": "12", "t": "nan", "s": [1, 2]}
    back = _roundtrip(safe)  # would raise (OverflowError, TypeError, bad XML) if anything were unsafe
    assert back["b"].data == b"\x00\x01" and back["parent"] == str(BIG_ID)


@pytest.mark.parametrize("text, expected", [
    ("7072", ("127.0.0.1", 7072)),
    ("0", ("127.0.0.1", 0)),
    ("10.0.0.5:7072", ("10.0.0.5", 7072)),
    ("[::1]:7072", ("::1", 7072)),
    (":9", ("127.0.0.1", 9)),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "port", "host:", "1:99999", "[::1]7072"])
def test_parse_address_refuses(text):
    with pytest.raises(XmlRpcError):
        parse_address(text)


def test_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("127.1.2.3") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.org")


# ------------------------------------------------------------------ a fake manager


class FakeApps:
    """Enough of AppController for progress/apps: one app forever deploying."""

    def __init__(self):
        self.records = {"slow": {"name": "slow", "phase": "deploying"}}
        self.polls = 0

    def progress(self, name):
        from manager.apps import DeployError

        self.polls += 1
        if name not in self.records:
            raise DeployError("NO_SUCH_APP", f"no application named {name!r}")
        return {"name": name, "phase": "deploying", "gen": 1, "error": None}

    def list(self):
        return [{"name": "slow", "phase": "deploying", "gen": 1, "nodes": ["web-1"], "created": 1.0, "error": None}]


class FakeRoot:
    epoch = BIG_ID


class FakeManager:
    def __init__(self, with_apps: bool):
        self.root = FakeRoot()
        self.membership = Membership(root_id=1)
        for i, (name, group) in enumerate([("web-1", "web"), ("web-2", "web"), ("db-1", "db")]):
            self.membership.route_added([BIG_ID + i])
            self.membership.registered({"id": BIG_ID + i, "name": name, "parent": 1, "attrs": {"group": group},
                                        "pid": 100 + i})
        self.apps = FakeApps() if with_apps else None
        self.services = None

    def uptime(self):
        return 12.5

    def status(self):
        return {"root": {"id": 1}, "members": self.membership.snapshot(), "events": [], "counters": {}}


class LoopThread:
    """An asyncio loop in a thread, standing in for the manager's loop."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-manager-loop")
        self.thread.start()

    def call(self, fn, *args, **kw):
        async def inside():
            return fn(*args, **kw)
        return asyncio.run_coroutine_threadsafe(inside(), self.loop).result(10)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def loop_thread():
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.close()


@pytest.fixture
def served(loop_thread):
    """(server handle, fake manager) with apps; always closed."""
    mgr = FakeManager(with_apps=True)
    srv = loop_thread.call(start_xmlrpc, mgr, "127.0.0.1", 0)
    try:
        yield srv, mgr
    finally:
        srv.close()


def _proxy(url):
    return xmlrpc.client.ServerProxy(url)


def _fault(call) -> xmlrpc.client.Fault:
    with pytest.raises(xmlrpc.client.Fault) as info:
        call()
    return info.value


def test_ping_and_list_nodes_with_selectors(served):
    srv, _ = served
    with _proxy(srv.url) as rpc:
        ping = rpc.ping()
        assert ping["epoch"] == str(BIG_ID) and ping["members"] == 3 and ping["uptime"] == 12.5
        nodes = rpc.list_nodes()
        assert [n["name"] for n in nodes] == ["db-1", "web-1", "web-2"]
        assert all(isinstance(n["id"], str) and n["state"] == "alive" for n in nodes)
        assert [n["name"] for n in rpc.list_nodes("group=web")] == ["web-1", "web-2"]
        assert [n["name"] for n in rpc.list_nodes("db-*,web-2")] == ["db-1", "web-2"]
        assert rpc.list_nodes("nothing-*") == []


def test_introspection_documents_every_method(served):
    srv, _ = served
    with _proxy(srv.url) as rpc:
        listed = rpc.system.listMethods()
        assert set(METHODS) <= set(listed) and "system.methodHelp" in listed
        for name in METHODS:
            assert rpc.system.methodHelp(name).startswith(f"{name}("), name
        assert "handle" in rpc.system.methodHelp("deploy")


def test_faults_have_codes_and_sentences(served):
    srv, _ = served
    with _proxy(srv.url) as rpc:
        f = _fault(lambda: rpc.no_such_method())
        assert f.faultCode == FAULT_CODES["UNKNOWN_METHOD"] and "load_spec" in f.faultString
        f = _fault(lambda: rpc.progress())
        assert f.faultCode == FAULT_CODES["BAD_ARGS"] and "progress(app)" in f.faultString
        f = _fault(lambda: rpc.progress(""))
        assert f.faultCode == FAULT_CODES["BAD_ARGS"] and "app must be" in f.faultString
        f = _fault(lambda: rpc.exec("true", "", -1))
        assert f.faultCode == FAULT_CODES["BAD_ARGS"]
        f = _fault(lambda: rpc.exec("true", "nothing-*", 1))
        assert f.faultCode == FAULT_CODES["BAD_SELECTOR"] and f.faultString.startswith("BAD_SELECTOR: ")
        f = _fault(lambda: rpc.progress("nope"))
        assert f.faultCode == FAULT_CODES["NO_SUCH_APP"] and "nope" in f.faultString
        f = _fault(lambda: rpc.deploy("0123456789abcdef0123"))
        assert f.faultCode == FAULT_CODES["NO_SUCH_HANDLE"] and "load_spec" in f.faultString
        f = _fault(lambda: rpc.deploy("x", {"force": 1}))
        assert f.faultCode == FAULT_CODES["BAD_ARGS"] and "force" in f.faultString
        f = _fault(lambda: rpc.logs("slow", {"color": True}))
        assert f.faultCode == FAULT_CODES["BAD_ARGS"] and "unknown option 'color'" in f.faultString
        assert rpc.apps()[0]["name"] == "slow"  # the server still serves after every fault


def test_manager_without_state_dir_says_so(loop_thread):
    srv = loop_thread.call(start_xmlrpc, FakeManager(with_apps=False), "127.0.0.1", 0)
    try:
        with _proxy(srv.url) as rpc:
            f = _fault(lambda: rpc.apps())
        assert f.faultCode == FAULT_CODES["FAILED"] and "--state-dir" in f.faultString
    finally:
        srv.close()


def test_load_spec_reports_problems_with_positions(served, tmp_path):
    srv, _ = served
    bad = tmp_path / "bad.xml"
    bad.write_text('<project name="p">\n  <component name="c"><num_hosts>two</num_hosts></component>\n</project>\n')
    with _proxy(srv.url) as rpc:
        out = rpc.load_spec(str(bad), str(ROOT / "examples" / "directory.xml"))
        assert out["ok"] is False and "handle" not in out
        p = out["problems"][0]
        assert p["file"] == str(bad) and p["line"] == 2 and p["column"] > 0
        assert p["text"].startswith(f"{bad}:2:")
        out = rpc.load_spec("<resources><oops/></resources>", "<resources/>")
        assert out["ok"] is False and out["problems"]
        out = rpc.load_spec("missing.xml", "<resources/>", {"cwd": str(tmp_path)})
        assert out["ok"] is False and "cannot read the spec" in out["problems"][0]["message"]


def test_load_spec_gives_a_stable_handle_and_says_what_is_unmet(served):
    srv, _ = served
    with _proxy(srv.url) as rpc:
        args = ("examples/simple.xml", "examples/directory.xml", {"cwd": str(ROOT)})
        out = rpc.load_spec(*args)
        assert out["ok"] is True and out["app"] == "simple"
        assert out["components"] == [{"name": "Cluster1", "num_hosts": 2}]
        assert out["resources"] == ["local1", "local2", "local3", "local4"]
        # The fake's nodes are web-1, web-2, db-1: none of the directory's resources is live.
        assert out["assignment"] == {} and "Cluster1" in out["unmet"]
        assert rpc.load_spec(*args)["handle"] == out["handle"]


def test_token_is_required_when_set(loop_thread):
    srv = loop_thread.call(start_xmlrpc, FakeManager(with_apps=True), "127.0.0.1", 0, token="s3cret")
    try:
        with _proxy(srv.url) as rpc, pytest.raises(xmlrpc.client.ProtocolError) as info:
            rpc.ping()
        assert info.value.errcode == 401
        wrong = srv.url.replace("http://", "http://snsbus:guess@")
        with _proxy(wrong) as rpc, pytest.raises(xmlrpc.client.ProtocolError):
            rpc.ping()
        right = srv.url.replace("http://", "http://snsbus:s3cret@")
        with _proxy(right) as rpc:
            assert rpc.ping()["members"] == 3
    finally:
        srv.close()


def test_non_loopback_is_refused_unless_allowed_with_a_token(loop_thread):
    mgr = FakeManager(with_apps=False)
    with pytest.raises(XmlRpcError, match="loopback"):
        loop_thread.call(start_xmlrpc, mgr, "0.0.0.0", 0)
    with pytest.raises(XmlRpcError, match="token"):
        loop_thread.call(start_xmlrpc, mgr, "0.0.0.0", 0, allow_remote=True)


def test_close_ends_a_call_in_flight(served):
    srv, mgr = served
    result = {}

    def waiter():
        with _proxy(srv.url) as rpc:
            try:
                rpc.wait("slow", 60)
            except xmlrpc.client.Fault as e:
                result["fault"] = e

    t = threading.Thread(target=waiter)
    t.start()
    wait_for(lambda: mgr.apps.polls >= 2, timeout=10)  # the wait() is polling
    t0 = time.monotonic()
    srv.close()
    t.join(10)
    assert not t.is_alive() and time.monotonic() - t0 < 5
    assert result["fault"].faultCode == FAULT_CODES["STOPPING"]
    srv.close()  # idempotent


def test_cli_refuses_a_public_address_unless_allowed():
    from click.testing import CliRunner

    from manager.__main__ import main

    res = CliRunner().invoke(main, ["--xmlrpc", "0.0.0.0:7072"])
    assert res.exit_code == 2 and "loopback" in res.output and "--xmlrpc-allow-remote" in res.output
    res = CliRunner().invoke(main, ["--xmlrpc", "nonsense"])
    assert res.exit_code == 2 and "PORT" in res.output


# ------------------------------------------------------------------ a real manager and real nodes


def _cycle(rpc) -> None:
    """load_spec, deploy, wait, status, logs, exec, cleanup of examples/simple.xml on local1 and local2."""
    def members():
        try:
            return rpc.ping()["members"] == 2
        except ConnectionError:
            return False

    wait_for(members, timeout=30)
    assert {n["name"] for n in rpc.list_nodes("local*")} == {"local1", "local2"}

    loaded = rpc.load_spec(str(ROOT / "examples" / "simple.xml"), str(ROOT / "examples" / "directory.xml"),
                           {"cwd": str(ROOT)})
    assert loaded["ok"] is True, loaded
    assert loaded["assignment"] == {"Cluster1": ["local1", "local2"]} and loaded["unmet"] == ""
    started = rpc.deploy(loaded["handle"], {"timeout": 60})
    assert started["app"] == "simple" and started["already"] is False and started["phase"] == "deploying"

    done = rpc.wait("simple", 60)
    assert done["phase"] == "completed", done
    assert rpc.deploy(loaded["handle"])["already"] is True  # the same spec again: nothing started
    assert [(a["name"], a["phase"]) for a in rpc.apps()] == [("simple", "completed")]

    status = rpc.status("simple")
    procs = {(p["node"], p["name"]): p for p in status["processes"]}
    assert set(procs) == {("local1", "cat"), ("local2", "cat")}
    assert all(p["state"] == "exited" and p["exit_code"] == 0 for p in procs.values())
    logs = rpc.logs("simple", {"process": "cat"})["logs"]
    assert all("Hello from a Plush-style package!" in v["cat"]["text"] for v in logs.values())

    ran = rpc.exec("echo hi", "local*", 10)
    assert ran["answered"] == 2 and not ran["missing"]
    assert [(g["stdout"], g["rc"], g["nodes"]) for g in ran["groups"]] == [("hi\n", 0, ["local1", "local2"])]

    out = rpc.cleanup("simple")
    assert out["removed"] is True and out["failed"] == {} and out["missing"] == []
    assert rpc.apps() == []
    f = _fault(lambda: rpc.status("simple"))
    assert f.faultCode == FAULT_CODES["NO_SUCH_APP"]


def test_full_cycle_on_a_real_cluster(tmp_path, monkeypatch):
    from tools import cluster

    sdir = tmp_path / "state"
    monkeypatch.setenv("SNSBUS_STATE_DIR", str(sdir))
    port = cluster.free_port()
    argv = [sys.executable, "-m", "manager", "--xmlrpc", f"127.0.0.1:{port}", "--log-format", "json"]
    try:
        mgr = cluster.start_manager(sdir, port=0, heartbeat=0.2, misses=3, manager_argv=argv)
        for name in ("local1", "local2"):
            cluster.start_named_node(sdir, name, join=mgr["control"], group="local_plush")
        with xmlrpc.client.ServerProxy(f"http://127.0.0.1:{port}/") as rpc:
            _cycle(rpc)
    finally:
        cluster.down(sdir, grace=2.0)
    lines = [json.loads(line) for line in (sdir / "logs" / "manager.log").read_text().splitlines() if line]
    assert all(rec["role"] == "manager" and {"time", "level", "logger", "message", "pid"} <= set(rec)
               for rec in lines)
    assert any(rec["message"].startswith(f"XML-RPC API on http://127.0.0.1:{port}/") for rec in lines)


def test_operations_doc_lists_every_method_and_fault():
    doc = (ROOT / "docs" / "operations.md").read_text()
    for name in METHODS:
        assert f"| `{name}(" in doc, name
    for code, number in FAULT_CODES.items():
        assert f"| {number} | `{code}` |" in doc, code
