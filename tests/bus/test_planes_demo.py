"""The `make demo` tour (tools/demo.py) runs its two bus processes and reaps them."""

from __future__ import annotations

import pytest

from tools.demo import STEPS, run_tour


@pytest.mark.timeout(90)
def test_demo_tour_runs_and_stops_everything(arun):
    lines: list[str] = []
    status = arun(run_tour(count=5_000, out=lines.append), timeout=80)
    text = "\n".join(lines)
    assert status == 0, text
    assert f"[{len(STEPS) + 1}/{len(STEPS) + 1}] stop" in text
    assert "5,000 messages" in text and "msg/s" in text
    assert "2 processes stopped and reaped" in text
    assert "FAILED" not in text
