"""The local state directory shared by ``bus-ctl`` and the manager it starts.

Layout of ``DIR`` (``--state-dir``, else ``$SNSBUS_STATE_DIR``, else
``$XDG_STATE_HOME/snsbus``, else ``~/.local/state/snsbus``)::

    DIR/manager.json   written by the manager when ready: {pid, control, data, epoch}
    DIR/cluster.json   written by ``bus-ctl up``: the processes it started (see tools.cluster)
    DIR/logs/          manager.log and node-*.log of the processes ``up`` started

Kept small and free of heavy imports: ``bus-ctl exec`` reads it on every call.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

__all__ = [
    "MANAGER_FILE",
    "CLUSTER_FILE",
    "LOG_DIR",
    "default_state_dir",
    "resolve_state_dir",
    "read_json",
    "write_json",
    "manager_info",
    "proc_stat",
    "proc_cmdline",
    "pid_alive",
]

MANAGER_FILE = "manager.json"
CLUSTER_FILE = "cluster.json"
LOG_DIR = "logs"

_HAVE_PROC = os.path.exists("/proc/self/stat")


def default_state_dir() -> Path:
    """``$SNSBUS_STATE_DIR``, else ``$XDG_STATE_HOME/snsbus``, else ``~/.local/state/snsbus``."""
    env = os.environ.get("SNSBUS_STATE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return base / "snsbus"


def resolve_state_dir(state_dir: str | os.PathLike | None) -> Path:
    """The given directory, or the default one."""
    return Path(state_dir).expanduser() if state_dir else default_state_dir()


def read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None if the file is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` atomically (temporary file + rename in the same directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def manager_info(state_dir: Path) -> dict | None:
    """The manager's ``manager.json`` in ``state_dir``, or None."""
    return read_json(state_dir / MANAGER_FILE)


def proc_stat(pid: int) -> tuple[str, int | None] | None:
    """``(state letter, start time in clock ticks)`` of ``pid``, or None if there is none.

    Reads ``/proc``; where there is no ``/proc`` it falls back to ``kill(pid, 0)``
    and returns ``("?", None)`` for a live process.
    """
    raw = None
    if _HAVE_PROC:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                raw = f.read().decode("ascii", "replace")
        except (FileNotFoundError, ProcessLookupError):
            return None
        except OSError:
            pass
    if raw is not None:
        # The command name may hold spaces and parentheses: split after the last ')'.
        fields = raw[raw.rfind(")") + 2 :].split()
        try:
            return fields[0], int(fields[19])
        except (IndexError, ValueError):
            return "?", None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "?", None


def proc_cmdline(pid: int) -> str | None:
    """The command line of ``pid`` joined with spaces, or None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return None


def processes() -> list[tuple[int, int, list[bytes]]]:
    """``(pid, parent pid, argv)`` of every process ``/proc`` shows (empty without ``/proc``)."""
    out = []
    if not _HAVE_PROC:
        return out
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        out.append((int(entry), ppid, argv))
    return out


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a running (not zombie) process."""
    if pid <= 0:
        return False
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X", "x")


def kill_until_gone(find, deadline: float, pause: float = 0.05) -> list[int]:
    """SIGKILL every pid ``find()`` returns, again and again, until it returns none or
    ``time.monotonic()`` passes ``deadline``; returns the pids still there."""
    left = find()
    while left and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(pause)
        left = find()
    return left
