"""TACC worker callables for the worker stub's tests (run inside worker processes).

Each takes the stub's request ``{"params", "data"|"items"}``.  ``gate`` (a
file path) makes a callable wait until the file exists, so a test can hold a
worker busy for exactly as long as it needs without sleeping.
"""

from __future__ import annotations

import os
import time

GATE_LIMIT = 30.0  # seconds a gated call waits at most


def _wait_gate(params: dict) -> None:
    gate = params.get("gate")
    if not gate:
        return
    limit = time.monotonic() + GATE_LIMIT
    while not os.path.exists(gate) and time.monotonic() < limit:
        time.sleep(0.002)


def echo(request: dict) -> dict:
    """The input back, after the gate; ``say`` prints to stdout, which must not break the pipe."""
    params = request["params"]
    if params.get("say"):
        print(params["say"])
    _wait_gate(params)
    if params.get("crash"):
        os._exit(3)
    return {"data": request["data"], "content_type": "application/octet-stream",
            "info": {"pid": os.getpid(), "n": params.get("n")}}  # fmt: skip


def bare(request: dict) -> bytes:
    """Returns bare bytes: the fastest possible worker, to measure the stub's overhead."""
    return request["data"]


def crash(request: dict) -> dict:
    """Kills its own process, every time."""
    os._exit(7)


def fail(request: dict) -> dict:
    """Raises unless ``params["ok"]``."""
    if not request["params"].get("ok"):
        raise ValueError("this input cannot be used")
    return {"data": b"fine", "info": {"pid": os.getpid()}}


def once_slow(request: dict) -> dict:
    """Sleeps (up to GATE_LIMIT) unless the file ``params["mark"]`` exists, which it creates first.

    The first run hangs, to be killed by the test; the re-run finds the mark and answers.
    """
    mark = request["params"]["mark"]
    if not os.path.exists(mark):
        with open(mark, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(GATE_LIMIT)
    return {"data": request["data"], "info": {"pid": os.getpid()}}


def concat(request: dict) -> dict:
    """Aggregation: the items joined."""
    return {"data": b"|".join(request["items"]), "content_type": "text/plain", "info": {"items": len(request["items"])}}


def bad_result(request: dict):
    """Returns something that is not a reply."""
    return 42


