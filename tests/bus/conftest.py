"""Fixtures for the bus tests: zmq contexts and factories that are always closed."""

from __future__ import annotations

import asyncio
import time

import pytest
import zmq

from bus.planes import SocketFactory


@pytest.fixture
def zctx():
    """A plain zmq context; destroyed (closing any socket a test left open) afterwards."""
    ctx = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.destroy(linger=0)


@pytest.fixture
def factory(zctx):
    """A SocketFactory with linger 0, so a failing test never blocks on teardown."""
    f = SocketFactory(zctx, linger=0)
    try:
        yield f
    finally:
        f.close(linger=0)


@pytest.fixture
def arun():
    """Run a coroutine to completion with a deadline (asyncio.run per call)."""

    def run(coro, timeout: float = 20.0):
        return asyncio.run(asyncio.wait_for(coro, timeout))

    return run


@pytest.fixture
def until():
    """``await until(cond, timeout)``: wait for a condition with a deadline, or fail."""

    async def wait(cond, timeout: float = 5.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            # Yield to the event loop (the PlaneLoop runs there); 1 ms granularity.
            await asyncio.sleep(0.001)

    return wait
