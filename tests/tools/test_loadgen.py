"""The load generator against a whole TranSend stack (origin, front end, test peer with real distillers)."""

from __future__ import annotations

import asyncio
import json
import math
import sys

import pytest

from tests.frontends.taskpeer import transend_stack
from tools.imagegen import write_set
from tools.loadgen import format_report, load_manifest, percentile, run_load_async, zipf_cumulative


def test_percentile_and_zipf():
    assert math.isnan(percentile([], 50))
    assert percentile([1.0], 99) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([0.0, 10.0], 90) == pytest.approx(9.0)
    cum = zipf_cumulative(4, 1.0)
    assert cum == pytest.approx([1.0, 1.5, 1.5 + 1 / 3, 1.5 + 1 / 3 + 0.25])
    assert zipf_cumulative(3, 0.0) == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError):
        zipf_cumulative(0, 1.0)


def test_loadgen_runs_against_the_front_end(tmp_path, capsys):
    images = tmp_path / "images"
    write_set(images, 6, seed=2)
    names = load_manifest(images / "manifest.json")
    assert len(names) == 6

    async def main():
        async with transend_stack(images) as (client, fe, peer, origin):
            frontend = str(client.make_url("")).rstrip("/")
            figures = await run_load_async(frontend, names, origin, concurrency=4, duration=2.0, zipf=1.2,
                                           params={"w": 160})  # fmt: skip
            hits = fe.statistics()["frontend"]["hits"]
            # The CLI, in another process, against the same stack.
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tools.loadgen", frontend, "--manifest", str(images / "manifest.json"),
                "--origin", origin, "-c", "2", "-n", "20", "-p", "w=160", "--json",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # fmt: skip
            out, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            return figures, json.loads(out), hits

    figures, cli, hits = asyncio.run(asyncio.wait_for(main(), 60))
    print(format_report(figures))
    printed = capsys.readouterr().out
    assert "req/s" in printed and "p99" in printed and "cache hit rate" in printed
    assert figures["requests"] > 10 and figures["errors"] == 0 and figures["ok"] == figures["requests"]
    assert 1.9 < figures["duration"] < 5.0 and figures["rps"] > 5
    lat = figures["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    # Six images under a Zipf skew: most requests repeat an image already distilled.
    assert figures["cache_hit_rate"] > 0.5 and figures["approximate"] == {}
    assert hits == figures["cache_hits"]
    assert cli["requests"] == 20 and cli["ok"] == 20 and cli["cache_hit_rate"] > 0.5
