"""Process supervision: the pure restart policy, then real processes (sh, sleep, python)."""

from __future__ import annotations

import asyncio
import functools
import sys
import time

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodes.supervisor import (
    ALWAYS,
    NEVER,
    ON_FAILURE,
    Exit,
    RestartPolicy,
    Supervisor,
    SupervisorError,
    next_action,
)

# ------------------------------------------------------------------ next_action (pure)

P = RestartPolicy(mode=ON_FAILURE, max_restarts=3, backoff_base=1.0, backoff_cap=5.0, flap_window=10.0)


def test_user_stop_is_final():
    assert next_action(P, [Exit(0, 1)], 1, True) == ("stay_down", "stopped by user")
    always = RestartPolicy(mode=ALWAYS)
    assert next_action(always, [Exit(0, -15)], 1, True)[0] == "stay_down"


def test_never_and_on_failure_success():
    assert next_action(RestartPolicy(mode=NEVER), [Exit(0, 1)], 1, False)[0] == "stay_down"
    act, reason = next_action(P, [Exit(0, 0)], 1, False)
    assert act == "stay_down" and "on-failure" in reason


def test_always_restarts_success():
    assert next_action(RestartPolicy(mode=ALWAYS, backoff_base=0.5), [Exit(0, 0)], 0, False) == (
        "restart",
        0.5,
    )


def test_ok_codes():
    pol = RestartPolicy(mode=ON_FAILURE, ok_codes=frozenset({0, 3}))
    assert next_action(pol, [Exit(0, 3)], 0, False)[0] == "stay_down"
    assert next_action(pol, [Exit(0, 4)], 0, False)[0] == "restart"


def test_backoff_grows_exponentially_and_caps():
    hist = []
    delays = []
    for t in range(3):
        hist.append(Exit(float(t), 1))
        act, delay = next_action(P, hist, float(t), False)
        assert act == "restart"
        delays.append(delay)
    assert delays == [1.0, 2.0, 4.0]
    big = RestartPolicy(max_restarts=10, backoff_base=1.0, backoff_cap=5.0, flap_window=100)
    hist = [Exit(float(t), 1) for t in range(6)]
    assert next_action(big, hist, 6.0, False) == ("restart", 5.0)


def test_flapping_gives_up():
    hist = [Exit(float(t), 1) for t in range(4)]  # 4 exits > max_restarts=3 within 10 s
    act, reason = next_action(P, hist, 3.0, False)
    assert act == "give_up" and reason.startswith("flapping")


def test_old_exits_leave_the_window():
    hist = [Exit(0.0, 1), Exit(1.0, 1), Exit(2.0, 1), Exit(30.0, 1)]
    assert next_action(P, hist, 30.0, False) == ("restart", 1.0)  # backoff resets too


def test_policy_validation():
    with pytest.raises(ValueError):
        RestartPolicy(mode="sometimes")
    with pytest.raises(ValueError):
        RestartPolicy(flap_window=0)


@given(
    st.lists(st.tuples(st.floats(0, 100), st.integers(-9, 3)), min_size=1, max_size=20),
    st.sampled_from([NEVER, ON_FAILURE, ALWAYS]),
    st.booleans(),
)
def test_next_action_properties(raw, mode, stopped):
    pol = RestartPolicy(mode=mode, max_restarts=4, backoff_base=0.5, backoff_cap=8.0, flap_window=20)
    hist = [Exit(t, c) for t, c in sorted(raw)]
    act, arg = next_action(pol, hist, hist[-1].at, stopped)
    assert act in ("restart", "give_up", "stay_down")
    if stopped or mode == NEVER:
        assert act == "stay_down"
    if act == "restart":
        assert 0 <= arg <= pol.backoff_cap
    else:
        assert isinstance(arg, str) and arg


# ------------------------------------------------------------------ real processes


@pytest.fixture(autouse=True)
def reap_children():
    """Fail on, and kill, any process a test left behind."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=5)
    assert not [p for p in left if _alive(p.pid)], f"leaked processes: {left}"


def arun(fn):
    """Run an async test under asyncio.run with an overall deadline."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 10))

    return wrapper


async def until(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


FAST = dict(backoff_base=0.05, backoff_cap=1.0, flap_window=30.0)


@arun
async def test_exit_code_recorded(tmp_path):
    async with Supervisor(tmp_path / "logs") as sup:
        ps = await sup.spawn("x", ["sh", "-c", "exit 7"], policy=RestartPolicy(mode=NEVER))
        await sup.wait("x")
        assert ps.state == "exited" and ps.exit_code == 7 and ps.restarts == 0
        [st_] = sup.status()
        assert st_["name"] == "x" and st_["exit_code"] == 7 and st_["pid"] is None
        assert st_["state"] == "exited" and "since" in st_


@arun
async def test_on_failure_restarts_until_success(tmp_path):
    counter = tmp_path / "n"
    script = f'echo run >> {counter}; [ $(wc -l < {counter}) -ge 3 ] && exit 0; exit 1'
    async with Supervisor(tmp_path / "logs") as sup:
        ps = await sup.spawn("x", ["sh", "-c", script], policy=RestartPolicy(max_restarts=5, **FAST))
        await sup.wait("x")
        assert ps.state == "exited" and ps.exit_code == 0 and ps.restarts == 2
        gaps = [b.at - a.at for a, b in zip(ps.history, ps.history[1:])]
        assert gaps[0] >= 0.05 and gaps[1] >= 0.1  # exponential backoff


@arun
async def test_flapping_stops_restarts_and_is_reported(tmp_path):
    async with Supervisor(tmp_path / "logs") as sup:
        pol = RestartPolicy(mode=ALWAYS, max_restarts=2, **FAST)
        ps = await sup.spawn("flap", ["sh", "-c", "echo out; echo err >&2; exit 1"], policy=pol)
        await sup.wait("flap")
        assert ps.state == "flapping" and ps.restarts == 2 and len(ps.history) == 3
        [st_] = sup.status()
        assert st_["state"] == "flapping" and "flapping" in st_["reason"]
        # Logs are appended across restarts.
        assert (tmp_path / "logs/flap.out").read_text() == "out\n" * 3
        assert (tmp_path / "logs/flap.err").read_text() == "err\n" * 3


@arun
async def test_user_stop_is_never_restarted(tmp_path):
    async with Supervisor(tmp_path / "logs") as sup:
        ps = await sup.spawn("s", ["sleep", "30"], policy=RestartPolicy(mode=ALWAYS, **FAST))
        pid = ps.pid
        assert ps.state == "running" and _alive(pid)
        await sup.stop("s", grace=2)
        assert ps.state == "stopped" and ps.exit_code == -15 and ps.restarts == 0
        assert not _alive(pid)
        await sup.wait("s")
        assert ps.state == "stopped" and ps.pid is None


@arun
async def test_stop_during_backoff(tmp_path):
    async with Supervisor(tmp_path / "logs") as sup:
        pol = RestartPolicy(mode=ALWAYS, backoff_base=30, backoff_cap=30)
        ps = await sup.spawn("b", ["sh", "-c", "exit 1"], policy=pol)
        await until(lambda: ps.state == "backoff")
        await sup.stop("b", grace=1)
        assert ps.state == "stopped" and ps.restarts == 0


@arun
async def test_stop_kills_the_whole_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pidfile}; wait"
    async with Supervisor(tmp_path / "logs") as sup:
        ps = await sup.spawn("g", ["sh", "-c", script], policy=RestartPolicy(mode=ALWAYS, **FAST))
        await until(lambda: pidfile.exists() and pidfile.read_text().strip())
        child = int(pidfile.read_text())
        assert _alive(child)
        await sup.stop("g", grace=2)
        assert ps.state == "stopped"
        await until(lambda: not _alive(child))


@arun
async def test_term_ignored_then_killed(tmp_path):
    code = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "print('ready', flush=True); time.sleep(60)"
    )
    async with Supervisor(tmp_path / "logs") as sup:
        ps = await sup.spawn("t", [sys.executable, "-c", code], policy=RestartPolicy(mode=ALWAYS))
        await until(lambda: (tmp_path / "logs/t.out").read_text() == "ready\n")
        t0 = time.monotonic()
        await sup.stop("t", grace=0.3)
        assert time.monotonic() - t0 >= 0.3
        assert ps.state == "stopped" and ps.exit_code == -9


@arun
async def test_orphans_die_with_their_leader(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pidfile}; exit 0"
    async with Supervisor(tmp_path / "logs") as sup:
        ps = await sup.spawn("o", ["sh", "-c", script], policy=RestartPolicy(mode=NEVER))
        await sup.wait("o")
        assert ps.exit_code == 0
        await until(lambda: not _alive(int(pidfile.read_text())))


@arun
async def test_stop_all_and_lifecycle(tmp_path):
    sup = Supervisor(tmp_path / "logs")
    assert not (tmp_path / "logs").exists()  # no I/O before start()
    with pytest.raises(SupervisorError):
        await sup.spawn("a", ["sleep", "30"])
    await sup.start()
    try:
        a = await sup.spawn("a", ["sleep", "30"], env={"PATH": "/usr/bin:/bin"})
        b = await sup.spawn("b", ["sleep", "30"], cwd=tmp_path)
        with pytest.raises(SupervisorError, match="already"):
            await sup.spawn("a", ["sleep", "30"])
        await sup.stop_all(grace=2)
        assert a.state == b.state == "stopped"
        assert {s["state"] for s in sup.status()} == {"stopped"}
    finally:
        await sup.stop()


@arun
async def test_missing_program_fails(tmp_path):
    async with Supervisor(tmp_path / "logs") as sup:
        ps = await sup.spawn("m", [str(tmp_path / "nope")], policy=RestartPolicy(mode=ALWAYS))
        assert ps.state == "failed" and "cannot start" in ps.reason
        await sup.wait("m")


def test_unknown_exit_code_is_a_failure():
    # An adopted process is not our child: its exit code is unknown (None).
    act, _ = next_action(P, [Exit(0, None)], 0, False)
    assert act == "restart"
    act, reason = next_action(RestartPolicy(mode=NEVER), [Exit(0, None)], 0, False)
    assert act == "stay_down" and "unknown" in reason


@arun
async def test_process_record_lives_as_long_as_the_process(tmp_path):
    import json

    run = tmp_path / "run"
    async with Supervisor(tmp_path / "logs", run_dir=run) as sup:
        pol = RestartPolicy(mode=ON_FAILURE, max_restarts=1, ok_codes=frozenset({0, 3}), **FAST)
        ps = await sup.spawn("r", ["sleep", "30"], cwd=tmp_path, policy=pol, tags={"block": "b"})
        rec = json.loads((run / "r.json").read_text())
        assert rec["pid"] == ps.pid and rec["argv"] == ["sleep", "30"] and rec["cwd"] == str(tmp_path)
        assert rec["tags"] == {"block": "b"} and isinstance(rec["start"], int) and rec["restarts"] == 0
        assert rec["policy"]["ok_codes"] == [0, 3] and rec["policy"]["mode"] == ON_FAILURE
        assert "env" not in rec  # never on disk: it may hold secrets
        assert set(sup.recorded()) == {"r"}
        await sup.stop("r", grace=2)
        assert sup.recorded() == {} and not list(run.iterdir())
        # A process that is down for good (here: stays down by policy) leaves no record either.
        await sup.spawn("d", ["sh", "-c", "exit 3"], policy=pol)
        await sup.wait("d")
        assert sup.recorded() == {}
    plain = Supervisor(tmp_path / "plain")
    async with plain:
        await plain.spawn("x", ["true"], policy=RestartPolicy(mode=NEVER))
        await plain.wait("x")
        assert plain.recorded() == {} and plain.run_dir is None
