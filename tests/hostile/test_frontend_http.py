"""Hostile HTTP requests to the TACC front end: oversized, malformed, SSRF (issue 7, item 3).

Every fetch the front end could make goes to a server of this test on
127.0.0.1: the "origin" (allowed) and a "private" one standing for whatever a
request must never reach (a metadata service, an internal host).  URLs naming
other addresses are refused before any connection is made, which the
counters prove (``origin_fetches`` does not move); the front end never
follows a redirect.  Host names are resolved by a table (a fake resolver),
never by DNS.
"""

from __future__ import annotations

import asyncio
import socket
from contextlib import asynccontextmanager

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from aiohttp.test_utils import TestClient, TestServer

from frontends import origins
from frontends.profiles import MAX_USER_LEN
from frontends.server import FrontEnd, FrontEndConfig


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class TableResolver(AbstractResolver):
    """Host name -> addresses, from a dict (no DNS); records what it was asked."""

    def __init__(self, table: dict[str, list[str]]):
        self.table = table
        self.asked: list[str] = []

    async def resolve(self, host, port=0, family=socket.AF_INET):
        self.asked.append(host)
        if host not in self.table:
            raise OSError(f"no such host {host} in the test's table")
        return [{"hostname": host, "host": a, "port": port, "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST} for a in self.table[host]]  # fmt: skip

    async def close(self) -> None:
        pass


def counting_app(name: str, hits: list) -> web.Application:
    """A server that answers every path with a few bytes (or a redirect) and counts what it got."""

    async def any_path(request: web.Request) -> web.StreamResponse:
        hits.append((name, request.path_qs))
        if request.path.startswith("/redirect"):
            raise web.HTTPFound(request.query["to"])
        return web.Response(body=b"not an image", content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/{tail:.*}", any_path)
    return app


@asynccontextmanager
async def stack(monkeypatch, *, origin_host: str | None = None, table=None, **config):
    """Origin + private server on loopback, a front end allowing only the origin, and an HTTP client."""
    hits: list = []
    resolver = TableResolver(table or {})
    monkeypatch.setattr(origins, "default_resolver", lambda: resolver)
    async with TestServer(counting_app("origin", hits), host="127.0.0.1") as origin, \
            TestServer(counting_app("private", hits), host="127.0.0.1") as private:  # fmt: skip
        origin_url = f"http://{origin_host or '127.0.0.1'}:{origin.port}"
        cfg = FrontEndConfig(manager="tcp://127.0.0.1:1", origins=(origin_url,), restart_manager=False,
                             max_url=1024, cache_timeout=0.05, **config)  # fmt: skip
        async with FrontEnd(cfg) as fe:
            async with TestClient(TestServer(fe.make_app(), host="127.0.0.1")) as client:
                yield client, fe, origin_url, f"http://127.0.0.1:{private.port}", hits, resolver


def fetches(fe) -> int:
    return fe.statistics()["frontend"]["origin_fetches"]


def test_public_address_check():
    for addr in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0", "::1",
                 "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "100.64.0.1", "224.0.0.1",
                 "255.255.255.255", "fe80::1%eth0", "not an address"):  # fmt: skip
        assert not origins.is_public(addr), addr
    for addr in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "::ffff:93.184.216.34"):
        assert origins.is_public(addr), addr


def test_resolver_keeps_only_public_addresses():
    table = {"mixed.example": ["169.254.169.254", "93.184.216.34"], "meta.example": ["169.254.169.254"],
             "localhost": ["127.0.0.1"], "six.example": ["::1", "fd00::1"]}  # fmt: skip

    async def main():
        r = origins.PublicResolver(TableResolver(table), allow_private=False)
        assert [a["host"] for a in await r.resolve("mixed.example", 80)] == ["93.184.216.34"]
        for host in ("meta.example", "six.example"):
            with pytest.raises(origins.PrivateAddress, match="not a public address"):
                await r.resolve(host, 80)
        assert [a["host"] for a in await r.resolve("localhost", 80)] == ["127.0.0.1"]  # named on purpose
        assert r.refused == 2
        lax = origins.PublicResolver(TableResolver(table), allow_private=True)
        assert [a["host"] for a in await lax.resolve("meta.example", 80)] == ["169.254.169.254"]

    run(main())


SSRF_URLS = [
    # (url with {port} of the allowed origin, expected status)
    ("http://169.254.169.254/latest/meta-data/", 403),
    ("http://169.254.169.254:{port}/latest/meta-data/", 403),
    ("http://[::1]:{port}/a.jpg", 403),
    ("http://[::ffff:127.0.0.1]:{port}/a.jpg", 403),
    ("http://[0:0:0:0:0:0:0:1]:{port}/a.jpg", 403),
    ("http://2130706433:{port}/a.jpg", 403),  # 127.0.0.1 as one decimal number
    ("http://0x7f000001:{port}/a.jpg", 403),  # ... in hex
    ("http://017700000001:{port}/a.jpg", 403),  # ... in octal
    ("http://0177.0.0.1:{port}/a.jpg", 403),
    ("http://127.1:{port}/a.jpg", 403),
    ("http://127.0.0.2:{port}/a.jpg", 403),
    ("http://0.0.0.0:{port}/a.jpg", 403),
    ("http://localhost:{port}/a.jpg", 403),
    ("http://10.0.0.1:{port}/a.jpg", 403),
    ("http://192.168.0.1/a.jpg", 403),
    ("http://127.0.0.1:{port}@169.254.169.254/a.jpg", 400),  # userinfo: refused outright
    ("http://user:pw@127.0.0.1:{port}/a.jpg", 400),
    ("http://127.0.0.1:{port}/a.jpg", None),  # the allowed one, as a control (fetched)
    ("https://127.0.0.1:{port}/a.jpg", 403),
    ("file:///etc/passwd", 400),
    ("gopher://127.0.0.1:{port}/", 400),
    ("//127.0.0.1:{port}/a.jpg", 400),
    ("http:///a.jpg", 400),
    ("http://[::1/a.jpg", 400),
]


def test_ssrf_urls_are_refused_before_any_fetch(monkeypatch):
    async def main():
        async with stack(monkeypatch) as (client, fe, origin, private, hits, resolver):
            port = origin.rsplit(":", 1)[1]
            for raw, status in SSRF_URLS:
                url = raw.format(port=port)
                before = fetches(fe)
                r = await client.get("/distill", params={"url": url})
                if status is None:
                    assert fetches(fe) == before + 1 and hits[-1][0] == "origin", url
                    continue
                assert r.status == status, (url, r.status, await r.text())
                assert fetches(fe) == before, f"{url} was fetched"
            assert all(name == "origin" for name, _ in hits) and len(hits) == 1
            assert resolver.asked == []  # nothing was even resolved

    run(main())


def test_redirect_to_a_private_address_is_not_followed(monkeypatch):
    async def main():
        async with stack(monkeypatch) as (client, fe, origin, private, hits, resolver):
            for to in (f"{private}/secret", "http://169.254.169.254/latest/meta-data/"):
                r = await client.get("/distill", params={"url": f"{origin}/redirect?to={to}"})
                assert r.status == 502 and "redirects are not followed" in await r.text()
            assert [name for name, _ in hits] == ["origin", "origin"]

    run(main())


def test_host_name_resolving_to_a_private_address_is_refused(monkeypatch):
    # DNS rebinding / a name pointing at an internal address: the allowed origin is a name
    # the (fake) DNS resolves to loopback, where the test's origin listens.
    async def main():
        table = {"images.example": ["127.0.0.1"]}
        async with stack(monkeypatch, origin_host="images.example", table=table) as (client, fe, origin, _, hits, res):
            r = await client.get("/distill", params={"url": f"{origin}/a.jpg"})
            assert r.status == 403 and "not a public address" in await r.text()
            assert hits == [] and res.asked == ["images.example"]
            assert fe.statistics()["frontend"]["forbidden"] == 1

    run(main())


def test_private_origins_allowed_when_configured(monkeypatch):
    async def main():
        table = {"images.example": ["127.0.0.1"]}
        async with stack(monkeypatch, origin_host="images.example", table=table, private_origins=True) as (
                client, fe, origin, _, hits, res):  # fmt: skip
            await client.get("/distill", params={"url": f"{origin}/a.jpg"})
            assert [name for name, _ in hits] == ["origin"]

    run(main())


def test_oversized_requests(monkeypatch):
    async def main():
        async with stack(monkeypatch) as (client, fe, origin, private, hits, resolver):
            r = await client.get("/distill", params={"url": f"{origin}/a.jpg", "pad": "x" * 2000})
            assert r.status == 414
            r = await client.get("/distill", params={"url": f"{origin}/" + "a" * 5000})
            assert r.status == 414
            r = await client.get("/distill", params={"url": f"{origin}/a.jpg"}, headers={"X-User": "u" * (MAX_USER_LEN + 1)})
            assert r.status == 400
            r = await client.get("/sheet", params=[("url", f"{origin}/{i}.jpg") for i in range(40)])
            assert r.status in (400, 414)
            r = await client.get("/distill", params={"url": f"{origin}/a.jpg"}, headers={"X-Big": "h" * 20000})
            assert r.status in (400, 431)  # aiohttp's header limit
            r = await client.get("/distill", params={"url": f"{origin}/a.jpg", "w": "9" * 400})
            assert r.status == 400
            assert hits == []
            assert (await client.get("/health")).status == 200

    run(main())


async def raw_request(client, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(4096), 10)
    finally:
        writer.close()
        await writer.wait_closed()


MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"GET /distill?url=%ZZ%00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /distill?url=http://127.0.0.1:1/\x00x HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /distill HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /distill HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    b"GET /distill HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /distill?url=\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /distill HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
]


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(monkeypatch):
    async def main():
        async with stack(monkeypatch) as (client, fe, origin, private, hits, resolver):
            for data in MALFORMED:
                answer = await raw_request(client, data)
                status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else None
                assert status is None or 400 <= status < 500, (data[:60], answer[:120])
            assert hits == []
            assert (await client.get("/health")).status == 200

    run(main())
