"""Renderings: node-name ranges, dshbak-style exec output, the status table."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fake_manager import FakeManager, make_members
from tools.render import compact_names, exec_failed, expand_names, format_exec, format_status, natural_key


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["node-0", "node-1", "node-2", "node-3", "node-7"], "node-[0-3,7]"),
        (["node-5"], "node-5"),
        ([], ""),
        (["node-2", "node-2"], "node-2"),
        (["web-1", "manager", "db-1", "web-2"], "db-1,manager,web-[1-2]"),
        (["n9", "n10", "n11"], "n[9-11]"),
        (["n01", "n02", "n03", "n10"], "n[01-03,10]"),
        (["rack1-a", "rack2-a", "rack3-b"], "rack[1-2]-a,rack3-b"),
        ([f"vm-{i}-{j}" for i in range(3) for j in range(5)], "vm-[0-2]-[0-4]"),
        ([f"vm-{i}-{j}" for i in range(3) for j in range(5)][:-1], "vm-[0-1]-[0-4],vm-2-[0-3]"),
    ],
)
def test_compact_names(names, expected):
    assert compact_names(names) == expected


def test_natural_order():
    assert sorted(["node-10", "node-9", "node-1", "a"], key=natural_key) == ["a", "node-1", "node-9", "node-10"]


@settings(max_examples=200, deadline=None)
@given(st.sets(st.tuples(st.sampled_from(["node-", "web", "db-", "x"]), st.integers(0, 40),
                         st.sampled_from(["", "-a", "-0", "-1"]))))
def test_expand_inverts_compact(parts):
    names = {f"{p}{n}{s}" for p, n, s in parts}
    text = compact_names(names)
    expanded = expand_names(text)
    assert sorted(expanded) == sorted(names)
    assert len(expanded) == len(names)


def _exec_result(**over):
    res = {
        "groups": [
            {"stdout": "hello\n", "stderr": "", "rc": 0, "nodes": ["node-3", "node-0", "node-1", "node-2", "node-7"]},
            {"stdout": "", "stderr": "boom\nbang\n", "rc": 2, "nodes": ["node-9"]},
            {"stdout": "", "stderr": "", "rc": 0, "nodes": ["db-1"]},
        ],
        "missing": [
            {"node": "node-4", "reason": "dead"},
            {"node": "node-5", "reason": "dead"},
            {"node": "node-8", "reason": "timed out"},
        ],
        "expected": 10,
        "answered": 7,
        "elapsed": 0.25,
    }
    res.update(over)
    return res


def test_format_exec_groups_like_dshbak():
    out, err = format_exec(_exec_result())
    assert out.splitlines() == [
        "----------------",
        "node-[0-3,7] (5)",
        "----------------",
        "hello",
        "----------------",
        "db-1 (1)",
        "----------------",
        "(no output)",
        "----------------",
        "node-9 (1)  exit 2",
        "----------------",
        "[stderr] boom",
        "[stderr] bang",
    ]
    assert err.splitlines() == [
        "did not answer: node-[4-5] (dead), node-8 (timed out)",
        "7 of 10 nodes answered in 0.25s, 1 exited non-zero, 3 did not answer",
    ]


def test_exec_failed():
    assert exec_failed(_exec_result())
    assert exec_failed(_exec_result(groups=[], missing=[{"node": "n", "reason": "dead"}]))
    assert exec_failed(_exec_result(missing=[]))  # node-9 exited 2
    ok = _exec_result(missing=[], groups=[{"stdout": "", "stderr": "", "rc": 0, "nodes": ["a"]}])
    assert not exec_failed(ok)
    out, err = format_exec(dict(ok, expected=1, answered=1))
    assert "did not answer" not in err
    assert err == "1 of 1 nodes answered in 0.25s\n"


def test_format_status_table_summary_and_events():
    fake = FakeManager(make_members(6, 2, dead={"node-4"}), max_children=2, events=[
        {"t": 1000.0, "kind": "joined", "node": "node-0", "detail": ""},
        {"t": 1010.0, "kind": "lost", "node": "node-4", "detail": "missed 3 heartbeats"},
        {"t": 1020.0, "kind": "rejoined", "node": "node-5", "detail": "under node-1"},
    ])
    fake.endpoint = "tcp://127.0.0.1:7070"
    text = format_status(fake.status({}), now=1030.0)
    lines = text.splitlines()
    assert lines[0].split() == ["NAME", "ID", "DEPTH", "PARENT", "CHILDREN", "LAST", "HEARD", "STATE"]
    assert lines[2].split() == ["node-0", "2", "1", "manager", "2", "0.2s", "alive"]
    assert lines[6].split() == ["node-4", "6", "2", "node-1", "0", "0.2s", "dead"]
    assert "6 members (5 alive, 1 dead), max depth 2, fanout: root 2, max 2, mean 2.0 over 3 inner nodes" in text
    assert "root manager [1] at tcp://127.0.0.1:7070 (max_children 2, policy randtree)" in text
    assert "recent failures and repairs:" in text
    assert "lost     node-4: missed 3 heartbeats" in text
    assert "(20s ago)" in text
    assert " joined " not in text  # routine joins are not failures


def test_format_status_empty():
    text = format_status({"root": {"id": 1, "name": "manager"}, "members": [], "events": []})
    assert "no members" in text
    assert "0 members (0 alive), max depth 0" in text
    assert "no failures or repairs recorded" in text
