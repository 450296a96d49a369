"""Partitions with network namespaces: a cut node, its subtree, the heal, and no process started twice.

The manager runs in the root namespace on the bridge address, every bus-node
in its own namespace (``tools.netns``), so cutting one namespace's link
isolates exactly that node: no connection closes, only silence tells.  The
root checks silence once per heartbeat, so it must notice a cut within
``misses`` + 1 heartbeats (plus ``SLACK`` for polling on a shared 2-core machine).

The manager also heals *running* applications: a node of theirs not alive for
``grace = max(2, 3 x heartbeat x misses)`` seconds is replaced by a spare
(``AppController.start_watch``).  So:

* a cut shorter than that grace must change nothing: same pids, same assignment;
* a longer cut gets the component re-run on a spare; when the cut node comes
  back, its own copy must be stopped, or the application runs one copy too
  many for ever.  The manager fences a returning node (``AppController._fence``
  cleans its copy up), which these tests check.

Skipped unless root can create namespaces.  Everything (processes, namespaces,
veth pairs, bridge) is removed by the ``Netns`` context even when a test fails.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from bus.security import client_security
from manager.keys import local_cluster_keys
from tests.helpers import wait_for
from tools import netns
from tools.client import CtlClient, CtlError

ROOT = Path(__file__).resolve().parents[2]
SLACK = 0.7  # status polling, scheduling on a shared 2-core machine
JOIN_TIMEOUT, BACKOFF_CAP = 1.0, 5.0  # bus.policy.TreeConfig defaults
WATCH_FROM = 10.0  # AppController.start_watch judges no node in the first 10 s after a manager start

_OK, _WHY = netns.available()
pytestmark = [pytest.mark.skipif(not _OK, reason=_WHY), pytest.mark.timeout(90)]

DAEMON = """<project name="{app}">
  <component name="all"><num_hosts>{n}</num_hosts><resource type="local" group="part"/></component>
  <experiment name="e"><component_block name="cb"><component name="all"/>
    <process_block name="serve">
      <process name="daemon" wait="start"><path>sleep</path><cmdline><arg>300</arg></cmdline></process>
    </process_block>{more}
  </component_block></experiment>
</project>
"""
JOB = """
    <process_block name="job">
      <process name="job"><path>sleep</path><cmdline><arg>4</arg></cmdline></process>
    </process_block>"""


class Cluster:
    """A manager on the bridge and one bus-node per namespace, named p0..p(n-1), joined one by one."""

    def __init__(self, net: netns.Netns, tmp: Path, *, heartbeat: float, misses: int = 3):
        from tools.cluster import free_port

        self.net, self.tmp = net, tmp
        self.heartbeat, self.misses = heartbeat, misses
        self.deadline = heartbeat * (misses + 1)  # dead after misses beats, seen at the root's next check
        self.grace = max(2.0, 3 * heartbeat * misses)  # manager/server.py: the application watch's grace
        self.sdir = tmp / "state"
        host = net.bridge_addr
        cport = free_port(host)
        dport = free_port(host)
        while dport == cport:
            dport = free_port(host)
        self.control = f"tcp://{host}:{cport}"
        keys = local_cluster_keys(self.sdir)  # CURVE across the bridge, as on a real network
        logs = tmp / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.manager = net.popen(None, [sys.executable, "-m", "manager", "--control", self.control,
                                        "--data", f"tcp://{host}:{dport}", "--state-dir", str(self.sdir),
                                        "--max-children", "2", "--heartbeat", str(heartbeat),
                                        "--misses", str(misses)],
                                 log_path=logs / "manager.log", cwd=ROOT)
        self.started = time.monotonic()
        wait_for(lambda: (self.sdir / "manager.json").exists() or self.manager.poll() is not None, timeout=20)
        if self.manager.poll() is not None:
            pytest.fail((logs / "manager.log").read_text())
        self.client = CtlClient(self.control, timeout=10, security=client_security(self.sdir))
        self.names = [f"p{i}" for i in range(net.n)]
        for i, name in enumerate(self.names):
            # One at a time: the tree's shape (interior nodes under the root) does not depend on a race.
            net.popen(i, [sys.executable, "-m", "nodes.cli", "--join", self.control, "--name", name,
                          "--bind-host", net.addr(i), "--state-dir", str(self.sdir / "nodes"), "--group", "part",
                          "--key-dir", keys["node_keys"]],
                      log_path=logs / f"{name}.log", cwd=ROOT)
            wait_for(lambda i=i: self.client.call("ping")["members"] == i + 1, timeout=20)

    def close(self) -> None:
        self.client.close()

    def members(self) -> dict:
        return {m["name"]: m for m in self.client.call("status")["members"] if not m["name"].startswith("#")}

    def deploy(self, spec: str, app: str, wait: bool = True) -> dict:
        rows = "".join(f'<resource name="{n}" type="local" group="part"/>' for n in self.names)
        started = self.client.call("deploy", spec=spec, spec_file=f"{app}.xml", cwd=str(self.tmp),
                                   resources=f"<resources>{rows}</resources>", resources_file="dir.xml")
        if not wait:
            return started
        return wait_for(lambda: (lambda p: p if p["phase"] != "deploying" else None)(
            self.client.call("progress", app=app)), timeout=30)

    def daemons(self, app: str) -> dict:
        """node -> (state, pid, restarts) of the daemon, as the application's nodes report it."""
        st = self.client.call("app_status", app=app, timeout=3.0)
        return {r["node"]: (r["state"], r["pid"], r["restarts"]) for r in st["processes"] if r["name"] == "daemon"}

    def wait_state(self, name: str, want, timeout: float) -> float:
        """Poll the membership until ``want(member)`` holds for ``name``; the monotonic time it first held."""
        end = time.monotonic() + timeout
        while True:
            try:
                m = self.members().get(name)
            except CtlError:
                m = None
            now = time.monotonic()
            if m is not None and want(m):
                return now
            if now > end:
                pytest.fail(f"{name} did not reach the expected state within {timeout}s: {m}")
            time.sleep(0.02)

    def interior(self, among) -> str:
        """A node of ``among`` at depth 1 with children: cutting it cuts a subtree."""
        members = self.members()
        found = sorted(n for n in among if members[n]["children"] > 0 and members[n]["depth"] == 1)
        if not found:
            pytest.fail(f"no interior node among {sorted(among)} with max_children 2: {members}")
        return found[0]


def _descendants(members: dict, top: str) -> set[str]:
    by_id = {m["id"]: m for m in members.values()}
    out = set()
    for name, m in members.items():
        j, seen = m["parent"], 0
        while j in by_id and seen < 64:
            if by_id[j]["name"] == top:
                out.add(name)
                break
            j, seen = by_id[j]["parent"], seen + 1
    return out


def _processes_of(app: str, name: str = "") -> dict:
    """node -> pids of live processes whose environment says they belong to ``app`` (and run ``name``)."""
    out: dict = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X") or f"SNSBUS_APP={app}".encode() not in env:
            continue
        if name and name.encode() not in argv:
            continue
        node = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"SNSBUS_NODE=")), "?")
        out.setdefault(node, []).append(int(entry))
    return out


@pytest.fixture
def net(tmp_path):
    with netns.Netns(5) as n:
        yield n


def test_short_cut_of_an_interior_node_detected_subtree_rejoins_heal_nothing_started_twice(net, tmp_path):
    c = Cluster(net, tmp_path, heartbeat=0.4)
    try:
        prog = c.deploy(DAEMON.format(app="parted", n=5, more=""), "parted")
        assert prog["phase"] == "running", prog
        before = c.daemons("parted")
        assert set(before) == set(c.names) and all(s == "running" for s, _, _ in before.values()), before
        assert {n: len(p) for n, p in _processes_of("parted").items()} == dict.fromkeys(c.names, 1)

        cut = c.interior(c.names)
        members = c.members()
        below = _descendants(members, cut)
        i = c.names.index(cut)

        t_cut = time.monotonic()
        net.cut(i)
        t_dead = c.wait_state(cut, lambda m: m["state"] != "alive", timeout=10)
        detect = t_dead - t_cut
        assert detect <= c.deadline + SLACK, f"noticed after {detect:.2f}s (deadline {c.deadline:.1f}s)"

        # The nodes below the cut were only cut off through it: they rejoin elsewhere; the cut node stays out.
        cut_id = members[cut]["id"]
        t_back = max(c.wait_state(n, lambda m: m["state"] == "alive" and m["parent"] != cut_id, timeout=10)
                     for n in below)
        rejoin_below = t_back - t_cut
        assert rejoin_below <= c.deadline + JOIN_TIMEOUT + SLACK + 1.0, rejoin_below
        res = c.client.call("exec", cmd="echo $SNSBUS_NODE", timeout=2)
        assert sorted(n for g in res["groups"] for n in g["nodes"]) == sorted(set(c.names) - {cut}), res
        assert [m["node"] for m in res["missing"]] == [cut], res

        t_heal = time.monotonic()
        net.heal(i)
        t_rejoined = c.wait_state(cut, lambda m: m["state"] == "alive", timeout=BACKOFF_CAP + JOIN_TIMEOUT + 8)
        rejoin = t_rejoined - t_heal
        absent = t_rejoined - t_dead
        assert rejoin <= BACKOFF_CAP + JOIN_TIMEOUT + SLACK + 1.0, rejoin
        assert absent < c.grace, f"the cut node was gone {absent:.2f}s, past the watch's grace: not a short cut"

        # Nothing was started twice: same pids, no restart, one process per node, the same assignment.
        wait_for(lambda: len(c.daemons("parted")) == len(c.names), timeout=10)
        assert c.daemons("parted") == before
        assert {n: len(p) for n, p in _processes_of("parted").items()} == dict.fromkeys(c.names, 1)
        assert c.client.call("progress", app="parted")["assignment"] == prog["assignment"]
        out = c.client.call("start", app="parted", timeout=10)  # idempotent after the heal too
        assert sorted(out["done"]) == sorted(c.names) and not out["failed"] and not out["missing"], out
        assert c.daemons("parted") == before
        res = c.client.call("exec", cmd="true", timeout=5)
        assert res["missing"] == [] and res["answered"] == len(c.names), res
        print(f"\npartition: cut {cut} (subtree {sorted(below)}): detected after {detect:.3f}s "
              f"(deadline {c.deadline:.1f}s), subtree back after {rejoin_below:.3f}s, cut node back "
              f"{rejoin:.3f}s after the heal ({absent:.2f}s gone in all, grace {c.grace:.1f}s)")
    finally:
        c.close()


def test_long_cut_heals_on_a_spare_and_the_returning_node_stops_its_copy(net, tmp_path):
    c = Cluster(net, tmp_path, heartbeat=0.2)
    try:
        prog = c.deploy(DAEMON.format(app="healed", n=4, more=""), "healed")
        if prog["phase"] != "running":
            pytest.fail(f"deploy: {prog}")
        assigned = prog["assignment"]["all"]
        spare = next(n for n in c.names if n not in assigned)
        cut = c.interior(assigned)
        net.cut(c.names.index(cut))
        t_cut = time.monotonic()
        # The watch judges after WATCH_FROM s of manager uptime, then after `grace` s of absence.
        bound = max(c.grace, WATCH_FROM - (t_cut - c.started)) + c.deadline + 1.0 + SLACK + 5.0
        healed = wait_for(lambda: (lambda p: p if spare in p["assignment"]["all"] else None)(
            c.client.call("progress", app="healed")), timeout=bound)
        if cut in healed["assignment"]["all"] or healed["replaced"].get(cut) != spare:
            pytest.fail(f"not healed on the spare: {healed}")
        wait_for(lambda: _processes_of("healed", "300").get(spare), timeout=10)
        net.heal(c.names.index(cut))
        c.wait_state(cut, lambda m: m["state"] == "alive", timeout=BACKOFF_CAP + JOIN_TIMEOUT + 8)
        settle = time.monotonic() + 3 * c.grace  # time for a fence to act, were there one
        daemons = _processes_of("healed", "300")
        while (cut in daemons) and time.monotonic() < settle:
            time.sleep(0.2)
            daemons = _processes_of("healed", "300")
        counts = {n: len(p) for n, p in daemons.items()}
        assert counts == dict.fromkeys(healed["assignment"]["all"], 1), counts
    finally:
        c.close()


def test_node_cut_mid_deploy_is_replaced_and_its_copy_is_stopped_after_the_heal(tmp_path):
    with netns.Netns(4) as net:
        c = Cluster(net, tmp_path, heartbeat=0.2)
        try:
            started = c.deploy(DAEMON.format(app="split", n=2, more=JOB), "split", wait=False)
            cut = started["assignment"]["all"][1]
            # Cut it while the second block (a 4 s job) runs: the daemon of the first block is up everywhere.
            wait_for(lambda: any(ph["key"] == "cb/job" and ph["state"] == "running"
                                 for ph in c.client.call("progress", app="split")["phases"]), timeout=20)
            wait_for(lambda: len(_processes_of("split").get(cut, ())) == 2, timeout=5)
            net.cut(c.names.index(cut))
            prog = wait_for(lambda: (lambda p: p if p["phase"] != "deploying" else None)(
                c.client.call("progress", app="split")), timeout=30)
            if prog["phase"] != "running" or cut not in prog["replaced"]:
                pytest.fail(f"the cut node was not replaced by a spare: {prog}")
            spare = prog["replaced"][cut]
            net.heal(c.names.index(cut))
            c.wait_state(cut, lambda m: m["state"] == "alive", timeout=BACKOFF_CAP + JOIN_TIMEOUT + 8)
            wait_for(lambda: _processes_of("split", "300").get(spare), timeout=10)
            settle = time.monotonic() + 3 * c.grace
            daemons = _processes_of("split", "300")
            while cut in daemons and time.monotonic() < settle:
                time.sleep(0.2)
                daemons = _processes_of("split", "300")
            counts = {n: len(p) for n, p in daemons.items()}
            # Two hosts asked for, two daemons: the replaced node's copy must be stopped once it is back.
            assert counts == dict.fromkeys(prog["assignment"]["all"], 1), counts
        finally:
            c.close()
