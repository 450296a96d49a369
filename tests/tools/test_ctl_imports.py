"""`bus-ctl` stays light: no asyncio, Pillow, lxml or psutil on import or on the exec path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("asyncio", "PIL", "lxml", "psutil")


def _modules_after(code: str) -> list[str]:
    probe = code + (
        "\nimport json as _j, sys as _s\n"
        f"print('MODULES=' + _j.dumps(sorted(m for m in _s.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("MODULES="))
    return json.loads(line[len("MODULES="):])


def test_import_is_light():
    assert _modules_after("import tools.ctl") == []


def test_exec_path_is_light(fake):
    code = (
        "from tools.ctl import main\n"
        f"rc = main(['exec', '--endpoint', {fake.endpoint!r}, '--nodes', 'node-1*', '--', 'true'],"
        " standalone_mode=False)\n"
        "assert rc in (0, 1), rc\n"
    )
    assert _modules_after(code) == []
    assert fake.requests[-1][0] == "exec"


def test_status_and_tree_text_are_light(fake):
    code = (
        "from tools.ctl import main\n"
        f"main(['status', '--endpoint', {fake.endpoint!r}], standalone_mode=False)\n"
        f"main(['tree', '--endpoint', {fake.endpoint!r}], standalone_mode=False)\n"
    )
    assert _modules_after(code) == []
