"""Process peers (SNS): a front end restarts a dead manager.

The manager tells its subscribers how it was started (``restart``: argv, cwd,
host) in its answer to ``svc_subscribe``.  A front end on the same host that
hears no beacon for ``grace`` seconds, and finds nothing listening at the
manager's control endpoint, starts it again with that command line.  The new
manager reads its state directory (applications, services) and the bus-nodes
re-register with it; its beacons resume.  A second front end that tries too
fails harmlessly: the control port is taken.  The manager, in turn, has every
front end restarted by its node's supervisor (restart policy ``always``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import time
from typing import Callable

__all__ = ["ManagerWatch", "should_restart"]

log = logging.getLogger(__name__)


def should_restart(silent_for: float | None, grace: float, info: dict | None, local_host: str,
                   last_attempt: float | None, now: float, backoff: float) -> tuple[bool, str]:
    """Policy: restart the manager now?  (pure; ``silent_for`` None = never heard)."""
    if not info or not info.get("argv"):
        return False, "the manager did not say how to restart it"
    if info.get("host") != local_host:
        return False, f"the manager runs on {info.get('host')!r}, not here"
    if silent_for is None or silent_for < grace:
        return False, "beacons are flowing"
    if last_attempt is not None and now - last_attempt < backoff:
        return False, f"restarted {now - last_attempt:.1f}s ago; waiting {backoff:g}s"
    return True, f"no beacon for {silent_for:.1f}s"


def _listening(endpoint: str) -> bool:
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=0.5):
            return True
    except (OSError, ValueError):
        return False


class ManagerWatch:
    """Watches the beacons of ``beacons`` (a frontends.beacon.BeaconClient)."""

    def __init__(self, beacons, *, grace: float = 5.0, backoff: float = 15.0, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.beacons = beacons
        self.grace, self.backoff, self.interval = grace, backoff, interval
        self.clock = clock
        self.restarts = 0
        self.last_reason = ""
        self._last_attempt: float | None = None
        self._task: asyncio.Task | None = None
        self._started = clock()
        self._children: list[subprocess.Popen] = []  # managers we started (they outlive us: own session)
        self._saved: dict | None = None

    def start(self) -> None:
        if getattr(self.beacons, "restart_info", None) is None:
            self.beacons.restart_info = self._load()  # a front end restarted while the manager is down
        self._task = asyncio.get_running_loop().create_task(self._run(), name="manager-watch")

    # The manager says how to restart it only while it runs; keep it on disk (the
    # application directory the node gives the front end) for a front end that is
    # itself restarted while the manager is down.
    @staticmethod
    def _path():
        base = os.environ.get("SNSBUS_APP_DIR")
        return os.path.join(base, ".snsbus", "manager-restart.json") if base else None

    def _load(self) -> dict | None:
        path = self._path()
        try:
            with open(path) as f:
                info = json.load(f)
            return info if isinstance(info, dict) else None
        except (OSError, TypeError, ValueError):
            return None

    def _save(self, info: dict) -> None:
        path = self._path()
        if path is None or info == self._saved:
            return
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(info, f)
            os.replace(tmp, path)
            self._saved = info
        except OSError as e:
            log.warning("cannot keep the manager's restart command in %s: %s", path, e)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:  # the watch must outlive any surprise
                log.exception("manager watch failed")

    async def check(self) -> bool:
        self._children = [c for c in self._children if c.poll() is None]
        if getattr(self.beacons, "restart_info", None):
            self._save(self.beacons.restart_info)
        now = self.clock()
        age = self.beacons.age()
        silent = age if age is not None else None
        info = getattr(self.beacons, "restart_info", None)
        ok, why = should_restart(silent, self.grace, info, socket.gethostname(), self._last_attempt, now,
                                 self.backoff)
        self.last_reason = why
        if not ok:
            return False
        if await asyncio.to_thread(_listening, self.beacons.endpoint):
            self.last_reason = "the manager's port answers: it is alive but silent; not restarting"
            return False
        self._last_attempt = now
        argv, cwd = list(info["argv"]), info.get("cwd") or None
        log_path = info.get("log")
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 (handed to the child)
        try:
            proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=dict(os.environ))
        except OSError as e:
            log.error("cannot restart the manager (%s): %s", " ".join(argv), e)
            return False
        finally:
            if log_path:
                out.close()
        self.restarts += 1
        log.warning("%s: restarted the manager (pid %d): %s", why, proc.pid, " ".join(argv))
        self._children.append(proc)  # polled on every check: reaped if it exits (no zombie)
        return True
