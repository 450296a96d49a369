"""``benchmarks/perf_tacc.py`` works: its pieces, and a tiny live run of its machinery (a few seconds).

The figures themselves are the script's job (slow, by hand or ``make bench``);
this only proves that a generated spec deploys, the in-process dispatch and
its round-robin baseline reach the workers, and everything is stopped.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import perf_tacc, tacc_workers  # noqa: E402
from manager.spec import parse  # noqa: E402


def test_workers_and_direct_baselines():
    assert tacc_workers.echo({"data": b"abc"}) == b"abc"
    assert tacc_workers.echo_direct(b"") == b""
    out = tacc_workers.sleeper_x4({"params": {"ms": 1}})
    assert out["info"]["slept_ms"] == 1.0 * tacc_workers.SLOW_FACTOR and out["data"]
    from tools.imagegen import make_image

    _, data, _ = make_image(5, 5)
    tacc_workers.pool_init([data])
    assert tacc_workers.distill_direct(tacc_workers.distill_task(0, 1)) > 0


def test_distill_sequence_is_unique_and_cycles_the_images():
    seq = [tacc_workers.distill_task(n, 16) for n in range(16 * 120)]
    assert [i for i, _ in seq[:32]] == list(range(16)) * 2
    keys = {(i, tuple(sorted(p.items()))) for i, p in seq}
    assert len(keys) == len(seq)  # every request a cache miss


def test_generated_spec_parses():
    dep = perf_tacc.Deployment("tsmoke", [{"name": "echo", "callable": f"{perf_tacc.W}:echo", "min": 2, "max": 2}],
                               slots=2, caches=1)
    app = parse(dep.spec(None), "bench.xml")
    (svc,) = app.services
    assert [(w.name, w.callable, w.min, w.max) for w in svc.workers] == [("echo", "benchmarks.tacc_workers:echo", 2, 2)]
    assert svc.caches[0].instances == 1 and not app.blocks


def test_pct():
    assert perf_tacc.pct([1, 2, 3, 4, 5], 0.5) == 3 and perf_tacc.pct([1, 2, 3], 0.99) == 3


@pytest.mark.timeout(60)
def test_live_dispatch_and_round_robin():
    spec = [{"name": "echo", "callable": f"{perf_tacc.W}:echo", "min": 2, "max": 2}]
    with perf_tacc.Deployment("tsmoke", spec, slots=2) as dep:
        assert len(dep.pids()["workers"]) == 2

        async def run():
            async with perf_tacc.dispatcher(dep.control, dep.svc, round_robin=True, security=dep.security) as (_, tasks, rr):
                done, errors, _ = await perf_tacc._echo_calls(tasks, 4, 0.3)
                picks = [(await rr.call([b"x"])).worker for _ in range(4)]
                lat, lost = await perf_tacc._open_loop(rr, 100.0, 0.3, 1.0, seed=0)
                return done, errors, picks, lat, lost

        done, errors, picks, lat, lost = asyncio.run(run())
    assert done > 0 and errors == 0
    assert picks[0] != picks[1] and picks[0::2] == [picks[0]] * 2 and picks[1::2] == [picks[1]] * 2
    assert lat and lost == 0
