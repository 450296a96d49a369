"""Fixtures of the tools tests: a fake manager, a state directory that is always torn down."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # fake_manager / fake_node, whatever the import mode
    sys.path.insert(0, str(HERE))

from fake_manager import FakeManager, make_members  # noqa: E402

from tests.helpers import wait_for  # noqa: E402,F401  (re-exported: tests do `from conftest import wait_for`)

FAKE_MANAGER = [sys.executable, str(HERE / "fake_manager.py")]
FAKE_NODE = [sys.executable, str(HERE / "fake_node.py")]


@pytest.fixture
def fake():
    """A fake manager with 30 members (node-7 and node-12 dead) in a thread."""
    events = [
        {"t": time.time() - 30, "kind": "joined", "node": "node-7", "detail": ""},
        {"t": time.time() - 20, "kind": "lost", "node": "node-7", "detail": "missed 3 heartbeats"},
        {"t": time.time() - 10, "kind": "rejoined", "node": "node-28", "detail": "under node-1"},
    ]
    mgr = FakeManager(make_members(30, 4, dead={"node-7", "node-12"}), events=events)
    mgr.start()
    try:
        yield mgr
    finally:
        mgr.stop()


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    """An empty state directory; whatever was started in it is stopped afterwards."""
    from tools import cluster

    sdir = tmp_path / "state"
    monkeypatch.setenv("SNSBUS_STATE_DIR", str(sdir))
    monkeypatch.delenv("SNSBUS_ENDPOINT", raising=False)
    try:
        yield sdir
    finally:
        cluster.down(sdir, grace=1.0)
