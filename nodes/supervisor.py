"""asyncio supervision of an application's processes on one node.

Each process runs in its own process group (``start_new_session``), with stdout and
stderr appended to ``log_dir/NAME.out`` / ``NAME.err`` across restarts. When a
process exits, the pure policy :func:`next_action` decides: restart after a backoff,
give up (flapping), or stay down. A process the user stopped is never restarted.

A process group lives and dies with its leader: when the leader exits, whatever is
left of its group is killed, so a restart never runs beside orphans of the last run.

With a ``run_dir``, each process is recorded in ``run_dir/NAME.json`` (pid, start
time from ``/proc/PID/stat``, argv, cwd, policy, restarts, tags; never the
environment, which may hold secrets) from its launch until it is down for good.
A supervisor made later on the same ``run_dir`` (the bus-node was killed and
restarted) takes a recorded process back with :meth:`Supervisor.adopt` if the pid
still names the same process (same start time: a reused pid is left alone). It
is not our child, so its exit is noticed through a pidfd (``os.pidfd_open``,
Linux >= 5.3; polling ``/proc`` without one) and its exit code is unknown
(``None``, a failure for the restart policy).
"""

from __future__ import annotations

import asyncio
import json
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

_POLL = 0.1  # seconds between /proc checks of an adopted process when there is no pidfd
_DEAD = ("Z", "X", "x")  # /proc states of a process that has exited


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
    failed = last.code not in policy.ok_codes  # an unknown code (None) is a failure
    if policy.mode == NEVER:
        return ("stay_down", f"{_exited(last.code)}; restart policy is never")
    if policy.mode == ON_FAILURE and not failed:
        return ("stay_down", f"{_exited(last.code)}; restart policy is on-failure")
    recent = sum(1 for e in history if now - e.at <= policy.flap_window)
    if recent > policy.max_restarts:
        return (
            "give_up",
            f"flapping: {recent} exits within {policy.flap_window:g}s "
            f"(max_restarts={policy.max_restarts}); not restarting",
        )
    delay = min(policy.backoff_cap, policy.backoff_base * 2 ** max(recent - 1, 0))
    return ("restart", delay)


def _exited(code: int | None) -> str:
    return "exited (exit code unknown)" if code is None else f"exited with {code}"


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
    tags: dict = field(default_factory=dict)  # recorded with the process (e.g. its block), opaque here

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
    ``run_dir`` (default: none) is where each process is recorded while it is
    supervised, so that a later supervisor can :meth:`adopt` it (module docstring).
    Use ``await start()`` / ``await stop()`` or ``async with``.
    """

    def __init__(self, log_dir: str | os.PathLike, clock: Callable[[], float] = time.monotonic,
                 run_dir: str | os.PathLike | None = None):
        self.log_dir = Path(log_dir)
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.clock = clock
        self._procs: dict[str, ProcessState] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._popen: dict[str, asyncio.subprocess.Process | _Adopted] = {}
        self._started = False

    async def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
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
        tags: dict | None = None,
    ) -> ProcessState:
        """Start ``argv`` as ``name`` and supervise it; returns once it started (or failed).

        ``env`` is the whole environment (None inherits ours); ``tags`` (JSON) are
        recorded with it. A name already supervised and still alive, or recorded by
        an earlier supervisor and still running (adopt it instead), raises
        :class:`SupervisorError`: a process never runs twice.
        """
        rec = self._claim(name)
        if rec is not None and _same_process(rec.get("pid"), rec.get("start")):
            raise SupervisorError(f"process {name!r} still runs as pid {rec['pid']}, started by an earlier "
                                  f"supervisor: adopt it")
        ps = ProcessState(
            name, list(argv), None if cwd is None else str(cwd), env,
            policy or RestartPolicy(), since=self.clock(), tags=dict(tags or {}),
        )
        self._procs[name] = ps
        first = asyncio.get_running_loop().create_future()
        self._tasks[name] = asyncio.create_task(self._run(ps, first), name=f"supervise-{name}")
        await first
        return ps

    def recorded(self) -> dict[str, dict]:
        """The process records in ``run_dir``, by name (left by an earlier supervisor, or ours)."""
        if self.run_dir is None:
            return {}
        out = {}
        for path in sorted(self.run_dir.glob("*.json")):
            rec = self._read_record(path.stem)
            if rec is not None:
                out[path.stem] = rec
        return out

    async def adopt(
        self,
        name: str,
        argv: Sequence[str] | None = None,
        *,
        cwd: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        policy: RestartPolicy | None = None,
        tags: dict | None = None,
        stopped_by_user: bool = False,
    ) -> ProcessState | None:
        """Take back the process an earlier supervisor recorded as ``name``; None without a record.

        If its pid still names the same process (same start time), it is watched
        again: state ``running``, same pid; its exit (code unknown: None) then
        follows the restart policy, and stop() kills its process group. If it died
        meanwhile, or its pid now names another process (left alone), that counts
        as an exit with an unknown code: restarted if the policy says so.
        ``argv``, ``cwd``, ``policy`` and ``tags`` (what a restart uses) default to
        the record's; ``env`` is never recorded and defaults to ours.
        ``stopped_by_user``: the user had stopped it (a stop cut short): it is
        never restarted, and a live one is left ``stopping`` for :meth:`stop`.
        """
        rec = self._claim(name)
        if rec is None:
            return None
        ps = ProcessState(
            name,
            list(argv if argv is not None else rec.get("argv") or []),
            str(cwd) if cwd is not None else rec.get("cwd"),
            env,
            policy or _policy_from(rec.get("policy")),
            restarts=int(rec.get("restarts") or 0),
            since=self.clock(),
            stopped_by_user=stopped_by_user,
            tags=dict(tags if tags is not None else rec.get("tags") or {}),
        )
        pid, start = rec["pid"], rec.get("start")
        adopted = None
        if _same_process(pid, start):
            adopted = _Adopted(pid, start)
            log.info("%s: adopted pid %d (started by an earlier supervisor)", name, pid)
        else:
            st = _proc_stat(pid)
            if st is None or st[1] == start:
                # No process has that pid (or it is our leader's zombie): the pid cannot have
                # been reused as a group id, so what is left of the group is the old run's.
                _killpg(pid, signal.SIGKILL)
            log.info("%s: recorded pid %d is gone; it exited while nobody supervised it", name, pid)
        self._procs[name] = ps
        first = asyncio.get_running_loop().create_future()
        self._tasks[name] = asyncio.create_task(
            self._run(ps, first, adopted=adopted, lost=adopted is None), name=f"supervise-{name}")
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

    def _claim(self, name: str) -> dict | None:
        """Checks before supervising ``name``: started, a good name, not supervised already; its record."""
        if not self._started:
            raise SupervisorError("supervisor not started: await start() first")
        self._check_name(name)
        task = self._tasks.get(name)
        if task is not None and not task.done():
            raise SupervisorError(f"process {name!r} is already supervised")
        return self._read_record(name)

    @staticmethod
    def _check_name(name: str) -> None:
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            raise SupervisorError(f"bad process name {name!r}")

    def _record_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def _read_record(self, name: str) -> dict | None:
        if self.run_dir is None:
            return None
        try:
            rec = json.loads(self._record_path(name).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable process record: %s", name, e)
            return None
        if not isinstance(rec, dict) or not isinstance(rec.get("pid"), int) or rec["pid"] <= 1:
            log.warning("%s: ignoring a process record without a pid", name)
            return None
        return rec

    def _record(self, ps: ProcessState, pid: int) -> None:
        """Write ``ps``'s record (atomically): what a later supervisor needs to adopt it."""
        if self.run_dir is None:
            return
        st = _proc_stat(pid)
        p = ps.policy
        rec = {
            "name": ps.name, "pid": pid, "start": st[1] if st else None, "argv": ps.argv, "cwd": ps.cwd,
            "restarts": ps.restarts, "tags": ps.tags, "recorded": time.time(),
            "policy": {"mode": p.mode, "max_restarts": p.max_restarts, "backoff_base": p.backoff_base,
                       "backoff_cap": p.backoff_cap, "flap_window": p.flap_window,
                       "ok_codes": sorted(p.ok_codes)},
        }
        path = self._record_path(ps.name)
        tmp = path.with_name(f".{ps.name}.json.tmp")
        try:
            tmp.write_text(json.dumps(rec))
            tmp.replace(path)
        except OSError as e:  # the process runs all the same; only its adoption is at stake
            log.warning("%s: cannot record pid %d in %s: %s", ps.name, pid, path, e)

    def _forget(self, name: str) -> None:
        if self.run_dir is not None:
            try:
                self._record_path(name).unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("%s: cannot remove its process record: %s", name, e)

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

    async def _run(
        self, ps: ProcessState, first: asyncio.Future, adopted: _Adopted | None = None, lost: bool = False
    ) -> None:
        """Watch ``ps`` until it is down for good. ``adopted``: a live process of an earlier
        supervisor, watched first; ``lost``: its recorded process exited unwatched."""
        proc = adopted
        try:
            while True:
                if lost:
                    lost, code = False, None
                    ps.pid = None
                    gone = "died while nobody supervised it; "
                else:
                    if proc is None:
                        try:
                            proc = await self._launch(ps)
                        except OSError as e:
                            self._set(ps, FAILED, f"cannot start {ps.argv[0]!r}: {e}")
                            log.warning("%s: %s", ps.name, ps.reason)
                            return
                        finally:
                            _ready(first)
                        self._record(ps, proc.pid)
                    self._popen[ps.name] = proc
                    ps.pid = proc.pid
                    self._set(ps, STOPPING if ps.stopped_by_user else RUNNING,
                              "adopted from an earlier supervisor" if proc is adopted else "")
                    _ready(first)
                    code = await proc.wait()
                    _killpg(proc.pid, signal.SIGKILL)  # orphans of this run die with it
                    self._popen.pop(ps.name, None)
                    proc = None
                    gone = ""
                ps.exit_code = code
                ps.pid = None
                now = self.clock()
                ps.history.append(Exit(now, code))
                action, arg = next_action(ps.policy, ps.history, now, ps.stopped_by_user)
                if action == "stay_down":
                    self._set(ps, STOPPED if ps.stopped_by_user else EXITED, gone + str(arg))
                    return
                if action == "give_up":
                    self._set(ps, FLAPPING, gone + str(arg))
                    log.warning("%s: %s", ps.name, arg)
                    return
                self._set(ps, BACKOFF, f"{gone}{_exited(code)}; restarting in {arg:g}s")
                _ready(first)
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
            self._popen.pop(ps.name, None)
            self._forget(ps.name)  # down for good: nothing left to adopt
            _ready(first)

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


def _ready(first: asyncio.Future) -> None:
    if not first.done():
        first.set_result(None)


def _policy_from(raw) -> RestartPolicy:
    """The policy of a process record (the default policy if the record has none we can read)."""
    try:
        return RestartPolicy(
            mode=raw["mode"], max_restarts=int(raw["max_restarts"]), backoff_base=float(raw["backoff_base"]),
            backoff_cap=float(raw["backoff_cap"]), flap_window=float(raw["flap_window"]),
            ok_codes=frozenset(int(c) for c in raw["ok_codes"]),
        )
    except (TypeError, KeyError, ValueError):
        return RestartPolicy()


def _proc_stat(pid: int) -> tuple[str, int | None] | None:
    """``(state letter, start time in clock ticks since boot)`` of ``pid``, or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    fields = raw[raw.rfind(")") + 2:].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return fields[0] if fields else "?", None


def _same_process(pid, start) -> bool:
    """Whether ``pid`` is alive and still the process that started at ``start`` (pids get reused)."""
    if not isinstance(pid, int) or pid <= 1 or start is None:
        return False  # without a start time a reused pid cannot be told apart: never adopt it
    st = _proc_stat(pid)
    return st is not None and st[0] not in _DEAD and st[1] == start


class _Adopted:
    """A live process an earlier supervisor started: not our child, so there is no exit code
    to collect. ``wait()`` returns None once it exited, noticed through a pidfd readable on
    exit (``os.pidfd_open``, Linux >= 5.3) or, without one, by polling ``/proc``."""

    def __init__(self, pid: int, start: int):
        self.pid, self.start = pid, start

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # no pidfd here (or the process is already gone)
            fd = None
        if fd is not None:
            try:
                # Checked after the open: the pidfd is then known to be this process, not a successor.
                if not _same_process(self.pid, self.start):
                    return None
                exited = loop.create_future()
                try:
                    loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
                except NotImplementedError:  # an event loop without add_reader: poll below
                    pass
                else:
                    try:
                        await exited
                    finally:
                        loop.remove_reader(fd)
                    return None
            finally:
                os.close(fd)
        while _same_process(self.pid, self.start):
            await asyncio.sleep(_POLL)
        return None
