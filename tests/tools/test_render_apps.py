"""The text bus-ctl prints for application results (pure functions)."""

from __future__ import annotations

from tools.render_apps import format_done, format_logs, format_progress, format_summary, next_offsets

PROG = {
    "name": "multi", "gen": 2, "phase": "failed", "error": "serve/start: 1 node(s) failed; b: boom",
    "assignment": {"servers": ["a", "b"], "clients": ["c", "d", "e", "f"]},
    "replaced": {"x": "b"},
    "phases": [
        {"key": "install/servers", "component": "servers", "state": "done", "done": ["a", "b"], "failed": {}},
        {"key": "install/clients", "component": "clients", "state": "running", "done": ["c"], "failed": {}},
        {"key": "serve/start", "component": "servers", "state": "cancelled", "done": ["a"],
         "failed": {"b": "boom"}},
    ],
}


def test_progress_bars_count_done_failed_pending() -> None:
    lines = format_progress(PROG).splitlines()
    assert lines[0].startswith("install/servers [########################] 2 done, 0 failed, 0 pending")
    assert lines[1].startswith("install/clients [######..................] 1 done, 0 failed, 3 pending")
    assert lines[2].startswith("serve/start     [############xxxxxxxxxxxx] 1 done, 1 failed, 0 pending")
    assert lines[2].endswith("(cancelled)")


def test_summary_names_failed_nodes_and_spares() -> None:
    text = format_summary(PROG)
    assert text.splitlines()[0] == "multi (gen 2): failed on 6 node(s)"
    assert "  x was replaced by spare b" in text
    assert "  FAILED serve/start on b: boom" in text
    assert text.rstrip().endswith("error: serve/start: 1 node(s) failed; b: boom")


def test_logs_grouped_like_dshbak_and_offsets_advance() -> None:
    res = {"logs": {"a": {"p": {"text": "hi\n", "offset": 3, "size": 3}},
                    "b": {"p": {"text": "hi\n", "offset": 3, "size": 3}},
                    "c": {"p": {"text": "other\n", "offset": 6, "size": 6}}},
           "missing": [{"node": "d", "reason": "dead"}]}
    assert format_logs(res).splitlines() == ["---- a, b : p ----", "hi", "---- c : p ----", "other",
                                             "d: did not answer (dead)"]
    assert format_logs(res, prefix=True).splitlines()[:2] == ["a,b p| hi", "c p| other"]
    assert next_offsets(res, {"a": {"p": 0}}) == {"a": {"p": 3}, "b": {"p": 3}, "c": {"p": 6}}


def test_done_lists_failures_and_gaps() -> None:
    res = {"app": "x", "done": ["a"], "failed": {"b": "no"}, "missing": [{"node": "c", "reason": "timed out"}]}
    assert format_done(res, "stopped").splitlines() == ["x: stopped on 1 node(s)", "b: failed: no",
                                                        "c: did not answer (timed out)"]
    assert format_done({"app": "x", "done": [], "failed": {}, "missing": []}, "cleaned") == "x: nothing to do\n"


def test_services_table_and_events() -> None:
    from tools.render_apps import format_services

    res = {"services": [{"name": "tr", "app": "tr", "classes": [
        {"worker": "distill", "min": 1, "max": 4, "high_water": 2.0, "pending": [], "decision": "queue 0.50 <= H 2"}],
        "instances": [
            {"id": "tr/distill@w1#1", "w": "distill", "node": "w1", "cache": False, "overflow": False, "q": 3,
             "busy": 1, "smoothed": 3.5, "cost": 0.021, "done": 40, "crashes": 1},
            {"id": "tr/distill@o1#5", "w": "distill", "node": "o1", "cache": False, "overflow": True, "q": 0,
             "busy": 0, "smoothed": 0.0, "cost": 0.02, "done": 2},
            {"id": "tr/cache@w1#2", "w": "cache", "node": "w1", "cache": True, "bytes": 900, "hits": 5, "misses": 2}]}],
        "events": [{"kind": "spawn", "detail": "tr/distill@o1#5 (overflow): queue 3.50 > H 2"},
                   {"kind": "registered", "detail": "x"}]}
    lines = format_services(res).splitlines()
    assert lines[0] == "service tr (app tr)"
    assert "distill: min 1 max 4 H 2  (queue 0.50 <= H 2)" in lines[1]
    row = next(line for line in lines if line.strip().startswith("tr/distill@w1#1"))
    assert row.split() == ["tr/distill@w1#1", "w1", "3", "1", "3.50", "21.0", "40", "1"]
    assert any(line.endswith("(overflow)") for line in lines)
    assert "cache: 900 bytes, 5 hits, 2 misses" in "\n".join(lines)
    assert lines[-2:] == ["recent:", "  spawn  tr/distill@o1#5 (overflow): queue 3.50 > H 2"]
