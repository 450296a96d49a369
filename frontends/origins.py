"""Where a front end may fetch originals from, and the fetch itself (SSRF guards).

* :func:`origin_of` names a URL's origin (``scheme://host:port``, the port made
  explicit): the front end fetches only from origins its operator listed.
* :class:`PublicResolver` wraps aiohttp's resolver so that an origin given by
  host name is fetched only from the public addresses it resolves to: a name
  resolving to a private, loopback, link-local or otherwise non-global address
  (DNS rebinding, a cloud metadata address) is refused, unless it is
  ``localhost`` or the front end runs with ``private_origins``.  IP literals
  never reach a resolver: the origin list named them.
* :func:`fetch` gets one original: no redirects followed, at most ``limit``
  bytes (checked against Content-Length and again while reading), every
  failure an :class:`OriginError` carrying the HTTP status to answer with.

Used by :mod:`frontends.server`; tested in tests/hostile/test_frontend_http.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

__all__ = ["Original", "OriginError", "PrivateAddress", "PublicResolver", "default_resolver", "fetch", "is_public",
           "origin_of"]  # fmt: skip


def origin_of(url: str | yarl.URL) -> str:
    """``scheme://host:port`` of an http(s) URL (port made explicit); ValueError otherwise."""
    u = yarl.URL(url) if isinstance(url, str) else url
    if u.scheme not in ("http", "https") or not u.host:
        raise ValueError(f"{str(url)!r} is not an absolute http or https URL")
    return f"{u.scheme}://{u.host.lower()}:{u.port}"


def is_public(address: str) -> bool:
    """Whether an IP address is a global unicast one (not private, loopback, link-local, reserved...)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback, whatever its notation
    return ip.is_global and not ip.is_multicast


class PrivateAddress(OSError):
    """An origin host name that resolves only to addresses the front end must not fetch from."""


def default_resolver() -> AbstractResolver:
    return aiohttp.DefaultResolver()


class PublicResolver(AbstractResolver):
    """Resolves origin host names to their public addresses only (SSRF through DNS).

    ``localhost`` (and ``*.localhost``) stay allowed: an operator who lists it
    asked for loopback.  IP literals never get here: aiohttp connects to
    them directly, and the origin list already named them.
    """

    def __init__(self, inner: AbstractResolver, allow_private: bool):
        self._inner = inner
        self._allow_private = allow_private
        self.refused = 0

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        name = host.lower().rstrip(".")
        if self._allow_private or name == "localhost" or name.endswith(".localhost"):
            return results
        public = [r for r in results if is_public(r["host"])]
        if not public:
            self.refused += 1
            raise PrivateAddress(f"{host} resolves to {', '.join(sorted({r['host'] for r in results}))}, "
                                 "which is not a public address")  # fmt: skip
        return public

    async def close(self) -> None:
        await self._inner.close()


class OriginError(Exception):
    """An origin problem, turned into a fresh HTTP answer (``status``, ``text``) by each request that waited on it."""

    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass(frozen=True)
class Original:
    data: bytes
    content_type: str


async def fetch(session: aiohttp.ClientSession, url: str, *, limit: int, timeout: float) -> Original:
    """The bytes of ``url`` from its origin through ``session`` (whose own timeout is ``timeout``
    seconds); raises :class:`OriginError` (403 for a private address, 404, 413 over ``limit``
    bytes, 502 for anything else the origin did, 504 on timeout)."""
    try:
        async with session.get(url, allow_redirects=False) as resp:
            if resp.status == 404:
                raise OriginError(404, f"the origin has no {url} (404)\n")
            if resp.status != 200:
                raise OriginError(502, f"the origin answered {resp.status} for {url} (redirects are not followed)\n")
            if resp.content_length is not None and resp.content_length > limit:
                raise OriginError(413, f"the original {url} is {resp.content_length} bytes; the limit is {limit}\n")
            buf = bytearray()
            async for chunk in resp.content.iter_chunked(1 << 16):
                buf += chunk
                if len(buf) > limit:
                    raise OriginError(413, f"the original {url} is over the limit of {limit} bytes\n")
            ctype = resp.headers.get("Content-Type", "application/octet-stream")
    except asyncio.TimeoutError:
        raise OriginError(504, f"the origin did not send {url} within {timeout:g}s\n") from None
    except aiohttp.ClientConnectorError as e:
        if isinstance(e.os_error, PrivateAddress):
            raise OriginError(403, f"will not fetch {url}: {e.os_error}\n") from None
        raise OriginError(502, f"cannot fetch {url}: {e}\n") from None
    except aiohttp.ClientError as e:
        raise OriginError(502, f"cannot fetch {url}: {e}\n") from None
    return Original(bytes(buf), ctype)
