"""Shared pieces of the fast-path benchmarks.

Each benchmark test stores its median time per twin in ``medians``; the speedup
tests that follow read both twins' figures from the same run, and the ratios are
printed in the terminal summary.
"""

from __future__ import annotations

import pytest

_MEDIANS: dict = {}  # (group, twin) -> median seconds per round
_REPORT: list = []  # lines for the terminal summary


@pytest.fixture(scope="session")
def medians():
    return _MEDIANS


@pytest.fixture(scope="session")
def report_ratio():
    """``report_ratio(line)``: print ``line`` in the terminal summary."""
    return _REPORT.append


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("ratios against a baseline from the same run (medians)")
        for line in _REPORT:
            terminalreporter.write_line(line)
