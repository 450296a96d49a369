"""A short chaos run (``tools.chaos``): TranSend under load while a worker, a bus-node, a front end
and the manager are killed with SIGKILL; no accepted request fails and no application state is lost.

The long run is ``make chaos`` (``python -m tools.chaos``).  This one lasts 22 s
of load with one kill of each kind, the manager's first (seed 6) so that its
restart (5 s without beacons, then a front end starts it) overlaps the load,
plus about 15 s of set-up and checks.
Every process of the run carries a token in its environment; the fixture
kills whatever is left with it, whatever happened.
"""

from __future__ import annotations

import json
import uuid

import pytest

from tools import chaos

pytestmark = pytest.mark.timeout(110)


@pytest.fixture
def token():
    t = uuid.uuid4().hex
    try:
        yield t
    finally:
        chaos.reap(t)


def test_schedule_has_every_kind_spaced_and_is_reproducible():
    events = chaos.schedule(22, 6)
    assert events[0].kind == "manager"  # the short run below counts on it
    assert sorted(e.kind for e in events) == sorted(chaos.DEFAULT_KINDS)
    assert all(b.at - a.at >= chaos.SPACING / 2 for a, b in zip(events, events[1:]))
    assert chaos.WARMUP <= events[0].at and events[-1].at <= 22 - chaos.TAIL
    assert chaos.schedule(22, 6) == events and chaos.schedule(60, 2) != chaos.schedule(60, 3)
    long = chaos.schedule(90, 4)
    assert len(long) >= 2 * len(chaos.DEFAULT_KINDS) and set(e.kind for e in long) == set(chaos.DEFAULT_KINDS)
    with pytest.raises(ValueError, match="--seconds"):
        chaos.schedule(10, 1)
    with pytest.raises(ValueError, match="unknown"):
        chaos.schedule(60, 1, ["reboot"])


def test_tally_counts_every_outcome_once():
    t = chaos.Tally(sent=5, exact=2, refused=3, cut_by_kill=1)
    t.approximate["original"] += 2
    t.failed["HTTP 503"] += 1
    t.latencies += [0.01, 0.02, 0.03, 0.04]
    d = t.as_dict()
    assert d["answered_exact"] + d["answered_approximate"] + d["failed_accepted"] == d["sent"]
    assert d["refused_failed_over"] == 3 and d["cut_by_frontend_kill_retried"] == 1
    assert d["latency_ms"]["p50"] == 25.0 and d["latency_ms"]["max"] == 40.0


def test_short_chaos_run_loses_no_accepted_request_and_no_state(tmp_path, token):
    report = tmp_path / "report.json"
    lines = []
    result = chaos.run(22, 6, report=report, state_dir=tmp_path / "state", token=token, settle=20.0,
                       out=lines.append)
    assert json.loads(report.read_text())["requests"] == result["requests"]
    assert result["unexpected_deaths"] == [], (
        f"processes of this run died without being killed by it (another program?): {result['unexpected_deaths']}")
    r = result["requests"]
    assert r["sent"] >= 100, r
    outcomes = r["answered_exact"] + r["answered_approximate"] + r["failed_accepted"] + r["not_accepted_anywhere"]
    assert outcomes == r["sent"], r
    assert r["failed_accepted"] == 0 and r["not_accepted_anywhere"] == 0, r
    assert result["state_problems"] == [], result["state_problems"]
    events = {e["kind"]: e for e in result["events"]}
    assert set(events) == set(chaos.DEFAULT_KINDS) and not [e for e in result["events"] if "error" in e], events
    assert events["worker"]["recovered_after"] is not None  # the stub restarted the worker process
    assert events["frontend"]["recovered_after"] is not None  # the supervisor restarted the front end
    assert events["manager"]["recovered_after"] is not None  # a front end restarted the manager
    node = events["node"]
    assert node["workers_left_running"] == [] and node["rejoined_after_restart"] is not None, node
    assert result["target_met"] and result["teardown_left"] == []
    assert chaos.reap(token, timeout=1.0) == []  # nothing of the run is left
    assert any(line.startswith("reproduce: python -m tools.chaos --seconds 22 --seed 6") for line in lines), lines
    print("\n" + "\n".join(lines))  # the figures, with -s
