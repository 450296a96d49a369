"""Replay every input the fuzzers saved: ``tests/fuzz/regressions/<target>/*.bin``.

``python -m tools.fuzz`` writes each new crash here as ``crash-<sha>.bin``;
the test fails until the bug is fixed.  Inputs named ``<id>-*.bin`` belong to
a known bug of ``tests/fuzz/known.py``: they must still fail the same way
(xfail) while the entry is there, and the test fails once one passes, so the
fix removes the entry and the input guards the fix from then on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz import known, targets

HERE = Path(__file__).parent
FILES = sorted(HERE.glob("*/*.bin"))


@pytest.fixture(scope="module")
def fuzz_state():
    targets.setup()
    try:
        yield
    finally:
        targets.teardown()


def _bug_of(path: Path) -> known.Known | None:
    return next((k for k in known.KNOWN if path.name.startswith(k.id + "-")), None)


def test_every_known_bug_has_a_regression_input():
    ids = {k.id for k in known.KNOWN}
    covered = {k.id for k in map(_bug_of, FILES) if k is not None}
    assert ids == covered, f"known bugs without an input in {HERE}: {sorted(ids - covered)}"
    assert all(f.parent.name in targets.TARGETS for f in FILES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_regression_input(path: Path, fuzz_state):
    target = path.parent.name
    data = path.read_bytes()
    bug = _bug_of(path)
    if bug is None:
        targets.TARGETS[target](data)  # a fixed crash: must pass from now on
        return
    try:
        targets.TARGETS[target](data)
    except Exception as e:
        if known.match(target, e) is bug:
            pytest.xfail(f"known bug {bug.id}: {bug.bug[:120]}")
        raise
    pytest.fail(f"known bug {bug.id} no longer reproduces with {path.name}: "
                f"it looks fixed, so delete its entry in tests/fuzz/known.py")  # fmt: skip
