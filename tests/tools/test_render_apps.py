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
