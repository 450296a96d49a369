"""asyncio supervision of an application's processes on one node.

Each process runs in its own process group (``start_new_session``), with stdout and
stderr appended to ``log_dir/NAME.out`` / ``NAME.err`` across restarts. When a
process exits, the pure policy :func:`next_action` decides: restart after a backoff,
give up (flapping), or stay down. A process the user stopped is never restarted.

A process group lives and dies with its leader: when the leader exits, whatever is
left of its group is killed, so a restart never runs beside orphans of the last run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from core.errors import BusError

__all__ = [
    "SupervisorError",
    "RestartPolicy",
    "Exit",
    "ProcessState",
    "Supervisor",
    "next_action",
    "NEVER",
    "ON_FAILURE",
    "ALWAYS",
]

log = logging.getLogger(__name__)

NEVER = "never"
ON_FAILURE = "on-failure"
ALWAYS = "always"
_MODES = (NEVER, ON_FAILURE, ALWAYS)

# Process states reported by status().
STARTING = "starting"
RUNNING = "running"
BACKOFF = "backoff"  # exited, waiting to be restarted
EXITED = "exited"  # exited and the policy keeps it down
STOPPING = "stopping"
STOPPED = "stopped"  # stopped by the user
FLAPPING = "flapping"  # too many exits within flap_window: no more restarts
FAILED = "failed"  # could not be started at all


class SupervisorError(BusError):
    """A supervisor request that cannot be honoured (unknown or duplicate process)."""


@dataclass(frozen=True)
class RestartPolicy:
    """When and how fast to restart a process.

    ``mode``: ``never`` | ``on-failure`` (exit code not in ``ok_codes``) | ``always``.
    The n-th restart within ``flap_window`` waits ``min(backoff_cap, backoff_base *
    2**(n-1))`` seconds; more than ``max_restarts`` exits within ``flap_window``
    seconds means the process is flapping and is not restarted again.
    """

    mode: str = ON_FAILURE
    max_restarts: int = 5
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    flap_window: float = 60.0
    ok_codes: frozenset[int] = frozenset({0})

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"restart mode must be one of {_MODES}, not {self.mode!r}")
        if self.max_restarts < 0 or self.backoff_base < 0 or self.backoff_cap < 0:
            raise ValueError("max_restarts and backoff values must be >= 0")
        if self.flap_window <= 0:
            raise ValueError("flap_window must be > 0")


@dataclass(frozen=True)
class Exit:
    """One exit of a process: when (supervisor clock) and its code (-N = killed by signal N)."""

    at: float
    code: int | None


def next_action(
    policy: RestartPolicy, history: Sequence[Exit], now: float, stopped_by_user: bool
) -> tuple[str, float | str]:
    """Decide what follows the latest exit in ``history``.

    Returns ``("restart", delay_seconds)``, ``("give_up", reason)`` (flapping) or
    ``("stay_down", reason)``.
    """
    if stopped_by_user:
        return ("stay_down", "stopped by user")
    if not history:
        return ("stay_down", "never exited")
    last = history[-1]
    failed = last.code not in policy.ok_codes
    if policy.mode == NEVER:
        return ("stay_down", f"exited with {last.code}; restart policy is never")
    if policy.mode == ON_FAILURE and not failed:
        return ("stay_down", f"exited with {last.code}; restart policy is on-failure")
    recent = sum(1 for e in history if now - e.at <= policy.flap_window)
    if recent > policy.max_restarts:
        return (
            "give_up",
            f"flapping: {recent} exits within {policy.flap_window:g}s "
            f"(max_restarts={policy.max_restarts}); not restarting",
        )
    delay = min(policy.backoff_cap, policy.backoff_base * 2 ** max(recent - 1, 0))
    return ("restart", delay)


@dataclass
class ProcessState:
    """The supervisor's view of one named process (mutable; ``status()`` snapshots it)."""

    name: str
    argv: list[str]
    cwd: str | None
    env: dict[str, str] | None
    policy: RestartPolicy
    state: str = STARTING
    pid: int | None = None
    restarts: int = 0
    exit_code: int | None = None
    since: float = 0.0
    reason: str = ""
    stopped_by_user: bool = False
    history: list[Exit] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "exit_code": self.exit_code,
            "since": self.since,
            "reason": self.reason,
        }


class Supervisor:
    """Starts, watches, restarts and stops named processes.

    ``clock`` (default ``time.monotonic``) times exits, backoff and ``since``.
    Use ``await start()`` / ``await stop()`` or ``async with``.
    """

    def __init__(self, log_dir: str | os.PathLike, clock: Callable[[], float] = time.monotonic):
        self.log_dir = Path(log_dir)
        self.clock = clock
        self._procs: dict[str, ProcessState] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._popen: dict[str, asyncio.subprocess.Process] = {}
        self._started = False

    async def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._started = True

    async def stop(self, name: str | None = None, grace: float = 5.0) -> None:
        """Stop process ``name`` (TERM, ``grace`` s, KILL; never restarted afterwards).

        Without a name: stop every process and shut the supervisor down.
        """
        if name is not None:
            await self._stop_one(name, grace)
            return
        await self.stop_all(grace)
        self._started = False

    async def __aenter__(self) -> "Supervisor":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        policy: RestartPolicy | None = None,
    ) -> ProcessState:
        """Start ``argv`` as ``name`` and supervise it; returns once it started (or failed).

        ``env`` is the whole environment (None inherits ours). A name already
        supervised and still alive raises :class:`SupervisorError`.
        """
        if not self._started:
            raise SupervisorError("supervisor not started: await start() first")
        if "/" in name or name in ("", ".", ".."):
            raise SupervisorError(f"bad process name {name!r}")
        task = self._tasks.get(name)
        if task is not None and not task.done():
            raise SupervisorError(f"process {name!r} is already supervised")
        ps = ProcessState(
            name, list(argv), None if cwd is None else str(cwd), env,
            policy or RestartPolicy(), since=self.clock(),
        )
        self._procs[name] = ps
        first = asyncio.get_running_loop().create_future()
        self._tasks[name] = asyncio.create_task(self._run(ps, first), name=f"supervise-{name}")
        await first
        return ps

    def get(self, name: str) -> ProcessState:
        try:
            return self._procs[name]
        except KeyError:
            raise SupervisorError(f"no process named {name!r}") from None

    def status(self) -> list[dict]:
        """A snapshot per process: name, state, pid, restarts, exit_code, since, reason."""
        return [ps.as_dict() for ps in self._procs.values()]

    async def stop_all(self, grace: float = 5.0) -> None:
        """Stop every process concurrently; the supervisor keeps running."""
        await asyncio.gather(*(self._stop_one(n, grace) for n in list(self._procs)))

    async def wait(self, name: str) -> ProcessState:
        """Wait until ``name`` is no longer supervised (stayed down, flapping, stopped)."""
        task = self._tasks.get(name)
        if task is not None:
            await asyncio.shield(task)
        return self.get(name)

    # -------------------------------------------------------------- internals

    def _set(self, ps: ProcessState, state: str, reason: str = "") -> None:
        ps.state = state
        ps.reason = reason
        ps.since = self.clock()

    async def _launch(self, ps: ProcessState) -> asyncio.subprocess.Process:
        # Append across restarts; the child keeps its own copies of the descriptors.
        with open(self.log_dir / f"{ps.name}.out", "ab") as out, open(
            self.log_dir / f"{ps.name}.err", "ab"
        ) as err:
            return await asyncio.create_subprocess_exec(
                *ps.argv,
                cwd=ps.cwd,
                env=ps.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    async def _run(self, ps: ProcessState, first: asyncio.Future) -> None:
        try:
            while True:
                try:
                    proc = await self._launch(ps)
                except OSError as e:
                    self._set(ps, FAILED, f"cannot start {ps.argv[0]!r}: {e}")
                    log.warning("%s: %s", ps.name, ps.reason)
                    return
                finally:
                    if not first.done():
                        first.set_result(None)
                self._popen[ps.name] = proc
                ps.pid = proc.pid
                self._set(ps, STOPPING if ps.stopped_by_user else RUNNING)
                code = await proc.wait()
                _killpg(proc.pid, signal.SIGKILL)  # orphans of this run die with it
                self._popen.pop(ps.name, None)
                ps.exit_code = code
                ps.pid = None
                now = self.clock()
                ps.history.append(Exit(now, code))
                action, arg = next_action(ps.policy, ps.history, now, ps.stopped_by_user)
                if action == "stay_down":
                    self._set(ps, STOPPED if ps.stopped_by_user else EXITED, str(arg))
                    return
                if action == "give_up":
                    self._set(ps, FLAPPING, str(arg))
                    log.warning("%s: %s", ps.name, arg)
                    return
                self._set(ps, BACKOFF, f"exited with {code}; restarting in {arg:g}s")
                await asyncio.sleep(arg)
                ps.restarts += 1
        except asyncio.CancelledError:
            proc = self._popen.pop(ps.name, None)
            if proc is not None:
                _killpg(proc.pid, signal.SIGKILL)
            if ps.stopped_by_user:
                self._set(ps, STOPPED, "stopped by user")
            raise
        finally:
            if not first.done():
                first.set_result(None)

    async def _stop_one(self, name: str, grace: float) -> None:
        ps = self.get(name)
        ps.stopped_by_user = True
        task = self._tasks.get(name)
        if task is None or task.done():
            return
        proc = self._popen.get(name)
        if proc is None:
            # Waiting in backoff (or starting): nothing to signal, just end the watch.
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self._set(ps, STOPPED, "stopped by user")
            return
        self._set(ps, STOPPING)
        _killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(task), grace)
        except asyncio.TimeoutError:
            _killpg(proc.pid, signal.SIGKILL)
            await asyncio.shield(task)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone
