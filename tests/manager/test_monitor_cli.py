"""`python -m manager --monitor-port 0`: the monitor is served and recorded in manager.json."""

from __future__ import annotations

import json
import sys
import urllib.request

from tools import cluster, state


def test_manager_serves_the_monitor_and_metrics_when_asked(tmp_path):
    sdir = tmp_path / "state"
    try:
        cluster.start_manager(sdir, port=0, manager_argv=[sys.executable, "-m", "manager", "--monitor-port", "0"])
        url = state.manager_info(sdir)["monitor"]
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=5) as r:
            page = r.read().decode()
        assert r.status == 200 and "<title>snsbus monitor</title>" in page and "static/monitor.js" in page
        with urllib.request.urlopen(url + "api/snapshot", timeout=5) as r:
            snap = json.loads(r.read())
        assert isinstance(snap, dict) and snap
        with urllib.request.urlopen(url + "metrics", timeout=5) as r:
            text = r.read().decode()
        assert "snsbus_" in text
    finally:
        cluster.down(sdir, grace=2.0)
