"""Tiny TACC worker callables for ``benchmarks/perf_tacc.py``, and its direct baselines.

Worker callables (named ``benchmarks.tacc_workers:NAME`` in a generated spec;
the worker process imports this module from the repository root):

* :func:`echo`: the input object back, unchanged: the cost of a task is then
  all bus, stub, pipe and front end;
* :func:`sleeper`: sleeps ``params["ms"]`` milliseconds (default 10), then
  answers a few bytes; :func:`sleeper_x4` is the same worker four times slower.
  Two callables rather than one with a per-request factor because a front end
  sends the same parameters to every worker: slowness belongs to the process
  (its machine), and a worker class per speed gives exactly that.  Sleeping
  costs no CPU, so on a 2-core machine the slowness is the worker's, not the
  scheduler's.

Direct baselines (run in a ``multiprocessing`` pool, no bus involved):

* :func:`distill_task`: request ``n`` of the distillation sequence both the
  service and the pool run (image, parameters unique per request);
* :func:`pool_init` / :func:`distill_direct`: the TranSend distiller
  (:func:`examples.transend.distill.distill_worker`) on an image the pool
  process already holds, so the baseline is the Pillow work alone;
  :func:`run_window` drives a pool with a bounded number of tasks in flight;
* :func:`echo_direct`: :func:`echo` as a pool task.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Iterator, Mapping, Sequence

__all__ = ["SLOW_FACTOR", "echo", "sleeper", "sleeper_x4", "distill_task", "pool_init", "distill_direct", "run_window",
           "echo_direct"]

SLOW_FACTOR = 4
DEFAULT_MS = 10.0

_IMAGES: Sequence[bytes] = ()  # a pool process's copy of the benchmark's images


def echo(request: Mapping[str, Any]) -> bytes:
    """TACC transformation: the input bytes back."""
    return request.get("data") or b""


def _sleep(request: Mapping[str, Any], factor: float) -> dict:
    ms = float((request.get("params") or {}).get("ms", DEFAULT_MS)) * factor
    time.sleep(ms / 1000.0)
    return {"data": b"z", "content_type": "text/plain", "info": {"slept_ms": ms}}


def sleeper(request: Mapping[str, Any]) -> dict:
    """TACC transformation: sleep ``params["ms"]`` milliseconds, answer one byte."""
    return _sleep(request, 1.0)


def sleeper_x4(request: Mapping[str, Any]) -> dict:
    """:func:`sleeper`, :data:`SLOW_FACTOR` times slower (a worker on a slower machine)."""
    return _sleep(request, SLOW_FACTOR)


def distill_task(n: int, m: int) -> tuple[int, dict]:
    """Request ``n`` of the sequence over ``m`` images: image ``n % m``, parameters unique per request."""
    k = n // m
    return n % m, {"max_width": 640, "max_height": 480 + k // 50, "quality": 40 + k % 50}


def pool_init(images: Sequence[bytes] = ()) -> None:
    """``multiprocessing.Pool`` initializer: its own session, and the images, so tasks carry only an index.

    A worker stub starts each worker process in a session of its own; with
    the kernel's autogroup scheduling (Linux's default) every session is a
    scheduling group with an equal share of the CPU against the other work
    on the host.  A pool process in the benchmark's session would share one
    group with it, so the baseline would lose CPU the service's workers get.
    """
    global _IMAGES
    try:
        os.setsid()
    except OSError:
        pass  # already a session leader
    _IMAGES = tuple(images)


def distill_direct(task: tuple[int, Mapping[str, Any]]) -> int:
    """Distill image ``task[0]`` with params ``task[1]`` in this process; the output size."""
    from examples.transend.distill import distill_worker

    index, params = task
    return len(distill_worker({"data": _IMAGES[index], "params": dict(params)})["data"])


def run_window(pool, m: int, concurrency: int, seconds: float, counter: Iterator[int]) -> tuple[int, float]:
    """Distill the sequence from ``counter`` on in ``pool``, ``concurrency`` in flight, for ``seconds``.

    Returns ``(tasks finished within the window, seconds)`` once the tasks still running at the end have
    finished, so the next window starts on an idle pool.
    """
    room = threading.Semaphore(concurrency)
    done, lock = [0], threading.Lock()
    end = time.monotonic() + seconds

    def finished(_):
        with lock:
            if time.monotonic() <= end:
                done[0] += 1
        room.release()

    def failed(e):
        room.release()
        print(f"    pool task failed: {e}", flush=True)

    while time.monotonic() < end:
        if room.acquire(timeout=0.05):
            pool.apply_async(distill_direct, (distill_task(next(counter), m),), callback=finished,
                             error_callback=failed)
    for _ in range(concurrency):
        room.acquire()
    return done[0], seconds


def echo_direct(data: bytes) -> bytes:
    """:func:`echo` as a pool task."""
    return echo({"data": data})
