"""Logging setup of the daemons: readable lines by default, one JSON object per line for log shippers.

Only CLI entry points call :func:`setup` (STYLE: logging is configured in
``main()``); library code just uses ``logging.getLogger(__name__)``.

``human``::

    2026-05-09 07:35:25,123 INFO bus-node[4242] nodes.agent: joined under manager

``json`` (one object per line, keys in this order; ``exc`` only with a traceback)::

    {"time": "2026-05-09T07:35:25.123Z", "level": "INFO", "logger": "nodes.agent",
     "message": "joined under manager", "pid": 4242, "role": "bus-node"}
"""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["FORMATS", "JsonFormatter", "human_formatter", "setup"]

FORMATS = ("human", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601, ms), level, logger, message, pid, role, exc."""

    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        import json  # only daemons that log JSON pay for it

        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
            "role": self.role,
        }
        if record.exc_info:
            # Cached on the record, as logging.Formatter does, for other handlers.
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def human_formatter(role: str) -> logging.Formatter:
    """The daemons' readable format (the one they always had)."""
    return logging.Formatter(f"%(asctime)s %(levelname)s {role}[%(process)d] %(name)s: %(message)s")


def setup(role: str, level: str = "INFO", fmt: str = "human", stream=None) -> logging.Handler:
    """Send the root logger's records at ``level`` and above to ``stream`` (stderr) in ``fmt``.

    ``role`` names the process in every line (``manager``, ``bus-node``, ``frontend``).
    Returns the handler (tests remove it again).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; choose one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter(role) if fmt == "json" else human_formatter(role))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
