"""A closed-loop HTTP load generator for a TACC front end (the TranSend demo).

``concurrency`` clients each send ``GET /distill?url=ORIGIN/NAME`` for images of
a manifest (``python -m tools.imagegen`` writes one), wait for the whole answer
and send the next, for ``duration`` seconds or until ``requests`` were sent.
Images are drawn with a Zipf skew (rank ``k`` has weight ``1/k**zipf``; ranks
are assigned to the images in a seeded shuffle), so popular images repeat and
exercise the cache, as real web traffic does.

It reports requests/s, latency percentiles (p50/p90/p99, whole answers, ms),
the cache hit rate (``X-Cache: hit`` among the answers carrying ``X-Cache``),
approximate answers by kind (``X-SNS-Approximate``) and errors (non-2xx
answers and failed connections)::

    python -m tools.loadgen http://127.0.0.1:8080 --manifest imgs/manifest.json \\
        --origin http://127.0.0.1:8000 --concurrency 16 --duration 10 [--json]

As a library: :func:`run_load` (blocking) or :func:`run_load_async` return
the figures as a dict, :func:`format_report` renders them.  Tested in
tests/tools/test_loadgen.py.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import click

__all__ = ["load_manifest", "percentile", "zipf_cumulative", "run_load_async", "run_load", "format_report", "main"]


def load_manifest(path: str | Path) -> list[str]:
    """Image names of a manifest written by ``tools.imagegen`` (``{"images": [{"name"}, ...]}``)."""
    doc = json.loads(Path(path).read_text())
    rows = doc.get("images") if isinstance(doc, dict) else doc
    names = [r["name"] if isinstance(r, dict) else str(r) for r in rows or ()]
    if not names:
        raise ValueError(f"{path} lists no images")
    return names


def zipf_cumulative(n: int, s: float) -> list[float]:
    """Cumulative weights of ranks 1..n under Zipf(s) (``s`` 0: uniform)."""
    if n < 1 or s < 0:
        raise ValueError(f"need n >= 1 and s >= 0, got n={n}, s={s}")
    return list(itertools.accumulate(1.0 / (k**s) for k in range(1, n + 1)))


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100) of sorted values, linearly interpolated; nan when empty."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * p / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


async def run_load_async(frontend: str, images: Sequence[str], origin: str, *, concurrency: int = 16,
                         duration: float | None = 10.0, requests: int | None = None, zipf: float = 1.0,
                         seed: int = 0, params: Mapping[str, Any] | None = None, users: Sequence[str] = (),
                         timeout: float = 30.0, path: str = "/distill",
                         vary: Mapping[str, Sequence[Any]] | None = None) -> dict:  # fmt: skip
    """Run the closed loop and return its figures (see :func:`format_report` for their meaning).

    Stops after ``duration`` seconds or ``requests`` requests, whichever
    comes first (at least one of them must be given).  ``users`` are sent as
    ``X-User``, drawn uniformly per request.  ``vary`` maps a query parameter
    to values drawn per request (e.g. ``{"q": range(30, 96)}``): distinct
    results, so the load reaches the workers instead of the cache.
    """
    import aiohttp

    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if duration is None and requests is None:
        raise ValueError("give a duration or a request count")
    names = list(images)
    random.Random(f"loadgen-ranks:{seed}").shuffle(names)
    cum = zipf_cumulative(len(names), zipf)
    total = cum[-1]
    target = frontend.rstrip("/") + path
    base = origin.rstrip("/")
    extra = {k: str(v) for k, v in (params or {}).items()}
    choices = {k: [str(x) for x in v] for k, v in (vary or {}).items()}
    latencies: list[float] = []
    statuses: Counter = Counter()
    approx: Counter = Counter()
    counts = {"hits": 0, "with_x_cache": 0, "exceptions": 0, "bytes": 0}
    issued = itertools.count()
    start = time.monotonic()
    stop_at = start + duration if duration is not None else math.inf

    async def client(session: aiohttp.ClientSession, i: int) -> None:
        rng = random.Random(f"loadgen:{seed}:{i}")
        while time.monotonic() < stop_at and (requests is None or next(issued) < requests):
            name = names[min(bisect.bisect_left(cum, rng.random() * total), len(names) - 1)]
            headers = {"X-User": rng.choice(users)} if users else {}
            query = {"url": f"{base}/{name}", **extra, **{k: rng.choice(v) for k, v in choices.items()}}
            t0 = time.monotonic()
            try:
                async with session.get(target, params=query, headers=headers) as resp:
                    body = await resp.read()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                counts["exceptions"] += 1
                continue
            latencies.append(time.monotonic() - t0)
            statuses[resp.status] += 1
            counts["bytes"] += len(body)
            cache = resp.headers.get("X-Cache")
            if cache is not None:
                counts["with_x_cache"] += 1
                counts["hits"] += cache == "hit"
            kind = resp.headers.get("X-SNS-Approximate")
            if kind:
                approx[kind] += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        await asyncio.gather(*(client(session, i) for i in range(concurrency)))
    elapsed = time.monotonic() - start
    latencies.sort()
    answered = len(latencies)
    ok = sum(n for status, n in statuses.items() if 200 <= status < 300)
    ms = [x * 1000.0 for x in latencies]
    return {
        "requests": answered + counts["exceptions"],
        "ok": ok,
        "errors": answered - ok + counts["exceptions"],
        "exceptions": counts["exceptions"],
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "duration": elapsed,
        "rps": answered / elapsed if elapsed > 0 else 0.0,
        "latency_ms": {"p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99),
                       "mean": sum(ms) / answered if answered else math.nan, "max": ms[-1] if ms else math.nan},
        "cache_hits": counts["hits"],
        "cache_hit_rate": counts["hits"] / counts["with_x_cache"] if counts["with_x_cache"] else 0.0,
        "approximate": dict(approx),
        "approximate_rate": sum(approx.values()) / answered if answered else 0.0,
        "bytes": counts["bytes"],
        "concurrency": concurrency,
        "images": len(names),
        "zipf": zipf,
    }  # fmt: skip


def run_load(frontend: str, manifest: str | Path | Sequence[str], origin: str, **options) -> dict:
    """Blocking :func:`run_load_async`; ``manifest`` is a manifest path or a list of image names."""
    images = load_manifest(manifest) if isinstance(manifest, (str, Path)) else list(manifest)
    return asyncio.run(run_load_async(frontend, images, origin, **options))


def format_report(f: Mapping[str, Any]) -> str:
    """A few human lines for the figures of :func:`run_load`."""
    lat = f["latency_ms"]
    approx = ", ".join(f"{k} {v}" for k, v in sorted(f["approximate"].items())) or "none"
    return "\n".join([
        f"{f['requests']} requests in {f['duration']:.1f}s from {f['concurrency']} clients: {f['rps']:.1f} req/s",
        f"latency ms: p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  p99 {lat['p99']:.1f}  max {lat['max']:.1f}",
        f"cache hit rate {100 * f['cache_hit_rate']:.1f}% ({f['cache_hits']} hits), "
        f"approximate answers: {approx} ({100 * f['approximate_rate']:.1f}%)",
        f"errors {f['errors']} (statuses {f['statuses']}, connection failures {f['exceptions']}), "
        f"{f['bytes'] / 1e6:.1f} MB received",
    ])  # fmt: skip


def _param(ctx, option, values) -> dict:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE (e.g. w=320)")
        out[key] = value
    return out


@click.command(name="loadgen", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("frontend")
@click.option("--manifest", required=True, type=click.Path(exists=True, dir_okay=False),
              help="manifest.json of the image set.")
@click.option("--origin", required=True, help="Origin serving the images, e.g. http://127.0.0.1:8000.")
@click.option("--concurrency", "-c", default=16, show_default=True, type=click.IntRange(1, 10000))
@click.option("--duration", "-d", default=None, type=click.FloatRange(min=0.01),
              help="Seconds [default: 10 unless --requests].")
@click.option("--requests", "-n", default=None, type=click.IntRange(min=1), help="Stop after this many requests.")
@click.option("--zipf", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Popularity skew (0: uniform).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--param", "-p", "params", multiple=True, callback=_param, metavar="KEY=VALUE",
              help="Extra query parameter for every request (e.g. -p w=320); repeatable.")
@click.option("--user", "users", multiple=True, help="Send X-User, drawn among these; repeatable.")
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Seconds per request.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def main(frontend, manifest, origin, concurrency, duration, requests, zipf, seed, params, users, timeout, as_json):
    """Load FRONTEND's /distill with images of MANIFEST served by ORIGIN; print the figures."""
    if duration is None and requests is None:
        duration = 10.0
    try:
        figures = run_load(frontend, manifest, origin, concurrency=concurrency, duration=duration, requests=requests,
                           zipf=zipf, seed=seed, params=params, users=users, timeout=timeout)
    except (OSError, ValueError) as e:
        raise click.ClickException(f"{e}; check the manifest and the front end's address") from e
    if as_json:
        lat = {k: (None if math.isnan(v) else v) for k, v in figures["latency_ms"].items()}
        click.echo(json.dumps({**figures, "latency_ms": lat}, indent=1))
    else:
        click.echo(format_report(figures))
    if figures["ok"] == 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
