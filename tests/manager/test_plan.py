"""Deploy planning (pure): assignment, spares, barrier counts, phase order, process definitions."""

from __future__ import annotations

from pathlib import Path

import pytest

from manager import plan
from manager.resources import NotEnoughResources, load_directory, parse_directory
from manager.spec import load, parse

ROOT = Path(__file__).resolve().parents[2]
MULTI = ROOT / "examples" / "multi.xml"
DIRECTORY = ROOT / "examples" / "directory.xml"


def test_assign_multi_example_uses_groups_and_attrs() -> None:
    app = load(MULTI)
    res = load_directory(DIRECTORY)
    got = plan.assign(app, res, ["local1", "local2", "local3", "local4"])
    assert got == {"servers": ["local1", "local2"], "clients": ["local3", "local4"]}


def test_assign_names_the_component_that_cannot_be_served() -> None:
    app = load(MULTI)
    res = load_directory(DIRECTORY)
    with pytest.raises(NotEnoughResources) as e:
        plan.assign(app, res, ["local1", "local2", "local3"])
    assert e.value.component == "clients" and e.value.wanted == 2 and e.value.matched == 1
    assert "clients" in str(e.value)


def test_spare_is_a_live_unused_matching_node() -> None:
    app = load(MULTI)
    res = parse_directory("""<resources>
      <resource name="a" type="local" group="workers"><attr name="arch" value="x86_64"/></resource>
      <resource name="b" type="local" group="workers"><attr name="arch" value="x86_64"/></resource>
      <resource name="c" type="local" group="workers"><attr name="arch" value="arm64"/></resource>
      <resource name="d" type="local" group="workers"><attr name="arch" value="x86_64"/></resource>
    </resources>""")
    clients = app.component_named("clients")
    # c does not match (arch), a and b are used, d is dead: no spare
    assert plan.spare_for(clients, res, ["a", "b", "c"], used={"a", "b"}) is None
    assert plan.spare_for(clients, res, ["a", "b", "c", "d"], used={"a", "b"}) == "d"


def test_barrier_expected_counts_max_or_all_users() -> None:
    app = load(MULTI)
    assignment = {"servers": ["s1", "s2"], "clients": ["c1", "c2"]}
    assert plan.barrier_expected(app, assignment) == {"ready": 4}
    two = parse(MULTI.read_text().replace('max="4"', 'max="3"'), "m.xml")
    assert plan.barrier_expected(two, assignment) == {"ready": 3}
    nomax = parse(MULTI.read_text().replace(' max="4"', ""), "m.xml")
    assert plan.barrier_expected(nomax, assignment) == {"ready": 4}  # both component blocks use it


def test_phase_keys_in_order_with_components() -> None:
    app = load(MULTI)
    keys = plan.phase_keys(app)
    assert list(keys) == ["install/servers", "install/clients", "serve/start_servers", "serve/servers_ready",
                          "query/ready", "query/run_clients", "report/summarise"]
    assert keys["query/run_clients"] == "clients" and keys["serve/start_servers"] == "servers"


def test_process_def_carries_our_additions() -> None:
    app = load(MULTI)
    server = next(p for p in app.processes() if p.name == "server")
    d = plan.process_def(server, "start_servers")
    assert d["wait"] == "start" and d["cwd"] == "tools" and d["env"] == {"PYTHONUNBUFFERED": "1"}
    assert d["restart"] == {"policy": "on-failure", "max": 3, "backoff": 0.5, "flap_window": 10.0}
    assert d["exit_codes"] == [0, 143] and d["run_timeout"] == 60.0 and d["stop_grace"] == 2.0


def test_software_of_gives_digests_and_archive_types() -> None:
    app = load(MULTI)
    pk = {("tools", "tools"): {"sha": "ab" * 32, "size": 10}}
    soft = plan.software_of(app, "servers", pk)
    assert soft == [{"name": "tools", "install": "sh setup.sh", "install_timeout": 30.0,
                     "packages": [{"sha": "ab" * 32, "size": 10, "name": "tools", "archive": "tar.gz",
                                   "dest": None}]}]
