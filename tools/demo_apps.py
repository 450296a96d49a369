"""Part three of ``make demo``: deploy a Plush-style application through the tree.

Runs the real ``bus-ctl`` commands (as a user would type them) against a
fresh local manager: ``deploy`` of ``examples/multi.xml`` on the machines of
``examples/directory.xml`` (their bus-nodes are started by the deploy itself),
``status``, ``logs``, ``cleanup``, ``down``.  Everything started is stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent

__all__ = ["run"]


def run(out: Callable[[str], None] = print) -> int:
    sdir = Path(tempfile.mkdtemp(prefix="snsbus-demo-apps-"))
    env = dict(os.environ, SNSBUS_STATE_DIR=str(sdir))
    env.pop("SNSBUS_ENDPOINT", None)
    status = 0

    def ctl(*args: str, check: bool = True) -> None:
        out(f"  $ bus-ctl {' '.join(args)}")
        res = subprocess.run([sys.executable, "-m", "tools.ctl", *args], cwd=ROOT, env=env, text=True,
                             capture_output=True, timeout=120)
        for line in (res.stdout + res.stderr).rstrip("\n").splitlines():
            out(f"      {line}")
        if check and res.returncode != 0:
            raise RuntimeError(f"bus-ctl {args[0]} exited with {res.returncode}")

    out("\nsnsbus demo: deploy an application (Plush XML) through the tree")
    try:
        ctl("up", "--local-nodes", "0", "--port", "0")
        ctl("deploy", "examples/multi.xml", "--resources", "examples/directory.xml")
        ctl("apps")
        ctl("status", "multi")
        ctl("logs", "multi", "--process", "client")
        ctl("deploy", "examples/multi.xml", "--resources", "examples/directory.xml")  # nothing starts twice
        ctl("cleanup", "multi")
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        out(f"      FAILED: {e}")
        status = 1
    finally:
        ctl("down", check=False)
    return status
