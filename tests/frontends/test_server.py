"""The front end end to end: a real origin, real distillation on a test peer, a real cache instance."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import time

import pytest
from PIL import Image

from frontends.profiles import SQLiteProfileStore
from frontends.server import X_APPROXIMATE, X_CACHE, X_REASON, X_WORKER, FrontEndConfig, origin_of, result_key
from tests.frontends.taskpeer import transend_stack
from tools.imagegen import write_set


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    manifest = write_set(d, 6, seed=1)
    return d, [m["name"] for m in manifest]


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "profiles.db"
    with SQLiteProfileStore(path) as store:
        store.put("alice", {"max_width": 100, "format": "png"})
    return path


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def test_origin_and_key_helpers():
    assert origin_of("http://LocalHost/x.jpg") == "http://localhost:80"
    assert origin_of("https://a.b:8443/x") == "https://a.b:8443"
    with pytest.raises(ValueError):
        origin_of("ftp://a/b")
    assert result_key("distill", ["u"], {"a": 1, "b": 2}) == result_key("distill", ["u"], {"b": 2, "a": 1})
    assert result_key("distill", ["u"], {"a": 1}) != result_key("distill", ["u"], {"a": 2})
    cfg = FrontEndConfig(manager="tcp://127.0.0.1:1", origins=("http://127.0.0.1:8000/images",), timeout=2.0)
    assert cfg.origins == ("http://127.0.0.1:8000",) and cfg.per_attempt == 1.0
    with pytest.raises(ValueError, match="max_original"):
        FrontEndConfig(manager="tcp://127.0.0.1:1", max_original=64 << 20)


def test_profile_applied_cache_hit_and_query_override(images, db):
    d, names = images
    jpeg = names[1]  # 1024x768 or so: always wider than 100

    async def main():
        async with transend_stack(d, db) as (client, fe, peer, origin):
            url = f"{origin}/{jpeg}"
            r = await client.get("/distill", params={"url": url}, headers={"X-User": "alice"})
            assert r.status == 200, await r.text()
            body = await r.read()
            assert r.headers[X_CACHE] == "miss" and X_APPROXIMATE not in r.headers
            assert r.headers["Content-Type"] == "image/png" and r.headers[X_WORKER].startswith("transend/distill@")
            assert size_of(body)[0] <= 100
            # The same request again: a cache hit with the same bytes.
            await _until(lambda: fe.cache.statistics()["stored"] >= 3)  # original, result, alias
            r = await client.get("/distill", params={"url": url, "user": "alice"})
            assert r.status == 200 and r.headers[X_CACHE] == "hit" and await r.read() == body
            # A query parameter wins over the profile; the original comes from the cache.
            r = await client.get("/distill", params={"url": url, "w": "50", "fmt": "jpg"}, headers={"X-User": "alice"})
            assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg"
            assert size_of(await r.read())[0] <= 50
            # Without a user: the default profile (800 wide, jpeg).
            r = await client.get("/distill", params={"url": url})
            w, _ = size_of(await r.read())
            assert 100 < w <= 800
            s = fe.statistics()["frontend"]
            assert s["origin_fetches"] == 1 and s["original_hits"] >= 2 and s["hits"] == 1
            assert s["profile_lookups"] == 3

    run(main())


def test_origin_not_allowed_is_403_and_bad_requests_are_4xx(images, db):
    d, names = images

    async def main():
        async with transend_stack(d, db, max_url=256, max_original=50_000) as (client, fe, peer, origin):
            r = await client.get("/distill", params={"url": "http://127.0.0.1:1/x.jpg"})
            assert r.status == 403 and "not allowed" in await r.text() and r.headers[X_CACHE] == "miss"
            r = await client.get("/sheet", params=[("url", f"{origin}/{names[0]}"), ("url", "http://evil.example/x")])
            assert r.status == 403
            r = await client.get("/distill", params={"url": "ftp://127.0.0.1/x"})
            assert r.status == 400
            r = await client.get("/distill")
            assert r.status == 400
            r = await client.get("/distill", params={"url": f"{origin}/{names[0]}", "w": "huge"})
            assert r.status == 400 and "max_width" in await r.text()
            r = await client.get("/distill", params={"url": f"{origin}/{names[0]}", "pad": "x" * 300})
            assert r.status == 414
            r = await client.get("/distill", params={"url": f"{origin}/missing.jpg"})
            assert r.status == 404
            r = await client.get("/distill", params={"url": f"{origin}/{names[2]}"})  # > 50 kB
            assert r.status == 413 and "limit" in await r.text()
            r = await client.get("/distill", params={"url": f"{origin}/manifest.json"})
            assert r.status == 422 and "image" in await r.text()
            assert fe.statistics()["frontend"]["forbidden"] == 2

    run(main())


def test_no_workers_answers_the_original_marked(images):
    d, names = images
    original = (d / names[0]).read_bytes()

    async def main():
        async with transend_stack(d, workers=0, sheet=False) as (client, fe, peer, origin):
            r = await client.get("/distill", params={"url": f"{origin}/{names[0]}"})
            assert r.status == 200
            assert r.headers[X_APPROXIMATE] == "original" and r.headers[X_REASON] == "no_workers"
            assert r.headers[X_CACHE] == "miss" and await r.read() == original
            assert r.headers["Content-Type"] == "image/jpeg"

    run(main())


def test_saturated_workers_answer_approximately_and_a_sheet_is_503(images):
    d, names = images

    async def main():
        async with transend_stack(d, max_queue=4, behaviour={"q": 9}) as (client, fe, peer, origin):
            peer.set(next(w for w in peer.workers if "/sheet@" in w), q=9)
            await _until(lambda: all(fe.tasks.load(w) >= 9 for w in peer.workers))
            r = await client.get("/distill", params={"url": f"{origin}/{names[0]}"})
            assert r.status == 200 and r.headers[X_APPROXIMATE] == "original" and r.headers[X_REASON] == "saturated"
            r = await client.get("/sheet", params=[("url", f"{origin}/{names[0]}"), ("url", f"{origin}/{names[1]}")])
            assert r.status == 503 and "saturated" in await r.text()
            assert sum(len(w.received) for w in peer.workers.values()) == 0  # nothing was queued

    run(main())


def test_origin_serves_only_files_of_its_directory(images):
    d, names = images

    async def main():
        async with transend_stack(d, workers=0, sheet=False, cache=False) as (client, fe, peer, origin):
            import aiohttp

            async with aiohttp.ClientSession() as s:
                async with s.get(f"{origin}/") as r:
                    assert set(names) <= set((await r.json())["files"])
                async with s.get(f"{origin}/{names[3]}") as r:
                    assert r.status == 200 and r.headers["Content-Type"] == "image/png"
                for bad in ("/%2e%2e/etc/passwd", "/..%2Fmanifest.json", "/.hidden", "/nothing.jpg"):
                    async with s.get(yarl_url(origin + bad)) as r:
                        assert r.status == 404, bad

    run(main())


def yarl_url(raw: str):
    import yarl

    return yarl.URL(raw, encoded=True)


def test_slow_workers_answer_cached_version_then_original(images):
    d, names = images

    async def main():
        async with transend_stack(d, timeout=0.4) as (client, fe, peer, origin):
            url = f"{origin}/{names[1]}"
            r = await client.get("/distill", params={"url": url, "w": "200"})
            assert r.status == 200 and X_APPROXIMATE not in r.headers
            good = await r.read()
            await _until(lambda: fe.cache.statistics()["stored"] >= 3)
            for wid in list(peer.workers):
                peer.set(wid, delay=5.0)
            # Other parameters, no worker answers in time: the cached distilled version.
            t0 = time.monotonic()
            r = await client.get("/distill", params={"url": url, "w": "300"})
            assert r.status == 200 and r.headers[X_APPROXIMATE] == "cached" and r.headers[X_REASON] == "timeout"
            assert await r.read() == good
            assert time.monotonic() - t0 < 2.0
            # An image never distilled: the original.
            r = await client.get("/distill", params={"url": f"{origin}/{names[0]}"})
            assert r.status == 200 and r.headers[X_APPROXIMATE] == "original"
            assert await r.read() == (d / names[0]).read_bytes()
            s = fe.statistics()["frontend"]
            assert s["approximate_cached"] == 1 and s["approximate_original"] == 1

    run(main())


def test_crashed_worker_is_redispatched(images):
    d, names = images

    async def main():
        async with transend_stack(d, workers=2) as (client, fe, peer, origin):
            crashing, healthy = [w for w in peer.workers if "/distill@" in w]
            peer.set(crashing, code="worker_crashed", q=0)
            peer.set(healthy, q=3)  # the crashing one is chosen first
            await _until(lambda: fe.tasks.load(healthy) >= 3)
            r = await client.get("/distill", params={"url": f"{origin}/{names[0]}", "w": "64"})
            assert r.status == 200 and X_APPROXIMATE not in r.headers and r.headers[X_WORKER] == healthy
            assert size_of(await r.read())[0] <= 64
            assert fe.tasks.statistics()["worker_crashed"] == 1

    run(main())


def test_contact_sheet_with_a_missing_image(images):
    d, names = images

    async def main():
        async with transend_stack(d) as (client, fe, peer, origin):
            urls = [("url", f"{origin}/{n}") for n in names[:3]] + [("url", f"{origin}/missing.jpg")]
            r = await client.get("/sheet", params=urls + [("cols", "2"), ("thumb", "64")])
            assert r.status == 200, await r.text()
            assert r.headers["Content-Type"] == "image/jpeg"
            # 2 columns x 2 rows of 64 px tiles with 4 px padding.
            assert size_of(await r.read()) == (2 * 68 + 4, 2 * 68 + 4)
            r = await client.get("/sheet", params=[("url", f"{origin}/missing.jpg")])
            assert r.status == 404

    run(main())


def test_concurrent_identical_requests_are_coalesced(images):
    d, names = images

    async def main():
        async with transend_stack(d, behaviour={"delay": 0.2}) as (client, fe, peer, origin):
            params = {"url": f"{origin}/{names[3]}", "w": "120"}
            responses = await asyncio.gather(*(client.get("/distill", params=params) for _ in range(5)))
            bodies = {await r.read() for r in responses}
            assert all(r.status == 200 for r in responses) and len(bodies) == 1
            assert sum(len(w.received) for w in peer.workers.values()) == 1
            assert fe.statistics()["frontend"]["coalesced"] >= 4

    run(main())


def test_health_and_stats(images):
    d, _ = images

    async def main():
        async with transend_stack(d) as (client, fe, peer, origin):
            r = await client.get("/health")
            h = await r.json()
            assert r.status == 200 and h["workers"] == 3 and h["caches"] == 1 and h["stale"] is False
            r = await client.get("/stats")
            s = await r.json()
            assert {"frontend", "tasks", "cache", "beacons", "plane"} <= s.keys()
            assert s["frontend"]["requests"] >= 1 and s["beacons"]["beacons"] >= 1

    run(main())


def test_cli_serves_and_stops_on_sigterm(images, tmp_path):
    d, names = images
    from bus.security import KeyPair, encode_key

    proc = subprocess.Popen([sys.executable, "-m", "frontends", "--manager", "tcp://127.0.0.1:9", "--port", "0",
                             "--origin", "http://127.0.0.1:9", "--profiles", str(tmp_path / "p.db"),
                             "--key-dir", str(tmp_path / "keys"), "--manager-key", encode_key(KeyPair.generate().public)],
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = ""
        deadline = time.monotonic() + 20
        while "serving" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "front end exited early"
        assert "serving transend on http://127.0.0.1:" in line
        port = int(line.rsplit(":", 1)[1])

        async def check():
            import aiohttp

            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{port}/health") as r:
                    return r.status, await r.json()

        status, body = run(check())
        assert status == 200 and body["stale"] is True and body["workers"] == 0
        proc.terminate()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


async def _until(cond, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_json_stats_are_serializable(images):
    d, _ = images

    async def main():
        async with transend_stack(d) as (client, fe, peer, origin):
            json.dumps(fe.statistics())

    run(main())
