"""The only module that imports a fast-path twin.

``BUS_NO_EXTENSIONS=1`` selects the pure-Python twin; otherwise the compiled
``core._fastpath`` is required, and a missing build is an ``ImportError``, not
a silent fallback (a test asserts which one is live).  Tests reach both twins
through the ``...C`` / ``...Py`` aliases.
"""

from __future__ import annotations

import os

from core import _fastpath_py

__all__ = [
    "IMPLEMENTATION",
    "HEADER_SIZE",
    "BROADCAST_ID",
    "LINK_UP",
    "LINK_LOCAL",
    "LINK_DROP",
    "LINK_BROADCAST",
    "Header",
    "FrameCodec",
    "RoutingTable",
    "Forwarder",
    "Aggregator",
    "LoadTable",
    "Credits",
    "drain",
    "events",
    "send_nowait",
    "relay",
    "twins",
]

NO_EXTENSIONS = bool(os.environ.get("BUS_NO_EXTENSIONS"))

if NO_EXTENSIONS:
    _impl = _fastpath_py
    _compiled = None
    IMPLEMENTATION = "python"
else:
    try:
        from core import _fastpath as _compiled
    except ImportError as e:  # pragma: no cover - exercised only on a broken build
        raise ImportError(
            "core._fastpath is not built; run `make test` (or `pip install -e .`) to "
            "compile it, or set BUS_NO_EXTENSIONS=1 to use the pure-Python twin"
        ) from e
    _impl = _compiled
    IMPLEMENTATION = "cython"

HEADER_SIZE = _impl.HEADER_SIZE
BROADCAST_ID = _impl.BROADCAST_ID
LINK_UP = _impl.LINK_UP
LINK_LOCAL = _impl.LINK_LOCAL
LINK_DROP = _impl.LINK_DROP
LINK_BROADCAST = _impl.LINK_BROADCAST

Header = _impl.Header
FrameCodec = _impl.FrameCodec
RoutingTable = _impl.RoutingTable
Forwarder = _impl.Forwarder
Aggregator = _impl.Aggregator
LoadTable = _impl.LoadTable
Credits = _impl.Credits
drain = _impl.drain
events = _impl.events
send_nowait = _impl.send_nowait
relay = _impl.relay

FrameCodecPy = _fastpath_py.FrameCodec
RoutingTablePy = _fastpath_py.RoutingTable
ForwarderPy = _fastpath_py.Forwarder
AggregatorPy = _fastpath_py.Aggregator
LoadTablePy = _fastpath_py.LoadTable
CreditsPy = _fastpath_py.Credits

if _compiled is not None:
    FrameCodecC = _compiled.FrameCodec
    RoutingTableC = _compiled.RoutingTable
    ForwarderC = _compiled.Forwarder
    AggregatorC = _compiled.Aggregator
    LoadTableC = _compiled.LoadTable
    CreditsC = _compiled.Credits


def twins() -> dict:
    """``{"python": module, "cython": module}`` for the twins available here."""
    out = {"python": _fastpath_py}
    if _compiled is not None:
        out["cython"] = _compiled
    return out
