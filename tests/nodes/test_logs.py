"""Log formats of the daemons: readable by default, one JSON object per line with --log-format json."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bus import logs
from tools import cluster

ROOT = Path(__file__).resolve().parents[2]


def _record(msg="hello %s", args=("world",), level=logging.INFO, exc_info=None, name="nodes.agent"):
    return logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)


def test_json_line_has_the_documented_fields():
    line = logs.JsonFormatter("bus-node").format(_record())
    rec = json.loads(line)
    assert list(rec) == ["time", "level", "logger", "message", "pid", "role"]
    assert rec["level"] == "INFO" and rec["logger"] == "nodes.agent" and rec["message"] == "hello world"
    assert rec["pid"] == os.getpid() and rec["role"] == "bus-node"
    assert rec["time"].endswith("Z") and len(rec["time"]) == len("2026-05-09T07:35:25.123Z")


def test_json_keeps_tracebacks_and_newlines_on_one_line():
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("two\nlines é", (), logging.ERROR, sys.exc_info())
    line = logs.JsonFormatter("manager").format(record)
    assert "\n" not in line
    rec = json.loads(line)
    assert rec["message"] == "two\nlines é" and rec["level"] == "ERROR"
    assert rec["exc"].startswith("Traceback") and "ValueError: boom" in rec["exc"]


def test_human_format_is_the_one_the_daemons_always_had():
    fmt = logs.human_formatter("bus-node")
    line = fmt.format(_record())
    assert line.endswith(f" INFO bus-node[{os.getpid()}] nodes.agent: hello world")


def test_setup_adds_one_handler_and_refuses_unknown_formats():
    out = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = logs.setup("frontend", "warning", "json", stream=out)
    try:
        logging.getLogger("frontends.x").warning("careful")
        logging.getLogger("frontends.x").info("not shown")
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    [line] = out.getvalue().splitlines()
    assert json.loads(line)["message"] == "careful"
    with pytest.raises(ValueError, match="human, json"):
        logs.setup("frontend", "INFO", "xml")


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_bus_node_logs_json():
    port = cluster.free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "nodes.cli", "--join", f"tcp://127.0.0.1:{port}",
                          "--join-timeout", "0.5", "--log-format", "json", "--insecure"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 3, out.stderr
    records = _json_lines(out.stderr)  # every line parses
    assert {r["role"] for r in records} == {"bus-node"}
    assert any(r["level"] == "ERROR" and "joined" in r["message"] for r in records)


def test_frontend_logs_json():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=str(ROOT), SNSBUS_FRONTEND_LOG_FORMAT="json")  # from the environment
        out = subprocess.run([sys.executable, "-m", "frontends", "--manager", f"tcp://127.0.0.1:{cluster.free_port()}",
                              "--port", str(port), "--insecure"], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    assert out.returncode == 1, out.stderr
    records = _json_lines(out.stderr)
    assert {r["role"] for r in records} == {"frontend"}
    assert any(r["level"] == "WARNING" and "--origin" in r["message"] for r in records)
    assert any(r["level"] == "ERROR" and "cannot listen" in r["message"] for r in records)
